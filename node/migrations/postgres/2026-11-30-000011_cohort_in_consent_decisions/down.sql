DELETE FROM consent_eligibility;
DELETE FROM consent_contexts;
DROP INDEX consent_eligibility_covering;
ALTER TABLE consent_eligibility DROP COLUMN print;
ALTER TABLE consent_eligibility DROP COLUMN birth_ymd;
ALTER TABLE consent_eligibility DROP COLUMN gender;
CREATE UNIQUE INDEX consent_eligibility_covering
    ON consent_eligibility (context, patient_id) INCLUDE (sensitive_mask);
