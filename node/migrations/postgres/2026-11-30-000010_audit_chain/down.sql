DROP TABLE audit_checkpoints;
ALTER TABLE audit_log DROP COLUMN hash;
ALTER TABLE audit_log DROP COLUMN prev_hash;
ALTER TABLE audit_log DROP COLUMN epsilon;
ALTER TABLE audit_log DROP COLUMN result_sha256;
ALTER TABLE audit_log DROP COLUMN peer;
ALTER TABLE audit_log DROP COLUMN requester_org;
ALTER TABLE audit_log DROP COLUMN requester;
ALTER TABLE audit_log DROP COLUMN source;
