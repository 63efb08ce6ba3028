ALTER TABLE patients DROP COLUMN link_token;
