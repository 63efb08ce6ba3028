-- Issue 8: the coordinator keeps the same hash-chained audit log as the
-- nodes (one format, one verifier), including one entry per request sent to
-- each node, which reconciliation compares with the nodes' logs. The old
-- trail's rows move over and get their links when the store opens.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY NOT NULL,
    at TEXT NOT NULL,
    caller TEXT NOT NULL,
    caller_role TEXT NOT NULL,
    caller_org TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    requester TEXT NOT NULL DEFAULT '',
    requester_org TEXT NOT NULL DEFAULT '',
    study_id TEXT NOT NULL DEFAULT '',
    capability_id TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    purpose TEXT NOT NULL DEFAULT '',
    policy_reasons TEXT NOT NULL DEFAULT '',
    query_sha256 TEXT NOT NULL DEFAULT '',
    result_sha256 TEXT NOT NULL DEFAULT '',
    result_cells BIGINT NOT NULL DEFAULT 0,
    consent_excluded BIGINT NOT NULL DEFAULT 0,
    epsilon DOUBLE PRECISION NOT NULL DEFAULT 0,
    prev_hash TEXT NOT NULL DEFAULT '',
    hash TEXT NOT NULL DEFAULT ''
);
INSERT INTO audit_log (seq, at, caller, caller_role, action, study_id, decision, reason)
    SELECT seq, at, actor, role, action, study_id, outcome, detail FROM audit_trail;
DROP TABLE audit_trail;

CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL,
    at TEXT NOT NULL,
    token TEXT NOT NULL
);
