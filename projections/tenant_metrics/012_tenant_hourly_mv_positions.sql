-- The materialized view now also writes the positions it counted (one atomic change of its query).
ALTER TABLE tenant_hourly_mv MODIFY QUERY
SELECT
    tenant_id,
    toStartOfHour(occurred_at) AS hour,
    type,
    JSONExtractString(payload, 'currency') AS currency,
    countState() AS events,
    sumState(JSONExtractInt(payload, 'amount_cents')) AS amount_cents,
    _topic,
    _partition,
    max(_offset) AS _offset
FROM events
GROUP BY tenant_id, hour, type, currency, _topic, _partition
