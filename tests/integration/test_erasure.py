"""Crypto-shredding end to end: SDK -> processor -> events -> chainer + projector, erase, replay, grep every store."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from clickhouse_connect.driver.binding import quote_identifier
from clickhouse_connect.driver.client import Client
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from fastavro import reader
from typer.testing import CliRunner

from keel.cli.main import app
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.envelope import Envelope
from support_desk.messages import EmailQueued, SendEmail
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end
from keel.kafka.topics import Topic, declared_topics, topic_name
from keel.processor.worker import CommandProcessor
from keel.projector.clickhouse import connect
from keel.projector.migrations import apply_migrations
from keel.projector.projector import PROJECTED_TOPICS, EventProjector
from keel.replay.engine import ReplayJob, replay
from keel.replay.range import Bound, Filter
from keel.replay.rebuild import rebuild
from keel.replay.sinks import AvroFileSink, JsonLinesSink, Sink, TableSink, TopicSink
from keel.sdk.producer import CommandProducer
from keel.trust.chainer import Chainer
from keel.trust.checkpoints import CheckpointSigner, TrustedKeys
from keel.trust.codec import SealingCodec
from keel.trust.erasure import erase_subject, redaction_sql
from keel.trust.fields import ERASED, PREFIX, FieldCipher
from keel.trust.keystore import KeyStore, open_keystore
from keel.trust.record import parse_record
from keel.trust.settings import TrustSettings
from keel.trust.store import read_audit
from keel.trust.verify import verify_chain
from tests.helpers import command, start
from tests.plugins.trust import trust_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "keel.cli"]
GONE = "zq-erasable-7f3a"  # only ever in the erased subject's personal fields
KEPT = "zq-kept-91bc"  # in another subject's personal fields
PUBLIC = "zq-template-c0ffee"  # not personal: stored in clear, proves the grep finds what is there


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    client = connect(settings)
    apply_migrations(client)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database)}")
    client.close()


def emails(tenant: str, subject: str, marker: str) -> list[Envelope]:
    return [command(tenant, f"sub-{subject}", start(), on_behalf_of=subject),
            command(tenant, f"sub-{subject}", SendEmail(to_address=f"{marker}@example.com", template=PUBLIC,
                                                        body=f"Dear {marker}, your refund."), on_behalf_of=subject)]


def stores_containing(settings: Settings, client: Client, paths: list[Path], text: str, logs: str) -> set[str]:
    """Every store whose bytes contain ``text``: Kafka topics, chDB tables and files, key store, logs."""
    needle = text.encode()
    found = set()
    for spec in declared_topics(settings):
        for m in read_to_end(settings, spec.name):
            headers = cast(list[tuple[str, bytes]], m.headers() or [])
            blob = (m.value() or b"") + (m.key() or b"") + b"".join(v for _, v in headers)
            if needle in blob:
                found.add(f"kafka:{spec.name}")
    # What is stored is in tables (views only compute from them; some take parameters)
    for (table,) in client.query("SELECT name FROM system.tables WHERE database = currentDatabase() "
                                 "AND engine != 'View'").result_rows:
        dump = client.raw_query(f"SELECT * FROM {quote_identifier(table)} FORMAT TSV")
        if needle in dump:
            found.add(f"clickhouse:{table}")
    for root in paths:
        for path in (root.rglob("*") if root.is_dir() else [root]):
            if path.is_file() and needle in path.read_bytes():
                found.add(f"file:{path}")
    if text in logs:
        found.add("logs")
    return found


def test_erased_subject_leaves_no_plaintext_anywhere_and_every_chain_still_verifies(
        settings: Settings, trust_settings: TrustSettings, client: Client, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    # `keel subjects erase` runs in another process below: this one's reads see it at once only
    # without a data-key cache (else within KEEL_DATA_KEY_CACHE_S: test_key_cache).
    keys = open_keystore(settings, trust_settings.model_copy(update={"data_key_cache_s": 0.0}))
    codec = decide(settings, keys)
    events = [codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))]
    mails = {e.on_behalf_of: e.payload for e in events if isinstance(e.payload, EmailQueued)}
    assert mails["cust-gone"].to_address == f"{GONE}@example.com"  # sealed on the wire, opens with the key
    with EventProjector(settings, client) as projector:  # the plain codec: ciphertext is projected
        projector.catch_up()

    env = trust_env(settings, trust_settings)
    erased = subprocess.run([*CLI, "subjects", "erase", "--tenant", "acme", "--subject", "cust-gone",
                             "--actor", "human:dpo-alice", "--reason", "GDPR art. 17 request",
                             "--no-redact"],  # this process owns the chDB path: it redacts below
                            env=env, capture_output=True, text=True, timeout=60)
    assert erased.returncode == 0, erased.stderr
    client.command(redaction_sql(), parameters={"tenant": "acme", "subject": "cust-gone"})
    chainer = Chainer(settings, CheckpointSigner.from_settings(trust_settings), instance_id="erasure")
    try:
        chainer.run_until_caught_up()
    finally:
        chainer.close()

    # events still decode: an explicit marker for the erased subject, the other subject intact
    events = [codec.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))]
    mails = {e.on_behalf_of: e.payload for e in events if isinstance(e.payload, EmailQueued)}
    assert (mails["cust-gone"].to_address, mails["cust-gone"].body) == (ERASED, ERASED)
    assert mails["cust-kept"].to_address == f"{KEPT}@example.com"
    # the chain verifies, and holds the receipt: what, when, by whom
    audit = read_audit(settings, "acme")
    assert verify_chain("acme", audit.records, audit.checkpoints, TrustedKeys.from_settings(trust_settings)).ok
    receipt = parse_record(audit.records[-1]).entry
    assert (receipt.type, receipt.actor, receipt.on_behalf_of) == ("SubjectErased", "human:dpo-alice", "cust-gone")
    assert b"GDPR art. 17 request" in receipt.body and b'"key_ids":["' in receipt.body
    # a projection rebuilt by replay, and the redacted existing rows
    rebuilt = connect(settings.model_copy(update={"clickhouse_database": settings.clickhouse_database + "_r"}))
    try:
        apply_migrations(rebuilt)
        with EventProjector(settings, rebuilt) as projector:
            projector.catch_up()
        [(redacted,)] = client.query("SELECT count() FROM events FINAL WHERE on_behalf_of = 'cust-gone' "
                                     "AND position(payload, {m:String}) > 0", parameters={"m": ERASED}).result_rows
        assert redacted == 1
        chdb_path = Path(settings.analytics_dsn.removeprefix("chdb://"))
        key_db = Path(str(trust_settings.keystore_dsn).removeprefix("sqlite:///"))
        keys.close()
        logs = caplog.text + erased.stdout + erased.stderr
        for store_client in (client, rebuilt):
            assert stores_containing(settings, store_client, [chdb_path, key_db, tmp_path], GONE, logs) == set()
        control = stores_containing(settings, client, [chdb_path], PUBLIC, logs)
        # The positive control proves the Kafka and SQL greps see plaintext where it is. The raw
        # chDB files are LZ4-compressed parts, so their grep is defence in depth only: it may
        # or may not see the control, and must never see the erased marker.
        assert control >= {f"kafka:{topic_name(settings, Topic.EVENTS)}", "clickhouse:events"}
    finally:
        rebuilt.command(f"DROP DATABASE IF EXISTS {quote_identifier(settings.clickhouse_database + '_r')}")
        rebuilt.close()


@pytest.fixture
def configured_keys(settings: Settings, trust_settings: TrustSettings,
                    monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyStore]:
    """This test's key store, also named by ``KEEL_*``: projectors, rebuilds and replays find it as the CLI's do."""
    monkeypatch.setenv("KEEL_MASTER_KEY_FILE", str(trust_settings.master_key_file))
    monkeypatch.setenv("KEEL_KEYSTORE_DSN", str(trust_settings.keystore_dsn))
    with open_keystore(settings, trust_settings) as keys:
        yield keys


def decide(settings: Settings, keys: KeyStore) -> SealingCodec:
    """Both subjects' emails sealed and decided; returns the codec that opens them."""
    codec = SealingCodec(FieldCipher(keys))
    with CommandProducer(settings, codec=codec) as producer:
        for cmd in [*emails("acme", "cust-gone", GONE), *emails("acme", "cust-kept", KEPT)]:
            producer.send(cmd)
    processor = CommandProcessor(settings, instance_id="erasure", codec=codec)
    try:
        processor.run_until_caught_up()
    finally:
        processor.close()
    return codec


