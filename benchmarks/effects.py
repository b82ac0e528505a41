"""Effects: the effect worker's rate, with a no-op handler and against a provider answering in 50 ms.

Stages, in one run, on throwaway topics and groups (deleted at the end):

1. ``processor``: ``CommandProcessor`` deciding the commands whose events carry the no-op
   effect (``effects_domain``): the baseline of stage 2.
2. ``effects-noop``: one ``EffectWorker`` (in a thread of this process, as ``keel effects run
   --no-supervise`` runs it) carrying those effects: the handler returns at once, so the rate
   is the worker's own cost per effect. Then ``outcomes-noop``: a processor recording the
   outcome commands as ``EffectSucceeded``.
3. ``processor-refunds`` decides the support desk's subscriptions and refunds; ``raw-http``
   and ``raw-http-pool-100`` drive the provider simulator (every answer ``--latency-ms``
   late) with a bare aiohttp client at the concurrency the worker may use; ``effects-50ms``
   is the worker running the support desk's ``issue_refund`` against the same simulator;
   ``outcomes-50ms`` records those outcomes.

Effect stages are timed from the first outcome Kafka acknowledged to the last, so the group
join and the first fetch are excluded; processor stages from the end of their first batch.
Cross-checks: every effect has exactly one outcome command on the commands topic and one
``EffectSucceeded``; for the refunds the simulator performed each idempotency key once.
Figures are printed, never judged; the exit status is non-zero only when effects or
commands were lost, a cross-check disagreed, or the infrastructure failed.

Run with ``.venv/bin/python benchmarks/effects.py`` against a broker from ``keel up``.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import json
import logging
import os
import pstats
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aiohttp
import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from _common import (
    private_keys,
    AGENT,
    BILLING,
    LEAD,
    TENANTS,
    BatchClock,
    Mark,
    StageResult,
    committed_total,
    environment,
    environment_table,
    machine_busy_seconds,
    mismatches,
    results_table,
    stage_result,
    status_console,
    unique_prefix,
    window_result,
)
import effects_domain
from effects_domain import Poke
from kafka_baseline import FIRST_BATCH_LIMIT_S, FROM_FIRST_BATCH, STALL_S, Cleanup, preload
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.domain.effects import idempotency_key, outcome_command_id
from keel.domain.envelope import Actor, ActorKind, Authority, Envelope, new_command
from keel.domain.events import EffectCancelled, EffectFailed, EffectSucceeded
from keel.domain.outcomes import event_id
from keel.effects.worker import EffectStats, EffectWorker
from keel.kafka.broker import broker_status
from keel.kafka.clients import admin_config
from keel.kafka.reader import read_to_end, record_headers
from keel.kafka.topics import Topic, apply_topics, declared_topics, topic_name
from keel.processor.worker import CommandProcessor, ProcessorStats
from keel.testing.provider import Faults, ProviderSimulator
from support_desk.effects import PAYMENTS_URL
from support_desk.messages import IssueRefund, StartSubscription

EFFECTS_PER_AGGREGATE = 2  # effects queue one at a time per aggregate: the workload spreads over many
PRICE_CENTS = 4_000
REFUND_CENTS = 1_000
POKER = Actor(kind=ActorKind.SERVICE, id="bench-poker")
OUTCOMES = ("EffectSucceeded", "EffectFailed", "EffectCancelled")
SAMPLE_S = 0.01  # how often the effect stages read the worker's counters
FIRST_OUTCOME_LIMIT_S = 120.0
FROM_FIRST_OUTCOME = "1st outcome acked"
FROM_FIRST_ANSWER = "1st answer"
DEFAULT_POOL = 100  # aiohttp.ClientSession()'s connection limit: what keel.domains.http's session has
RAW_TIMEOUT_S = 9.9  # what an attempt's default 10 s leaves the handler's request (keel.domains.http.MARGIN_S)
_TICK = os.sysconf("SC_CLK_TCK")


# -- CPU of everything sharing the machine ------------------------------------------------


def _stat_cpu_s(path: str) -> float | None:
    """utime + stime of a /proc ``stat`` file (a process or one thread), in seconds."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def child_pid(marker: str) -> int | None:
    """The pid of this process's child whose command line contains ``marker``."""
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                if marker in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    return int(pid)
            except OSError:
                continue
    return None


