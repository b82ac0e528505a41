"""The data-key store port: one AES-256 key per (tenant, data subject), wrapped by the tenant master key.

Keys live apart from the events (SQLite by default, PostgreSQL in production; the same
contract suite runs against both). A stored key is ``nonce + AES-GCM(tenant master key,
data key)`` with the tenant, subject and key id as associated data, so a row copied to
another tenant or subject does not unwrap. Each tenant's master key is derived with
HKDF-SHA256 from the root master key in ``KEEL_MASTER_KEY_FILE``. Erasing a subject
deletes the wrapped key and keeps a tombstone (key id, when, by whom), so ciphertexts
under it read as erased rather than as unknown, and whatever projects or replays them again
learns which keys are erased without unwrapping any (``erased``).

Rotating the root: with the old root as ``KEEL_MASTER_KEY_PREVIOUS_FILE``, keys it wrapped
still unwrap (AES-GCM's tag tells which root fits), new keys are wrapped by the new one,
and ``rotate`` re-wraps the old ones in place, each with a compare-and-set so a
concurrent erasure wins. The data keys, and so every ciphertext, stay as they are.

Every store keeps recently used data keys in a ``KeyCache`` (bounded in count and age;
never plaintext), so sealing and opening do not query the store and unwrap per field.
An erasure through this store drops the subject's keys from its cache at once; another
process's cache may use them until they expire (``KEEL_DATA_KEY_CACHE_S``, default 5 s;
see ``keycache``).
"""

from __future__ import annotations

import base64
import os
import struct
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keel.config import Settings
from keel.errors import ConfigError
from keel.sqlmarks import in_lists
from keel.trust.errors import KeyUnwrapFailed, UnknownKey, WrongTenantKey
from keel.trust.keycache import KeyCache
from keel.trust.settings import TrustSettings

_LEN = struct.Struct(">I")
_IDS_PER_QUERY = 500  # bound parameters per statement, well inside SQLite's and PostgreSQL's limits


def _lp(*parts: str) -> bytes:
    return b"".join(_LEN.pack(len(p.encode())) + p.encode() for p in parts)


@dataclass(frozen=True)
class DataKey:
    """A subject's plaintext data key, in memory only while sealing or opening."""

    key_id: str
    tenant: str
    subject: str
    key: bytes

    @cached_property
    def aead(self) -> AESGCM:
        """The AES-GCM cipher of this key, built once per key rather than once per field."""
        return AESGCM(self.key)


@dataclass(frozen=True)
class KeyRow:
    """A stored key: wrapped material, or ``None`` once erased (a tombstone)."""

    key_id: str
    tenant: str
    subject: str
    wrapped: bytes | None
    erased_at: datetime | None = None
    erased_by: str | None = None


@dataclass(frozen=True)
class MasterKey:
    """The root key; derives one wrapping key per tenant."""

    root: bytes

    def for_tenant(self, tenant: str) -> AESGCM:
        """The tenant's wrapping cipher (HKDF-SHA256 of the root, bound to the tenant id)."""
        return AESGCM(_tenant_master(self.root, tenant))

    @classmethod
    def from_settings(cls, settings: TrustSettings) -> MasterKey:
        """Read ``KEEL_MASTER_KEY_FILE``."""
        if settings.master_key_file is None:
            raise ConfigError("set KEEL_MASTER_KEY_FILE to a file holding a 32-byte master key",
                              code="master_key_missing")
        return cls.from_file(settings.master_key_file)

    @classmethod
    def previous_from_settings(cls, settings: TrustSettings) -> MasterKey | None:
        """Read ``KEEL_MASTER_KEY_PREVIOUS_FILE`` (the root being rotated away from), if set."""
        return None if settings.master_key_previous_file is None else cls.from_file(settings.master_key_previous_file)

    @classmethod
    def from_file(cls, path: Path) -> MasterKey:
        """A root master key file: 32 raw bytes, or their base64 text."""
        data = path.read_bytes()
        if len(data) != 32:
            try:
                data = base64.b64decode(data.strip(), validate=True)
            except ValueError:
                data = b""
        if len(data) != 32:
            raise ConfigError(f"{path} must hold 32 bytes (raw or base64)", code="master_key_invalid")
        return cls(data)


