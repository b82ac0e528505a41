"""``keel effects list|show|retry|cancel``: what effects are doing, and the operator's levers."""

from __future__ import annotations

import typer


def register(group: typer.Typer) -> None:
    """Add the operator commands to the ``effects`` group."""
