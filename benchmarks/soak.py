"""Soak: the whole platform at a steady rate for a long time, watching for leaks, lag and errors.

The deployment of ``end_to_end.py`` (``Deployment``: gateway, relay, processor workers, the
chainer, ``keel project --follow`` owning a private chDB, and an effect worker running the
refunds and e-mails against a provider simulator, all real processes on a throwaway topic
prefix and data dir) takes ``--rate`` commands/s of the reference story from
its open-loop generator for ``--minutes``, told over and over on a fixed pool of subscriptions
(``PoolWorkload``), while its two pollers (the engine, ``GET
/v1/query``) read the events back. Every ``--sample-s`` the soak records, per service, the
resident memory (RSS) and the open file descriptors of its process tree (from ``/proc``), the
broker JVM's RSS, the commands accepted but not yet queryable, and how many offsets each
consumer group (processor, projector per topic, chainer) is behind its topic's end.

The run fails (exit 1) when a service ended or was restarted by its watchdog, a service
logged a traceback or an error, a poll was answered with an HTTP error (a dropped keep-alive
connection, which the poller opens again, is only reported), the gateway refused or never
answered a command, an accepted command's events are not in ClickHouse exactly once
(``end_to_end.exactly_once``), an effect has no outcome or two, or the provider performed one
twice, or a service's memory grew by more than 10 % after the warm-up: its RSS at the end
(median of the last three samples under load) against its RSS after the warm-up (median of
the first three samples after it; the warm-up is the first third of the run unless
``--warmup-minutes`` says otherwise, ``WARMUP_SHARE``). The broker and the harness (with the
provider simulator, which keeps every action it performed) are reported, not judged. Last,
the raw baseline of ``end_to_end.py`` (idempotent produce of the same encoded commands).

Writes the table (``table.txt``), the plot (``soak.png``), the JSON line (``soak.json``) and
the services' logs to ``--out``; the JSON line is also the last line on stdout.

Run: ``.venv/bin/python benchmarks/soak.py --minutes 30`` after ``keel up`` (``--help``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import typer
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from _common import (
    STORY_LENGTH, TENANTS, committed_total, environment, environment_table, high_watermarks_total, listening_pid,
    unique_prefix,
)
from end_to_end import (
    AGENT, ENGINE, GROUP_SECONDS, NOT_YET, OUTCOME_TYPES, CpuSample, Deployment, Harness, StageRun, Tokens, Workload,
    cpu_sample, cpu_shares, exactly_once, interrupted_as_exit, kafka_raw, open_loop, query_view_counts,
)
from keel.config import Settings
from keel.kafka.clients import admin_config
from keel.kafka.topics import Topic, topic_name
from keel.projector.clickhouse import connect
from keel.testing.provider import ProviderSimulator

MAX_GROWTH = 0.10
"""The most a service's RSS may grow from after the warm-up to the end of the load."""
WARMUP_SHARE = 1 / 3
"""Share of the run that is warm-up. State that fills by design is full before growth counts: the
processors' dedupe window (``--dedupe-window-s``, 4 min), and the outdated parts the embedded ClickHouse
keeps for 8 min after each merge (``old_parts_lifetime``), whose memory levels off only after it. A
third of the published 30 minutes is 10."""
MEDIAN_OF = 3
"""Samples whose median is a service's RSS at either end of the steady window (one sample is noisy)."""
GROUPS = {"processor": Topic.COMMANDS, "projector.events": Topic.EVENTS,
          "projector.commands": Topic.COMMANDS, "chainer": Topic.AUDIT_INTAKE}
"""Consumer groups (after the prefix) and the topic each consumes."""
LOG_ERROR = re.compile(r'Traceback|"level": "(error|critical)"|^(ERROR|CRITICAL)[: ]')
MIB = 1 << 20


