"""Personal fields read the same everywhere a person reads them, and every plaintext read is audited.

``GET /v1/commands/{id}``, ``keel state``, ``keel audit show`` and ``keel replay`` to a JSON-lines
file show a sealed value as ``⟨sealed⟩``, as ``⟨erased⟩`` once its subject is erased, and in
plaintext only to a reader allowed to see it (an API key with the ``personal_data`` role,
``--reveal --as kind:id``), whose read is then a ``PersonalDataRead`` receipt in the tenant's chain.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from typer.testing import CliRunner, Result

from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Actor, ActorKind, new_command
from keel.domain.outcomes import to_events
from keel.domain.personal import ERASED, SEALED, SEALED_PREFIX
from keel.gateway.app import create_app
from keel.gateway.settings import IngressSettings
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, topic_name
from keel.outbox.db import open_database
from keel.outbox.store import OutboxStore
from keel.processor.worker import CommandProcessor
from keel.projector.projector import EventProjector
from keel.relay.status import event_outcomes
from keel.replay.errors import ReplayError
from keel.sdk.producer import CommandProducer
from keel.security.keys import KeyStore as ApiKeys
from keel.trust.chainer import Chainer
from keel.trust.checkpoints import CheckpointSigner
from keel.trust.codec import SealingCodec
from keel.trust.entries import RECEIPT_MAGIC
from keel.trust.erasure import erase_subject
from keel.trust.fields import FieldCipher
from keel.trust.keystore import open_keystore
from keel.trust.reveal import PERSONAL_DATA_READ, PERSONAL_DATA_ROLE
from keel.trust.settings import TrustSettings
from support_desk.messages import EmailQueued, SendEmail
from tests.helpers import command, start
from tests.plugins.analytics import migrated_database
from tests.plugins.trust import make_trust_settings, own_topics, trust_env

pytestmark = pytest.mark.integration

KEPT, GONE = "cust-kept", "cust-gone"
DPO = "human:dpo-alice"


def mail(subject: str) -> str:
    return f"{subject}@example.com"


def personal_data_reads(settings: Settings, via: str) -> list[dict[str, Any]]:
    """The ``PersonalDataRead`` receipts on the audit intake whose details say they came ``via`` this path."""
    receipts = [json.loads((m.value() or b"")[len(RECEIPT_MAGIC):])
                for m in read_to_end(settings, topic_name(settings, Topic.AUDIT_INTAKE))
                if (m.value() or b"").startswith(RECEIPT_MAGIC)]
    return [r for r in receipts if r["type"] == PERSONAL_DATA_READ and r["details"]["via"].startswith(via)]


# -- the gateway -------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    client: TestClient
    store: OutboxStore
    cipher: FieldCipher
    headers: dict[str, dict[str, str]]


@pytest.fixture
def gateway(settings: Settings, trust_settings: TrustSettings, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    """A gateway that seals personal fields, and keys for the agent, a plain reader and a personal-data reader."""
    monkeypatch.setenv("KEEL_MASTER_KEY_FILE", str(trust_settings.master_key_file))
    monkeypatch.setenv("KEEL_KEYSTORE_DSN", str(trust_settings.keystore_dsn))
    # Erasures below go through another key store, as `keel subjects erase` would: the gateway sees
    # them at once only without its data-key cache (else within KEEL_DATA_KEY_CACHE_S: test_key_cache).
    monkeypatch.setenv("KEEL_DATA_KEY_CACHE_S", "0")
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    db = open_database(dsn)
    store, keys = OutboxStore(db), ApiKeys(db)
    store.migrate()
    keys.create_tenant("acme")
    tokens = {name: keys.create_key("acme", Actor(kind=kind, id=name), roles)[1] for name, kind, roles in (
        ("support-bot", ActorKind.AGENT, frozenset({"support-agent"})), ("ann", ActorKind.HUMAN, frozenset()),
        ("dpo-alice", ActorKind.HUMAN, frozenset({PERSONAL_DATA_ROLE})))}
    application = create_app(settings.model_copy(update={"data_dir": tmp_path}),
                             IngressSettings(outbox_dsn=dsn, gateway_key_cache_s=0))
    with open_keystore(settings, trust_settings) as data_keys, \
            TestClient(application, raise_server_exceptions=False) as client:
        yield Gateway(client, store, FieldCipher(data_keys),
                      {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()})
    db.close()


def emailed(gw: Gateway, subject: str) -> uuid.UUID:
    """A SendEmail accepted by the gateway, and its EmailQueued tracked as the relay's tracker records it."""
    sent = new_command(SendEmail(to_address=mail(subject), template="t", body=f"Dear {subject}"), tenant_id="acme",
                       aggregate_id=f"sub-{subject}", actor=Actor(kind=ActorKind.AGENT, id="support-bot"),
                       on_behalf_of=subject)
    accepted = gw.client.post("/v1/commands", json=sent.model_dump(mode="json"), headers=gw.headers["support-bot"])
    assert accepted.status_code == 202, accepted.text
    [event] = to_events(sent, [EmailQueued(to_address=mail(subject), template="t", body=f"Dear {subject}")],
                        version=1, now=sent.occurred_at)
    as_published = EnvelopeCodec().decode(SealingCodec(gw.cipher).encode(event))  # the tracker's plain codec
    gw.store.apply_outcomes(event_outcomes(as_published))
    return sent.id


