ALTER TABLE training_lineage DROP COLUMN rows_sha256;
ALTER TABLE training_lineage DROP COLUMN seed_secret;
