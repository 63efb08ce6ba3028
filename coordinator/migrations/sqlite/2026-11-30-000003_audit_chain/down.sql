CREATE TABLE audit_trail (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    action TEXT NOT NULL,
    study_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
INSERT INTO audit_trail (seq, at, actor, role, action, study_id, outcome, detail)
    SELECT seq, at, caller, caller_role, action, study_id, decision, reason FROM audit_log;
DROP TABLE audit_checkpoints;
DROP TABLE audit_log;
