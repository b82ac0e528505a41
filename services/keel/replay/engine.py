"""Replays a range of a topic through a filter into a sink, resumably.

The consumer is ``read_committed`` with partitions assigned explicitly (no group), so a
replay never disturbs the pipeline's consumers. Every ``checkpoint_every`` records the sink
flushes and a checkpoint file records, next to the sink's state, the next offset of every
partition; a replay started again with the same job and checkpoint continues from there.
A checkpoint written for another job (other topic, range, filter or target) is refused.
Republishing into one of Keel's live topics needs ``allow_live``; the CLI asks for it
explicitly and for a confirmation. Values sealed under a key erased by now reach every sink
as ``⟨erased⟩`` (``keel.trust.erased``): the record is re-encoded for sinks that copy its
bytes; any other record keeps its exact bytes and its ciphertext.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from keel.bootstrap import known_erasures
from keel.config import Settings
from keel.contracts.codec import EnvelopeCodec
from keel.errors import InfraError, KeelError
from keel.kafka.clients import consumer_config
from keel.kafka.topics import declared_topics
from keel.replay.errors import ReplayError
from keel.replay.range import Bound, Filter, resolve
from keel.replay.sinks import Sink
from keel.trust.erased import Erased, Erasures

_POLL_S = 0.2
_STALL_S = 30.0


@dataclass(frozen=True)
class ReplayJob:
    """What to replay: a topic, a range, a filter, and a description of the target."""

    topic: str
    start: Bound
    end: Bound
    filter: Filter
    target: str

    @property
    def fingerprint(self) -> str:
        """Identifies the job in its checkpoint, so a checkpoint never resumes another job."""
        text = json.dumps(asdict(self), default=lambda v: sorted(v) if isinstance(v, frozenset) else str(v),
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ReplayProgress:
    """Records read and kept so far, out of the range's total."""

    read: int
    kept: int
    total: int


def live_topics(settings: Settings) -> frozenset[str]:
    """Keel's own topics under the configured prefix."""
    return frozenset(spec.name for spec in declared_topics(settings))


def guard_target_topic(settings: Settings, topic: str, *, allow_live: bool) -> None:
    """Refuse to republish into a live topic unless explicitly allowed."""
    if topic in live_topics(settings) and not allow_live:
        raise ReplayError(f"{topic} is a live Keel topic; republishing into it needs --allow-live and a "
                          "confirmation", code="live_target")


def replay(settings: Settings, job: ReplayJob, sink: Sink, *, checkpoint: Path | None = None,
           checkpoint_every: int = 50_000, on_progress: Callable[[ReplayProgress], None] | None = None,
           codec: EnvelopeCodec | None = None, erasures: Erasures | None = None) -> ReplayProgress:
    """Replay ``job`` into ``sink``; resumes from ``checkpoint`` when it holds this job's state.

    ``erasures`` defaults to the configured key store's tombstones.
    """
    codec = codec or EnvelopeCodec()
    config = consumer_config(settings, f"{settings.topic_prefix}.replay.{uuid.uuid4().hex}",
                             **{"enable.partition.eof": True})
    consumer = Consumer(config)
    release: Callable[[], None] = lambda: None
    try:
        if erasures is None:
            erasures, release = known_erasures(settings)
        ranges = resolve(consumer, config, job.topic, job.start, job.end)
        total = sum(last - first for first, last in ranges.values())
        starts = {p: first for p, (first, _) in ranges.items()}
        kept = 0
        saved = _load(checkpoint, job)
        if saved is not None:
            starts = {int(p): int(o) for p, o in saved["next"].items()}
            kept = int(saved["kept"])
            sink.resume(saved["sink"])
        pending = {p: last for p, (_, last) in ranges.items() if starts.get(p, last) < last}
        read = total - sum(last - starts.get(p, last) for p, last in pending.items())
        consumer.assign([TopicPartition(job.topic, p, starts[p]) for p in sorted(pending)])
        since = 0
        seen = time.monotonic()
        while pending:
            messages = consumer.consume(10_000, timeout=_POLL_S)
            if not messages and time.monotonic() - seen > _STALL_S:
                raise InfraError(f"replay of {job.topic} stalled; partitions still open: {sorted(pending)}",
                                 code="replay_stalled")
            erased = erasures.among(m.value() or b"" for m in messages if m.error() is None)
            for message in messages:
                seen = time.monotonic()
                partition, offset, error = message.partition(), message.offset(), message.error()
                if partition not in pending:
                    continue
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    raise InfraError(f"reading {job.topic} failed: {error.str()}", code="consumer_failed")
                if error is None and offset is not None:
                    read += 1
                    since += 1
                    starts[partition] = offset + 1
                    if offset >= pending[partition]:
                        continue  # past the end bound (the end is exclusive)
                    if job.filter.key_may_match(message.key()):
                        kept += _write(codec, message, job.filter, sink, erased)
                if error is not None or starts[partition] >= pending[partition]:
                    starts[partition] = max(starts[partition], pending[partition])
                    del pending[partition]
                    consumer.pause([TopicPartition(job.topic, partition)])
                if since >= checkpoint_every or not pending:
                    _save(checkpoint, job, starts, kept, sink.flush())
                    since = 0
            if on_progress is not None:
                on_progress(ReplayProgress(read=min(read, total), kept=kept, total=total))
        return ReplayProgress(read=total, kept=kept, total=total)
    finally:
        consumer.close()
        release()


def _write(codec: EnvelopeCodec, message: Message, chosen: Filter, sink: Sink, erased: Erased) -> int:
    try:
        event = codec.decode(message.value() or b"")
    except KeelError:
        return 0  # the projector logs undecodable records; a replay skips them
    if not chosen.matches(event):
        return 0
    redacted = erased.envelope(event)
    if redacted is not event:
        message.set_value(codec.encode(redacted))  # sinks that copy the record's bytes copy these
    sink.write(message, redacted)
    return 1


class _Checkpoint(TypedDict):
    """A replay's saved progress: its job, the next offset per partition, and the sink's state."""

    job: str
    next: dict[str, int]
    kept: int
    sink: dict[str, Any]


def _load(path: Path | None, job: ReplayJob) -> _Checkpoint | None:
    if path is None or not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplayError(f"{path} is not a readable replay checkpoint: {exc}", code="checkpoint_unreadable") from exc
    if not isinstance(state, dict) or state.get("job") != job.fingerprint:
        raise ReplayError(f"{path} is the checkpoint of another replay; remove it or pick another path",
                          code="checkpoint_mismatch")
    return cast(_Checkpoint, state)


def _save(path: Path | None, job: ReplayJob, starts: dict[int, int], kept: int, sink_state: dict[str, object]) -> None:
    if path is None:
        return
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps({"job": job.fingerprint, "next": {str(p): o for p, o in starts.items()},
                                     "kept": kept, "sink": sink_state}))
    os.replace(temporary, path)  # atomic: a crash leaves the old checkpoint or the new one
