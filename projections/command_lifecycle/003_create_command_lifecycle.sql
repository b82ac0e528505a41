-- One row per command: submitted -> decided -> approval requested -> approved/rejected -> executed,
-- with the time each step took. A plain view over commands and events, so it is exact at
-- every moment (min/any are unaffected by a row projected twice) and never needs a rebuild.
-- Approval events name their command in the payload; every other event by causation_id.
CREATE VIEW IF NOT EXISTS command_lifecycle AS
SELECT
    tenant_id,
    command_id,
    coalesce(nullIf(anyIf(type, src = 'command'), ''), nullIf(anyIf(JSONExtractString(payload, 'command_type'), type IN ('CommandRejected', 'ApprovalRequested')), '')) AS command_type,
    nullIf(anyIf(aggregate_id, src = 'command'), '') AS aggregate_id,
    nullIf(anyIf(actor_kind, src = 'command'), '') AS actor_kind,
    nullIf(anyIf(actor_id, src = 'command'), '') AS actor_id,
    minIfOrNull(occurred_at, src = 'command') AS submitted_at,
    minIfOrNull(occurred_at, src = 'event' AND type NOT IN ('ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired')) AS decided_at,
    minIfOrNull(occurred_at, type = 'ApprovalRequested') AS approval_requested_at,
    minIfOrNull(occurred_at, type = 'ApprovalGranted') AS approved_at,
    minIfOrNull(occurred_at, type IN ('CommandRejected', 'ApprovalRejected', 'ApprovalExpired')) AS rejected_at,
    minIfOrNull(occurred_at, src = 'event' AND type NOT IN ('CommandRejected', 'ApprovalRequested', 'ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired')) AS executed_at,
    nullIf(anyIf(JSONExtractString(payload, 'code'), type = 'CommandRejected'), '') AS rejection_code,
    multiIf(executed_at IS NOT NULL, 'executed', rejected_at IS NOT NULL, 'rejected', approved_at IS NOT NULL, 'approved',
            approval_requested_at IS NOT NULL, 'awaiting_approval', decided_at IS NOT NULL, 'decided', 'submitted') AS status,
    dateDiff('millisecond', submitted_at, decided_at) AS decision_ms,
    dateDiff('millisecond', approval_requested_at, coalesce(approved_at, rejected_at)) AS approval_wait_ms,
    dateDiff('millisecond', submitted_at, executed_at) AS submit_to_execute_ms
FROM
(
    SELECT tenant_id, event_id AS command_id, 'command' AS src, type, aggregate_id, actor_kind, actor_id, occurred_at, payload
    FROM commands
    UNION ALL
    SELECT tenant_id,
           if(type IN ('ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired'), toUUIDOrNull(JSONExtractString(payload, 'command_id')), causation_id) AS command_id,
           'event' AS src, type, aggregate_id, actor_kind, actor_id, occurred_at, payload
    FROM events
)
WHERE command_id IS NOT NULL
GROUP BY tenant_id, command_id