class GcClock:
    """Wall time this process spends in the cyclic garbage collector (any thread; it holds the GIL)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full_collections = 0
        self._began = 0.0

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self._on_collect)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._on_collect)

    def _on_collect(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._began
        if info["generation"] == 2:
            self.full_collections += 1


GC = GcClock()


@dataclass(frozen=True)
class Watched:
    """What to read CPU time of besides this process: a thread of it, the simulator, the broker."""

    thread_id: int | None = None
    simulator_pid: int | None = None
    broker_pid: int | None = None


@dataclass(frozen=True)
class Usage:
    """CPU seconds used so far by this process, the watched thread and processes, and the machine."""

    mark: Mark
    thread: float | None
    simulator: float | None
    broker: float | None
    machine: float
    gc: float
    full_collections: int


def usage_now(total: int, watched: Watched) -> Usage:
    """A ``Usage`` for ``total`` items done, now."""
    return Usage(
        mark=Mark(time.perf_counter(), time.process_time(), total),
        thread=_stat_cpu_s(f"/proc/self/task/{watched.thread_id}/stat") if watched.thread_id else None,
        simulator=_stat_cpu_s(f"/proc/{watched.simulator_pid}/stat") if watched.simulator_pid else None,
        broker=_stat_cpu_s(f"/proc/{watched.broker_pid}/stat") if watched.broker_pid else None,
        machine=machine_busy_seconds(), gc=GC.seconds, full_collections=GC.full_collections)


@dataclass(frozen=True)
class Load:
    """Where the CPU went during a stage's timed window, and how many items were in flight."""

    stage: str
    thread_busy: float | None
    """CPU of the worker's (or the raw client's) event-loop thread, as a share of one core."""
    gc_share: float
    """Share of the window this process spent in the garbage collector, when no Python thread runs."""
    full_collections: int
    process_us: float
    """This process's CPU (every thread) per item."""
    simulator_us: float | None
    broker_us: float | None
    machine_cores: float
    """Cores busy on the whole machine, everything included but the hypervisor's steal."""
    others_cores: float
    """Cores busy with anything but this process, the simulator and the broker: the neighbours."""
    in_flight_mean: float | None
    in_flight_max: int | None
    ms_in_flight: float | None
    """Mean in flight over the rate (Little's law): how long one item spends in flight."""


def load_between(stage: str, first: Usage, last: Usage, in_flight: list[int] | None) -> Load:
    """The ``Load`` of the window ``first``..``last``."""
    items, seconds = last.mark.total - first.mark.total, last.mark.wall - first.mark.wall

    def spent(a: float | None, b: float | None) -> float:
        return b - a if a is not None and b is not None else 0.0

    def per_item(a: float | None, b: float | None) -> float | None:
        return spent(a, b) / items * 1e6 if a is not None and b is not None and items else None

    def cores(used: float) -> float:
        return used / seconds if seconds > 0 else 0.0

    mean = sum(in_flight) / len(in_flight) if in_flight else None
    rate = items / seconds if seconds > 0 else 0.0
    ours = (spent(first.mark.cpu, last.mark.cpu) + spent(first.simulator, last.simulator)
            + spent(first.broker, last.broker))
    return Load(
        stage=stage,
        thread_busy=cores(spent(first.thread, last.thread)) if first.thread is not None else None,
        gc_share=cores(last.gc - first.gc), full_collections=last.full_collections - first.full_collections,
        process_us=per_item(first.mark.cpu, last.mark.cpu) or 0.0,
        simulator_us=per_item(first.simulator, last.simulator), broker_us=per_item(first.broker, last.broker),
        machine_cores=cores(last.machine - first.machine),
        others_cores=max(0.0, cores(last.machine - first.machine - ours)),
        in_flight_mean=mean, in_flight_max=max(in_flight) if in_flight else None,
        ms_in_flight=mean / rate * 1000 if mean is not None and rate else None)


