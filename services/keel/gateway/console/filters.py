"""The Jinja2 filters of the console's templates: times as people say them, values as text."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from keel.domain.envelope import Actor

Moment = float | str | datetime | None
"""Epoch seconds (the outbox), ISO 8601 text (tracked events) or a datetime (models)."""


def _ago(epoch: Moment) -> str:
    """How long ago, in the largest whole unit: ``4 min ago``, or ``just now``."""
    moment = _epoch(epoch)
    if moment is None:
        return "—"
    return "just now" if time.time() - moment < 60 else f"{_span(time.time() - moment)} ago"


def _until(epoch: Moment) -> str:
    moment = _epoch(epoch)
    if moment is None:
        return "—"
    left = moment - time.time()
    return f"in {_span(left)}" if left >= 0 else f"{_span(-left)} ago (expired)"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{max(int(seconds), 0)} s"


def _epoch(value: Moment) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return float(value)


def _iso(value: Moment) -> str:
    moment = _epoch(value)
    return "" if moment is None else datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _shown(value: Any) -> str:
    """A payload value as text: strings as they are, anything else as compact JSON."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _sentence(message: str) -> str:
    """A message as a sentence: its first letter upper case (``KeelError`` messages start lower case)."""
    return message[:1].upper() + message[1:]


def _actor(actor: Actor | dict[str, Any] | None) -> str:
    if actor is None:
        return "—"
    kind, ident = (actor.kind, actor.id) if isinstance(actor, Actor) else (actor.get("kind"), actor.get("id"))
    return f"{kind}:{ident}"


FILTERS: dict[str, Callable[..., str]] = {"ago": _ago, "until": _until, "iso": _iso, "shown": _shown,
                                          "actor": _actor, "sentence": _sentence}
