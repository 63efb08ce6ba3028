DROP INDEX medication_codes_by_patient;
DROP TABLE privacy_charges;
DROP TABLE privacy_budget;
