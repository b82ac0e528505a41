-- tenant_hourly from every projected event, with positions (see 014).
INSERT INTO tenant_hourly
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
