"""``--tenant`` is checked, lists have ``--json``, and tables never cut ids (issue: every answer is true)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from typer.testing import CliRunner, Result

from keel.cli.main import app
from keel.config import Settings
from keel.kafka.clients import admin_config, producer_config
from keel.processor.worker import CommandProcessor
from keel.sdk.producer import CommandProducer
from keel.watchers.stats import changelog_topic
from keel.watchers.stats_tally import Counts, Source, table_key
from tests.helpers import command, refund, start

POLICY = {"version": "t-1", "roles": {"support-agent": ["*"]}, "grants": {"agent:support-bot": ["support-agent"]},
          "rules": [{"name": "big-refunds-need-admin",
                     "match": {"command_types": ["IssueRefund"], "payload": {"amount_cents": {"gt": 100000}}},
                     "decision": "approve"}]}


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """This test's topics, ClickHouse database and its own tenant registry (outbox database)."""
    return {"KEEL_TOPIC_PREFIX": settings.topic_prefix, "KEEL_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
            "KEEL_TOPIC_PARTITIONS": str(settings.topic_partitions), "KEEL_DATA_DIR": str(settings.data_dir),
            "KEEL_CLICKHOUSE_DSN": settings.analytics_dsn, "KEEL_CLICKHOUSE_DATABASE": settings.clickhouse_database,
            "KEEL_OUTBOX_DSN": f"sqlite:///{tmp_path / 'outbox.sqlite3'}", "COLUMNS": "200"}


@pytest.fixture
def processor(settings: Settings) -> Iterator[CommandProcessor]:
    worker = CommandProcessor(settings, instance_id="cli-tenants")
    yield worker
    worker.close()


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def register(env: dict[str, str], tenant: str) -> None:
    assert run(env, "tenants", "create", tenant, "--no-kafka").exit_code == 0


def keel_main(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point (``keel.cli.main.main``), which turns a KeelError into one line and exit 1."""
    return subprocess.run([sys.executable, "-m", "keel.cli", *args], env={**os.environ, **env}, text=True,
                          capture_output=True, timeout=120, check=False)


def park_a_big_refund(settings: Settings, env: dict[str, str], processor: CommandProcessor,
                      tmp_path: Path) -> str:
    """A command of tenant acme waiting for approval; returns its id."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    assert run(env, "policy", "apply", str(policy), "--tenant", "acme").exit_code == 0
    processor.run_until_caught_up()
    big = command("acme", "sub-1", refund(150_000))
    with CommandProducer(settings) as producer:
        producer.send(command("acme", "sub-1", start(500_000)))
        producer.send(big)
    processor.run_until_caught_up()
    return str(big.id)


def first_column(output: str) -> str:
    """The first column's cell text of a boxed table's body, folded lines joined."""
    body = output.split("┡", 1)[1].splitlines()[1:]
    return "".join(line.split("│")[1].strip() for line in body if line.startswith("│"))


def test_an_unknown_tenant_is_a_one_line_error_not_an_empty_list(env: dict[str, str]) -> None:
    result = keel_main(env, "approvals", "list", "--tenant", "acmee")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error [unknown_tenant] unknown tenant 'acmee': it is not registered (see `keel tenants list`) "
        "and the data has no trace of it (field: tenant)"]
    assert result.stdout == ""


def test_a_registered_tenant_without_events_is_told_it_has_none_yet(env: dict[str, str]) -> None:
    register(env, "acme")
    result = run(env, "approvals", "list", "--tenant", "acme")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "tenant acme has no events yet"


def test_an_unregistered_tenant_with_events_still_lists_its_approvals_as_json_with_full_ids(
        settings: Settings, env: dict[str, str], processor: CommandProcessor, tmp_path: Path) -> None:
    big = park_a_big_refund(settings, env, processor, tmp_path)
    result = run(env, "approvals", "list", "--tenant", "acme", "--json")
    assert result.exit_code == 0, result.output
    [pending] = json.loads(result.stdout)
    assert pending["command_id"] == big and pending["rule"] == "big-refunds-need-admin"


