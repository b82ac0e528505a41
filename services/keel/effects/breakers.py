"""Circuit breakers per tenant and provider, as one effect worker keeps them.

A provider that fails ``threshold`` retryable attempts in a row is opened locally at once
(``record`` answers ``OPENED``: the worker sends ``OpenProviderBreaker``, so every other
worker learns it from the controls topic). While open, effects wait without calling it.
After a cooldown one attempt goes through as a probe: if the provider answers, the breaker
closes (``CLOSED``: the worker sends ``CloseProviderBreaker``); if not, it stays open and
the cooldown doubles, up to ``max_cooldown_s``.

The controls topic is followed edge by edge (``follow``): a breaker another worker opened
opens here, and one another worker's probe closed closes here. Only changes count, so a
worker's own breaker is not closed again by the controls record that lags behind it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

BreakerKey = tuple[str, str]
"""(tenant, provider)."""


class Admission(Enum):
    """What an attempt may do now."""

    GO = "go"
    PROBE = "probe"
    """Go, as the one probe through an open breaker."""
    WAIT = "wait"


class Transition(Enum):
    """A change the other workers must hear of."""

    OPENED = "opened"
    CLOSED = "closed"


@dataclass
class _Breaker:
    failures: int = 0
    open_since: float | None = None
    cooldown_s: float = 0.0
    probing: bool = False
    seen_open: bool = False
    """Whether the controls topic said open when last looked at."""


class Breakers:
    """Every (tenant, provider) breaker of one worker; ``clock`` is monotonic seconds."""

    def __init__(self, threshold: int, cooldown_s: float, max_cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.cooldown_s, self.max_cooldown_s, self.clock = threshold, cooldown_s, max_cooldown_s, clock
        self._breakers: dict[BreakerKey, _Breaker] = {}

    def follow(self, key: BreakerKey, open_in_controls: bool) -> None:
        """Take in what the controls topic says of ``key`` now (only a change of it counts)."""
        breaker = self._breakers.get(key)
        if breaker is None:
            if not open_in_controls:
                return
            breaker = self._breakers[key] = _Breaker()
        if open_in_controls == breaker.seen_open:
            return
        breaker.seen_open = open_in_controls
        if open_in_controls and breaker.open_since is None:
            self._open(breaker, self.cooldown_s)
        elif not open_in_controls and breaker.open_since is not None:
            self._close(breaker)

    def admit(self, key: BreakerKey) -> Admission:
        """Whether an attempt against ``key`` may start now; a ``PROBE`` must be ``record``ed."""
        breaker = self._breakers.get(key)
        if breaker is None or breaker.open_since is None:
            return Admission.GO
        if breaker.probing or self.clock() < breaker.open_since + breaker.cooldown_s:
            return Admission.WAIT
        breaker.probing = True
        return Admission.PROBE

    def abandon(self, key: BreakerKey) -> None:
        """An admitted attempt never reached the provider: a probe it was is free again."""
        breaker = self._breakers.get(key)
        if breaker is not None:
            breaker.probing = False

    def record(self, key: BreakerKey, answered: bool, *, probe: bool) -> Transition | None:
        """Count an attempt's end: ``answered`` unless it failed retryably (the provider did not answer)."""
        breaker = self._breakers.setdefault(key, _Breaker())
        if probe:
            breaker.probing = False
            if answered:
                self._close(breaker)
                return Transition.CLOSED
            self._open(breaker, min(breaker.cooldown_s * 2, self.max_cooldown_s))
            return None
        if breaker.open_since is not None:  # an attempt begun before the breaker opened: the probe decides
            return None
        if answered:
            breaker.failures = 0
            return None
        breaker.failures += 1
        if breaker.failures < self.threshold:
            return None
        self._open(breaker, self.cooldown_s)
        return Transition.OPENED

    def open_keys(self) -> list[BreakerKey]:
        """The breakers open now (read from the metrics thread: one copy, made in one step)."""
        return [key for key, breaker in list(self._breakers.items()) if breaker.open_since is not None]

    def _open(self, breaker: _Breaker, cooldown_s: float) -> None:
        breaker.open_since, breaker.cooldown_s, breaker.failures = self.clock(), cooldown_s, 0

    @staticmethod
    def _close(breaker: _Breaker) -> None:
        breaker.open_since, breaker.failures, breaker.probing = None, 0, False
