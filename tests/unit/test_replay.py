"""Pure parts of replay: parsing bounds, ordering checks and filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keel.replay.errors import ReplayError
from keel.replay.range import Bound, Filter, check_order
from tests.integration.test_projector import subscription_story


@pytest.mark.parametrize(("text", "bound"), [
    ("beginning", Bound(kind="beginning")),
    ("end", Bound(kind="end")),
    ("offset:42", Bound(kind="offset", offset=42)),
    ("2030-01-02T03:04:05Z", Bound(kind="time", at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))),
    ("2030-01-02T03:04:05", Bound(kind="time", at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))),
])
def test_bounds_parse(text: str, bound: Bound) -> None:
    assert Bound.parse(text) == bound


@pytest.mark.parametrize("text", ["offset:-1", "offset:x", "yesterday", ""])
def test_malformed_bounds_are_refused(text: str) -> None:
    with pytest.raises(ReplayError) as refused:
        Bound.parse(text)

    assert refused.value.code == "bad_bound"


@pytest.mark.parametrize(("start", "end", "code"), [
    ("offset:5", "offset:2", "inverted_range"),
    ("offset:5", "offset:5", "inverted_range"),
    ("2030-01-02T00:00:00Z", "2030-01-01T00:00:00Z", "inverted_range"),
    ("end", "offset:3", "bad_bound"),
    ("beginning", "beginning", "bad_bound"),
])
def test_inverted_or_backwards_ranges_are_refused(start: str, end: str, code: str) -> None:
    with pytest.raises(ReplayError) as refused:
        check_order(Bound.parse(start), Bound.parse(end))

    assert refused.value.code == code


def test_filters_match_tenant_aggregate_type_and_actor() -> None:
    events = subscription_story("acme", "sub-1")
    refund = next(e for e in events if e.type == "RefundIssued")

    everything = Filter(tenant="acme", aggregate="sub-1", types=frozenset({"RefundIssued"}), actor="support-bot")
    assert everything.matches(refund)
    assert not Filter(tenant="globex").matches(refund)
    assert not Filter(types=frozenset({"EmailQueued"})).matches(refund)
    assert not Filter(actor="someone-else").matches(refund)
    assert Filter(tenant="acme").key_may_match(b"acme/sub-1")
    assert not Filter(tenant="acme").key_may_match(b"acme-corp/sub-1")
    assert not Filter(tenant="acme", aggregate="sub-2").key_may_match(b"acme/sub-1")
