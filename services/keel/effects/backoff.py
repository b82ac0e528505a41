"""How long an effect waits before its next attempt: exponential backoff with jitter.

The n-th retry waits ``backoff_s * 2**(n-1)``, capped at ``max_backoff_s``, scaled by a
random factor in [0.5, 1]: effects that failed together (a provider outage) do not come
back together, and no retry comes sooner than half its nominal delay.
"""

from __future__ import annotations

import random

from keel.domains.model import Effect

_MAX_DOUBLINGS = 64  # 2**64 dwarfs any max_backoff_s; bounds the power before the cap applies


def retry_delay(effect: Effect, failed_attempts: int, rng: random.Random) -> float:
    """Seconds to wait after ``failed_attempts`` (>= 1) attempts have failed."""
    nominal = min(effect.max_backoff_s, effect.backoff_s * 2 ** min(failed_attempts - 1, _MAX_DOUBLINGS))
    return float(nominal * rng.uniform(0.5, 1.0))
