DROP TABLE audit_log;
DROP TABLE consents;
DROP TABLE observation_values;
DROP TABLE condition_codes;
DROP TABLE patients;
DROP TABLE resources;
