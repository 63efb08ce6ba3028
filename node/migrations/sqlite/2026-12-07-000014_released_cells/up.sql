-- The sets of patients behind every number an exact table released to an
-- organisation (released cells, a rate's patients with and without the
-- event, a summary's with and without a value and with their values, the
-- table's line totals and its cohort), so that a later release whose set
-- differs from one of them by 1..k-1 patients is refused: a cell is a set
-- of patients, whatever cohort or analysis made it. Members are 64-bit
-- hashes, sorted; they never leave the node.
CREATE TABLE released_cells (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    organisation TEXT NOT NULL,
    study_id TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    released_at TEXT NOT NULL,
    size BIGINT NOT NULL,
    members BLOB NOT NULL,
    print_sha256 TEXT NOT NULL,
    -- Whether the release gave the set's size exactly; a set kept only to
    -- compare with (a summary's patients without a value, a cohort) is
    -- never released again unchecked.
    exact BOOLEAN NOT NULL
);
CREATE INDEX released_cells_by_size ON released_cells (organisation, size);
CREATE UNIQUE INDEX released_cells_once
    ON released_cells (organisation, print_sha256, exact);

-- Each exact table's finest partition (its cells, a rate's split by the
-- event and a summary's by having a value, each with whether it was
-- released), so that a later set a few patients from a union of released
-- cells is refused too. Per part: a released flag byte, a 32-bit size and
-- the part's sorted 64-bit patient hashes.
CREATE TABLE released_tables (
    seq INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    organisation TEXT NOT NULL,
    study_id TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    released_at TEXT NOT NULL,
    parts BLOB NOT NULL,
    parts_sha256 TEXT NOT NULL
);
CREATE UNIQUE INDEX released_tables_once
    ON released_tables (organisation, parts_sha256);

-- The clip range of each variable's exact summaries and the bins of its
-- exact histograms, fixed per organisation by the first release: two clip
-- ranges of one variable give, by difference, what the patients between
-- them hold (the maximum, with one patient above the lower), and shifted
-- bins the patients at the edges.
CREATE TABLE analysis_bounds (
    organisation TEXT NOT NULL,
    variable TEXT NOT NULL,
    kind TEXT NOT NULL,
    bounds TEXT NOT NULL,
    study_id TEXT NOT NULL,
    fixed_at TEXT NOT NULL,
    PRIMARY KEY (organisation, variable, kind)
);
