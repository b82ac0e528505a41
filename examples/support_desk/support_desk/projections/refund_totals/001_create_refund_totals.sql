-- Refund totals per tenant and currency: issued, reversed and net, in cents.
CREATE VIEW IF NOT EXISTS refund_totals AS
SELECT
    tenant_id,
    currency,
    sumIf(events, type = 'RefundIssued') AS refunds,
    sumIf(amount_cents, type = 'RefundIssued') AS refunded_cents,
    sumIf(amount_cents, type = 'RefundReversed') AS reversed_cents,
    refunded_cents - reversed_cents AS net_refunded_cents
FROM tenant_metrics
WHERE type IN ('RefundIssued', 'RefundReversed')
GROUP BY tenant_id, currency