# -- workloads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Commands to pre-load, and the ids of the effects their events carry."""

    commands: list[Envelope]
    effects: list[uuid.UUID]
    aggregates: int


@dataclass(frozen=True)
class Loaded:
    """A workload once on the commands topic: what the checks need, without its commands."""

    commands: int
    effects: list[uuid.UUID]
    aggregates: int
    seconds: float
    """How long sending them took (not a timed stage)."""


def pre_load(settings: Settings, workload: Workload) -> Loaded:
    """Send the workload's commands and let go of them.

    Tens of thousands of envelopes kept alive here would be walked by every full garbage
    collection of the timed stages, a cost the worker's own process does not have.
    """
    seconds = preload(settings, workload.commands)
    return Loaded(len(workload.commands), workload.effects, workload.aggregates, seconds)


def fresh_heap() -> None:
    """Collect what earlier stages left, so that a stage's garbage collections are its own."""
    gc.collect()


def interleave(plans: list[list[Envelope]]) -> list[Envelope]:
    """Aggregates' commands step by step: every batch holds many aggregates, each in its order."""
    longest = max((len(p) for p in plans), default=0)
    return [plan[step] for step in range(longest) for plan in plans if step < len(plan)]


def poke_workload(effects: int) -> Workload:
    """``effects`` pokes of the benchmark domain, two per probe, across the tenants."""
    aggregates = effects // EFFECTS_PER_AGGREGATE
    plans = [[new_command(Poke(n=i * EFFECTS_PER_AGGREGATE + k), tenant_id=TENANTS[i % len(TENANTS)],
                          aggregate_id=f"probe-{i}", actor=POKER)
              for k in range(EFFECTS_PER_AGGREGATE)] for i in range(aggregates)]
    commands = interleave(plans)
    return Workload(commands, [event_id(c.id, 0) for c in commands], aggregates)


def refund_workload(effects: int) -> Workload:
    """Subscriptions across the tenants, each started and then refunded twice by the support agent."""
    aggregates = effects // EFFECTS_PER_AGGREGATE
    plans: list[list[Envelope]] = []
    refunds: list[Envelope] = []
    for i in range(aggregates):
        tenant, aggregate, customer = TENANTS[i % len(TENANTS)], f"sub-{i}", f"cust-{i}"
        start = new_command(StartSubscription(customer_id=customer, plan="pro", monthly_price_cents=PRICE_CENTS,
                                              currency="EUR"),
                            tenant_id=tenant, aggregate_id=aggregate, actor=BILLING,
                            authority=Authority(role="billing-service"))
        mine = [new_command(IssueRefund(amount_cents=REFUND_CENTS, currency="EUR", reason="unused days",
                                        confidence=0.9),
                            tenant_id=tenant, aggregate_id=aggregate, actor=AGENT, on_behalf_of=customer,
                            delegation=(LEAD,), authority=Authority(role="support-agent"))
                for _ in range(EFFECTS_PER_AGGREGATE)]
        refunds += mine
        plans.append([start, *mine])
    return Workload(interleave(plans), [event_id(c.id, 0) for c in refunds], aggregates)


# -- the processor -----------------------------------------------------------------------


def decide(settings: Settings, admin: AdminClient, stage: str, label: str, count: int,
           committed_before: int) -> StageResult:
    """A fresh processor decides ``count`` commands (every one accepted, one event each); timed from its first batch."""
    fresh_heap()
    processor = CommandProcessor(settings, instance_id=unique_prefix("worker"))
    clock = BatchClock()  # init_transactions is not counted
    stop = threading.Event()

    def on_batch(stats: ProcessorStats) -> None:
        done = stats.commands + stats.dead_lettered
        clock.mark(done)
        if done >= count:
            stop.set()

    threading.Thread(target=_stop_when_stalled, args=(stop, clock), daemon=True).start()
    try:
        processor.run(stop, on_batch)
    finally:
        stop.set()
        processor.close()
    s = processor.stats
    committed = committed_total(admin, processor.group_id)
    return stage_result(
        stage, label, count, clock, message_bytes=None, timed=FROM_FIRST_BATCH,
        detail=f"{s.events:,} events, {s.rejected:,} rejected; {s.batches} batches; committed offsets: {committed:,}",
        anomalies=mismatches(("rejected", s.rejected, 0), ("dead-lettered", s.dead_lettered, 0),
                             ("duplicates", s.duplicates, 0), ("events", s.events, s.commands),
                             ("committed offsets", committed, committed_before + count)))


