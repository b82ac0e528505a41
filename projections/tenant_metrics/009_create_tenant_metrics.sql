-- Events per tenant, hour and type, with the money they moved (refunds, reversals).
CREATE VIEW IF NOT EXISTS tenant_metrics AS
SELECT tenant_id, hour, type, currency, countMerge(events) AS events, sumMerge(amount_cents) AS amount_cents
FROM tenant_hourly
GROUP BY tenant_id, hour, type, currency
