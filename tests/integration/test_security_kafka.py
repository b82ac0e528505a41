"""Per-tenant Kafka principals on a secure broker (SASL/SCRAM + StandardAuthorizer).

A tenant's principal reaches its own prefixed resources and nothing else: not another
tenant's topics, groups or transactional ids, and never the platform topics.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import AuthorizationDenied
from keel.gateway.settings import IngressSettings
from keel.kafka.broker import platform_auth, start_broker, stop_broker
from keel.kafka.clients import admin_config, consumer_config
from keel.kafka.errors import topic_partitions
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.outbox.db import open_database
from keel.outbox.enqueue import to_new_command
from keel.outbox.store import OutboxStore
from keel.relay.relay import Relay
from keel.replay.range import Bound, resolve
from keel.sdk.producer import CommandProducer
from keel.security.acl import create_tenant_principal, tenant_prefix, tenant_username
from tests.helpers import command, start

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Secure:
    settings: Settings
    platform: dict[str, Any]
    tenants: dict[str, dict[str, Any]]
    inbox: dict[str, str]


@pytest.fixture(scope="module")
def secure(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    """A private secure broker with platform topics and tenants a and b, each with an inbox topic."""
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path_factory.mktemp("secure"), "kafka_port": _free_port(),
        "kafka_controller_port": _free_port(), "kafka_bootstrap": None, "topic_partitions": 1,
        "topic_prefix": f"sec-{uuid.uuid4().hex[:6]}"})
    start_broker(settings, secure=True)
    try:
        platform = platform_auth(settings)
        admin = AdminClient({**admin_config(settings), **platform})
        apply_topics(admin, declared_topics(settings))
        inbox = {t: tenant_prefix(settings, t) + "inbox" for t in ("a", "b")}
        for future in admin.create_topics([NewTopic(name, 1, 1) for name in inbox.values()]).values():
            future.result()
        tenants = {t: {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
                       "sasl.username": tenant_username(t),
                       "sasl.password": create_tenant_principal(admin, settings, t)} for t in ("a", "b")}
        yield Secure(settings, platform, tenants, inbox)
    finally:
        stop_broker(settings)


def produce(secure: Secure, auth: dict[str, Any], topic: str) -> KafkaError | None:
    """Produce one record as ``auth``; the delivery error, or None when it was written."""
    producer = Producer({"bootstrap.servers": secure.settings.bootstrap_servers, **auth,
                         "message.timeout.ms": 10_000})
    outcome: list[KafkaError | None] = []
    producer.produce(topic, b"x", on_delivery=lambda error, _message: outcome.append(error))
    producer.flush(15)
    return outcome[0]


READ = 0  # consume_error's answer when the consumer read a record and committed its offset


def consume_error(secure: Secure, auth: dict[str, Any], topic: str, group: str) -> int:
    """The error code a consumer in ``group`` gets when subscribing to ``topic``, or ``READ``."""
    consumer = Consumer({"bootstrap.servers": secure.settings.bootstrap_servers, **auth, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        consumer.subscribe([topic])
        for _ in range(40):
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                return int(error.code())
            consumer.commit(message=message, asynchronous=False)  # needs the group ACL
            return READ
        raise AssertionError(f"neither a record nor an error from {topic} in 20s")
    except KafkaException as exc:
        return int(exc.args[0].code())
    finally:
        consumer.close()


def test_a_tenant_produces_and_consumes_its_own_resources(secure: Secure) -> None:
    a = secure.tenants["a"]
    assert produce(secure, a, secure.inbox["a"]) is None
    assert consume_error(secure, a, secure.inbox["a"], tenant_prefix(secure.settings, "a") + "reader") == READ


def test_a_tenant_cannot_produce_to_another_tenants_topic(secure: Secure) -> None:
    error = produce(secure, secure.tenants["a"], secure.inbox["b"])
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_a_tenant_cannot_consume_another_tenants_topic_or_use_its_groups(secure: Secure) -> None:
    a, prefix_a, prefix_b = secure.tenants["a"], tenant_prefix(secure.settings, "a"), tenant_prefix(secure.settings, "b")
    produce(secure, secure.tenants["b"], secure.inbox["b"])
    assert consume_error(secure, a, secure.inbox["b"], prefix_a + "reader") == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert consume_error(secure, a, secure.inbox["a"], prefix_b + "reader") == KafkaError.GROUP_AUTHORIZATION_FAILED


def test_a_tenant_cannot_describe_another_tenants_topic(secure: Secure) -> None:
    admin = AdminClient({**admin_config(secure.settings), **secure.tenants["a"]})
    visible = admin.list_topics(timeout=15).topics
    assert secure.inbox["a"] in visible and secure.inbox["b"] not in visible
    assert not any(name.startswith(secure.settings.topic_prefix + ".") and ".tenant." not in name for name in visible)
    described = admin.list_topics(secure.inbox["b"], timeout=15).topics[secure.inbox["b"]]
    assert described.error is not None and described.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_a_tenant_cannot_use_another_tenants_transactional_id(secure: Secure) -> None:
    def init(transactional_id: str) -> None:
        Producer({"bootstrap.servers": secure.settings.bootstrap_servers, **secure.tenants["a"],
                  "transactional.id": transactional_id}).init_transactions(15)

    init(tenant_prefix(secure.settings, "a") + "tx")
    with pytest.raises(KafkaException) as caught:
        init(tenant_prefix(secure.settings, "b") + "tx")
    assert caught.value.args[0].code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED


def test_platform_topics_are_written_only_by_the_platform_principal(secure: Secure, tmp_path: Path) -> None:
    commands = topic_name(secure.settings, Topic.COMMANDS)
    for tenant in ("a", "b"):
        error = produce(secure, secure.tenants[tenant], commands)
        assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    store = OutboxStore(open_database(f"sqlite:///{tmp_path / 'outbox.sqlite3'}"))
    store.migrate()
    cmd = command("a", "sub-1", start())
    store.accept([to_new_command(cmd, EnvelopeCodec().encode(cmd))])
    platform = secure.settings.model_copy(update={"kafka_sasl_username": secure.platform["sasl.username"],
                                                  "kafka_sasl_password": SecretStr(secure.platform["sasl.password"])})
    relay = Relay(store, platform, IngressSettings())
    assert relay.run_once() == 1
    relay.close()
    # read_to_end has no auth hook: read as the platform principal with a plain consumer
    consumer = Consumer({"bootstrap.servers": secure.settings.bootstrap_servers, **secure.platform,
                         "group.id": f"{secure.settings.topic_prefix}.check", "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(commands, 0, 0)])
    message = consumer.poll(15)
    consumer.close()
    assert message is not None and message.error() is None and message.key() == b"a/sub-1"
    store.db.close()


def test_a_wrong_password_is_refused(secure: Secure) -> None:
    admin = AdminClient({**admin_config(secure.settings), **secure.tenants["a"], "sasl.password": "wrong"})
    with pytest.raises(KafkaException):
        admin.list_topics(timeout=5)


def test_keel_tenants_create_makes_a_working_principal_on_a_secure_broker(secure: Secure, tmp_path: Path) -> None:
    settings = secure.settings
    env = {"KEEL_DATA_DIR": str(settings.data_dir), "KEEL_KAFKA_PORT": str(settings.kafka_port),
           "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port), "KEEL_KAFKA_BOOTSTRAP": None,
           "KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'o.sqlite3'}"}
    result = CliRunner().invoke(app, ["tenants", "create", "c"], env=env)
    assert result.exit_code == 0, result.output
    password = re.search(r"password \(shown once\): (\S+)", result.output).group(1)  # type: ignore[union-attr]
    topic = tenant_prefix(settings, "c") + "inbox"
    admin = AdminClient({**admin_config(settings), **secure.platform})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    auth = {**secure.tenants["a"], "sasl.username": tenant_username("c"), "sasl.password": password}
    assert produce(secure, auth, topic) is None
    error = produce(secure, auth, secure.inbox["a"])
    assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def as_tenant(secure: Secure, tenant: str, password: str | None = None) -> Settings:
    """The secure broker's settings, authenticating as ``tenant``'s principal (or with ``password``)."""
    auth = secure.tenants[tenant]
    return secure.settings.model_copy(update={
        "kafka_sasl_username": auth["sasl.username"],
        "kafka_sasl_password": SecretStr(password if password is not None else auth["sasl.password"])})


def test_a_denied_topic_reads_as_a_denial_from_the_sdk_producer(secure: Secure) -> None:
    producer = CommandProducer(as_tenant(secure, "a"), codec=EnvelopeCodec())
    producer.send(command("a", "sub-1", start()))
    with pytest.raises(AuthorizationDenied) as caught:
        producer.flush(15)
    producer.close()
    commands = topic_name(secure.settings, Topic.COMMANDS)
    assert caught.value.code == "kafka_authorization_denied"
    assert (caught.value.principal, caught.value.resource, caught.value.operation) == (
        "User:tenant-a", f"topic:{commands}", "WRITE")
    assert str(caught.value).startswith(
        f"[kafka_authorization_denied] the broker's ACLs deny User:tenant-a WRITE on topic {commands} ")


def test_a_topic_the_principal_may_not_describe_reads_as_a_denial_not_as_missing(secure: Secure) -> None:
    with pytest.raises(AuthorizationDenied) as caught:
        list(read_to_end(as_tenant(secure, "a"), secure.inbox["b"], timeout_s=15))
    assert caught.value.code == "kafka_authorization_denied"
    assert (caught.value.principal, caught.value.resource, caught.value.operation) == (
        "User:tenant-a", f"topic:{secure.inbox['b']}", "DESCRIBE")


def test_a_hidden_topic_reads_as_a_denial_where_replay_the_projector_and_the_processor_look_it_up(secure: Secure) -> None:
    tenant_a = as_tenant(secure, "a")
    config = consumer_config(tenant_a, f"{tenant_a.topic_prefix}.replay.{uuid.uuid4().hex}")
    consumer = Consumer(config)
    try:
        assert topic_partitions(consumer, config, secure.inbox["a"], 15) == [0]  # its own: described
        assert topic_partitions(consumer, config, secure.inbox["a"] + "-none", 15) == []  # really missing
        with pytest.raises(AuthorizationDenied) as caught:  # replay's range resolution
            resolve(consumer, config, secure.inbox["b"], Bound.parse("beginning"), Bound.parse("end"))
    finally:
        consumer.close()
    assert (caught.value.principal, caught.value.resource) == ("User:tenant-a", f"topic:{secure.inbox['b']}")


def keel_cli(secure: Secure, tmp_path: Path, args: list[str], password: str,
             stdin: str = "") -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m keel.cli ARGS`` as tenant a's principal with ``password``, from a fresh data dir."""
    env = {**os.environ, "KEEL_DATA_DIR": str(tmp_path / "data"), "KEEL_TOPIC_PREFIX": secure.settings.topic_prefix,
           "KEEL_KAFKA_BOOTSTRAP": secure.settings.bootstrap_servers,
           "KEEL_KAFKA_SASL_USERNAME": tenant_username("a"), "KEEL_KAFKA_SASL_PASSWORD": password}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "keel.cli", *args], env=env, input=stdin, text=True,
                            capture_output=True, timeout=120, check=False)
    return result, time.monotonic() - began


