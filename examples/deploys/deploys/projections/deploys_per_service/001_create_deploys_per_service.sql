-- Per tenant and service: previews deployed, promotions, rollbacks, and where the rollout stands:
-- the release last promoted or rolled back (NULL before any promotion) and its share of the traffic.
CREATE VIEW IF NOT EXISTS deploys_per_service AS
SELECT
    tenant_id,
    aggregate_id AS service,
    countIf(type = 'PreviewDeployed') AS deploys,
    countIf(type = 'ReleasePromoted') AS promotions,
    countIf(type = 'ReleaseRolledBack') AS rollbacks,
    argMaxIf(JSONExtractString(payload, 'release'), version, type != 'PreviewDeployed') AS release,
    ifNull(argMaxIf(JSONExtractInt(payload, 'percent'), version, type != 'PreviewDeployed'), 0) AS percent,
    max(occurred_at) AS last_change_at
FROM events FINAL
WHERE type IN ('PreviewDeployed', 'ReleasePromoted', 'ReleaseRolledBack')
GROUP BY tenant_id, aggregate_id
