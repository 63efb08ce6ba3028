-- Issue 38, part 3 (learn/LINEAGE.md): what a training run is bound to at
-- this node once its first round is computed. `seed_secret` (hex, drawn
-- here, never sent) keys every round's randomness, so a round redone from
-- the same step gives the same contribution, across restarts too;
-- `rows_sha256` is the digest of the training and held-out rows the run
-- computes on, so a round or evaluation over other rows (an import or a
-- consent change since) is refused rather than released beside the
-- first: their difference would be the changed patients' data.
ALTER TABLE training_lineage ADD COLUMN seed_secret TEXT;
ALTER TABLE training_lineage ADD COLUMN rows_sha256 TEXT;
