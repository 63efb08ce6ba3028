-- Federated training runs: the run's whole state as JSON (aggregates only:
-- the global model, its standardisation, per-round pooled metrics), saved
-- after every completed round so a restarted coordinator resumes there.
CREATE TABLE training_runs (
    id TEXT PRIMARY KEY NOT NULL,
    study_id TEXT NOT NULL REFERENCES studies (id),
    training TEXT NOT NULL,
    -- running, completed or failed.
    status TEXT NOT NULL,
    record_json TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
