"""Provider breakers: open after N retryable failures in a row, one probe per cooldown, close on an answer,
and follow the controls topic by its changes only."""

from __future__ import annotations

from keel.effects.breakers import Admission, Breakers, Transition

KEY = ("acme", "cards")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breakers(clock: Clock) -> Breakers:
    return Breakers(threshold=3, cooldown_s=2.0, max_cooldown_s=5.0, clock=clock)


def _trip(breakers: Breakers) -> None:
    assert [breakers.record(KEY, False, probe=False) for _ in range(3)] == [None, None, Transition.OPENED]


def test_consecutive_retryable_failures_open_the_breaker_and_an_answer_resets_the_count() -> None:
    breakers = _breakers(Clock())
    assert breakers.record(KEY, False, probe=False) is None
    assert breakers.record(KEY, False, probe=False) is None
    assert breakers.record(KEY, True, probe=False) is None  # a success or a refusal: the provider answers
    assert breakers.admit(KEY) is Admission.GO
    _trip(breakers)
    assert breakers.admit(KEY) is Admission.WAIT
    assert breakers.admit(("globex", "cards")) is Admission.GO  # per tenant and provider


def test_one_probe_per_cooldown_and_the_cooldown_doubles_up_to_the_cap() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    _trip(breakers)
    clock.now += 1.9
    assert breakers.admit(KEY) is Admission.WAIT
    clock.now += 0.1
    assert breakers.admit(KEY) is Admission.PROBE
    assert breakers.admit(KEY) is Admission.WAIT  # one probe at a time
    assert breakers.record(KEY, False, probe=True) is None  # still open, now for 4 s
    clock.now += 3.9
    assert breakers.admit(KEY) is Admission.WAIT
    clock.now += 0.1
    assert breakers.admit(KEY) is Admission.PROBE
    breakers.record(KEY, False, probe=True)
    clock.now += 5.0  # capped at 5 s, not 8
    assert breakers.admit(KEY) is Admission.PROBE
    assert breakers.record(KEY, True, probe=True) is Transition.CLOSED
    assert breakers.admit(KEY) is Admission.GO


def test_an_abandoned_probe_frees_the_probe_and_a_late_failure_does_not_count() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    _trip(breakers)
    assert breakers.record(KEY, False, probe=False) is None  # an attempt begun before it opened
    clock.now += 2.0
    assert breakers.admit(KEY) is Admission.PROBE
    breakers.abandon(KEY)
    assert breakers.admit(KEY) is Admission.PROBE


def test_the_controls_topic_opens_and_closes_by_its_changes_only() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    breakers.follow(KEY, False)
    breakers.follow(KEY, True)  # another worker opened it
    assert breakers.admit(KEY) is Admission.WAIT
    clock.now += 2.0
    assert breakers.admit(KEY) is Admission.PROBE  # and if that worker died, this one probes
    assert breakers.record(KEY, True, probe=True) is Transition.CLOSED
    breakers.follow(KEY, True)  # the open record still lags behind: no change, stays closed
    assert breakers.admit(KEY) is Admission.GO
    breakers.follow(KEY, False)  # the close arrives

    _trip(breakers)  # opened here; the controls topic says closed until the processor decides
    breakers.follow(KEY, False)
    assert breakers.admit(KEY) is Admission.WAIT
    breakers.follow(KEY, True)
    breakers.follow(KEY, False)  # another worker's probe closed it
    assert breakers.admit(KEY) is Admission.GO
