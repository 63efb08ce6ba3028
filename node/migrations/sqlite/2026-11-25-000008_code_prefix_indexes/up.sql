-- Code prefixes select a query's candidate patients. SQLite uses the
-- existing (system, code, patient_id) indexes for LIKE 'prefix%' because
-- the node sets case_sensitive_like; nothing to add. (PostgreSQL needs
-- text_pattern_ops indexes; see its migration of the same name.)
SELECT 1;
