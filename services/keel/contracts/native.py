"""The native core, ``keel_avro`` (``native/keel-avro``), loaded once for every module that uses it.

Its own module, not the codec's, so a reader of audit records gets ``audit_head`` without importing
the codec's models and fastavro. ``KEEL_AVRO=python`` leaves the core unloaded even when installed;
``KEEL_AVRO=native`` fails at import when it is not installed.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Final, Literal


def _load() -> ModuleType | None:
    """The native core unless ``KEEL_AVRO=python``; None when it is not installed (and not required)."""
    choice = os.environ.get("KEEL_AVRO", "")
    if choice not in ("", "native", "python"):
        raise ValueError(f"KEEL_AVRO must be 'native' or 'python', not {choice!r}")
    if choice == "python":
        return None
    try:
        return importlib.import_module("keel_avro")
    except ImportError:
        if choice == "native":
            raise
        return None


CORE: Final = _load()
AVRO_CORE: Final[Literal["native", "python"]] = "python" if CORE is None else "native"
"""Which Avro core encodes and decodes current-schema messages: ``native`` (keel_avro) or ``python`` (fastavro)."""
audit_head: Final[Callable[[bytes, tuple[object, ...]], bytes | None] | None] = getattr(CORE, "audit_head", None)
"""The native core's writer of an audit record's fields (``keel.trust.record.seal_record`` falls back to its
own); absent from builds before 2026-12-07."""
uuid_text: Final[Callable[[uuid.UUID], str]] = getattr(CORE, "uuid_text", str)
"""``str`` of a ``uuid.UUID``, by the native core when it has it: ``UUID.__str__`` is Python code
(0.59 against 0.15 µs a call), and the outbox keys every row by a command's or an event's id."""
