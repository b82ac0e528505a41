"""The processor's memory of decided command ids: kept for the dedupe window, then forgotten."""

from __future__ import annotations

import uuid

from keel.processor.state import DecidedIds

DAY = 24 * 3600.0
T0 = 1_800_000_000.0  # a fixed epoch second


def test_ids_are_remembered_for_the_window_and_forgotten_after_it() -> None:
    ids = DecidedIds(window_s=7 * DAY)
    early, late = uuid.uuid4(), uuid.uuid4()
    ids.add(early, T0)
    ids.add(late, T0 + 3 * DAY)

    assert ids.expire(T0 + 7 * DAY - 60) == 0
    assert early in ids and late in ids
    assert ids.expire(T0 + 7 * DAY + 120) == 1
    assert early not in ids and late in ids
    assert ids.expire(T0 + 10 * DAY + 120) == 1
    assert len(ids) == 0


def test_a_window_of_zero_remembers_every_id_and_covers_every_command() -> None:
    ids = DecidedIds(window_s=0)
    old = uuid.uuid4()
    ids.add(old, T0)

    assert ids.expire(T0 + 1000 * DAY) == 0 and old in ids
    assert ids.covers(T0 - 1000 * DAY, now=T0)


def test_a_command_created_before_the_window_is_not_covered() -> None:
    ids = DecidedIds(window_s=7 * DAY)

    assert ids.covers(T0 - 7 * DAY + 1, now=T0)
    assert not ids.covers(T0 - 7 * DAY - 1, now=T0)


def test_an_id_added_after_the_clock_stepped_back_expires_with_the_newest() -> None:
    ids = DecidedIds(window_s=DAY)
    newest, stepped_back = uuid.uuid4(), uuid.uuid4()
    ids.add(newest, T0 + 600)
    ids.add(stepped_back, T0)

    assert ids.expire(T0 + DAY + 300) == 0  # the earlier time alone would have expired it
    assert stepped_back in ids
    assert ids.expire(T0 + DAY + 900) == 2


def test_an_id_decided_again_expires_a_window_after_its_first_decision() -> None:
    ids = DecidedIds(window_s=DAY)
    parked = uuid.uuid4()
    ids.add(parked, T0)  # parked for approval
    ids.add(parked, T0 + DAY / 2)  # approved: its later events name it again

    assert ids.expire(T0 + DAY + 120) == 1
    assert parked not in ids and len(ids) == 0
