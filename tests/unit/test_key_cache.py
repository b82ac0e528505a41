"""The data-key cache: expiry, erasure invalidation, the bound on its size, and what it saves the key store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from keel.domain.envelope import Envelope
from keel.errors import ConfigError
from keel.trust.errors import WrongTenantKey
from keel.trust.codec import SealingCodec
from keel.trust.fields import ERASED, PREFIX, FieldCipher
from keel.trust.keycache import KeyCache
from keel.trust.keystore import DataKey, MasterKey
from keel.trust.keystore_sqlite import SqliteKeyStore
from support_desk.messages import SendEmail
from tests.helpers import CountingKeyStore, command


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys(tmp_path: Path, clock: Clock) -> Iterator[CountingKeyStore]:
    with CountingKeyStore(tmp_path / "keys.db", MasterKey(os.urandom(32)), cache=KeyCache(4, 5.0, clock)) as store:
        yield store


def key(n: int, subject: str | None = None) -> DataKey:
    return DataKey(f"k{n}", "acme", subject or f"cust-{n}", os.urandom(32))


def email(subject: str, tenant: str = "acme") -> Envelope:
    return command(tenant, "sub-1", SendEmail(to_address="ann@example.com", template="t"), on_behalf_of=subject)


def test_a_cached_key_expires_its_lifetime_after_it_was_read_however_often_it_is_used(clock: Clock) -> None:
    cache, stored = KeyCache(10, 5.0, clock), key(1)
    cache.put(stored, cache.epoch)
    clock.now += 4.9
    assert cache.by_id("k1") is stored and cache.active("acme", "cust-1") is stored  # a hit does not extend it
    clock.now += 0.1
    assert cache.by_id("k1") is None and cache.active("acme", "cust-1") is None and len(cache) == 0


def test_the_cache_never_holds_more_than_its_bound_dropping_the_oldest_first(clock: Clock) -> None:
    cache = KeyCache(3, 5.0, clock)
    for n in range(10):
        cache.put(key(n), cache.epoch)
        assert len(cache) <= 3
    assert [cache.by_id(f"k{n}") is not None for n in range(10)] == [False] * 7 + [True] * 3
    assert cache.active("acme", "cust-0") is None and cache.active("acme", "cust-9") is not None


def test_forgetting_a_subject_drops_its_keys_and_voids_reads_that_started_before(clock: Clock) -> None:
    cache = KeyCache(10, 5.0, clock)
    cache.put(key(1), cache.epoch)
    cache.put(key(2), cache.epoch)
    read_started = cache.epoch  # a lookup of cust-1 reads the store while the subject is erased
    cache.forget("acme", "cust-1")
    cache.put(key(1), read_started)  # the racing read arrives after the erasure: not cached
    assert cache.by_id("k1") is None and cache.active("acme", "cust-1") is None
    assert cache.by_id("k2") is not None  # other subjects stay


def test_a_cache_with_no_lifetime_holds_nothing_and_a_bad_bound_is_refused(clock: Clock) -> None:
    cache = KeyCache(10, 0.0, clock)
    cache.put(key(1), cache.epoch)
    assert len(cache) == 0
    with pytest.raises(ConfigError) as refused:
        KeyCache(0, 5.0)
    assert refused.value.code == "key_cache_invalid"


def test_sealing_and_opening_hit_the_store_once_per_subject_within_the_lifetime(keys: CountingKeyStore) -> None:
    cipher = FieldCipher(keys)
    first = cipher.seal(email("cust-1"))
    before = keys.statements
    sealed = [cipher.seal(email("cust-1")) for _ in range(5)]
    assert [cast(SendEmail, cipher.open(s).payload).to_address for s in [first, *sealed]] == ["ann@example.com"] * 6
    assert keys.statements == before  # no query, no unwrap: every key came from the cache


def test_an_erasure_here_is_seen_at_once_though_the_key_was_cached(keys: CountingKeyStore) -> None:
    cipher = FieldCipher(keys)
    sealed = cipher.seal(email("cust-1"))
    assert cast(SendEmail, cipher.open(sealed).payload).to_address == "ann@example.com"
    keys.erase("acme", "cust-1", "human:dpo")
    assert cast(SendEmail, cipher.open(sealed).payload).to_address == ERASED
    assert cast(SendEmail, cipher.seal(email("cust-1")).payload).to_address.split(":")[2] != \
        cast(SendEmail, sealed.payload).to_address.split(":")[2]


def test_an_erasure_by_another_process_is_seen_once_the_lifetime_has_passed(
        keys: CountingKeyStore, tmp_path: Path, clock: Clock) -> None:
    cipher = FieldCipher(keys)
    sealed = cipher.seal(email("cust-1"))
    with SqliteKeyStore(tmp_path / "keys.db", keys.master) as elsewhere:  # as `keel subjects erase` would
        elsewhere.erase("acme", "cust-1", "human:dpo")
    assert cast(SendEmail, cipher.open(sealed).payload).to_address == \
        "ann@example.com"  # still cached: within the bound
    clock.now += 5.0
    assert cast(SendEmail, cipher.open(sealed).payload).to_address == ERASED


def test_a_cached_key_is_still_refused_to_another_tenant(keys: CountingKeyStore) -> None:
    key_id = keys.key_for("acme", "cust-1").key_id
    with pytest.raises(WrongTenantKey):
        keys.lookup("globex", key_id)


def test_preparing_a_batch_creates_its_new_subjects_keys_in_a_few_statements(keys: CountingKeyStore,
                                                                             clock: Clock) -> None:
    keys.cache = KeyCache(1000, 5.0, clock)
    known = keys.key_for("acme", "cust-0")
    batch = [email(f"cust-{n}") for n in range(300)] + [email("cust-0", tenant="globex")]
    before = keys.statements
    FieldCipher(keys).prepare(batch)
    # per tenant: one query for existing keys, one insert per 125 new ones (acme: 3; globex: 1)
    assert keys.statements - before == (1 + 3) + (1 + 1)
    before = keys.statements
    sealed = [FieldCipher(keys).seal(e) for e in batch]
    assert keys.statements == before  # every key came from the cache
    assert cast(SendEmail, sealed[0].payload).to_address.split(":")[2] == known.key_id
    assert len({cast(SendEmail, s.payload).to_address.split(":")[2] for s in sealed}) == 301
    keys.cache = KeyCache(1000, 5.0, clock)  # a cold cache: the keys were stored
    assert [keys.key_for("acme", f"cust-{n}").key_id for n in (0, 299)] == [
        cast(SendEmail, sealed[n].payload).to_address.split(":")[2] for n in (0, 299)]


def test_a_batch_served_from_the_cache_does_not_extend_the_keys_lifetime(keys: CountingKeyStore, clock: Clock) -> None:
    first = keys.key_for("acme", "cust-1")
    clock.now += 4.0
    assert keys.keys_for("acme", ["cust-1"]) == {"cust-1": first}
    clock.now += 1.0
    assert keys.cache.active("acme", "cust-1") is None


def test_prefetching_encoded_records_reads_their_keys_in_one_statement_and_opening_asks_no_more(
        tmp_path: Path, keys: CountingKeyStore, clock: Clock) -> None:
    keys.cache = KeyCache(1000, 5.0, clock)
    writer = SealingCodec(FieldCipher(keys))
    records = [writer.encode(email(f"cust-{n}")) for n in range(300)] + [b"not a record", b""]
    with CountingKeyStore(tmp_path / "keys.db", keys.master, cache=KeyCache(1000, 5.0, clock)) as elsewhere:
        reader = SealingCodec(FieldCipher(elsewhere))  # another process: none of these keys cached
        reader.prefetch(records)
        assert elsewhere.statements == 1  # 300 key ids in one IN list
        opened = [reader.decode(r) for r in records[:300]]
        assert elsewhere.statements == 1
    assert {cast(SendEmail, e.payload).to_address for e in opened} == {"ann@example.com"}
    keys.cache = KeyCache(1000, 0.0, clock)  # no cache: a prefetch would read keys for nothing
    before = keys.statements
    SealingCodec(FieldCipher(keys)).prefetch(records)
    assert keys.statements == before


def test_a_prefetch_leaves_erased_unknown_and_foreign_keys_to_the_open_that_reports_them(
        keys: CountingKeyStore, clock: Clock) -> None:
    keys.cache = KeyCache(1000, 5.0, clock)
    codec = SealingCodec(FieldCipher(keys))
    erased, foreign = codec.encode(email("cust-1")), codec.encode(email("cust-2", tenant="globex"))
    keys.erase("acme", "cust-1", "human:dpo")
    looks_sealed = f"{PREFIX}{'f' * 32}:AAAA".encode()  # text shaped like a sealed value, no such key
    keys.cache = KeyCache(1000, 5.0, clock)
    codec.prefetch([erased, foreign, looks_sealed])
    assert len(keys.cache) == 1  # only the live key, cached under its own tenant
    assert cast(SendEmail, codec.decode(erased).payload).to_address == ERASED
    with pytest.raises(WrongTenantKey):
        keys.lookup("acme", codec.read(foreign)["payload"]["to_address"].split(":")[2])
