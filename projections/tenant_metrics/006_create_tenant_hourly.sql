-- Pre-aggregated per tenant, hour, event type and currency: how many events, and the money they
-- moved (amount_cents of refunds and reversals). Fed by the tenant_hourly_mv materialized view;
-- query it through the tenant_metrics view, which merges the partial states. A batch the
-- events table drops as a retry (same insert_deduplication_token) is dropped here too.
CREATE TABLE IF NOT EXISTS tenant_hourly
(
    tenant_id LowCardinality(String),
    hour DateTime('UTC'),
    type LowCardinality(String),
    currency LowCardinality(String),
    events AggregateFunction(count),
    amount_cents AggregateFunction(sum, Int64)
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, hour, type, currency)
SETTINGS non_replicated_deduplication_window = 1000
