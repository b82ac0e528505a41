"""``keel effects``: run effect workers, and see, retry and cancel effects."""

from __future__ import annotations

import typer

from keel.cli import effects_ops


def register(app: typer.Typer) -> None:
    """Add the ``effects`` group to ``app``."""
    group = typer.Typer(help="Effects: decided events carried into the outside world.", no_args_is_help=True)
    effects_ops.register(group)
    app.add_typer(group, name="effects")
