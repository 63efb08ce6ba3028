-- The node's FHIR store (SQLite). Raw resources are kept verbatim in
-- `resources`; queries run only on the index tables below it.
CREATE TABLE resources (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id BIGINT NOT NULL,
    last_updated TEXT NOT NULL,
    patient_id TEXT,
    content TEXT NOT NULL,
    PRIMARY KEY (resource_type, id)
);

CREATE TABLE patients (
    id TEXT PRIMARY KEY NOT NULL,
    gender TEXT NOT NULL,
    -- Birth date as the integer YYYYMMDD, so age at a date is integer arithmetic.
    birth_ymd BIGINT
);

CREATE TABLE condition_codes (
    condition_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    system TEXT NOT NULL,
    code TEXT NOT NULL,
    PRIMARY KEY (condition_id, system, code)
);
CREATE INDEX condition_codes_by_code ON condition_codes (system, code, patient_id);

CREATE TABLE observation_values (
    observation_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    system TEXT NOT NULL,
    code TEXT NOT NULL,
    value DOUBLE PRECISION,
    unit TEXT,
    effective_at BIGINT,
    PRIMARY KEY (observation_id, system, code)
);
CREATE INDEX observation_values_by_code ON observation_values (system, code, patient_id);

CREATE TABLE consents (
    consent_id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL,
    status TEXT NOT NULL,
    scope TEXT NOT NULL,
    decision TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX consents_by_patient ON consents (patient_id, scope, recorded_at);

CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    at TEXT NOT NULL,
    caller TEXT NOT NULL,
    caller_role TEXT NOT NULL,
    caller_org TEXT NOT NULL,
    study_id TEXT NOT NULL,
    capability_id TEXT NOT NULL,
    action TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    result_cells BIGINT NOT NULL
);
