-- Variables defined by SQL on FHIR ViewDefinitions (issue 6). A view is
-- evaluated over the stored resources once per data generation and its
-- (patient, value) rows kept here, so queries read an index, never JSON.
INSERT INTO node_state (key, value) VALUES ('data_generation', 0);

CREATE TABLE view_materialisations (
    view_sha256 TEXT PRIMARY KEY NOT NULL,
    generation BIGINT NOT NULL,
    row_count BIGINT NOT NULL,
    built_at TEXT NOT NULL
);

CREATE TABLE view_values (
    view_sha256 TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL
);
CREATE INDEX view_values_by_patient ON view_values (view_sha256, patient_id, value);
