-- The per-query path.
--
-- A released cohort is kept once per organisation: the same cohort asked
-- again adds nothing a differencing check needs, and repeated queries would
-- otherwise make every check read more prints. Prints recorded before this
-- migration have no digest ('') and stay as they are.
ALTER TABLE released_cohorts ADD COLUMN print_sha256 TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX released_cohorts_by_print
    ON released_cohorts (organisation, print_sha256) WHERE print_sha256 <> '';

-- Candidate patients' consent is checked by index only (SQLite gets the
-- same by making the table WITHOUT ROWID).
CREATE UNIQUE INDEX consent_eligibility_covering
    ON consent_eligibility (context, patient_id) INCLUDE (sensitive_mask);
CREATE UNIQUE INDEX patients_covering ON patients (id) INCLUDE (gender, birth_ymd);
