DROP TABLE released_cohorts;