def _stop_when_stalled(stop: threading.Event, clock: BatchClock) -> None:
    """Set ``stop`` when no batch has completed for too long (commands lost or the processor stuck)."""
    while not stop.wait(1.0):
        last, limit = (clock.marks[-1], STALL_S) if clock.marks else (clock.start, FIRST_BATCH_LIMIT_S)
        if time.perf_counter() - last.wall > limit:
            stop.set()


# -- the effect worker -------------------------------------------------------------------


def run_effects(settings: Settings, stage: str, label: str, count: int, watched: Watched,
                profile: cProfile.Profile | None) -> tuple[StageResult, Load | None, dict[str, int]]:
    """One effect worker, in a thread, runs ``count`` effects; timed from the first acknowledged outcome."""
    fresh_heap()
    stats = EffectStats()
    worker = EffectWorker(settings, instance_id=unique_prefix("effects"), stats=stats)
    stop = threading.Event()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            if profile is not None:
                profile.enable()  # this thread only
            worker.run(stop)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's thread
            failures.append(exc)
        finally:
            if profile is not None:
                profile.disable()

    thread = threading.Thread(target=work, name="effect-worker")
    start = usage_now(0, watched)
    thread.start()
    while thread.native_id is None:
        time.sleep(0.001)
    watched = replace(watched, thread_id=thread.native_id)
    first: Usage | None = None
    last: Usage | None = None
    in_flight: list[int] = []
    progress_at, settled_before = time.perf_counter(), 0
    try:
        while thread.is_alive():
            time.sleep(SAMPLE_S)
            settled = stats.succeeded + stats.failed + stats.cancelled
            now = time.perf_counter()
            if settled > settled_before:
                progress_at, settled_before = now, settled
            if first is None and settled:
                first = usage_now(settled, watched)
            elif first is not None and not stop.is_set():
                in_flight.append(stats.attempts - stats.retried - settled)
            if settled >= count and not stop.is_set():
                last = usage_now(settled, watched)
                stop.set()
            if not stop.is_set() and now - progress_at > (STALL_S if first is not None else FIRST_OUTCOME_LIMIT_S):
                stop.set()
    finally:
        stop.set()
        thread.join()
        worker.close()
    if failures:
        raise failures[0]
    counters = asdict(stats)
    settled = stats.succeeded + stats.failed + stats.cancelled
    end = last or usage_now(settled, watched)
    window_start = first or start
    result = window_result(
        stage, label, count, stats.succeeded, window_start.mark, end.mark, start=start.mark, message_bytes=None,
        batches=0, timed=FROM_FIRST_OUTCOME,
        detail=(f"{stats.attempts:,} attempts, {stats.retried:,} retried, {stats.succeeded:,} succeeded, "
                f"{stats.failed:,} failed, {stats.cancelled:,} cancelled"),
        anomalies=mismatches(("failed", stats.failed, 0), ("cancelled", stats.cancelled, 0)))
    load = load_between(stage, window_start, end, in_flight) if first is not None and last is not None else None
    return result, load, counters


def outcome_commands(settings: Settings, effects: list[uuid.UUID], workload: int) -> tuple[str, ...]:
    """The commands topic holds the ``workload`` commands and one outcome command (generation 0) per effect."""
    codec = EnvelopeCodec()
    wanted = {outcome_command_id(e, 0) for e in effects}
    seen: Counter[uuid.UUID] = Counter()
    others = 0
    for message in read_to_end(settings, topic_name(settings, Topic.COMMANDS)):
        command_id = codec.read(message.value() or b"")["id"]
        if command_id in wanted:
            seen[command_id] += 1
        else:
            others += 1
    return mismatches(("effects with an outcome command", len(seen), len(wanted)),
                      ("outcome commands sent more than once", sum(1 for n in seen.values() if n > 1), 0),
                      ("other commands on the topic", others, workload))


