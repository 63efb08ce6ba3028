-- The node's FHIR store (PostgreSQL). Current resources are kept verbatim in
-- `resources`, earlier versions and deletions in `resource_history`; queries
-- run only on the index tables derived from them.
CREATE TABLE resources (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id BIGINT NOT NULL,
    last_updated TEXT NOT NULL,
    -- SHA-256 of `content`: an unchanged re-import is recognised without
    -- comparing documents.
    content_sha256 TEXT NOT NULL,
    patient_id TEXT,
    content TEXT NOT NULL,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX resources_by_patient ON resources (patient_id);

-- Superseded versions; `content` is NULL for a deletion.
CREATE TABLE resource_history (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id BIGINT NOT NULL,
    last_updated TEXT NOT NULL,
    content TEXT,
    PRIMARY KEY (resource_type, id, version_id)
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
    -- KCD-8 and ICD-10 codes are stored without the dot (E11.9 -> E119).
    code TEXT NOT NULL,
    onset_at BIGINT,
    recorded_at BIGINT,
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

CREATE TABLE encounters (
    encounter_id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL,
    class_code TEXT NOT NULL,
    start_at BIGINT,
    end_at BIGINT
);
CREATE INDEX encounters_by_patient ON encounters (patient_id, start_at);

CREATE TABLE medication_codes (
    medication_request_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    system TEXT NOT NULL,
    code TEXT NOT NULL,
    authored_at BIGINT,
    PRIMARY KEY (medication_request_id, system, code)
);
CREATE INDEX medication_codes_by_code ON medication_codes (system, code, patient_id);

CREATE TABLE consents (
    consent_id TEXT PRIMARY KEY NOT NULL,
    patient_id TEXT NOT NULL,
    status TEXT NOT NULL,
    scope TEXT NOT NULL,
    decision TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX consents_by_patient ON consents (patient_id, scope, recorded_at);

-- Local code mappings applied when indexing, e.g. HIRA EDI lab codes to LOINC.
CREATE TABLE code_map (
    source_system TEXT NOT NULL,
    source_code TEXT NOT NULL,
    target_system TEXT NOT NULL,
    target_code TEXT NOT NULL,
    PRIMARY KEY (source_system, source_code, target_system)
);

-- How far the import of each NDJSON file got; written in the same
-- transaction as the batch it describes, so a resumed import neither skips
-- nor repeats a line.
CREATE TABLE import_checkpoints (
    source TEXT PRIMARY KEY NOT NULL,
    fingerprint TEXT NOT NULL,
    lines_committed BIGINT NOT NULL,
    finished BOOLEAN NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE audit_log (
    seq BIGSERIAL PRIMARY KEY,
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