def test_a_narrow_terminal_folds_ids_instead_of_cutting_them(
        settings: Settings, env: dict[str, str], processor: CommandProcessor, tmp_path: Path) -> None:
    big = park_a_big_refund(settings, env, processor, tmp_path)
    result = run({**env, "COLUMNS": "40"}, "approvals", "list", "--tenant", "acme")
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 40
    assert first_column(result.output) == big


def test_a_pipe_gets_whole_lines_not_80_columns(
        settings: Settings, env: dict[str, str], processor: CommandProcessor, tmp_path: Path) -> None:
    big = park_a_big_refund(settings, env, processor, tmp_path)
    without_columns = {key: value for key, value in env.items() if key != "COLUMNS"}
    result = keel_main(without_columns, "approvals", "list", "--tenant", "acme")
    assert result.returncode == 0, result.stderr
    assert big in result.stdout and "big-refunds-need-admin" in result.stdout


def test_keys_and_tenants_list_as_json(env: dict[str, str]) -> None:
    register(env, "acme")
    made = run(env, "keys", "create", "--tenant", "acme", "--actor", "agent:support-bot", "--role", "support-agent")
    assert made.exit_code == 0, made.output
    assert json.loads(run(env, "tenants", "list", "--json").stdout) == [{"tenant": "acme"}]
    [key] = json.loads(run(env, "keys", "list", "--tenant", "acme", "--json").stdout)
    assert key["tenant"] == "acme" and key["actor"] == "agent:support-bot" and key["roles"] == ["support-agent"]
    assert key["key_id"] in made.output and key["revoked"] is False


def test_keys_list_refuses_an_unknown_tenant_and_names_a_registered_one_without_keys(env: dict[str, str]) -> None:
    unknown = run(env, "keys", "list", "--tenant", "nobody")
    assert unknown.exit_code == 1 and getattr(unknown.exception, "code", None) == "unknown_tenant"
    register(env, "acme")
    assert run(env, "keys", "list", "--tenant", "acme").output.strip() == "tenant acme has no keys yet"


def test_stats_refuses_an_unknown_tenant_and_tells_a_registered_one_it_has_none_yet(
        settings: Settings, env: dict[str, str]) -> None:
    topic, admin = changelog_topic(settings), AdminClient(admin_config(settings))
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    try:
        _stats_answers(settings, env, topic)
    finally:
        admin.delete_topics([topic])[topic].result()


def _stats_answers(settings: Settings, env: dict[str, str], topic: str) -> None:
    minute = float(int(time.time()) // 60 * 60)
    producer = Producer(producer_config(settings))
    producer.produce(topic, key=json.dumps([table_key("globex", Source.COMMANDS, 0), [minute, minute + 59.9]]),
                     value=json.dumps(Counts(commands=2, offset=1).to_json()))
    producer.flush(30)

    unknown = keel_main(env, "stats", "--tenant", "nobody")
    assert unknown.returncode == 1 and "[unknown_tenant]" in unknown.stderr
    register(env, "acme")
    idle = run(env, "stats", "--tenant", "acme")
    assert idle.exit_code == 0 and idle.output.strip() == "tenant acme has no stats yet"
    [row] = json.loads(run(env, "stats", "--tenant", "globex", "--json").stdout)  # unregistered, but counted
    assert row["tenant"] == "globex" and row["commands"] == 2


def test_query_refuses_an_unknown_tenant_and_tells_a_registered_one_it_has_no_data_yet(env: dict[str, str]) -> None:
    assert run(env, "projections", "migrate").exit_code == 0
    unknown = run(env, "query", "SELECT count() FROM commands", "--tenant", "nobody")
    assert unknown.exit_code == 1 and getattr(unknown.exception, "code", None) == "unknown_tenant"
    register(env, "acme")
    idle = run(env, "query", "SELECT count() FROM commands", "--tenant", "acme")
    assert idle.exit_code == 0, idle.output
    assert idle.output.strip() == "tenant acme has no projected data yet (`keel project` loads it)"
    as_json = run(env, "query", "SELECT count() AS n FROM commands", "--tenant", "acme", "--json")
    assert json.loads(as_json.stdout)["rows"] == [[0]]


def test_dlq_list_as_json_is_an_empty_list_when_there_are_none(env: dict[str, str]) -> None:
    result = run(env, "dlq", "list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
