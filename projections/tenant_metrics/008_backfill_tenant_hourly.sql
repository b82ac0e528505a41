-- Events projected before the materialized view existed are aggregated once, here.
INSERT INTO tenant_hourly
SELECT
    tenant_id,
    toStartOfHour(occurred_at) AS hour,
    type,
    JSONExtractString(payload, 'currency') AS currency,
    countState() AS events,
    sumState(JSONExtractInt(payload, 'amount_cents')) AS amount_cents
FROM events
WHERE _projected_at < (SELECT min(applied_at) FROM _keel_migrations WHERE number = 7)
GROUP BY tenant_id, hour, type, currency
