DROP TABLE view_values;
DROP TABLE view_materialisations;
DELETE FROM node_state WHERE key = 'data_generation';
