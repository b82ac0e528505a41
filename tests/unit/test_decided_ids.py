"""The processor's memory of decided command ids: kept for the dedupe window, then forgotten."""

from __future__ import annotations

import uuid

from keel.processor.state import DecidedIds, IdsLoader

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


def test_membership_is_exact_among_many_ids() -> None:
    ids = DecidedIds(window_s=DAY)
    kept = [uuid.uuid4() for _ in range(50_000)]
    for index, command_id in enumerate(kept):
        ids.add(command_id, T0 + index / 100)
    ids.add(kept[0], T0 + 900)  # a second decision changes nothing

    assert len(ids) == len(kept)
    assert all(command_id in ids for command_id in kept)
    assert not any(uuid.uuid4() in ids for _ in range(50_000))


def test_an_id_straddling_two_packed_records_is_no_member() -> None:
    ids = DecidedIds()
    first, second = uuid.UUID(bytes=b"\xaa" * 16), uuid.UUID(bytes=b"\xbb" * 16)
    straddling = uuid.UUID(bytes=b"\xaa" * 8 + b"\xbb" * 8)  # its bytes run across both records
    for command_id in (first, second, straddling):
        ids._ids.setdefault(hash(command_id.bytes) & 0xFFFF, bytearray()).extend(first.bytes + second.bytes)

    assert straddling not in ids


def test_time_ordered_ids_spread_over_the_buckets() -> None:
    ids = DecidedIds()
    for number in range(100_000):  # the same leading bytes, as UUIDv7 ids of one moment have
        ids.add(uuid.UUID(int=(0x0193 << 112) | number), T0)

    assert len(ids) == 100_000 and max(len(bucket) for bucket in ids._ids.values()) < 16 * 50


def test_packed_ids_restore_to_the_same_memory_less_what_expired() -> None:
    ids = DecidedIds(window_s=DAY)
    old, recent = uuid.uuid4(), [uuid.uuid4() for _ in range(1000)]
    ids.add(old, T0)
    for command_id in recent:
        ids.add(command_id, T0 + DAY / 2)

    loader = IdsLoader(DAY, now=T0 + DAY + 120)
    for run in ids.packed():
        loader.add(*run)
    restored = loader.done()

    assert old not in restored and all(command_id in restored for command_id in recent)
    assert len(restored) == len(recent)
    assert restored.expire(T0 + DAY / 2 + DAY + 120) == len(recent)


def test_the_journal_holds_the_ids_added_since_it_was_last_drained() -> None:
    ids = DecidedIds(window_s=DAY, journal=True)
    first, second = uuid.uuid4(), uuid.uuid4()
    ids.add(first, T0)
    assert ids.journal is not None
    ids.journal.drop(1)
    ids.add(second, T0 + 60)
    ids.add(first, T0 + 120)  # known: not journaled again

    assert bytes(ids.journal.ids) == second.bytes and list(ids.journal.minutes) == [int((T0 + 60) // 60)]


def test_an_id_costs_tens_of_bytes_not_a_hundred() -> None:
    """Measured past the fixed cost of the buckets (all exist after some 400,000 ids); buckets this
    small still round their allocations up, so it falls further with millions of ids."""
    import tracemalloc

    ids, batch = DecidedIds(window_s=DAY), 400_000
    for _ in range(batch):
        ids.add(uuid.uuid4(), T0)
    more = [uuid.uuid4() for _ in range(batch)]
    tracemalloc.start()
    for command_id in more:
        ids.add(command_id, T0)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    assert used / batch < 50, f"{used / batch:.1f} bytes an id"


def test_restored_ids_expire_exactly_whatever_order_their_runs_came_in() -> None:
    ids = DecidedIds(window_s=DAY)
    batches = [[uuid.uuid4() for _ in range(20_000)] for _ in range(3)]
    for hours, batch in zip((1, 5, 9), batches):
        for command_id in batch:
            ids.add(command_id, T0 + hours * 3600)
    loader = IdsLoader(DAY, now=T0 + 9 * 3600)
    for run in reversed(list(ids.packed())):  # newest and oldest interleave in the rebuilt buckets
        loader.add(*run)
    restored = loader.done()

    assert restored.expire(T0 + DAY + 3 * 3600) == len(batches[0])
    assert not any(command_id in restored for command_id in batches[0])
    assert all(command_id in restored for command_id in batches[1] + batches[2])
    assert restored.expire(T0 + DAY + 7 * 3600) == len(batches[1]) and len(restored) == len(batches[2])
