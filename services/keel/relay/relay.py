"""The outbox relay: moves committed outbox rows to the commands topic, in order, at least once.

Why it never skips a late commit: it keeps no high-water mark. Each round reads the
oldest rows still marked unpublished (``published_at IS NULL ORDER BY seq``), so a row
whose transaction took a low ``seq`` and committed after higher ones is simply found by
the next round. A row is marked published only after Kafka's delivery report for it.

Why one relay at a time: relays share the outbox through a lease with an epoch. Only the
holder publishes; standbys take over when it lapses (``kill -9`` included). A paused
holder that wakes after a takeover may publish rows again; they are exact duplicates of
commands the processor dedupes by id, and each aggregate's order is kept because a relay
always publishes an aggregate's unpublished rows in ``seq`` order on one idempotent producer.

Why an outage is a state, not a stream of warnings: while Kafka does not acknowledge, every
round fails after ``KEEL_RELAY_DELIVERY_TIMEOUT_S`` and its rows stay unpublished for the next.
The relay says so once (what failed, how many commands wait in the outbox, how often it
retries), reminds every ``REMIND_S``, and says once when Kafka acknowledges again;
librdkafka's own line per refused or dropped connection, several a second, is left out
(``keel.kafka.clients.outage_quiet_logger``).

The lease holder also applies the outbox's retention (``KEEL_OUTBOX_RETENTION_S``): once a
minute it deletes published commands older than that, one batch per round while a backlog lasts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from confluent_kafka import KafkaError, Message, Producer

from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.gateway.settings import IngressSettings
from keel.kafka.clients import outage_quiet_logger, producer_config
from keel.kafka.topics import Topic, topic_name
from keel.observability import tracing
from keel.observability.batches import LoopMetrics
from keel.observability.metrics import RELAY_FAILED, RELAY_LEASE, RELAYED
from keel.sdk.producer import PRINCIPAL_TENANT_HEADER
from keel.outbox.models import PendingRow
from keel.outbox.store import OutboxStore
from keel.relay.spans import PublishSpans

log = logging.getLogger(__name__)

LEASE = "relay"
PRUNE_BATCH = 5_000  # rows per retention transaction: short, so the gateway's inserts never wait long
PRUNE_EVERY_S = 60.0
RETRY_S = 1.0  # pause after a round Kafka did not acknowledge (the round itself waited the delivery timeout)
REMIND_S = 60.0  # while Kafka stays away, how often the relay says so again


@dataclass
class RelayStats:
    """Counters since start, for logs and tests."""

    rounds: int = 0
    published: int = 0
    failed: int = 0
    standby_rounds: int = 0
    pruned: int = 0
    last_error: str | None = None
    outage_since: float | None = None
    """When the current run of rounds Kafka did not acknowledge began (monotonic), if one runs."""


class Relay:
    """Publishes outbox rows while it holds the outbox's relay lease."""

    def __init__(self, store: OutboxStore, settings: Settings, ingress: IngressSettings,
                 *, holder: str | None = None) -> None:
        self.store = store
        self.ingress = ingress
        self.topic = topic_name(settings, Topic.COMMANDS)
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stats = RelayStats()
        self._epoch: int | None = None
        self._renew_at = 0.0  # monotonic time the lease this relay holds is next renewed
        self._next_prune = 0.0  # monotonic time of the next retention batch
        self.metrics = LoopMetrics("relay")
        # Traced: one publish span per row, in the trace its envelope's ``traceparent`` names.
        self._spans = PublishSpans(self.topic, EnvelopeCodec()) if tracing.enabled() else None
        self._failures: dict[bytes, str] = {}  # the round's rows Kafka refused, by value: their errors
        timeout_ms = int(ingress.relay_delivery_timeout_s * 1000)
        # Untraced, only a refused row is reported into Python: a closure and a report per row cost
        # ~1.4 µs a row (the closure ~1.0; the report's call and message object ~0.4).
        self._producer = Producer(producer_config(
            settings, **{"message.timeout.ms": timeout_ms, "logger": outage_quiet_logger("keel.relay.kafka"),
                         "delivery.report.only.error": self._spans is None}))
        self._bootstrap = settings.bootstrap_servers
        self._reminded = 0.0  # monotonic time the outage was last reported
        self._failure_reported = 0.0  # monotonic time a failed round was last reported

    def run_once(self) -> int:
        """One round: keep the lease, publish a batch, mark what Kafka acknowledged."""
        self.stats.rounds += 1
        epoch = self._lease()
        if epoch is None:
            self.stats.standby_rounds += 1
            RELAY_LEASE.set(0)
            return 0
        RELAY_LEASE.set(1)
        if epoch != self._epoch:  # a takeover (or the first round): say so, for whoever runs the relays
            log.info("relay holds the outbox lease", extra={"holder": self.holder, "epoch": epoch})
            self._epoch = epoch
        self._prune()
        started = time.perf_counter()
        rows = self.store.unsent(self.ingress.relay_batch_size)
        if not rows:
            return 0
        delivered, failure = self._publish(rows)
        self.store.mark_published(delivered)
        self.stats.published += len(delivered)
        self.metrics.batch(len(rows), time.perf_counter() - started)
        RELAYED.inc(len(delivered))
        if failure is not None:
            self._undelivered(*failure)
        elif self.stats.outage_since is not None:
            self._delivered_again(self.stats.outage_since)
        return len(delivered)

    def _lease(self) -> int | None:
        """The lease's epoch while this relay holds it, else ``None``.

        A held lease is renewed once a third of its TTL has passed, not every round: a renewal
        is a durable write, and renewing at each round's start and after its flush made a round
        three commits (and fsyncs) on the outbox the gateways write to, not one. Nobody else
        takes the lease before it expires, and it is renewed while two thirds of it are left.
        """
        if self._epoch is not None and time.monotonic() < self._renew_at:
            return self._epoch
        return self._renew()

    def _renew(self) -> int | None:
        """Take or renew the lease (a durable write); returns its epoch, ``None`` while another holds it."""
        now = time.monotonic()
        epoch = self.store.acquire_lease(LEASE, self.holder, self.ingress.relay_lease_ttl_s)
        if epoch is None:
            self._epoch = None
        else:
            self._renew_at = now + self.ingress.relay_lease_ttl_s / 3
        return epoch

    def _undelivered(self, first: PendingRow, error: str) -> None:
        """Report a round Kafka did not acknowledge (``first`` failed row, its error): at the outage's
        start, then every ``REMIND_S``."""
        now = time.monotonic()
        if self.stats.outage_since is not None and now - self._reminded < REMIND_S:
            return
        started, self._reminded = self.stats.outage_since, now
        backlog = self.store.backlog().describe(time.time())
        retry = f"retrying every {self.ingress.relay_delivery_timeout_s + RETRY_S:.0f} s"
        first_failed = {"holder": self.holder, "tenant_id": first.key.split("/", 1)[0],
                        "command_id": str(first.command_id)}
        if started is None:
            self.stats.outage_since = now
            log.warning("Kafka at %s does not acknowledge the outbox's commands (%s): %s; they stay there, %s",
                        self._bootstrap, error, backlog, retry, extra=first_failed)
        else:
            log.warning("Kafka at %s still does not acknowledge the outbox's commands after %.0f s (%s): %s; %s",
                        self._bootstrap, now - started, error, backlog, retry, extra=first_failed)

    def _delivered_again(self, since: float) -> None:
        """End the outage that began at ``since``: say how long it lasted and what is left to catch up on."""
        self.stats.outage_since = None
        log.info("Kafka at %s acknowledges the outbox's commands again after %.0f s; catching up: %s",
                 self._bootstrap, time.monotonic() - since, self.store.backlog().describe(time.time()),
                 extra={"holder": self.holder})

    def _prune(self) -> None:
        """One batch of what the retention lets go; a full batch means more, next round."""
        retention = self.ingress.outbox_retention_s
        if not retention or time.monotonic() < self._next_prune:
            return
        deleted = self.store.prune(time.time() - retention, PRUNE_BATCH)
        self.stats.pruned += deleted
        self._next_prune = time.monotonic() + (0.0 if deleted == PRUNE_BATCH else PRUNE_EVERY_S)

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set; then give the lease up for a standby."""
        try:
            while not stop.is_set():
                try:
                    if self.run_once() == 0:
                        stop.wait(RETRY_S if self.stats.outage_since is not None
                                  else self.ingress.relay_poll_interval_s)
                except Exception as exc:  # noqa: BLE001 - an outage must not kill the relay
                    self._round_failed(exc)
                    stop.wait(RETRY_S)
        finally:
            RELAY_LEASE.set(0)
            self.store.release_lease(LEASE, self.holder)
            self._epoch = None
            self._producer.flush(self.ingress.relay_delivery_timeout_s)

    def _round_failed(self, exc: Exception) -> None:
        """Report a round that failed before Kafka (the outbox away, most often): when the error changes,
        then every ``REMIND_S``, not once a second."""
        now, error = time.monotonic(), str(exc)
        if error != self.stats.last_error or now - self._failure_reported >= REMIND_S:
            self._failure_reported = now
            log.warning("relay round failed: %s; retrying every %.0f s", error, RETRY_S, extra={"holder": self.holder})
        self.stats.last_error = error

    def _publish(self, rows: list[PendingRow]) -> tuple[list[uuid.UUID], tuple[PendingRow, str] | None]:
        """Produce rows in ``seq`` order and wait for every report; returns the acknowledged ids and,
        if any row failed, the first of them with its error.

        A row after a failed row of the same aggregate is not marked either: the next round
        sends both again in order, and the processor drops the duplicate by command id.
        """
        spans, produce = self._spans, self._producer.produce
        for row in rows:
            # The key's tenant is the gateway's authenticated principal's (never the body's).
            headers: list[tuple[str, str | bytes | None]] = [
                (PRINCIPAL_TENANT_HEADER, row.key.split("/", 1)[0].encode())]
            if spans is not None:
                headers.append((tracing.HEADER, spans.start(row)))
            while True:
                try:
                    produce(self.topic, value=row.value, key=row.key.encode(), headers=headers,
                            on_delivery=self._report)
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    self._producer.poll(0.05)
        while len(self._producer) > 0:  # never start a new round while a row is in flight
            self._producer.flush(1.0)
            self._lease()  # slow Kafka: keep the lease (renewed when due)
        refused, self._failures = self._failures, {}
        if not refused:
            return [row.command_id for row in rows], None
        failed = {row.command_id: refused[row.value] for row in rows if row.value in refused}
        self.stats.failed += len(failed)
        RELAY_FAILED.inc(len(failed))
        first = next(row for row in rows if row.command_id in failed)
        self.stats.last_error = failed[first.command_id]
        blocked: set[str] = set()
        delivered = []
        for row in rows:
            if row.command_id in failed or row.key in blocked:
                blocked.add(row.key)
            else:
                delivered.append(row.command_id)
        return delivered, (first, failed[first.command_id])

    def _report(self, error: KafkaError | None, message: Message) -> None:
        """Kafka's report on a row (only on a refused one while untraced); a row's value is unique (its id)."""
        value = message.value()
        assert isinstance(value, bytes)
        if error is not None:
            self._failures[value] = error.str()
        if self._spans is not None:
            self._spans.end(value, error.str() if error is not None else None)

    def close(self) -> None:
        """Flush what is in flight (its rows stay unpublished if it fails)."""
        self._producer.flush(self.ingress.relay_delivery_timeout_s)

