-- Cohorts whose aggregates were released, per requesting organisation, so
-- that a query whose cohort differs from an earlier one by only a few
-- patients can be refused (differencing). Members are 64-bit hashes of
-- patient ids, sorted; they never leave the node.
CREATE TABLE released_cohorts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    organisation TEXT NOT NULL,
    study_id TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    released_at TEXT NOT NULL,
    size BIGINT NOT NULL,
    members BLOB NOT NULL
);
CREATE INDEX released_cohorts_by_size ON released_cohorts (organisation, size);
