-- Issue 41: a patient's linkage token, HMAC-SHA256 of their resident
-- registration number under the federation's link key, kept (never the
-- RRN) so pooled counts can count each patient once across hospitals.
ALTER TABLE patients ADD COLUMN link_token TEXT;
