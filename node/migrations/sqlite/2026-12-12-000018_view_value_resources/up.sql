-- Each view row names the resource it came from, so a query reads an
-- observation's sensitive categories (from every coding of it, in
-- observation_values) before using its value (issue 38 (7)). Views built
-- before are built again: their rows name no resource.
DELETE FROM view_values;
DELETE FROM view_materialisations;
ALTER TABLE view_values ADD COLUMN resource_id TEXT NOT NULL DEFAULT '';
