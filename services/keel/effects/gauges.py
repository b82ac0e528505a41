"""The effect workers' state as gauges: open provider breakers, and effects held unsettled.

Read at scrape time from every worker this process runs (``watch`` on start, ``forget``
on close), so a breaker that closes or a worker that stops leaves no stale series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from keel.effects.breakers import Breakers
from keel.observability.metrics import BREAKERS_OPEN, EFFECTS_BUFFERED, Values, known_label

_lock = threading.Lock()
_workers: dict[str, tuple[Callable[[], int], Breakers]] = {}


def watch(instance: str, buffered: Callable[[], int], breakers: Breakers) -> None:
    """Report ``instance``'s buffered effects and breakers from now on."""
    with _lock:
        _workers[instance] = (buffered, breakers)
    BREAKERS_OPEN.source, EFFECTS_BUFFERED.source = open_breakers, buffered_effects


def forget(instance: str) -> None:
    """Stop reporting ``instance`` (it closed)."""
    with _lock:
        _workers.pop(instance, None)


def open_breakers() -> Values:
    """(tenant, provider) -> 1 per open breaker; an ``other`` tenant counts how many of its are open."""
    with _lock:
        workers = list(_workers.values())
    opened = {key for _buffered, breakers in workers for key in breakers.open_keys()}
    values: Values = {}
    for tenant, provider in opened:
        label = (known_label(tenant), provider)
        values[label] = values.get(label, 0.0) + 1.0
    return values


def buffered_effects() -> Values:
    """worker -> effects it holds read but not settled."""
    with _lock:
        workers = list(_workers.items())
    return {(instance,): float(buffered()) for instance, (buffered, _breakers) in workers}
