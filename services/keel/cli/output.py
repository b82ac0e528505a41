"""How list commands print: a table for people, ``--json`` for programs, ids never cut.

Rich truncates a cell with "…" when a column is narrow and, off a terminal, assumes 80
columns: an id cut that way cannot be copied into the next command. Here every column
folds, and a pipe (no terminal, no ``COLUMNS``) gets lines as long as the content.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document (no table) for programs.")]
PIPE_WIDTH = 10_000  # tables are as wide as their content, so this only lifts the 80-column cap
Record = Mapping[str, object]


def console() -> Console:
    """A stdout console: the terminal's (or ``COLUMNS``') width, else wide enough for whole lines.

    Made per call, not at import, so the width is the one of this run's environment.
    """
    probe = Console()
    return probe if probe.is_terminal or "COLUMNS" in os.environ else Console(width=PIPE_WIDTH)


def fold(table: Table) -> Table:
    """``table`` with every column folding long cells onto more lines instead of cutting them."""
    for column in table.columns:
        column.overflow = "fold"
        column.no_wrap = False
    return table


def table(columns: Sequence[tuple[str, str]], records: Sequence[Record], *, title: str | None = None) -> Table:
    """A folding table of ``records``: ``columns`` are (record key, header) pairs; cells are literal text."""
    built = fold(Table(*(header for _, header in columns), title=title))
    for record in records:
        built.add_row(*(Text(_cell(record[key])) for key, _ in columns))
    return built


def emit(records: Sequence[Record], *, as_json: bool, shown: Table, empty: str | None = None) -> None:
    """Print ``records`` as one JSON array, or ``shown`` for people; ``empty`` says why there are none.

    With ``--json`` stdout stays one parseable document, so the ``empty`` note goes to stderr.
    """
    if as_json:
        write_json(list(records))
        if empty and not records:
            note(empty)
    elif empty and not records:
        say(empty)
    else:
        console().print(fold(shown))


def write_json(document: object) -> None:
    """``document`` as one JSON line on stdout; ids, dates and the like as text."""
    sys.stdout.write(json.dumps(document, default=str, ensure_ascii=False) + "\n")


def say(message: str) -> None:
    """One plain line on stdout (no markup, never wrapped mid-id)."""
    console().print(message, markup=False, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """One plain line on stderr, beside machine-readable stdout."""
    Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)


def _cell(value: object) -> str:
    if value is None or value is False:
        return ""
    if value is True:
        return "yes"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)
