-- One row per approval request: the command, the rule that asked for it, who decided and how
-- long it took. A plain view over events (exact, no rebuild); the command is named in the payload.
CREATE VIEW IF NOT EXISTS approvals AS
SELECT
    tenant_id,
    toUUIDOrNull(JSONExtractString(payload, 'command_id')) AS command_id,
    any(aggregate_id) AS aggregate_id,
    nullIf(anyIf(JSONExtractString(payload, 'command_type'), type = 'ApprovalRequested'), '') AS command_type,
    nullIf(anyIf(JSONExtractString(payload, 'policy_rule'), type = 'ApprovalRequested'), '') AS policy_rule,
    nullIf(anyIf(JSONExtractString(payload, 'policy_version'), type = 'ApprovalRequested'), '') AS policy_version,
    nullIf(anyIf(actor_id, type = 'ApprovalRequested'), '') AS requested_by,
    minIfOrNull(occurred_at, type = 'ApprovalRequested') AS requested_at,
    nullIf(anyIf(JSONExtractString(payload, 'approver'), type IN ('ApprovalGranted', 'ApprovalRejected')), '') AS approver,
    minIfOrNull(occurred_at, type IN ('ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired')) AS decided_at,
    multiIf(countIf(type = 'ApprovalGranted') > 0, 'approved', countIf(type = 'ApprovalRejected') > 0, 'rejected',
            countIf(type = 'ApprovalExpired') > 0, 'expired', 'pending') AS outcome,
    nullIf(anyIf(JSONExtractString(payload, 'reason'), type = 'ApprovalRejected'), '') AS rejection_reason,
    dateDiff('millisecond', requested_at, decided_at) AS time_to_decision_ms
FROM events
WHERE type IN ('ApprovalRequested', 'ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired')
GROUP BY tenant_id, command_id
