DROP TABLE audit_trail;
DROP TABLE results;
DROP TABLE votes;
DROP TABLE studies;
