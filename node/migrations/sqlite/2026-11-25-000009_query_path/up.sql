-- The per-query path.
--
-- A released cohort is kept once per organisation: the same cohort asked
-- again adds nothing a differencing check needs, and repeated queries would
-- otherwise make every check read more prints. Prints recorded before this
-- migration have no digest ('') and stay as they are.
ALTER TABLE released_cohorts ADD COLUMN print_sha256 TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX released_cohorts_by_print
    ON released_cohorts (organisation, print_sha256) WHERE print_sha256 <> '';

-- Every candidate patient of a query is looked up in patients and in
-- consent_eligibility by text key. As WITHOUT ROWID tables each lookup is
-- one B-tree search instead of two (key index, then the row).
CREATE TABLE patients_by_id (
    id TEXT PRIMARY KEY NOT NULL,
    gender TEXT NOT NULL,
    birth_ymd BIGINT
) WITHOUT ROWID;
INSERT INTO patients_by_id (id, gender, birth_ymd) SELECT id, gender, birth_ymd FROM patients;
DROP TABLE patients;
ALTER TABLE patients_by_id RENAME TO patients;

CREATE TABLE consent_eligibility_by_patient (
    context TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    sensitive_mask BIGINT NOT NULL,
    PRIMARY KEY (context, patient_id)
) WITHOUT ROWID;
INSERT INTO consent_eligibility_by_patient (context, patient_id, sensitive_mask)
    SELECT context, patient_id, sensitive_mask FROM consent_eligibility;
DROP TABLE consent_eligibility;
ALTER TABLE consent_eligibility_by_patient RENAME TO consent_eligibility;
