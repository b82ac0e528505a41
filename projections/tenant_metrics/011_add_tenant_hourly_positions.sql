-- tenant_hourly stores, per source topic and partition, the highest Kafka offset it has counted,
-- in the same block as the counts. ClickHouse writes an INSERT into events before its
-- materialized views, not atomically: after a crash between the two the projector compares
-- these positions with those of events and counts what is missing (keel.projector.aggregates).
ALTER TABLE tenant_hourly
    ADD COLUMN IF NOT EXISTS _topic LowCardinality(String),
    ADD COLUMN IF NOT EXISTS _partition UInt32,
    ADD COLUMN IF NOT EXISTS _offset SimpleAggregateFunction(max, UInt64),
    MODIFY ORDER BY (tenant_id, hour, type, currency, _topic, _partition)
