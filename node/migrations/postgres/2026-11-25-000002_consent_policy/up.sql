-- Consent provisions and policy decisions (issue 4).

-- The normalised provision tree of each Consent (JSON, written by import);
-- empty for rows indexed before this migration, which hold only the root rule.
ALTER TABLE consents ADD COLUMN provision TEXT NOT NULL DEFAULT '';

-- Counters the node keeps about its own data.
CREATE TABLE node_state (
    key TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
-- Bumped by every import batch that changes a Patient or a Consent, so that
-- consent decisions computed before it are never used after it.
INSERT INTO node_state (key, value) VALUES ('consent_generation', 0);

-- Consent decisions for one request context (see node/src/consent/eligibility.rs).
CREATE TABLE consent_contexts (
    context TEXT PRIMARY KEY NOT NULL,
    generation BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    -- JSON: patients considered, included, and excluded by reason.
    summary TEXT NOT NULL
);
CREATE TABLE consent_eligibility (
    context TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    -- Bit mask of the sensitive categories this patient permits.
    sensitive_mask BIGINT NOT NULL,
    PRIMARY KEY (context, patient_id)
);

-- What policy and consent decided for each audited request.
ALTER TABLE audit_log ADD COLUMN purpose TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN policy_reasons TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_log ADD COLUMN consent_excluded BIGINT NOT NULL DEFAULT 0;
