DROP TABLE training_lineage;
