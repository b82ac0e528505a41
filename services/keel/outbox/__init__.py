"""The transactional outbox: commands acknowledged durably before Kafka sees them."""