def recorded_outcomes(settings: Settings, effects: list[uuid.UUID]) -> tuple[str, ...]:
    """Each effect has exactly one recorded outcome on the events topic, and it is ``EffectSucceeded``."""
    codec = EnvelopeCodec()
    kinds: Counter[str] = Counter()
    per_effect: Counter[uuid.UUID] = Counter()
    for message in read_to_end(settings, topic_name(settings, Topic.EVENTS)):
        kind = (dict(record_headers(message)).get("keel-type") or b"").decode()
        if kind in OUTCOMES:
            kinds[kind] += 1
            outcome = codec.decode(message.value() or b"").payload
            assert isinstance(outcome, EffectSucceeded | EffectFailed | EffectCancelled)
            per_effect[outcome.effect_id] += 1
    wanted = set(effects)
    return mismatches(("EffectSucceeded", kinds["EffectSucceeded"], len(wanted)),
                      ("EffectFailed", kinds["EffectFailed"], 0), ("EffectCancelled", kinds["EffectCancelled"], 0),
                      ("effects with a recorded outcome", len(wanted & set(per_effect)), len(wanted)),
                      ("effects with more than one outcome", sum(1 for n in per_effect.values() if n > 1), 0))


# -- a bare HTTP client against the simulator -------------------------------------------