def decide_and_project(settings: Settings, keys: KeyStore, client: Client) -> None:
    """``decide``, then both log topics projected (events and commands)."""
    decide(settings, keys)
    for source in PROJECTED_TOPICS:
        with EventProjector(settings, client, source=source) as projector:
            projector.catch_up()


def project_then_erase(settings: Settings, keys: KeyStore, client: Client) -> dict[str, list[str]]:
    """``decide_and_project``, then cust-gone erased as ``keel subjects erase`` does it (keys, receipt,
    live rows redacted). Returns cust-kept's sealed values of the events topic, as Kafka holds them."""
    decide_and_project(settings, keys, client)
    erase_subject(settings, keys, tenant="acme", subject="cust-gone", actor="human:dpo-alice", reason="test")
    client.command(redaction_sql(), parameters={"tenant": "acme", "subject": "cust-gone"})
    plain = EnvelopeCodec()
    kept = personal_values((e.on_behalf_of, e.type, e.payload.model_dump()) for e in (
        plain.decode(m.value() or b"") for m in read_to_end(settings, topic_name(settings, Topic.EVENTS))))
    assert all(v.startswith(PREFIX) for v in kept["cust-kept"])
    return kept


def personal_values(emails: Iterable[tuple[Any, Any, Mapping[str, Any]]]) -> dict[str, list[str]]:
    """The personal fields of every (subject, type, payload) email, by subject."""
    found: dict[str, list[str]] = {}
    for subject, kind, payload in emails:
        if kind in ("SendEmail", "EmailQueued"):
            found.setdefault(str(subject), []).extend([payload["to_address"], payload["body"]])
    return found