def payload(gw: Gateway, command_id: uuid.UUID, reader: str) -> dict[str, Any]:
    answer = gw.client.get(f"/v1/commands/{command_id}", headers=gw.headers[reader])
    assert answer.status_code == 200, answer.text
    assert SEALED_PREFIX not in answer.text
    [event] = answer.json()["events"]
    return event["payload"]  # type: ignore[no-any-return]


def test_the_gateway_shows_sealed_values_sealed_and_plaintext_to_the_personal_data_role_with_a_receipt(
        gateway: Gateway, settings: Settings) -> None:
    command_id = emailed(gateway, KEPT)

    plain = payload(gateway, command_id, "ann")
    revealed = payload(gateway, command_id, "dpo-alice")

    assert (plain["to_address"], plain["body"], plain["template"]) == (SEALED, SEALED, "t")
    assert (revealed["to_address"], revealed["body"]) == (mail(KEPT), f"Dear {KEPT}")
    [read] = personal_data_reads(settings, "GET")
    assert (read["actor"], read["on_behalf_of"], read["authority"]) == (
        "human:dpo-alice", KEPT, {"role": PERSONAL_DATA_ROLE})
    assert read["details"] == {"via": f"GET /v1/commands/{command_id}", "command_id": str(command_id),
                               "fields": ["body", "to_address"]}
    stream = gateway.client.get(f"/v1/commands/{command_id}/stream", headers=gateway.headers["ann"])
    [data] = [json.loads(line.removeprefix("data:")) for line in stream.text.splitlines() if line.startswith("data:")]
    assert SEALED_PREFIX not in stream.text and data["events"][0]["payload"]["to_address"] == SEALED


def test_the_gateway_shows_an_erased_subject_erased_to_every_reader_and_records_no_read(
        gateway: Gateway, settings: Settings) -> None:
    command_id = emailed(gateway, GONE)
    gateway.cipher.keys.erase("acme", GONE, DPO)

    for reader in ("ann", "dpo-alice"):
        shown = payload(gateway, command_id, reader)
        assert (shown["to_address"], shown["body"]) == (ERASED, ERASED), reader
    assert personal_data_reads(settings, "GET") == []


