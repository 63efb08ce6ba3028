-- The set of nodes each study's secure-aggregation sums were taken over at
-- this node: bound at its first contribution, so that no later round of the
-- study sums over another set (two sums over sets that differ isolate what
-- the difference contributed). Node ids, sorted, comma-separated.
CREATE TABLE sum_participants (
    study_id TEXT PRIMARY KEY,
    participants TEXT NOT NULL,
    bound_at TEXT NOT NULL
);
