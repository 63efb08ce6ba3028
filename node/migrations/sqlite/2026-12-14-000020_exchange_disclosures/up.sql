-- Issue 42: every disclosure of a resident's own records through the
-- exchange, for the resident's history of who received what and when.
CREATE TABLE exchange_disclosures (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    patient_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    recipient TEXT NOT NULL,
    purpose TEXT NOT NULL,
    scope TEXT NOT NULL,
    disclosed_at TEXT NOT NULL,
    resources BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX exchange_disclosures_by_patient ON exchange_disclosures (patient_id);
