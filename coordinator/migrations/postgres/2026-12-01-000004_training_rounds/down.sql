DROP TABLE training_rounds;
