-- The rows written before 011 have no positions: recompute the table from events (015).
-- Run migrations with the projector stopped, as `keel project` does by applying them first.
TRUNCATE TABLE tenant_hourly
