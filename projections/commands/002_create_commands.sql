-- Every command as submitted (event_id holds the command id), with its Kafka position; the
-- "submitted" step of the command lifecycle. Same shape and guarantees as the events table.
-- ReplacingMergeTree keyed by event id collapses a re-projected event (query with FINAL
-- for an exact view); the insert_deduplication_token of each batch, kept for the last
-- 1000 inserts, drops a retried batch before it is ever written.
CREATE TABLE IF NOT EXISTS commands
(
    tenant_id LowCardinality(String),
    aggregate_id String,
    version Nullable(UInt64),
    event_id UUID,
    type LowCardinality(String),
    schema_version UInt16,
    actor_kind LowCardinality(String),
    actor_id String,
    delegation String COMMENT 'JSON array of {actor, reason}, user -> agent -> tool',
    on_behalf_of Nullable(String),
    authority_role Nullable(String),
    authority_grant Nullable(String),
    authority_policy_rule Nullable(String),
    authority_policy_version Nullable(String),
    authority_approval_id Nullable(String),
    expected_version Nullable(UInt64),
    causation_id Nullable(UUID),
    correlation_id UUID,
    occurred_at DateTime64(6, 'UTC'),
    traceparent Nullable(String),
    payload String COMMENT 'JSON object, the event payload',
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _projected_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, aggregate_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000
