"""The outbox relay (outbox rows to Kafka) and the status tracker (Kafka outcomes to the outbox)."""
