-- Differential-privacy budget ledger (issue 6). One row per requesting
-- organisation and study, and one per organisation with study_id '' for its
-- total over all studies. A charge is a conditional UPDATE of both rows in
-- one transaction, so concurrent queries can never overspend.
CREATE TABLE privacy_budget (
    organisation TEXT NOT NULL,
    study_id TEXT NOT NULL,
    epsilon_spent DOUBLE PRECISION NOT NULL,
    delta_spent DOUBLE PRECISION NOT NULL,
    queries BIGINT NOT NULL,
    PRIMARY KEY (organisation, study_id)
);

-- Every charge, by the capability that paid it.
CREATE TABLE privacy_charges (
    capability_id TEXT PRIMARY KEY NOT NULL,
    organisation TEXT NOT NULL,
    study_id TEXT NOT NULL,
    epsilon DOUBLE PRECISION NOT NULL,
    delta DOUBLE PRECISION NOT NULL,
    charged_at TEXT NOT NULL
);

-- Per-patient tests of "was prescribed this code" lead with the patient.
CREATE INDEX medication_codes_by_patient ON medication_codes (patient_id, system, code);
