"""Settings of the ingress path (gateway, outbox, relay, Kafka credentials), from ``KEEL_*``.

Kept apart from ``keel.config.Settings`` until the lead merges them; same prefix, same
rules: typed, frozen, printed by ``keel config`` once merged.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from keel.config import Settings


class IngressSettings(BaseSettings):
    """Effective configuration of the gateway, the outbox relay and their Kafka identity."""

    model_config = SettingsConfigDict(env_prefix="KEEL_", frozen=True)

    outbox_dsn: str | None = Field(
        default=None, description="sqlite:///abs/path (default: outbox.sqlite3 under data_dir) or postgresql://…")
    gateway_host: str = Field(default="127.0.0.1", description="Interface the gateway binds.")
    gateway_port: int = Field(default=8080, description="Port the gateway listens on.")
    gateway_workers: int = Field(default=1, ge=1, description="Gateway worker processes.")
    gateway_max_body_bytes: int = Field(default=256 * 1024, ge=1024, description="Largest accepted body.")
    gateway_key_cache_s: float = Field(
        default=5.0, ge=0, description="How long a verified API key is trusted before it is looked up again.")
    gateway_batch_max: int = Field(default=512, ge=1, description="Commands per outbox transaction (group commit).")
    relay_batch_size: int = Field(default=2000, ge=1, description="Outbox rows per relay round.")
    relay_poll_interval_s: float = Field(default=0.05, gt=0, description="Sleep when the outbox is empty.")
    relay_lease_ttl_s: float = Field(default=10.0, gt=0, description="A dead relay's lease expires after this.")
    relay_delivery_timeout_s: float = Field(default=30.0, gt=0, description="Bound on one Kafka delivery.")
    kafka_sasl_username: str | None = Field(default=None, description="SASL/SCRAM user (secure brokers).")
    kafka_sasl_password: str | None = Field(default=None, description="SASL/SCRAM password.")
    kafka_sasl_mechanism: str = Field(default="SCRAM-SHA-512", description="SASL mechanism.")

    def dsn(self, settings: Settings) -> str:
        """The outbox DSN: the configured one or a SQLite file under ``data_dir``."""
        return self.outbox_dsn or f"sqlite:///{(settings.data_dir / 'outbox.sqlite3').resolve()}"

    def kafka_auth(self) -> dict[str, Any]:
        """librdkafka settings that authenticate as the configured principal (none if unset)."""
        if self.kafka_sasl_username is None:
            return {}
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": self.kafka_sasl_mechanism,
                "sasl.username": self.kafka_sasl_username, "sasl.password": self.kafka_sasl_password or ""}
