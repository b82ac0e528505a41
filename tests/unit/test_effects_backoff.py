"""Retry delays: doubling from ``backoff_s``, capped at ``max_backoff_s``, jittered into [half, whole]."""

from __future__ import annotations

import random

import pytest

from keel.domains.model import Effect
from keel.domain.payloads import Event
from keel.effects.backoff import retry_delay

EFFECT = Effect(on=Event, handler=lambda call: None, provider="cards", backoff_s=0.5, max_backoff_s=30.0)


@pytest.mark.parametrize(("failed", "nominal"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (500, 30.0)])
def test_the_delay_doubles_up_to_the_cap_with_jitter_of_at_most_half(failed: int, nominal: float) -> None:
    rng = random.Random(failed)
    delays = [retry_delay(EFFECT, failed, rng) for _ in range(200)]
    assert all(nominal / 2 <= delay <= nominal for delay in delays)
    assert max(delays) - min(delays) > nominal / 10  # jittered, not one value


def test_effects_that_failed_together_come_back_apart() -> None:
    rng = random.Random(7)
    assert len({round(retry_delay(EFFECT, 4, rng), 6) for _ in range(50)}) == 50