@pytest.mark.parametrize("args", [["submit", "-"], ["topics", "apply"]], ids=["submit", "topics-apply"])
def test_a_wrong_password_is_one_clear_line_within_seconds(secure: Secure, tmp_path: Path, args: list[str]) -> None:
    password = f"not-the-password-{uuid.uuid4().hex[:8]}"
    body = json.dumps(command("a", "sub-1", start()).model_dump(mode="json"))
    result, took = keel_cli(secure, tmp_path, args, password, stdin=body)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == (f"error [kafka_authentication_failed] {secure.settings.bootstrap_servers} refused the "
                        "credentials of User:tenant-a (SASL SCRAM-SHA-512); check KEEL_KAFKA_SASL_USERNAME "
                        "and KEEL_KAFKA_SASL_PASSWORD")
    assert password not in result.stderr + result.stdout
    assert took < 10, f"{took:.1f}s"


def test_a_denied_topic_is_one_clear_line_from_topics_apply(secure: Secure, tmp_path: Path) -> None:
    result, _ = keel_cli(secure, tmp_path, ["topics", "apply"], secure.tenants["a"]["sasl.password"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error [kafka_authorization_denied] the broker's ACLs deny User:tenant-a CREATE on "
                               f"topic {secure.settings.topic_prefix}."), lines[0]
