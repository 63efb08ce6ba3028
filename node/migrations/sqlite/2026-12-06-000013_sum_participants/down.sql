DROP TABLE sum_participants;
