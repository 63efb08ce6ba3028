-- The coordinator's durable state: studies and their manifests, committee
-- votes, the latest result of each study query, and the audit trail.
CREATE TABLE studies (
    id TEXT PRIMARY KEY NOT NULL,
    -- The number in the id, so ids are issued in order.
    number BIGINT NOT NULL UNIQUE,
    -- Canonical manifest JSON, as capabilities bind it.
    manifest_json TEXT NOT NULL,
    -- submitted, approved, rejected or revoked.
    status TEXT NOT NULL,
    submitted_at TEXT NOT NULL,
    last_run TEXT
);

CREATE TABLE votes (
    study_id TEXT NOT NULL REFERENCES studies (id),
    position BIGINT NOT NULL,
    member TEXT NOT NULL,
    -- approve, reject or revoke.
    decision TEXT NOT NULL,
    note TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (study_id, position)
);

CREATE TABLE results (
    study_id TEXT NOT NULL REFERENCES studies (id),
    query TEXT NOT NULL,
    run_at TEXT NOT NULL,
    -- Released per-node results, failures and totals (JSON): aggregates only.
    result_json TEXT NOT NULL,
    PRIMARY KEY (study_id, query)
);

CREATE TABLE audit_trail (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    study_id TEXT NOT NULL,
    -- done or refused.
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
