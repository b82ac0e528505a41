"""Typed errors of replay and rebuild (candidates for ``keel.errors`` once the slice settles)."""

from __future__ import annotations

from keel.errors import KeelError


class ReplayError(KeelError):
    """A replay was asked for something it cannot do: an empty or inverted range, a live target."""

    code = "replay_error"


class ProjectionError(KeelError):
    """A projection cannot be rebuilt or rolled back: unknown view, nothing to roll back to."""

    code = "projection_error"
