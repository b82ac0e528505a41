"""Token-bucket rate limits per tenant and per actor, enforced inside the processor.

Buckets are worker-local: each worker limits the partitions it owns, so with N workers a
tenant spread over all partitions may reach up to N times its limit. That is the price of
no shared counter on the hot path; per-aggregate order and exactly-once are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Buckets refilled continuously at ``limit`` per minute, holding at most ``limit``."""

    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, limits: list[tuple[str, int]], now_s: float) -> str | None:
        """Take one token from every bucket, or none; returns the key that ran out, if any."""
        buckets = self.buckets
        for key, limit in limits:
            bucket = buckets.get(key)
            if bucket is None:  # not ``setdefault``: it would build a bucket per call
                bucket = buckets[key] = _Bucket(float(limit), now_s)
            bucket.tokens = min(float(limit), bucket.tokens + (now_s - bucket.updated) * limit / 60.0)
            bucket.updated = now_s
            if bucket.tokens < 1.0:
                return key
        for key, _ in limits:
            buckets[key].tokens -= 1.0
        return None