class PoolWorkload(Workload):
    """The reference story told again and again over a fixed pool of subscriptions: each is started
    once, then refunded, e-mailed, cancelled and reactivated in turn (its refunds are rejected once
    its payment is used up). New customers would grow the processor's state and the projections by
    design; a fixed pool keeps what the services hold bounded, so memory that still grows is a leak."""

    pool = 2_000

    def __init__(self, count: int, rate: float, tokens: Tokens) -> None:
        super().__init__(count, rate, tokens)
        self.pool = max(self.pool, self.group, int(rate * GROUP_SECONDS))

    def step(self, index: int) -> tuple[str, int, int]:
        told, member = divmod(index, self.pool)
        return TENANTS[member % len(TENANTS)], member, told % STORY_LENGTH

    def request(self, index: int) -> bytes:
        tenant, aggregate, step = self.step(index)
        if step or index < self.pool * STORY_LENGTH:
            return super().request(index)
        body = {"id": self.command_id(index), "aggregate_id": f"sub-{self._base}-{aggregate}",
                "on_behalf_of": f"cust-{self._base}-{aggregate}", "authority": {"role": "support-agent"},
                "type": "ReactivateSubscription", "payload": {"reason": "customer came back"}}
        return self.post(tenant, AGENT.id, body)
console = Console(stderr=True)


# -- what is sampled --------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One moment of the run: load, lag, and per process tree its RSS (bytes) and open fds."""

    t: float
    """Seconds since the load started."""
    phase: str
    """``warm-up``, ``steady`` (both under load) or ``drain`` (after the last send)."""
    sent: int
    accepted: int
    refused: int
    in_flight: int
    """Sent, not yet answered."""
    not_queryable: int
    """Accepted (HTTP 202), not yet seen by the engine poller."""
    group_lag: dict[str, int]
    rss: dict[str, int]
    fds: dict[str, int]
    load_1m: float


def process_tree_memory(roots: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Resident bytes and open file descriptors of each named process and its descendants, from ``/proc``.

    As ``_common.process_tree_cpu``, a descendant that is itself a root counts only under its
    own name; a process that exits meanwhile counts as nothing. Shared pages (forked gateway
    workers) count once per process, as RSS does.
    """
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    page, named, found = os.sysconf("SC_PAGE_SIZE"), set(roots.values()), {}
    for name, root in roots.items():
        rss = fds = 0
        pending = [root]
        while pending:
            pid = pending.pop()
            try:
                with open(f"/proc/{pid}/statm") as statm:
                    rss += int(statm.read().split()[1]) * page
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            pending += [child for child in children.get(pid, []) if child not in named]
        found[name] = (rss, fds)
    return found


class GroupLag:
    """Offsets each consumer group is behind its topic's end (transaction markers included: a few
    remain when idle), through one admin client and one group-less consumer for the watermarks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = AdminClient(admin_config(settings))
        self.consumer = Consumer({**admin_config(settings), "group.id": f"{settings.topic_prefix}.soak-watermarks"})

    def now(self) -> dict[str, int]:
        """Per group; the commits are read before the ends, so a lag is never negative."""
        committed = {group: committed_total(self.admin, f"{self.settings.topic_prefix}.{group}") for group in GROUPS}
        ends = {topic: high_watermarks_total(self.consumer, topic_name(self.settings, topic))
                for topic in set(GROUPS.values())}
        return {group: ends[topic] - committed[group] for group, topic in GROUPS.items()}

    def close(self) -> None:
        self.consumer.close()


def progress(run: StageRun) -> tuple[int, int, int, int, int]:
    """(sent, accepted, refused, in flight, accepted but not queryable) of ``run``, now."""
    count, statuses = run.workload.count, Counter(run.status)  # one pass: answers arrive meanwhile
    accepted, answered = statuses[202], count - statuses[0]
    sent = count - run.scheduled.count(NOT_YET)  # after the answers: a command is sent before it is answered
    behind = sum(1 for status, at in zip(run.status, run.seen[ENGINE].at) if status == 202 and at == NOT_YET)
    return sent, accepted, answered - accepted, sent - answered, behind


# -- judging ----------------------------------------------------------------------------


def memory_growth(samples: list[Sample], services: list[str]) -> dict[str, dict[str, float]]:
    """Per process tree: RSS (MiB) after the warm-up and at the end of the load, the growth between,
    and the least-squares slope over every steady sample (MiB/min: a trend rather than two points)."""
    steady = [s for s in samples if s.phase == "steady"]
    figures = {}
    for name in services:
        start = statistics.median(s.rss[name] for s in steady[:MEDIAN_OF] if name in s.rss) / MIB
        end = statistics.median(s.rss[name] for s in steady[-MEDIAN_OF:] if name in s.rss) / MIB
        trend = statistics.linear_regression([s.t / 60 for s in steady if name in s.rss],
                                             [s.rss[name] / MIB for s in steady if name in s.rss])
        figures[name] = {"after_warmup_mib": start, "end_mib": end, "growth": end / start - 1,
                         "slope_mib_per_min": trend.slope}
    return figures


