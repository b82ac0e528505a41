"""Consumer lag per partition, from the statistics librdkafka already keeps.

A consumer given ``lag_config(...)`` reports its statistics every
``KEEL_METRICS_LAG_INTERVAL_MS`` (JSON, on the thread that polls it); ``record_lag``
turns them into ``keel_consumer_lag_records``. No extra broker round trips: the fetcher
already knows each partition's high watermark and last stable offset. Lag is measured
from the consumer's position, not its committed offset: transactional loops commit
through their producer, which librdkafka's consumer-side committed offset does not see.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from keel.config import Settings
from keel.observability.metrics import CONSUMER_LAG

log = logging.getLogger(__name__)


def lag_config(settings: Settings, group: str) -> dict[str, Any]:
    """librdkafka settings that feed ``group``'s lag to the metrics (none when metrics are off)."""
    if not settings.metrics_enabled or not settings.metrics_lag_interval_ms:
        return {}
    return {"statistics.interval.ms": settings.metrics_lag_interval_ms, "stats_cb": lag_reporter(group)}


def lag_reporter(group: str) -> Callable[[str], None]:
    """A ``stats_cb`` that records the lag of every partition the consumer holds."""
    held: set[tuple[str, str]] = set()

    def report(raw: str) -> None:
        try:
            now = partition_lags(json.loads(raw))
        except (ValueError, TypeError, AttributeError) as exc:  # never let a statistics quirk stop a loop
            log.debug("unreadable librdkafka statistics: %s", exc)
            return
        for topic, partition in held - set(now):  # revoked: its gauge would lie
            CONSUMER_LAG.remove(group, topic, partition)
        for (topic, partition), lag in now.items():
            CONSUMER_LAG.labels(group, topic, partition).set(lag)
        held.clear()
        held.update(now)

    return report


def partition_lags(stats: dict[str, Any]) -> dict[tuple[str, str], int]:
    """(topic, partition) -> records past the position, for each partition with a known position."""
    lags: dict[tuple[str, str], int] = {}
    for topic, body in (stats.get("topics") or {}).items():
        for name, partition in (body.get("partitions") or {}).items():
            if name == "-1" or partition.get("fetch_state") in (None, "none", "stopped"):
                continue  # the internal unassigned partition, or one this consumer does not fetch
            position = int(partition.get("app_offset", -1001))
            if position < 0:  # nothing consumed yet: where it starts from
                position = int(partition.get("committed_offset", -1001))
            end = int(partition.get("ls_offset", -1) if partition.get("ls_offset", -1) >= 0
                      else partition.get("hi_offset", -1))
            if position < 0 or end < 0:
                continue
            lags[topic, name] = max(0, end - position)
    return lags
