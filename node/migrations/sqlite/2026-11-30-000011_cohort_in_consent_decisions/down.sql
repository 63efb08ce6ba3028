DELETE FROM consent_eligibility;
DELETE FROM consent_contexts;
ALTER TABLE consent_eligibility DROP COLUMN print;
ALTER TABLE consent_eligibility DROP COLUMN birth_ymd;
ALTER TABLE consent_eligibility DROP COLUMN gender;