def log_errors(root: Path, services: list[str]) -> list[str]:
    """The first few lines of each service's log that hold a traceback or an error."""
    problems = []
    for name in services:
        with (root / f"{name}.log").open(errors="replace") as log:
            hits = [line.strip()[:300] for line in log if LOG_ERROR.search(line)]
        if hits:
            problems.append(f"{name} logged {len(hits)} error line(s), first: " + " | ".join(hits[:3]))
    return problems


# -- output -----------------------------------------------------------------------------


def samples_table(samples: list[Sample], services: list[str]) -> Table:
    """One row per sample: load, lag, and each process tree's RSS and fds."""
    table = Table(title="soak over time: RSS MiB · open fds per service; lag in commands and in offsets")
    for column in ("t s", "phase", "load 1m", "sent", "refused", "in flight", "not queryable",
                   *(f"lag {g}" for g in GROUPS), *services):
        table.add_column(column, justify="right")
    for s in samples:
        table.add_row(f"{s.t:.0f}", s.phase, f"{s.load_1m:.1f}", f"{s.sent:,}", f"{s.refused:,}",
                      f"{s.in_flight:,}", f"{s.not_queryable:,}", *(f"{s.group_lag.get(g, 0):,}" for g in GROUPS),
                      *(f"{s.rss[n] / MIB:,.0f} · {s.fds[n]}" if n in s.rss else "-" for n in services))
    return table


def growth_table(growth: dict[str, dict[str, float]], judged: list[str]) -> Table:
    table = Table(title=f"memory growth (limit +{MAX_GROWTH:.0%}): median RSS of the first {MEDIAN_OF} "
                        f"samples after the warm-up → of the last {MEDIAN_OF} under load")
    for column in ("process tree", "after warm-up MiB", "end MiB", "growth", "trend MiB/min", "judged"):
        table.add_column(column, justify="right")
    for name, f in growth.items():
        over = name in judged and f["growth"] > MAX_GROWTH
        table.add_row(name, f"{f['after_warmup_mib']:,.1f}", f"{f['end_mib']:,.1f}",
                      f"[red]{f['growth']:+.1%}[/red]" if over else f"{f['growth']:+.1%}",
                      f"{f['slope_mib_per_min']:+.1f}",
                      "yes" if name in judged else "no (reported)")
    return table


def plot(samples: list[Sample], services: list[str], warmup_s: float, load_s: float, path: Path) -> None:
    """RSS, open fds and lag over time, the warm-up and the end of the load marked."""
    t = [s.t for s in samples]
    figure = Figure(figsize=(11, 11))
    FigureCanvasAgg(figure)  # drawn by Agg into a file: no display, no pyplot state
    rss, fds, lag = figure.subplots(3, 1, sharex=True)
    for name in services:
        points = [(s.t, s.rss[name] / MIB, s.fds[name]) for s in samples if name in s.rss]
        rss.plot([p[0] for p in points], [p[1] for p in points], label=name)
        fds.plot([p[0] for p in points], [p[2] for p in points], label=name)
    lag.plot(t, [s.not_queryable for s in samples], label="accepted, not queryable (commands)")
    for group in GROUPS:
        lag.plot(t, [s.group_lag.get(group, 0) for s in samples], label=f"group {group} (offsets)")
    fds.set_yscale("log")  # the broker holds a thousand or more; each service a few dozen
    for axis, label in ((rss, "RSS MiB"), (fds, "open fds"), (lag, "behind")):
        axis.set_ylabel(label)
        axis.axvline(warmup_s, color="grey", linestyle="--")
        axis.axvline(load_s, color="grey", linestyle=":")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="upper left")
    lag.set_xlabel("seconds since the load started (dashed: end of warm-up; dotted: last send)")
    figure.suptitle("keel soak")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# -- main -------------------------------------------------------------------------------


