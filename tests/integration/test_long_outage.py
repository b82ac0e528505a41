"""A broker outage longer than the relay's delivery timeout, with real `keel gateway` and `keel relay` processes.

Agents keep posting commands over HTTP while the private broker is stopped for several
delivery timeouts. The gateway keeps accepting them into the outbox; the relay keeps its
lease, marks nothing sent, and says once that Kafka is away and how many commands wait;
both ``/readyz`` answer 503 naming the broker and the backlog. Once the broker is back,
every accepted command reaches the commands topic exactly once, each aggregate's in the
order the gateway accepted them, and both probes say ready again.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from keel.bootstrap import ensure_local_keys
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind
from keel.kafka.broker import start_broker, stop_broker
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.observability.exporter import published
from keel.outbox.db import open_database
from keel.security.keys import KeyStore
from tests.broker_faults import Load, free_port
from tests.processes import KeelProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

DELIVERY_TIMEOUT_S = 3
OUTAGE_S = 4 * DELIVERY_TIMEOUT_S
RATE_PER_S = 20.0
OUTAGE_LINE = "does not acknowledge the outbox's commands"
RECOVERY_LINE = "acknowledges the outbox's commands again"


def probe(url: str) -> tuple[int, list[str]]:
    """A ``/readyz``'s status code and reasons."""
    answer = httpx.get(url, timeout=2.0)
    return answer.status_code, list(answer.json()["reasons"])


def wait_for(what: str, bound_s: float, condition: Callable[[], bool], logs: Callable[[], str]) -> float:
    """Poll ``condition`` until true; the seconds it took (fails with ``logs`` after ``bound_s``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < bound_s, f"not {what} within {bound_s:.0f}s:\n{logs()}"
        time.sleep(0.2)
    return time.monotonic() - started


def test_commands_wait_in_the_outbox_through_a_long_outage(broker_settings: Settings, tmp_path: Path) -> None:
    settings = broker_settings.model_copy(update={
        "data_dir": tmp_path, "kafka_port": free_port(), "kafka_controller_port": free_port(),
        "kafka_bootstrap": None, "topic_partitions": 2, "topic_prefix": f"outage-{uuid.uuid4().hex[:8]}"})
    start_broker(settings)
    outbox = tmp_path / "outbox.sqlite3"
    env = {"KEEL_OUTBOX_DSN": f"sqlite:///{outbox}", "KEEL_KAFKA_PORT": str(settings.kafka_port),
           "KEEL_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
           "KEEL_RELAY_DELIVERY_TIMEOUT_S": str(DELIVERY_TIMEOUT_S)}
    port = free_port()
    gateway = KeelProcess(["gateway", "--port", str(port)], settings, tmp_path / "gateway.log", **env)
    relay = KeelProcess(["relay", "--no-track"], settings, tmp_path / "relay.log", **env)
    load: Load | None = None

    def logs() -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in (gateway, relay))

    def unsent_and_published() -> tuple[int, int]:
        with sqlite3.connect(outbox) as db:
            unsent, sent = db.execute("SELECT count(*) - count(published_at), count(published_at) "
                                      "FROM keel_outbox").fetchone()
        return int(unsent), int(sent)

    try:
        apply_topics(AdminClient(admin_config(settings)), declared_topics(settings))
        ensure_local_keys(settings)
        keys = KeyStore(open_database(f"sqlite:///{outbox}"))
        gateway.start()
        relay.start()
        wait_for("serving", 60, lambda: _answers(f"http://127.0.0.1:{port}/healthz")
                 and {t.service for t in published(settings)} >= {"relay"}, logs)
        keys.create_tenant("acme")  # the gateway made the tables
        _, token = keys.create_key("acme", Actor(kind=ActorKind.AGENT, id="support-bot"), frozenset({"support-agent"}))
        urls = {"gateway": f"http://127.0.0.1:{port}/readyz"} | {
            t.service: f"http://{t.address}/readyz" for t in published(settings) if t.service == "relay"}
        wait_for("ready", 60, lambda: all(probe(url)[0] == 200 for url in urls.values()), logs)

        load = Load(f"http://127.0.0.1:{port}", token, RATE_PER_S)
        load.start()
        wait_for("relaying", 30, lambda: unsent_and_published()[1] >= 20, logs)

        stop_broker(settings)
        stopped = time.monotonic()
        _, sent_at_stop = unsent_and_published()
        took = wait_for("unready with the backlog", 10 + DELIVERY_TIMEOUT_S, lambda: all(
            code == 503 and any(r.startswith("broker:") and "commands wait in the outbox" in r for r in reasons)
            for code, reasons in map(probe, urls.values())), logs)
        print(f"\nboth /readyz 503 with the backlog {took:.1f}s after the stop: "
              f"{ {name: probe(url) for name, url in urls.items()} }")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped)))
        unsent, sent = unsent_and_published()
        reasons = {name: probe(url) for name, url in urls.items()}
        print(f"after {time.monotonic() - stopped:.1f}s down: {unsent} unsent, {sent - sent_at_stop} marked sent "
              f"since the stop; /readyz: {reasons}")
        assert sent - sent_at_stop <= 2 * RATE_PER_S, "rows were marked sent long after the broker stopped"
        assert unsent >= (OUTAGE_S - 2) * RATE_PER_S * 0.5, f"too few commands accepted during the outage: {unsent}"
        relay.assert_alive()
        assert relay.count(OUTAGE_LINE) == 1, relay.output()[-4000:]

        start_broker(settings)
        back = time.monotonic()
        time.sleep(2.0)  # commands keep coming for a while after the broker is back
        load.stop()
        drained = wait_for("drained", 60, lambda: unsent_and_published()[0] == 0, logs)
        ready = wait_for("ready again", 30, lambda: all(probe(url)[0] == 200 for url in urls.values()), logs)
        print(f"broker back: outbox drained {drained:.1f}s and both ready {ready:.1f}s after "
              f"(from the start: {time.monotonic() - back:.1f}s)")

        assert load.refused == [], load.refused[:5]
        codec, on_topic = EnvelopeCodec(), defaultdict(list)
        for message in read_to_end(settings, topic_name(settings, Topic.COMMANDS)):
            envelope = codec.decode(message.value() or b"")
            on_topic[envelope.key].append(envelope.id)
        key_of = {command_id: key for key, ids in on_topic.items() for command_id in ids}
        assert sorted(key_of) == sorted(load.accepted), "a command is missing from the commands topic"
        assert sum(map(len, on_topic.values())) == len(load.accepted), "a command was published twice"
        for key, ids in on_topic.items():
            assert ids == [c for c in load.accepted if key_of[c] == key], f"{key} lost its order"
        assert relay.count(OUTAGE_LINE) == 1 and relay.count(RECOVERY_LINE) == 1, relay.output()[-4000:]
        for process in (gateway, relay):
            process.assert_alive()
            assert "Traceback" not in process.output(), process.output()[-4000:]
        print("relay:\n" + "\n".join(line for line in relay.output().splitlines() if "Kafka" in line))
    finally:
        if load is not None:
            load.stop()
        gateway.stop(grace_s=30)
        relay.stop(grace_s=30)
        stop_broker(settings)


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0)
    except httpx.TransportError:
        return False
    return True
