-- Per tenant, actor and hour: actions taken, commands rejected, guardrail (breaker) trips.
-- Counts are uniqExact over event ids, so an event projected twice still counts once; a
-- BreakerTripped event counts against the agent it names, not the system actor that sent it.
CREATE VIEW IF NOT EXISTS agent_activity AS
SELECT
    tenant_id,
    if(type = 'BreakerTripped', 'agent', actor_kind) AS actor_kind,
    if(type = 'BreakerTripped', JSONExtractString(payload, 'agent_id'), actor_id) AS actor_id,
    toStartOfHour(occurred_at) AS hour,
    uniqExactIf(event_id, type NOT IN ('CommandRejected', 'BreakerTripped', 'BreakerReset', 'ApprovalRequested', 'ApprovalGranted', 'ApprovalRejected', 'ApprovalExpired')) AS actions,
    uniqExactIf(event_id, type = 'CommandRejected') AS rejections,
    uniqExactIf(event_id, type = 'BreakerTripped') AS guardrail_trips,
    uniqExactIf(event_id, type = 'ApprovalRequested') AS approvals_requested
FROM events
GROUP BY tenant_id, actor_kind, actor_id, hour
