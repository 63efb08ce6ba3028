DELETE FROM view_values;
DELETE FROM view_materialisations;
ALTER TABLE view_values DROP COLUMN resource_id;