async def _drive(url: str, count: int, concurrency: int, pool: int, run: str,
                 watched: Watched) -> tuple[Usage, Usage | None, Usage, Counter[str]]:
    """POST ``count`` refunds, ``concurrency`` at a time over at most ``pool`` connections, as the worker does.

    Like the worker's attempts, each request is a task of its own that starts when a place is
    free, and its body and answer are JSON, encoded and parsed with the standard library.
    """
    endpoint = url.rstrip("/") + "/v1/refunds"
    outcomes: Counter[str] = Counter()
    places = asyncio.Semaphore(concurrency)
    first: Usage | None = None

    async def request(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal first
        key = f"{run}-{i}"
        headers = {"Idempotency-Key": key, "X-Keel-Tenant": TENANTS[i % len(TENANTS)], "X-Keel-Agent": AGENT.id}
        body = {"amount_cents": REFUND_CENTS, "currency": "EUR", "reference": key}
        try:
            async with session.post(endpoint, json=body, headers=headers, allow_redirects=False,
                                    timeout=aiohttp.ClientTimeout(total=RAW_TIMEOUT_S)) as response:
                status = response.status
                json.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcomes[type(exc).__name__] += 1
            return
        finally:
            places.release()
        outcomes["2xx" if 200 <= status < 300 else str(status)] += 1
        if first is None:
            first = usage_now(1, watched)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=pool)) as session:
        start = usage_now(0, watched)
        tasks: set[asyncio.Task[None]] = set()
        for i in range(count):
            await places.acquire()
            task = asyncio.create_task(request(session, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        last = usage_now(outcomes["2xx"], watched)
    return start, first, last, outcomes


def raw_http(url: str, stage: str, count: int, concurrency: int, pool: int,
             watched: Watched) -> tuple[StageResult, Load | None]:
    """Requests/s of a bare aiohttp client at ``concurrency``, on this (the main) thread's event loop."""
    watched = replace(watched, thread_id=threading.get_native_id())
    fresh_heap()
    start, first, last, outcomes = asyncio.run(_drive(url, count, concurrency, pool, unique_prefix(stage), watched))
    answered = outcomes["2xx"]
    window = first or start
    result = window_result(
        stage, f"aiohttp, {concurrency} requests in flight over ≤{pool} connections", count, answered,
        window.mark, last.mark, start=start.mark, message_bytes=None, batches=0, timed=FROM_FIRST_ANSWER,
        detail="answers: " + ", ".join(f"{k} {v:,}" for k, v in outcomes.most_common()))
    return result, load_between(stage, window, last, [concurrency]) if first is not None else None


def performed_once(simulator: ProviderSimulator, effects: list[uuid.UUID]) -> tuple[str, tuple[str, ...]]:
    """What the simulator received and performed, and whether it performed every effect's key exactly once."""
    performed = simulator.performed()
    wanted = {idempotency_key(e) for e in effects}
    counts = Counter({key: action.count for key, action in performed.items()})
    stats = simulator.stats()
    detail = f"simulator: {stats.requests:,} requests, {stats.performed:,} performed, {stats.replays:,} replays"
    return detail, mismatches(("effects performed", len(wanted & set(counts)), len(wanted)),
                              ("keys performed that are no effect of the run", len(set(counts) - wanted), 0),
                              ("keys performed more than once", sum(1 for n in counts.values() if n != 1), 0))


# -- the run ---------------------------------------------------------------------------


def register_domains() -> Path:
    """Write the benchmark domain's schemas and name it in ``KEEL_DOMAINS``; returns the folder to delete.

    Before anything loads the registry, which happens once per process.
    """
    folder = effects_domain.domain.home
    effects_domain.write_schemas(folder)
    named = [p for p in os.environ.get("KEEL_DOMAINS", "").split(",") if p.strip()]
    os.environ["KEEL_DOMAINS"] = ",".join([*named, effects_domain.__name__])
    return folder


def fresh_prefix(name: str, partitions: int, cleanup: Cleanup, admin: AdminClient) -> Settings:
    """Settings under a new prefix whose topics exist and are registered for cleanup."""
    settings = Settings().model_copy(update={"topic_prefix": unique_prefix(name), "topic_partitions": partitions})
    specs = declared_topics(settings)
    cleanup.topics += [s.name for s in specs]
    cleanup.groups += [f"{settings.topic_prefix}.{g}" for g in ("processor", "processor.loader", "effects")]
    apply_topics(admin, specs)
    return settings


@dataclass
class Run:
    """Everything a run measured."""

    results: list[StageResult]
    loads: list[Load]
    counters: dict[str, dict[str, int]]


def run_stages(admin: AdminClient, cleanup: Cleanup, effects: int, partitions: int, latency_ms: float,
               concurrency: int, status: Console, profile: cProfile.Profile | None) -> Run:
    """Every stage in order; what each creates is registered for cleanup before it is created."""
    run = Run([], [], {})
    broker_pid = broker_status(Settings()).pid

    # 1-2: the no-op effect, and the processor deciding its commands
    noop = fresh_prefix("effects-noop", partitions, cleanup, admin)
    pokes = pre_load(noop, poke_workload(effects))
    status.log(f"1/3 pre-loaded {pokes.commands:,} pokes ({pokes.aggregates:,} probes, {len(TENANTS)} tenants) "
               f"in {pokes.seconds:.1f}s under {noop.topic_prefix}; deciding")
    run.results.append(decide(noop, admin, "processor", "CommandProcessor, pokes (1 effect each)", pokes.commands, 0))
    status.log("2/3 effect worker, no-op handler")
    result, load, run.counters["effects-noop"] = run_effects(
        noop, "effects-noop", "EffectWorker, no-op async handler", len(pokes.effects), Watched(broker_pid=broker_pid),
        None)
    result = replace(result, anomalies=result.anomalies + outcome_commands(noop, pokes.effects, pokes.commands))
    run.results.append(result)
    run.loads += [load] if load else []
    status.log("2/3 processor recording the outcomes")
    recorded = decide(noop, admin, "outcomes-noop", "CommandProcessor, CompleteEffect → EffectSucceeded",
                      len(pokes.effects), pokes.commands)
    run.results.append(replace(recorded, anomalies=recorded.anomalies + recorded_outcomes(noop, pokes.effects)))

    # 3: the support desk's refunds against the simulator
    refunds = fresh_prefix("effects-refunds", partitions, cleanup, admin)
    work = pre_load(refunds, refund_workload(effects))
    status.log(f"3/3 pre-loaded {work.commands:,} commands ({work.aggregates:,} subscriptions, "
               f"{len(work.effects):,} refunds) in {work.seconds:.1f}s under {refunds.topic_prefix}; deciding")
    run.results.append(decide(refunds, admin, "processor-refunds",
                              f"CommandProcessor, 1 start + {EFFECTS_PER_AGGREGATE} refunds per subscription",
                              work.commands, 0))
    with ProviderSimulator() as simulator:
        os.environ[PAYMENTS_URL] = simulator.url
        watched = Watched(simulator_pid=child_pid("keel.testing.provider"), broker_pid=broker_pid)
        faults = Faults(latency_ms=latency_ms)
        for stage, pool in (("raw-http", concurrency), ("raw-http-pool-100", DEFAULT_POOL)):
            simulator.reset()
            simulator.set_faults(faults)
            status.log(f"3/3 {stage}: {effects:,} requests, {concurrency} in flight, ≤{pool} connections, "
                       f"{latency_ms:g} ms answers")
            result, load = raw_http(simulator.url, stage, effects, concurrency, pool, watched)
            run.results.append(result)
            run.loads += [load] if load else []
        simulator.reset()
        simulator.set_faults(faults)
        status.log(f"3/3 effect worker, support desk refunds, {latency_ms:g} ms provider")
        stage = f"effects-{latency_ms:g}ms"
        result, load, counters = run_effects(refunds, stage, "EffectWorker, support_desk.effects.issue_refund",
                                             len(work.effects), watched, profile)
        run.counters[stage] = counters
        received, performed = performed_once(simulator, work.effects)
        run.results.append(replace(result, detail=f"{result.detail}; {received}", anomalies=result.anomalies
                                   + outcome_commands(refunds, work.effects, work.commands) + performed))
        run.loads += [load] if load else []
    # The handler's aiohttp session belongs to the worker's event loop, which has ended: nothing
    # closes it (the worker has no shutdown hook for handlers), and asyncio would log it at exit.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    status.log("3/3 processor recording the outcomes")
    recorded = decide(refunds, admin, f"outcomes-{latency_ms:g}ms", "CommandProcessor, CompleteEffect → EffectSucceeded",
                      len(work.effects), work.commands)
    run.results.append(replace(recorded, anomalies=recorded.anomalies + recorded_outcomes(refunds, work.effects)))
    return run


def ratios(results: dict[str, StageResult], latency_ms: float, concurrency: int) -> dict[str, float]:
    """The comparisons the benchmark exists for."""
    def ratio(a: str, b: str) -> float:
        return results[a].rate / results[b].rate if a in results and b in results and results[b].rate else 0.0

    def by_cpu(a: str, b: str) -> float:
        ok = a in results and b in results and results[a].cpu_us_per_message
        return results[b].cpu_us_per_message / results[a].cpu_us_per_message if ok else 0.0

    slow = f"effects-{latency_ms:g}ms"
    bound = concurrency / (latency_ms / 1000) if latency_ms else 0.0
    return {
        "effects-noop/processor": ratio("effects-noop", "processor"),
        "effects-noop/processor by CPU": by_cpu("effects-noop", "processor"),
        f"{slow}/raw-http": ratio(slow, "raw-http"),
        f"{slow}/raw-http-pool-100": ratio(slow, "raw-http-pool-100"),
        f"{slow}/concurrency bound ({bound:,.0f}/s)": results[slow].rate / bound if slow in results and bound else 0.0,
    }


def load_table(loads: list[Load], cores: int) -> Table:
    """Where the CPU went in each effect and raw stage's window."""
    table = Table(title="CPU and concurrency over each timed window (µs are per effect or request)",
                  caption="loop: CPU of the worker's (raw: the client's) event-loop thread; GC: share of the window "
                          "this process spent collecting (full collections); busy: cores busy on the machine, "
                          "others: of them, not this process, the simulator or the broker; in flight: mean / max "
                          "effects between attempt and acknowledged outcome (raw: requests); ms in flight: "
                          "mean in flight / rate")
    table.add_column("stage")
    for column in ("loop % core", "GC % (full)", "proc µs", "sim µs", "broker µs", f"busy of {cores}", "others",
                   "in flight", "ms in flight"):
        table.add_column(column, justify="right")

    def maybe(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    for load in loads:
        in_flight = (f"{load.in_flight_mean:,.0f} / {load.in_flight_max:,}"
                     if load.in_flight_mean is not None and load.in_flight_max is not None else "-")
        table.add_row(load.stage, maybe(load.thread_busy * 100 if load.thread_busy is not None else None, ".0f"),
                      f"{load.gc_share * 100:.0f} ({load.full_collections})", f"{load.process_us:.0f}",
                      maybe(load.simulator_us, ".0f"), maybe(load.broker_us, ".0f"), f"{load.machine_cores:.2f}",
                      f"{load.others_cores:.2f}", in_flight, maybe(load.ms_in_flight, ".0f"))
    return table


app = typer.Typer(add_completion=False)


@app.command()
def main(
    effects: int = typer.Option(20_000, min=100, help="Effects per effect stage (and requests per raw stage)."),
    partitions: int = typer.Option(6, min=1, help="Partitions of every topic the run creates."),
    latency_ms: float = typer.Option(50.0, min=0.0, help="How late the provider simulator answers every request."),
    json_only: bool = typer.Option(False, "--json-only", help="Print only the final JSON line."),
    profile: Path | None = typer.Option(None, help="Write a cProfile of the worker thread of the provider stage here "
                                                   "(slows it)."),
) -> None:
    """Measure the effect worker against the processor and a raw HTTP client; print the figures."""
    private_keys()
    folder = register_domains()
    settings = Settings()
    admin = AdminClient(admin_config(settings))
    status = status_console(json_only)
    out = Console(quiet=json_only, width=None if sys.stdout.isatty() else 140)
    env = environment(settings, admin)
    count = effects - effects % EFFECTS_PER_AGGREGATE
    concurrency = min(settings.effects_max_in_flight,
                      len(TENANTS) * min(settings.effects_max_per_tenant, settings.effects_max_per_provider))
    params = {"effects": count, "partitions": partitions, "latency_ms": latency_ms,
              "effects_per_aggregate": EFFECTS_PER_AGGREGATE, "tenants": len(TENANTS),
              "max_in_flight": settings.effects_max_in_flight, "max_per_tenant": settings.effects_max_per_tenant,
              "max_per_provider": settings.effects_max_per_provider, "raw_concurrency": concurrency,
              "worker": "EffectWorker in a thread of the benchmark process (as `keel effects run --no-supervise`)",
              "profiled": profile is not None}
    profiler = cProfile.Profile() if profile is not None else None
    cleanup = Cleanup()
    run = Run([], [], {})
    try:
        with GC:
            run = run_stages(admin, cleanup, count, partitions, latency_ms, concurrency, status, profiler)
    finally:
        for problem in cleanup.run(admin):
            status.log(f"[yellow]cleanup: {problem}[/yellow]")
        shutil.rmtree(folder, ignore_errors=True)
    env["load_avg_1m_end"] = os.getloadavg()[0]
    by_stage = {r.stage: r for r in run.results}
    figures = ratios(by_stage, latency_ms, concurrency)
    out.print(environment_table(env, params))
    out.print(results_table("Effects (commands, effects or requests/s over the timed window)", run.results))
    for r in run.results:
        out.print(f"  {r.stage}: {r.label}; {r.detail}" + "".join(f"\n    [red]{a}[/red]" for a in r.anomalies))
    out.print(load_table(run.loads, os.cpu_count() or 1))
    for name, value in figures.items():
        out.print(f"  ratio {name}: [bold]{value:.3f}[/bold]")
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
        out.print(f"  profile of the worker thread of the provider stage written to {profile} (it slowed that stage)")
        if not json_only:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    ok = bool(run.results) and all(r.ok for r in run.results)
    document = {
        "benchmark": "effects", "ok": ok, "env": env, "params": params,
        "results": {r.stage: {**asdict(r), "lost": r.lost, "ok": r.ok} for r in run.results},
        "load": {load.stage: asdict(load) for load in run.loads},
        "worker_counters": run.counters,
        "ratios": {k: round(v, 4) for k, v in figures.items()},
    }
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if not ok:
        failed = [r.stage for r in run.results if not r.ok]
        status.log(f"[red]lost effects or a failed cross-check in: {', '.join(failed) or 'setup'}[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