@dataclass
class Soak:
    """The sampling loop around one open-loop run on a deployment."""

    deployment: Deployment
    harness: Harness
    lag: GroupLag
    broker_pid: int | None
    started: float = 0.0

    def roots(self) -> dict[str, int]:
        """Every service (a restarted one by its new pid), the broker's JVM (if found) and this harness."""
        return {**self.deployment.pids(), **({"broker": self.broker_pid} if self.broker_pid else {}),
                "harness": os.getpid()}

    def sample(self, run: StageRun, phase: str) -> Sample:
        memory = process_tree_memory(self.roots())
        sent, accepted, refused, in_flight, behind = progress(run)
        sample = Sample(t=time.perf_counter() - self.started, phase=phase, sent=sent, accepted=accepted,
                        refused=refused, in_flight=in_flight, not_queryable=behind, group_lag=self.lag.now(),
                        rss={n: m[0] for n, m in memory.items()}, fds={n: m[1] for n, m in memory.items()},
                        load_1m=os.getloadavg()[0])
        console.print(f"  {sample.t:6.0f} s {phase:8} sent {sent:,} not queryable {behind:,} lag "
                      + " ".join(f"{g} {v:,}" for g, v in sample.group_lag.items()) + " · RSS MiB "
                      + " ".join(f"{n} {v / MIB:,.0f}" for n, v in sample.rss.items()), soft_wrap=True)
        return sample

    def ticks(self, every_s: float, until: float) -> Iterator[None]:
        """Yield every ``every_s`` until the perf-counter time ``until``; between, restart what ended."""
        next_at = time.perf_counter()
        while time.perf_counter() < until:
            if time.perf_counter() >= next_at:
                next_at += every_s
                yield
            self.deployment.check_alive()
            self.harness.check_pollers()
            time.sleep(min(0.5, max(0.0, next_at - time.perf_counter())))


def effects_settled(settings: Settings, runs: list[StageRun], provider: ProviderSimulator,
                    timeout_s: float) -> list[str]:
    """``exactly_once`` with the effects, once every effect has its outcome (or ``timeout_s`` passed), and
    the provider performed each effect exactly once under its idempotency key: nothing else, nothing twice."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems, _ = exactly_once(settings, runs, effects=True)
        if not any(p.startswith("effects with no outcome") for p in problems) or time.monotonic() > deadline:
            break
        time.sleep(2)
    performed = provider.performed()
    twice = [key for key, action in performed.items() if action.count != 1]
    if twice:
        problems.append(f"the provider performed {len(twice):,} effects more than once, e.g. {twice[:3]}")
    outcomes = outcome_count(settings)
    if len(performed) != outcomes:
        problems.append(f"the provider performed {len(performed):,} effects; ClickHouse holds {outcomes:,} outcomes")
    return problems


def outcome_count(settings: Settings) -> int:
    """Effect outcome events in ClickHouse's raw rows."""
    client = connect(settings, may_host=False)
    try:
        names = ", ".join(map(repr, sorted(OUTCOME_TYPES)))
        return int(client.query(f"SELECT count() FROM events WHERE type IN ({names})").result_rows[0][0])
    finally:
        client.close()