def table_values(client: Client, table: str) -> dict[str, list[str]]:
    rows = client.query(f"SELECT on_behalf_of, type, payload FROM {quote_identifier(table)} FINAL").result_rows
    return personal_values((subject, kind, json.loads(payload)) for subject, kind, payload in rows)


def sealed_rows(client: Client, table: str, subject: str) -> int:
    return int(client.query(f"SELECT count() FROM {quote_identifier(table)} WHERE on_behalf_of = {{s:String}} "
                            "AND position(payload, {p:String}) > 0",
                            parameters={"s": subject, "p": PREFIX}).result_rows[0][0])


def test_rebuilding_after_an_erasure_keeps_the_subject_erased_and_others_sealed(
        settings: Settings, configured_keys: KeyStore, client: Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="keel.projector")
    project_then_erase(settings, configured_keys, client)
    before = {table: table_values(client, table) for table in ("events", "commands")}
    assert before["events"]["cust-gone"] == [ERASED, ERASED]  # the live rows, redacted by the erasure

    for table in ("events", "commands"):
        rebuild(settings, client, table)
    assert "native insert" not in caplog.text  # the engine redacted them, no fallback to Python did
    client.command("CREATE TABLE events_python AS events")
    with EventProjector(settings, client, table="events_python", native=False) as python:
        python.catch_up()  # the projector's other path, as a lagging projector would take it

    for table in ("events", "commands", "events_python"):
        values = table_values(client, table)
        assert sealed_rows(client, table, "cust-gone") == 0, table
        assert values["cust-gone"] == [ERASED, ERASED], table
        assert values["cust-kept"] == before[table.removesuffix("_python")]["cust-kept"], table
        assert all(v.startswith(PREFIX) for v in values["cust-kept"]), table


def test_a_replay_after_an_erasure_writes_the_subject_erased_to_files_topics_and_tables(
        settings: Settings, configured_keys: KeyStore, client: Client, tmp_path: Path) -> None:
    kept = project_then_erase(settings, configured_keys, client)
    events = topic_name(settings, Topic.EVENTS)
    staging = f"{settings.topic_prefix}.staging"
    admin = AdminClient(admin_config(settings))
    admin.create_topics([NewTopic(staging, 3, 1)])[staging].result()
    job = ReplayJob(topic=events, start=Bound.parse("beginning"), end=Bound.parse("end"), filter=Filter(),
                    target="test")
    sinks: list[Sink] = [JsonLinesSink(tmp_path / "events.jsonl"), AvroFileSink(tmp_path / "events.avro"),
             TopicSink(settings, staging), TableSink(client, "events_replay", events)]

    for sink in sinks:
        replay(settings, job, sink)
        sink.close()

    plain = EnvelopeCodec()
    lines = [json.loads(line)["event"] for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    with (tmp_path / "events.avro").open("rb") as file:
        avro = [plain.decode(record["value"]) for record in cast(list[dict[str, Any]], list(reader(file)))]
    topic = [plain.decode(m.value() or b"") for m in read_to_end(settings, staging)]
    written = {
        "jsonl": personal_values((e["on_behalf_of"], e["type"], e["payload"]) for e in lines),
        "avro": personal_values((e.on_behalf_of, e.type, e.payload.model_dump()) for e in avro),
        "topic": personal_values((e.on_behalf_of, e.type, e.payload.model_dump()) for e in topic),
        "table": table_values(client, "events_replay"),
    }
    admin.delete_topics([staging])
    for target, values in written.items():
        assert values == {"cust-gone": [ERASED, ERASED], "cust-kept": kept["cust-kept"]}, target


def test_keel_subjects_erase_redacts_both_log_tables_and_the_copies_a_rebuild_kept(
        settings: Settings, trust_settings: TrustSettings, configured_keys: KeyStore, client: Client) -> None:
    decide_and_project(settings, configured_keys, client)
    for table in ("events", "commands"):
        rebuild(settings, client, table)  # the old tables stay as <table>__previous, for a rollback
    tables = ("events", "commands", "events__previous", "commands__previous")
    assert all(sealed_rows(client, table, "cust-gone") > 0 for table in tables)

    erased = CliRunner().invoke(app, ["subjects", "erase", "--tenant", "acme", "--subject", "cust-gone",
                                      "--actor", "human:dpo-alice"], env=trust_env(settings, trust_settings))

    assert erased.exit_code == 0, erased.output
    assert "redacted in events, commands, events__previous, commands__previous" in " ".join(erased.output.split())
    for table in tables:
        assert sealed_rows(client, table, "cust-gone") == 0, table
        assert sealed_rows(client, table, "cust-kept") > 0, table
