"""Keel: a Kafka-streamed, multi-tenant event platform that makes AI agents safe to run."""

__version__ = "0.1.0"
