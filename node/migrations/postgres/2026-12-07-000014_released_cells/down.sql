DROP TABLE analysis_bounds;
DROP INDEX released_tables_once;
DROP TABLE released_tables;
DROP INDEX released_cells_once;
DROP INDEX released_cells_by_size;
DROP TABLE released_cells;
