DROP INDEX patients_covering;
DROP INDEX consent_eligibility_covering;
DROP INDEX released_cohorts_by_print;
ALTER TABLE released_cohorts DROP COLUMN print_sha256;