@lru_cache(maxsize=1024)
def _tenant_master(root: bytes, tenant: str) -> bytes:
    """Derived once per tenant: key-wrapping material, never subject data."""
    return HKDF(hashes.SHA256(), 32, salt=None, info=b"keel.tenant-master.v1\x00" + tenant.encode()).derive(root)


def _foreign(key_id: str, tenant: str) -> WrongTenantKey:
    return WrongTenantKey(f"data key {key_id!r} belongs to another tenant, not {tenant!r}", field="key_id")


@dataclass(frozen=True)
class RotationReport:
    """What ``KeyStore.rotate`` did: keys re-wrapped, keys already under the current root,
    and the ids of keys neither root unwraps (left as they are)."""

    rewrapped: int
    current: int
    unreadable: tuple[str, ...]


class KeyStore(ABC):
    """Data keys by subject; adapters store ``KeyRow``s, this class does the cryptography."""

    def __init__(self, master: MasterKey, previous: MasterKey | None = None, cache: KeyCache | None = None) -> None:
        self.master = master
        self.previous = previous  # the root being rotated away from: still unwraps
        self.cache = cache if cache is not None else KeyCache()

    # -- what adapters implement ----------------------------------------------------------

    @abstractmethod
    def _active(self, tenant: str, subject: str) -> KeyRow | None: ...

    @abstractmethod
    def _active_among(self, tenant: str, subjects: list[str]) -> list[KeyRow]:
        """The active rows of those of ``subjects`` (at most ``_IDS_PER_QUERY``) that have one."""

    @abstractmethod
    def _insert(self, row: KeyRow) -> KeyRow:
        """Store ``row`` unless the subject already has an active key; return the active one."""

    @abstractmethod
    def _insert_new(self, rows: list[KeyRow]) -> list[str]:
        """Store those of ``rows`` (at most ``_IDS_PER_QUERY // 4``) whose subject has no active key; their ids."""

    @abstractmethod
    def _row(self, key_id: str) -> KeyRow | None: ...

    @abstractmethod
    def _wrapped_among(self, key_ids: list[str]) -> list[KeyRow]:
        """The unerased rows of those of ``key_ids`` (at most ``_IDS_PER_QUERY``) the store holds."""

    @abstractmethod
    def _erase(self, tenant: str, subject: str, erased_by: str, when: datetime) -> list[str]:
        """Delete the subject's wrapped keys, keep tombstones; return the erased key ids."""

    @abstractmethod
    def _erased_among(self, key_ids: list[str]) -> list[str]:
        """The ids among ``key_ids`` (at most ``_IDS_PER_QUERY``) whose keys were erased."""

    @abstractmethod
    def _wrapped_after(self, key_id: str, limit: int) -> list[KeyRow]:
        """Up to ``limit`` unerased rows with a key id greater than ``key_id``, in key id order."""

    @abstractmethod
    def _rewrap(self, key_id: str, old: bytes, new: bytes) -> bool:
        """Replace the wrapped key ``old`` of ``key_id`` by ``new``; False if it changed meanwhile."""

    @abstractmethod
    def close(self) -> None: ...

    # -- the port -----------------------------------------------------------------------

    def key_for(self, tenant: str, subject: str) -> DataKey:
        """The subject's active data key, created on first use."""
        cached = self.cache.active(tenant, subject)
        if cached is not None:
            return cached
        epoch = self.cache.epoch
        row = self._active(tenant, subject)
        if row is None:
            created = self._new_key(tenant, subject)
            row = self._insert(KeyRow(created.key_id, tenant, subject, self._wrap(created)))
            key = created if row.key_id == created.key_id else self._unwrap(row)  # another writer won the race
        else:
            key = self._unwrap(row)
        self.cache.put(key, epoch)
        return key

    def keys_for(self, tenant: str, subjects: Collection[str]) -> dict[str, DataKey]:
        """The active data key of each of ``subjects``, the missing ones created, in a few statements for all.

        What ``key_for`` does one subject at a time, for a batch: one query per
        ``_IDS_PER_QUERY`` subjects the cache does not hold, one insert per
        ``_IDS_PER_QUERY // 4`` subjects without a key. The keys are cached too.
        """
        cached = {subject: key for subject in subjects if (key := self.cache.active(tenant, subject)) is not None}
        epoch = self.cache.epoch
        read: dict[str, DataKey] = {}  # from the store now: cached from now (a cached key keeps its expiry)
        unknown = sorted(set(subjects) - cached.keys())
        for start in range(0, len(unknown), _IDS_PER_QUERY):
            read.update((row.subject, self._unwrap(row))
                        for row in self._active_among(tenant, unknown[start:start + _IDS_PER_QUERY]))
        new = [self._new_key(tenant, subject) for subject in unknown if subject not in read]
        per_insert = _IDS_PER_QUERY // 4  # four parameters per row
        for start in range(0, len(new), per_insert):
            chunk = new[start:start + per_insert]
            inserted = set(self._insert_new([KeyRow(k.key_id, tenant, k.subject, self._wrap(k)) for k in chunk]))
            read.update((k.subject, k) for k in chunk if k.key_id in inserted)
            raced = [k.subject for k in chunk if k.key_id not in inserted]  # another writer created theirs first
            if raced:
                read.update((row.subject, self._unwrap(row)) for row in self._active_among(tenant, raced))
        for key in read.values():
            self.cache.put(key, epoch)
        return {**cached, **read}

    def lookup(self, tenant: str, key_id: str) -> DataKey | None:
        """The key ``key_id`` of ``tenant``; ``None`` if it was erased; typed errors otherwise."""
        key = self.cache.by_id(key_id)
        if key is None:
            epoch = self.cache.epoch
            row = self._row(key_id)
            if row is None:
                raise UnknownKey(f"no data key {key_id!r} in the key store", field="key_id")
            if row.tenant != tenant:
                raise _foreign(key_id, tenant)
            if row.wrapped is None:
                return None
            key = self._unwrap(row)
            self.cache.put(key, epoch)
        elif key.tenant != tenant:
            raise _foreign(key_id, tenant)
        return key

    def prefetch(self, key_ids: Iterable[str]) -> None:
        """Read the keys among ``key_ids`` the cache lacks into it, one statement per ``_IDS_PER_QUERY``.

        A batch about to open the values of many subjects would otherwise ask the store once
        per key. Only a hint: an erased, unknown or unreadable key is left to ``lookup``, which
        reports it where the value is opened; at most half the cache is filled at once.
        """
        if not self.cache.ttl_s:  # no cache: nothing read now would be kept for the open
            return
        missing = [key_id for key_id in dict.fromkeys(key_ids) if self.cache.by_id(key_id) is None]
        missing = missing[:max(1, self.cache.max_keys // 2)]
        epoch = self.cache.epoch
        for start in range(0, len(missing), _IDS_PER_QUERY):
            for row in self._wrapped_among(missing[start:start + _IDS_PER_QUERY]):
                try:
                    key = self._unwrap(row)
                except KeyUnwrapFailed:
                    continue
                self.cache.put(key, epoch)

    def erase(self, tenant: str, subject: str, erased_by: str) -> list[str]:
        """Crypto-shred every key of ``subject``; returns the erased key ids (this store's cache drops them at once)."""
        try:
            return self._erase(tenant, subject, erased_by, datetime.now(UTC))
        finally:
            self.cache.forget(tenant, subject)

    def erased(self, key_ids: Collection[str]) -> frozenset[str]:
        """Which of ``key_ids`` were erased, from their tombstones: no key is unwrapped."""
        ids = sorted(set(key_ids))
        return frozenset(key_id for start in range(0, len(ids), _IDS_PER_QUERY)
                         for key_id in self._erased_among(ids[start:start + _IDS_PER_QUERY]))

    def tombstone(self, key_id: str) -> KeyRow | None:
        """The stored row of ``key_id`` (for receipts and inspection)."""
        return self._row(key_id)

    def rotate(self, batch: int = 500) -> RotationReport:
        """Re-wrap under the current root every key the previous root wrapped."""
        rewrapped = current = 0
        unreadable: list[str] = []
        after = ""
        while rows := self._wrapped_after(after, batch):
            for row in rows:
                if self._unwrap_with(self.master, row) is not None:
                    current += 1
                    continue
                key = None if self.previous is None else self._unwrap_with(self.previous, row)
                if key is None:
                    unreadable.append(row.key_id)
                # a row erased since it was read keeps its tombstone: the compare-and-set fails
                elif row.wrapped is not None and self._rewrap(row.key_id, row.wrapped, self._wrap(key)):
                    rewrapped += 1
            after = rows[-1].key_id
        return RotationReport(rewrapped, current, tuple(unreadable))

    @staticmethod
    def _new_key(tenant: str, subject: str) -> DataKey:
        return DataKey(uuid.uuid4().hex, tenant, subject, AESGCM.generate_key(bit_length=256))

    def _wrap(self, key: DataKey) -> bytes:
        nonce = os.urandom(12)
        return nonce + self.master.for_tenant(key.tenant).encrypt(
            nonce, key.key, self._aad(key.tenant, key.subject, key.key_id))

    def _unwrap(self, row: KeyRow) -> DataKey:
        key = self._unwrap_with(self.master, row)
        if key is None and self.previous is not None:
            key = self._unwrap_with(self.previous, row)
        if key is None:
            raise KeyUnwrapFailed(f"data key {row.key_id!r} does not unwrap under the master key of "
                                  f"{row.tenant!r}", field="key_id")
        return key

    def _unwrap_with(self, master: MasterKey, row: KeyRow) -> DataKey | None:
        """The data key in ``row`` if ``master`` wrapped it, else ``None``."""
        assert row.wrapped is not None
        try:
            key = master.for_tenant(row.tenant).decrypt(
                row.wrapped[:12], row.wrapped[12:], self._aad(row.tenant, row.subject, row.key_id))
        except InvalidTag:
            return None
        return DataKey(row.key_id, row.tenant, row.subject, key)

    @staticmethod
    def _aad(tenant: str, subject: str, key_id: str) -> bytes:
        return b"keel.data-key.v1\x00" + _lp(tenant, subject, key_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class SqlKeyStore(KeyStore):
    """The key table's queries, shared by the SQLite and PostgreSQL adapters.

    Adapters open the connection and create the table, run ``?``-placeholder SQL
    (``_rows``) and say how their engine stores a timestamp (``_stamp``).
    """

    @abstractmethod
    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement (its own transaction) and return the rows it yields."""

    def _stamp(self, when: datetime) -> Any:
        """``when`` as the engine stores it."""
        return when

    def _wrapped(self, condition: str, params: tuple[Any, ...]) -> list[KeyRow]:
        """The unerased rows that also meet ``condition`` (SQL after ``AND``, ``ORDER BY`` and ``LIMIT`` too)."""
        rows = self._rows("SELECT key_id, tenant, subject, wrapped FROM keel_data_keys "
                          f"WHERE wrapped IS NOT NULL AND {condition}", params)
        return [KeyRow(key, tenant, subject, bytes(wrapped)) for key, tenant, subject, wrapped in rows]

    def _active(self, tenant: str, subject: str) -> KeyRow | None:
        rows = self._wrapped("tenant = ? AND subject = ?", (tenant, subject))
        return rows[0] if rows else None

    def _active_among(self, tenant: str, subjects: list[str]) -> list[KeyRow]:
        return [row for marks, chunk in in_lists(subjects)
                for row in self._wrapped(f"tenant = ? AND subject IN ({marks})", (tenant, *chunk))]

    def _insert_new(self, rows: list[KeyRow]) -> list[str]:
        inserted = []
        for _, chunk in in_lists(rows):  # a repeated last row conflicts with itself: nothing more is inserted
            values = ", ".join(["(?, ?, ?, ?)"] * len(chunk))
            inserted += [r[0] for r in self._rows(
                f"INSERT INTO keel_data_keys (key_id, tenant, subject, wrapped) VALUES {values} "
                "ON CONFLICT DO NOTHING RETURNING key_id",
                tuple(p for row in chunk for p in (row.key_id, row.tenant, row.subject, row.wrapped)))]
        return inserted

    def _insert(self, row: KeyRow) -> KeyRow:
        self._rows("INSERT INTO keel_data_keys (key_id, tenant, subject, wrapped) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT DO NOTHING", (row.key_id, row.tenant, row.subject, row.wrapped))
        active = self._active(row.tenant, row.subject)
        assert active is not None
        return active

    def _row(self, key_id: str) -> KeyRow | None:
        rows = self._rows("SELECT key_id, tenant, subject, wrapped, erased_at, erased_by "
                          "FROM keel_data_keys WHERE key_id = ?", (key_id,))
        if not rows:
            return None
        key, tenant, subject, wrapped, erased_at, erased_by = rows[0]
        if isinstance(erased_at, str):  # SQLite keeps timestamps as ISO text
            erased_at = datetime.fromisoformat(erased_at)
        return KeyRow(key, tenant, subject, None if wrapped is None else bytes(wrapped), erased_at, erased_by)

    def _wrapped_among(self, key_ids: list[str]) -> list[KeyRow]:
        return [row for marks, chunk in in_lists(key_ids)
                for row in self._wrapped(f"key_id IN ({marks})", tuple(chunk))]

    def _erased_among(self, key_ids: list[str]) -> list[str]:
        return [row[0] for marks, chunk in in_lists(key_ids) for row in self._rows(
            f"SELECT key_id FROM keel_data_keys WHERE wrapped IS NULL AND key_id IN ({marks})", tuple(chunk))]

    def _wrapped_after(self, key_id: str, limit: int) -> list[KeyRow]:
        return self._wrapped("key_id > ? ORDER BY key_id LIMIT ?", (key_id, limit))

    def _rewrap(self, key_id: str, old: bytes, new: bytes) -> bool:
        return bool(self._rows("UPDATE keel_data_keys SET wrapped = ? WHERE key_id = ? AND wrapped = ? "
                               "RETURNING key_id", (new, key_id, old)))

    def _erase(self, tenant: str, subject: str, erased_by: str, when: datetime) -> list[str]:
        rows = self._rows("UPDATE keel_data_keys SET wrapped = NULL, erased_at = ?, erased_by = ? "
                          "WHERE tenant = ? AND subject = ? AND wrapped IS NOT NULL RETURNING key_id",
                          (self._stamp(when), erased_by, tenant, subject))
        return sorted(r[0] for r in rows)


def open_keystore(settings: Settings, trust: TrustSettings) -> KeyStore:
    """The key store named by ``KEEL_KEYSTORE_DSN`` (default: SQLite under ``data_dir``), its cache as configured."""
    master, previous = MasterKey.from_settings(trust), MasterKey.previous_from_settings(trust)
    cache = KeyCache(trust.data_key_cache_keys, trust.data_key_cache_s)
    dsn = trust.keystore_dsn or f"sqlite:///{(settings.data_dir / 'keys.db').resolve()}"
    if dsn.startswith("sqlite:///"):
        from keel.trust.keystore_sqlite import SqliteKeyStore

        return SqliteKeyStore(dsn.removeprefix("sqlite:///"), master, previous, cache)
    if dsn.startswith(("postgresql://", "postgres://")):
        from keel.trust.keystore_postgres import PostgresKeyStore

        return PostgresKeyStore(dsn, master, previous, cache)
    raise ConfigError(f"KEEL_KEYSTORE_DSN must be sqlite:///path or postgresql://..., not {dsn!r}",
                      code="keystore_dsn_invalid")
