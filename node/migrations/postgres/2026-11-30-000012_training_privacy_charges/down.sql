DROP INDEX privacy_charges_request;
ALTER TABLE privacy_charges DROP COLUMN request_sha256;
