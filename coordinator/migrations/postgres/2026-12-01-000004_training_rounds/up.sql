-- A training run's completed rounds, one row each, so saving a run after a
-- round writes that round rather than rewriting every round before it (the
-- run's own row keeps the rest of its state). A run saved before this
-- table existed keeps its rounds in its record until it is next saved.
CREATE TABLE training_rounds (
    run_id TEXT NOT NULL REFERENCES training_runs (id),
    round BIGINT NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
