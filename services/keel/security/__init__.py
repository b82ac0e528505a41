"""Tenants, API keys and per-tenant Kafka principals."""