def test_the_gateway_shows_no_plaintext_when_the_read_cannot_be_recorded(
        gateway: Gateway, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    command_id = emailed(gateway, KEPT)

    def down(*_args: object, **_kwargs: object) -> None:
        raise OSError("the audit intake is down")

    monkeypatch.setattr("keel.gateway.security_log.record_reads", down)

    assert payload(gateway, command_id, "dpo-alice")["to_address"] == SEALED


# -- the command line: state, audit show, replay ---------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Two subjects' emails decided, chained and projected (ciphertext); then one subject erased, unredacted."""

    settings: Settings
    env: dict[str, str]


@pytest.fixture(scope="module")
def world(broker_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    trust = make_trust_settings(tmp_path_factory.mktemp("trust"))
    with own_topics(broker_settings) as settings, migrated_database(settings) as client, \
            open_keystore(settings, trust) as keys:
        codec = SealingCodec(FieldCipher(keys))
        with CommandProducer(settings, codec=codec) as producer:
            for subject in (KEPT, GONE):
                producer.send(command("acme", f"sub-{subject}", start(), on_behalf_of=subject))
                producer.send(command("acme", f"sub-{subject}", SendEmail(
                    to_address=mail(subject), template="t", body=f"Dear {subject}"), on_behalf_of=subject))
        processor = CommandProcessor(settings, instance_id="reads", codec=codec)
        try:
            processor.run_until_caught_up()
        finally:
            processor.close()
        project(settings, client)
        # The projection is not redacted: whatever reads it must not rely on the erasure having redacted it.
        erase_subject(settings, keys, tenant="acme", subject=GONE, actor=DPO, reason="test")
        chainer = Chainer(settings, CheckpointSigner.from_settings(trust), instance_id="reads")
        try:
            chainer.run_until_caught_up()
        finally:
            chainer.close()
        yield World(settings, trust_env(settings, trust))


def project(settings: Settings, client: Client) -> None:
    with EventProjector(settings, client) as projector:
        projector.catch_up()


def keel(world: World, *args: str) -> Result:
    done = CliRunner().invoke(app, list(args), env={**world.env, "COLUMNS": "400"})
    assert done.exit_code == 0, done.output
    return done


def state(world: World, subject: str, *reveal: str) -> dict[str, Any]:
    done = keel(world, "state", "--tenant", "acme", "--aggregate", f"sub-{subject}", "--at", "2", "--json", *reveal)
    assert SEALED_PREFIX not in done.stdout
    [email] = [e for e in json.loads(done.stdout)["events"] if e["type"] == "EmailQueued"]
    return email["payload"]  # type: ignore[no-any-return]


def test_keel_state_shows_sealed_erased_and_revealed_values_and_records_the_reveal(world: World) -> None:
    assert (state(world, KEPT)["to_address"], state(world, KEPT)["body"]) == (SEALED, SEALED)
    assert (state(world, GONE)["to_address"], state(world, GONE)["body"]) == (ERASED, ERASED)
    assert personal_data_reads(world.settings, "keel state") == []

    revealed = state(world, KEPT, "--reveal", "--as", DPO)

    assert (revealed["to_address"], revealed["body"]) == (mail(KEPT), f"Dear {KEPT}")
    [read] = personal_data_reads(world.settings, "keel state")
    assert (read["actor"], read["on_behalf_of"], read["details"]["fields"]) == (DPO, KEPT, ["body", "to_address"])
    assert state(world, GONE, "--reveal", "--as", DPO)["to_address"] == ERASED
    assert len(personal_data_reads(world.settings, "keel state")) == 1  # nothing of the erased subject was read


def test_keel_state_tables_show_markers_not_ciphertext(world: World) -> None:
    done = keel(world, "state", "--tenant", "acme", "--aggregate", f"sub-{KEPT}", "--at", "2")
    assert SEALED_PREFIX not in done.stdout and f'"to_address": "{SEALED}"' in done.stdout


def trail(world: World, subject: str, *reveal: str) -> str:
    done = keel(world, "audit", "show", "--tenant", "acme", "--subject", subject, *reveal)
    assert SEALED_PREFIX not in done.stdout
    [line] = [line for line in done.stdout.splitlines() if "EmailQueued" in line]
    return line


def test_keel_audit_show_shows_sealed_erased_and_revealed_values_and_records_the_reveal(world: World) -> None:
    assert f"to_address={SEALED} body={SEALED}" in trail(world, KEPT)
    assert f"to_address={ERASED} body={ERASED}" in trail(world, GONE)

    revealed = trail(world, KEPT, "--reveal", "--as", DPO)

    assert f'to_address={mail(KEPT)} body="Dear {KEPT}"' in revealed
    [read] = personal_data_reads(world.settings, "keel audit show")
    assert (read["actor"], read["on_behalf_of"], read["details"]["fields"]) == (DPO, KEPT, ["body", "to_address"])


def replayed(world: World, out: Path, *reveal: str) -> dict[str, dict[str, Any]]:
    keel(world, "replay", "--topic", "events", "--tenant", "acme", "--type", "EmailQueued", "--out", str(out),
         "--checkpoint", str(out.with_suffix(".checkpoint")), *reveal)
    text = out.read_text(encoding="utf-8")
    assert SEALED_PREFIX not in text
    return {e["on_behalf_of"]: e["payload"] for e in (json.loads(line)["event"] for line in text.splitlines())}


def test_keel_replay_to_a_file_shows_sealed_erased_and_revealed_values_and_records_the_reveal(
        world: World, tmp_path: Path) -> None:
    plain = replayed(world, tmp_path / "plain.jsonl")
    assert (plain[KEPT]["to_address"], plain[GONE]["to_address"]) == (SEALED, ERASED)

    revealed = replayed(world, tmp_path / "revealed.jsonl", "--reveal", "--as", DPO)

    assert (revealed[KEPT]["to_address"], revealed[KEPT]["body"]) == (mail(KEPT), f"Dear {KEPT}")
    assert revealed[GONE]["to_address"] == ERASED
    [read] = personal_data_reads(world.settings, "keel replay")
    assert (read["actor"], read["on_behalf_of"], read["details"]["fields"]) == (DPO, KEPT, ["body", "to_address"])


def test_revealing_needs_a_name_and_a_file_for_people(world: World, tmp_path: Path) -> None:
    unnamed = CliRunner().invoke(app, ["state", "--tenant", "acme", "--aggregate", f"sub-{KEPT}", "--at", "2",
                                       "--reveal"], env=world.env)
    avro = CliRunner().invoke(app, ["replay", "--out", str(tmp_path / "x.avro"), "--format", "avro", "--reveal",
                                    "--as", DPO], env=world.env)
    assert unnamed.exit_code == 2 and "--as" in unnamed.output
    assert isinstance(avro.exception, ReplayError) and avro.exception.code == "bad_target"
    assert not (tmp_path / "x.avro").exists()
