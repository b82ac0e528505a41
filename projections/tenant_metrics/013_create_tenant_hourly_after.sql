-- What tenant_hourly_mv would have written for the events of one topic partition after one
-- offset: the projector inserts it when tenant_hourly is behind events (a crash between the
-- two parts of an INSERT). Same SELECT as the materialized view, on a slice of events.
CREATE VIEW IF NOT EXISTS tenant_hourly_after AS
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
FROM
(
    SELECT tenant_id, occurred_at, type, payload, _topic, _partition, _offset
    FROM events
    WHERE _topic = {topic:String} AND _partition = {partition:UInt32} AND _offset > {after:Int64}
)
GROUP BY tenant_id, hour, type, currency, _topic, _partition
