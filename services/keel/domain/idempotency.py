"""How long a command id stands for one command.

The processor remembers decided command ids for a window (``KEEL_PROCESSOR_DEDUPE_WINDOW_S``)
and then forgets them. A command created before the window could repeat a forgotten one,
and deciding it again would repeat its effects under the same, deterministic event ids, so
every way in refuses it: the gateway and the SDK with a typed error, the processor by
dead-lettering it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keel.domain.envelope import Envelope
from keel.errors import ValidationError

BEYOND_WINDOW = "beyond_dedupe_window"


def check_within_window(command: Envelope, window_s: float, now: datetime | None = None) -> None:
    """Raise ``beyond_dedupe_window`` if ``command`` was created more than ``window_s`` ago (0: never)."""
    if window_s and command.occurred_at < (now or datetime.now(UTC)) - timedelta(seconds=window_s):
        raise ValidationError(beyond_window_reason(command, window_s), code=BEYOND_WINDOW, field="occurred_at")


def beyond_window_reason(command: Envelope, window_s: float) -> str:
    """Why a command created before the window is refused."""
    return (f"occurred_at {command.occurred_at.isoformat()} is more than {window_s:g}s ago, before the window "
            "in which the processor tells a repeated command id from a new one (KEEL_PROCESSOR_DEDUPE_WINDOW_S)")
