-- Issue 38, part 9: other keepers' signed audit heads, kept outside their
-- database, so that deleting or rewriting their log's tail together with
-- the checkpoints above it is caught. The coordinator keeps each node's;
-- each node keeps the coordinator's. Stored as received; the signature is
-- checked when a log is verified.
CREATE TABLE audit_witnessed (
    keeper TEXT NOT NULL,       -- the token's iss: a node id or `coordinator`
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    iat BIGINT NOT NULL,        -- the signed time, unix seconds
    token TEXT NOT NULL,        -- the checkpoint JWS as received
    received_at TEXT NOT NULL,  -- the witness's clock, RFC 3339
    PRIMARY KEY (keeper, seq)
);
