-- Code prefixes (KCD-8 `E11%`) select a query's candidate patients. Under a
-- non-C collation PostgreSQL cannot use a default btree for LIKE 'prefix%';
-- text_pattern_ops can, whatever the database's collation.
CREATE INDEX condition_codes_by_code_prefix ON condition_codes (system, code text_pattern_ops, patient_id);
CREATE INDEX medication_codes_by_code_prefix ON medication_codes (system, code text_pattern_ops, patient_id);
