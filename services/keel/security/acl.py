"""Per-tenant Kafka principals: a SCRAM user per tenant and prefixed ACLs on its resources only.

A tenant's resources are named ``<prefix>.tenant.<tenant>.`` (topics, consumer groups,
transactional ids); the trailing dot keeps tenant ``a`` out of tenant ``ab``. Platform
topics (``<prefix>.commands``, ``.events`` …) get no tenant ACL at all: with the
StandardAuthorizer and ``allow.everyone.if.no.acl.found=false`` only the platform
principal (a super user) reads or writes them.
"""

from __future__ import annotations

import secrets

from confluent_kafka.admin import AdminClient
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from keel.config import Settings
from keel.errors import InfraError

_ITERATIONS = 8192
_GRANTS: dict[ResourceType, tuple[AclOperation, ...]] = {
    ResourceType.TOPIC: (AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE,
                         AclOperation.DESCRIBE_CONFIGS),
    ResourceType.GROUP: (AclOperation.READ, AclOperation.DESCRIBE),
    ResourceType.TRANSACTIONAL_ID: (AclOperation.WRITE, AclOperation.DESCRIBE),
}


def tenant_username(tenant_id: str) -> str:
    """The SCRAM user name of a tenant's principal."""
    return f"tenant-{tenant_id}"


def tenant_prefix(settings: Settings, tenant_id: str) -> str:
    """The name prefix of every Kafka resource that belongs to ``tenant_id``."""
    return f"{settings.topic_prefix}.tenant.{tenant_id}."


def tenant_acls(settings: Settings, tenant_id: str) -> list[AclBinding]:
    """The prefixed ALLOW bindings that give a tenant its own resources and nothing else."""
    principal, prefix = f"User:{tenant_username(tenant_id)}", tenant_prefix(settings, tenant_id)
    return [AclBinding(kind, prefix, ResourcePatternType.PREFIXED, principal, "*", operation,
                       AclPermissionType.ALLOW)
            for kind, operations in _GRANTS.items() for operation in operations]


def create_tenant_principal(admin: AdminClient, settings: Settings, tenant_id: str,
                            timeout_s: float = 30.0) -> str:
    """Create (or rotate) the tenant's SCRAM credential and ACLs; returns the new password."""
    password = secrets.token_urlsafe(24)
    upsert = UserScramCredentialUpsertion(
        tenant_username(tenant_id), ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, _ITERATIONS),
        password.encode())
    try:
        for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout_s).values():
            future.result()
        for future in admin.create_acls(tenant_acls(settings, tenant_id), request_timeout=timeout_s).values():
            future.result()
    except Exception as exc:  # noqa: BLE001 - librdkafka raises KafkaException with many causes
        raise InfraError(f"could not create the Kafka principal of tenant {tenant_id}: {exc}",
                         code="kafka_principal_failed") from exc
    return password
