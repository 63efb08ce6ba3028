-- Capabilities a node has accepted, so none is accepted twice (replays),
-- and studies the coordinator has revoked (issue 5).
CREATE TABLE capability_uses (
    jti TEXT PRIMARY KEY NOT NULL,
    study_id TEXT NOT NULL,
    -- Unix seconds; rows past expiry can be pruned, as the token is refused anyway.
    expires_at BIGINT NOT NULL,
    used_at TEXT NOT NULL
);

CREATE TABLE revoked_studies (
    study_id TEXT PRIMARY KEY NOT NULL,
    revoked_at TEXT NOT NULL,
    reason TEXT NOT NULL
);
