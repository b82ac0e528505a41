"""The data-key cache: recently used data keys in memory, bounded in count and in age; never plaintext.

Without it every sealed field costs a key-store query and an unwrap (13% of the
processor's CPU). Its lifetime is the one thing erasure has to reckon with: an erasure
in this process drops the subject's keys from the store's cache at once
(``KeyStore.erase``); an erasure by another process (``keel subjects erase``) reaches this
one when the entries expire, at most ``KEEL_DATA_KEY_CACHE_S`` (5 s) after they were read.
Until then this process may still open the subject's values, and seal new ones under the
erased key (which then read as erased too).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from keel.errors import ConfigError
from keel.trust.settings import DATA_KEY_CACHE_KEYS, DATA_KEY_CACHE_S

if TYPE_CHECKING:
    from keel.trust.keystore import DataKey


class KeyCache:
    """Recently used data keys of one key store, bounded in count and in age; never plaintext.

    An entry lives ``ttl_s`` from when its key was read from (or created in) the store; a
    hit does not extend it, so a key erased by another process stops being used at most
    ``ttl_s`` later. Beyond ``max_keys`` the oldest entry goes first. ``forget`` (called by
    ``KeyStore.erase``) drops a subject's keys at once and voids every read that started
    before it, so a lookup racing an erasure in this process cannot cache the erased key.
    Erased keys are never cached: a tombstone is always read from the store. ``ttl_s=0``
    disables the cache. Thread-safe.
    """

    def __init__(self, max_keys: int = DATA_KEY_CACHE_KEYS, ttl_s: float = DATA_KEY_CACHE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1 or ttl_s < 0:
            raise ConfigError(f"a data-key cache needs max_keys >= 1 and ttl_s >= 0, not {max_keys}, {ttl_s}",
                              code="key_cache_invalid")
        self.max_keys, self.ttl_s = max_keys, ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # By key id, oldest first (expiry order). Ordered: a plain dict emptied from the front
        # scans the holes its pops leave on every look at its first entry (measured: 9 µs a
        # put into a full cache of 10,000 keys, 3 µs ordered).
        self._keys: OrderedDict[str, tuple[float, DataKey]] = OrderedDict()
        self._active: dict[tuple[str, str], str] = {}  # (tenant, subject) -> key id of an entry in _keys
        self._epoch = 0  # bumped by every forget

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def epoch(self) -> int:
        """Take it before reading a key from the store, and give it to ``put``."""
        return self._epoch

    def by_id(self, key_id: str) -> DataKey | None:
        """The unexpired cached key ``key_id``, if any."""
        with self._lock:
            return self._fresh(key_id)

    def active(self, tenant: str, subject: str) -> DataKey | None:
        """The subject's unexpired cached key (a key not erased is its subject's active key)."""
        with self._lock:
            key_id = self._active.get((tenant, subject))
            return None if key_id is None else self._fresh(key_id)

    def put(self, key: DataKey, epoch: int) -> None:
        """Cache ``key``, read from the store when the cache was at ``epoch``, unless a ``forget`` came since."""
        if not self.ttl_s:
            return
        with self._lock:
            if epoch != self._epoch:
                return
            now = self._clock()
            keys = self._keys
            keys.pop(key.key_id, None)  # re-inserted last, with a new expiry
            while keys:
                expiry, oldest = next(iter(keys.values()))
                if len(keys) < self.max_keys and expiry > now:
                    break
                self._drop(oldest.key_id)
            keys[key.key_id] = (now + self.ttl_s, key)
            self._active[(key.tenant, key.subject)] = key.key_id

    def forget(self, tenant: str, subject: str) -> None:
        """Drop every cached key of the subject, and refuse puts of reads that started before now."""
        with self._lock:
            self._epoch += 1
            self._active.pop((tenant, subject), None)
            for key_id in [k for k, (_, key) in self._keys.items() if (key.tenant, key.subject) == (tenant, subject)]:
                del self._keys[key_id]

    def _fresh(self, key_id: str) -> DataKey | None:
        entry = self._keys.get(key_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key_id)
            return None
        return entry[1]

    def _drop(self, key_id: str) -> None:
        _, key = self._keys.pop(key_id)
        if self._active.get((key.tenant, key.subject)) == key_id:
            del self._active[(key.tenant, key.subject)]
