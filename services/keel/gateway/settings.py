"""Settings of the ingress path (gateway, outbox, relay), from ``KEEL_*``; printed by ``keel config``.

Kafka credentials live in ``keel.config.Settings``: every client uses them.
"""

from __future__ import annotations


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
        default=5.0, ge=0, description="How long a verified API key is trusted before it is looked up again: "
                                       "a revoked key stops working within this bound.")
    gateway_batch_max: int = Field(default=512, ge=1, description="Commands per outbox transaction (group commit).")
    gateway_trusted_proxies: str = Field(
        default="", description="Comma-separated addresses or networks (or '*') of the proxies whose "
                                "X-Forwarded-For and X-Forwarded-Proto the gateway believes; empty: none, "
                                "the connection's peer is the client.")
    relay_batch_size: int = Field(default=2000, ge=1, description="Outbox rows per relay round.")
    relay_poll_interval_s: float = Field(default=0.05, gt=0, description="Sleep when the outbox is empty.")
    relay_lease_ttl_s: float = Field(default=10.0, gt=0, description="A dead relay's lease expires after this.")
    relay_delivery_timeout_s: float = Field(default=30.0, gt=0, description="Bound on one Kafka delivery.")
    outbox_retention_s: float = Field(
        default=7 * 86_400, ge=0,
        description="The relay deletes published commands accepted longer ago than this (0: keep all); "
                    "their ids, and GET /v1/commands/{id}, are forgotten with them.")

    def dsn(self, settings: Settings) -> str:
        """The outbox DSN: the configured one or a SQLite file under ``data_dir``."""
        return self.outbox_dsn or f"sqlite:///{(settings.data_dir / 'outbox.sqlite3').resolve()}"
