ALTER TABLE audit_log DROP COLUMN consent_excluded;
ALTER TABLE audit_log DROP COLUMN policy_reasons;
ALTER TABLE audit_log DROP COLUMN purpose;
DROP TABLE consent_eligibility;
DROP TABLE consent_contexts;
DROP TABLE node_state;
ALTER TABLE consents DROP COLUMN provision;
