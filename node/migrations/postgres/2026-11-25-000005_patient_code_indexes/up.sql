-- Queries test "this patient has this code" once per patient in the
-- cohort; without an index leading with the patient, each test scanned every
-- row with the code (77 s instead of 43 ms for 100k patients).
CREATE INDEX condition_codes_by_patient ON condition_codes (patient_id, system, code);
CREATE INDEX observation_values_by_patient ON observation_values (patient_id, system, code, value);
