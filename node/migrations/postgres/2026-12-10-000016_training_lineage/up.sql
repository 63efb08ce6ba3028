-- Issue 38, part 3 (learn/LINEAGE.md 2.5): where each training run stands
-- at this node. Nodes compute every model of a run themselves, from the
-- approved training and the members' signed inputs of each round; this is
-- the last round applied, the head of the chain over the run's exact sums,
-- and the model that follows, with the step before (a coordinator that
-- crashed may redo the last round). Rows are written compare-and-set on
-- `round`.
CREATE TABLE training_lineage (
    study_id TEXT NOT NULL,
    training_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,          -- last sum applied: -1 genesis, 0 moments, r
    head TEXT NOT NULL,              -- hex SHA-256
    model_json TEXT NOT NULL,        -- ghx.model/v1 after `round`; empty at genesis
    previous_round INTEGER,
    previous_head TEXT,
    previous_model_json TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (study_id, training_sha256, run_id)
);
