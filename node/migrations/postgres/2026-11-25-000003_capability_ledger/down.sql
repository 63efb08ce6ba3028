DROP TABLE revoked_studies;
DROP TABLE capability_uses;
