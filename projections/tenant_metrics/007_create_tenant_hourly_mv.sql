-- Every insert into events also lands here, aggregated; `keel projections rebuild tenant_hourly`
-- recomputes the table from events if it ever drifts (e.g. a crash between the two parts).
CREATE MATERIALIZED VIEW IF NOT EXISTS tenant_hourly_mv TO tenant_hourly AS
SELECT
    tenant_id,
    toStartOfHour(occurred_at) AS hour,
    type,
    JSONExtractString(payload, 'currency') AS currency,
    countState() AS events,
    sumState(JSONExtractInt(payload, 'amount_cents')) AS amount_cents
FROM events
GROUP BY tenant_id, hour, type, currency
