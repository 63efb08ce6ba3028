-- What each privacy charge paid for: the digest of the query or training
-- spec. A noised training's rounds are charged one by one, each the growth
-- of the training's stated epsilon, so the node counts the rounds it has
-- already charged for that training.
ALTER TABLE privacy_charges ADD COLUMN request_sha256 TEXT NOT NULL DEFAULT '';
CREATE INDEX privacy_charges_request ON privacy_charges (organisation, study_id, request_sha256);
