CREATE TABLE consent_eligibility_rowid (
    context TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    sensitive_mask BIGINT NOT NULL,
    PRIMARY KEY (context, patient_id)
);
INSERT INTO consent_eligibility_rowid SELECT context, patient_id, sensitive_mask FROM consent_eligibility;
DROP TABLE consent_eligibility;
ALTER TABLE consent_eligibility_rowid RENAME TO consent_eligibility;

CREATE TABLE patients_rowid (
    id TEXT PRIMARY KEY NOT NULL,
    gender TEXT NOT NULL,
    birth_ymd BIGINT
);
INSERT INTO patients_rowid SELECT id, gender, birth_ymd FROM patients;
DROP TABLE patients;
ALTER TABLE patients_rowid RENAME TO patients;

DROP INDEX released_cohorts_by_print;
ALTER TABLE released_cohorts DROP COLUMN print_sha256;