def main(
    minutes: float = typer.Option(30.0, help="Minutes of steady load (30 for the published figure)."),
    rate: float = typer.Option(200.0, help="Commands/s offered (the 2-core machine saturates near 1,000)."),
    sample_s: float = typer.Option(10.0, help="Seconds between two samples."),
    warmup_minutes: float | None = typer.Option(
        None, help="Minutes of load before memory counts as warm (default: the first third of the run)."),
    workers: int = typer.Option(2, help="Gateway worker processes (keel gateway --workers)."),
    processors: int = typer.Option(1, help="Processor workers (keel process, each supervised)."),
    connections: int = typer.Option(16, help="Keep-alive connections of the open-loop generator (pipelined)."),
    poll_ms: float = typer.Option(100.0, help="Least ms between the starts of two engine polls."),
    analyst_poll_ms: float = typer.Option(1000.0, help="Least ms between two rounds of GET /v1/query."),
    raw_count: int = typer.Option(200_000, help="Messages of the raw Kafka baseline (0 skips it)."),
    drain_timeout: float = typer.Option(300.0, help="Seconds to wait after the load for every command to be queryable."),
    window_s: float = typer.Option(
        240.0, "--dedupe-window-s", help="The processors' dedupe window (KEEL_PROCESSOR_DEDUPE_WINDOW_S; the "
        "outbox keeps published commands half as long): short, so the warm-up reaches the steady state that "
        "the default 30 days reaches after a month."),
    out: Path | None = typer.Option(None, help="Where the table, plot, JSON and logs go (default: a new temp dir)."),
    keep: bool = typer.Option(False, help="Keep the data dir (outbox, chDB) too."),
) -> None:
    """Run a whole deployment at a steady rate for a long time; fail on errors, loss or memory growth."""
    load_s = minutes * 60
    warmup_s = (warmup_minutes if warmup_minutes is not None else minutes * WARMUP_SHARE) * 60
    if (load_s - warmup_s) / sample_s < 2 * MEDIAN_OF:
        raise typer.BadParameter(f"fewer than {2 * MEDIAN_OF} samples after the warm-up: run longer or sample "
                                 "more often")
    out = out or Path(tempfile.mkdtemp(prefix="keel-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    settings = Settings(data_dir=root, topic_prefix=unique_prefix("soak"))
    env = environment(settings, AdminClient(admin_config(settings)))
    broker_pid = listening_pid(int(settings.bootstrap_servers.split(",")[0].rsplit(":", 1)[1]))
    params = {"minutes": minutes, "rate": rate, "sample_s": sample_s, "warmup_s": warmup_s,
              "gateway_workers": workers, "processors": processors, "connections": connections,
              "poll_ms": poll_ms, "analyst_poll_ms": analyst_poll_ms, "raw_count": raw_count,
              "dedupe_window_s": window_s,
              "topic_prefix": settings.topic_prefix, "out": str(out)}
    provider = ProviderSimulator().__enter__()  # the effects' outside world; closed in the finally below
    deployment = Deployment(settings, root, workers, processors, extra_env={
        "KEEL_PROCESSOR_DEDUPE_WINDOW_S": f"{window_s:g}", "KEEL_OUTBOX_RETENTION_S": f"{window_s / 2:g}"},
        provider_url=provider.url)
    harness: Harness | None = None
    lag: GroupLag | None = None
    samples: list[Sample] = []
    problems: list[str] = []
    cpu: dict[str, dict[str, float]] = {}
    growth: dict[str, dict[str, float]] = {}
    raw: float | None = None
    steady_rate = 0.0
    drops: dict[str, int] = {}
    try:
        with interrupted_as_exit():
            console.print(f"deployment under {root}, topics {settings.topic_prefix}.*; output to {out}")
            harness = Harness.warmed_up(deployment, connections, poll_ms, analyst_poll_ms)
            lag = GroupLag(settings)
            soak = Soak(deployment, harness, lag, broker_pid)
            run = harness.new_run(int(rate * load_s), rate, PoolWorkload)
            console.print(f"soak: {rate:,.0f} commands/s for {minutes:g} min, warm-up {warmup_s:.0f} s, "
                          f"a sample every {sample_s:g} s; broker pid {broker_pid or 'not found'}")
            future = asyncio.run_coroutine_threadsafe(
                open_loop(deployment.port, run, connections, harness.stop, drain_timeout), harness.loop)
            soak.started = time.perf_counter()
            warm: tuple[CpuSample, int] | None = None  # CPU and queryable commands when the warm-up ended
            for _ in soak.ticks(sample_s, soak.started + load_s):
                phase = "warm-up" if time.perf_counter() - soak.started < warmup_s else "steady"
                if phase == "steady" and warm is None:
                    warm = cpu_sample(soak.roots()), run.queryable
                samples.append(soak.sample(run, phase))
            last_cpu, queryable = cpu_sample(soak.roots()), run.queryable
            assert warm is not None  # the parameters leave samples after the warm-up
            steady_rate = (queryable - warm[1]) / (last_cpu.wall - warm[0].wall)
            cpu = cpu_shares(warm[0], last_cpu, queryable - warm[1])
            for _ in soak.ticks(sample_s, time.perf_counter() + drain_timeout):
                samples.append(soak.sample(run, "drain"))
                if future.done() and all(seen.count >= run.accepted() for seen in run.seen.values()):
                    break
            future.result()
            console.print("checking every command and effect in ClickHouse…")
            problems += effects_settled(settings, harness.runs, provider, drain_timeout)
            sent, accepted, refused, unanswered, _ = progress(run)
            if refused or unanswered:
                problems.append(f"the gateway refused {refused:,} and never answered {unanswered:,} "
                                f"of {sent:,} commands")
            for name, seen in run.seen.items():
                if seen.count < accepted:
                    problems.append(f"{accepted - seen.count:,} accepted commands never seen by the {name} poller "
                                    f"within {drain_timeout:.0f} s of the last send")
            views = query_view_counts(deployment.port, deployment.analyst_tokens)
            distinct = sum(c for _, c in views.values())
            accepted_all = sum(r.accepted() for r in harness.runs)
            if distinct != accepted_all:
                problems.append(f"GET /v1/query sees {distinct:,} commands with events; {accepted_all:,} were accepted")
            for poller in harness.pollers:  # a dropped keep-alive connection is reconnected, and only reported
                problems += [f"the {poller.name} poller: {what} ×{n}" for what, n in poller.errors.items()
                             if what.startswith("HTTP")]
                drops.update({f"{poller.name} {what}": n for what, n in poller.errors.items()
                              if not what.startswith("HTTP")})
                if poller.foreign:
                    problems.append(f"the {poller.name} poller saw {poller.foreign:,} rows of no command of the run")
            harness.close()
            deployment.stop()
            if raw_count:
                console.print("raw baseline: produce of the same encoded commands…")
                raw = kafka_raw(settings, raw_count)
    except KeyboardInterrupt:
        problems.append("interrupted")
    except RuntimeError as exc:  # a service ended three times, a poller died, the warm-up failed
        problems.append(str(exc).splitlines()[0])
        console.print(f"[red]{exc}[/red]")
    finally:
        if harness is not None:
            harness.stop.set()
            harness.close()
        if lag is not None:
            lag.close()
        deployment.stop()
        provider.__exit__(None, None, None)
        services = list(deployment.processes)
        problems += [f"ended and started again: {e}" for e in deployment.exits]
        problems += [f"{n}: its watchdog ended a stalled worker {c} time(s)" for n, c in deployment.restarts().items()]
        problems += log_errors(root, services)
        (out / "logs").mkdir(exist_ok=True)
        for name in services:
            shutil.copy(root / f"{name}.log", out / "logs" / f"{name}.log")
        deployment.remove(keep)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    measured = [n for n in ("gateway", "relay", *sorted(n for n in services if n.startswith("processor")),
                            "chainer", "effects", "projector", "broker", "harness") if any(n in s.rss for s in samples)]
    if sum(s.phase == "steady" for s in samples) >= 2 * MEDIAN_OF:  # fewer: the run was cut short
        growth = memory_growth(samples, measured)
        problems += [f"{n}: RSS grew {f['growth']:+.1%} after the warm-up ({f['after_warmup_mib']:,.0f} → "
                     f"{f['end_mib']:,.0f} MiB), more than {MAX_GROWTH:.0%}"
                     for n, f in growth.items() if n in services and f["growth"] > MAX_GROWTH]
    table = samples_table(samples, measured)
    with (out / "table.txt").open("w") as text:
        Console(file=text, width=240).print(table)
    if samples:
        plot(samples, measured, warmup_s, load_s, out / "soak.png")
    wide = Console(stderr=True, width=max(console.width, 240))
    wide.print(environment_table(env, params))
    wide.print(table)
    if growth:
        wide.print(growth_table(growth, services))
    if cpu:
        wide.print("CPU over the steady window, cores: " + ", ".join(
            f"{n} {cpu[n]['cores']:.2f}" for n in [*measured, "others", "machine"] if n in cpu)
            + f"; {steady_rate:,.0f} commands/s made queryable")
    if raw is not None:
        wide.print(f"raw Kafka produce of the same encoded commands, same broker: {raw:,.0f} msgs/s")
    if drops:
        wide.print("poller connections dropped and opened again: " + ", ".join(f"{k} ×{n}" for k, n in drops.items()))
    wide.print(f"load average (1 min) at start {env['load_avg_1m_start']:.2f}, at end {env['load_avg_1m_end']:.2f}")
    wide.print(f"table, plot, JSON and logs in {out}")
    ok = not problems
    wide.print("[green]soak passed: no error, nothing lost, no memory growth[/green]" if ok
               else "[red]soak FAILED:[/red]\n  " + "\n  ".join(problems))
    document = {"benchmark": "soak", "ok": ok, "env": env, "params": params, "memory": growth,
                "steady_queryable_per_s": steady_rate, "cpu_cores": {n: f["cores"] for n, f in cpu.items()},
                "raw_kafka_msgs_per_s": raw, "problems": problems, "poll_connection_drops": drops, "samples": [asdict(s) for s in samples]}
    line = json.dumps(document, separators=(",", ":"))
    (out / "soak.json").write_text(line + "\n")
    print(line, flush=True)
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
