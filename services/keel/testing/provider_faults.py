"""The faults a provider simulator injects, set at runtime through ``POST /_control/faults``.

Each fault imitates one way a real provider lets a caller down, and the two that perform
before failing (``error_500``, ``timeout``) are the ones only an idempotency key survives:
the caller cannot tell them from a failure that performed nothing, so it must retry and
trust the provider to replay instead of acting twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Fault(StrEnum):
    """What went wrong with one request, as ``GET /_control/stats`` counts it."""

    SLOW = "slow"
    """Answered ``slow_ms`` later than ``latency_ms``."""
    ERROR_503 = "error_503"
    """503 without performing: a retry performs the action."""
    ERROR_500 = "error_500"
    """Performed, then 500: a retry must be replayed, not performed again."""
    TIMEOUT = "timeout"
    """Performed, then no answer for ``hang_s``: the caller times out, and a retry must be replayed."""


class Faults(BaseModel):
    """The simulator's fault settings; ``{}`` means none."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latency_ms: float = Field(default=0.0, ge=0, le=600_000, description="Added to every answer of /v1.")
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_ms: float = Field(default=0.0, ge=0, le=600_000)
    error_rate: float = Field(default=0.0, ge=0, le=1, description="Half 503 (not performed), half 500 (performed).")
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=30.0, gt=0, le=3600, description="How long a timeout fault holds its answer.")
    seed: int | None = Field(default=None, description="Makes the sequence of faults repeatable.")

    @model_validator(mode="after")
    def _one_failure_per_request(self) -> Faults:
        if self.error_rate + self.timeout_rate > 1:
            raise ValueError("error_rate + timeout_rate must be at most 1: a request fails one way at most")
        return self


@dataclass(frozen=True)
class Plan:
    """What the faults do to one request that would perform an action."""

    delay_s: float
    slow: bool
    failure: Fault | None


class Dice:
    """Draws each request's faults from ``Faults``, repeatably when they carry a seed."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self._random = random.Random(self.faults.seed)

    def plan(self) -> Plan:
        """The next request's delay and failure."""
        faults = self.faults
        slow = faults.slow_rate > 0 and self._random.random() < faults.slow_rate
        delay_ms = faults.latency_ms + (faults.slow_ms if slow else 0.0)
        draw = self._random.random()
        failure: Fault | None = None
        if draw < faults.error_rate:
            failure = Fault.ERROR_503 if self._random.random() < 0.5 else Fault.ERROR_500
        elif draw < faults.error_rate + faults.timeout_rate:
            failure = Fault.TIMEOUT
        return Plan(delay_s=delay_ms / 1000, slow=slow, failure=failure)
