-- Issue 8: the audit log becomes a hash chain with signed checkpoints.
-- Rows written before this migration get their links when the store opens.
ALTER TABLE audit_log ADD COLUMN source TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN requester TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN requester_org TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN peer TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN result_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN epsilon REAL NOT NULL DEFAULT 0;
ALTER TABLE audit_log ADD COLUMN prev_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN hash TEXT NOT NULL DEFAULT '';

-- The keeper's signature over the chain hash at one entry. Checkpoints are
-- never deleted: after expiry the last one before the first kept entry
-- anchors the chain.
CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY NOT NULL,
    hash TEXT NOT NULL,
    at TEXT NOT NULL,
    token TEXT NOT NULL
);
