"""The authenticated principal behind a request: tenant, actor and roles come from here.

Tenant identity always comes from the credential (API key, Kafka SASL principal), never
from a payload field; every edge builds a ``Principal`` and checks the message against it.
"""

from __future__ import annotations

from pydantic import Field

from keel.domain.envelope import Actor, Frozen


class Principal(Frozen):
    """Who is calling: bound to exactly one tenant, one actor, and a set of roles."""

    tenant_id: str = Field(description="The only tenant this principal may act in or read.")
    actor: Actor
    roles: frozenset[str] = Field(default=frozenset(), description="e.g. support-agent, admin, analyst.")
