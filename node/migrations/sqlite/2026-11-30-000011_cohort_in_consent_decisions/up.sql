-- A query's candidates are looked up once, in the consent decisions of its
-- context, instead of once there and once more in `patients`: the decisions
-- carry the demographics the engine filters and groups by. Import bumps the
-- consent generation whenever a Patient changes, so a context's copy is
-- never older than the Patient rows it was made from.
--
-- Contexts made before this migration lack the copy: they are dropped, and
-- the next query of each context evaluates it again.
DELETE FROM consent_eligibility;
DELETE FROM consent_contexts;
ALTER TABLE consent_eligibility ADD COLUMN gender TEXT NOT NULL DEFAULT '';
ALTER TABLE consent_eligibility ADD COLUMN birth_ymd BIGINT;
-- Each patient's cohort-print hash (differencing), so a query does not
-- hash the ids of its cohort.
ALTER TABLE consent_eligibility ADD COLUMN print BIGINT NOT NULL DEFAULT 0;
