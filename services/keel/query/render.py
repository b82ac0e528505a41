"""Renders a ``QueryResult`` as a rich table, JSON or CSV for the CLI and the query API
(Arrow and Parquet: ``keel.query.columnar``).

JSON keeps rows as arrays next to the column names, so duplicate column names and
column order survive; dates become ISO 8601, UUIDs and decimals strings.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import date, datetime, time
from typing import Any

from rich.table import Table
from rich.text import Text

from keel.query.run import QueryResult

ARROW_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
"""The media types of ``keel.query.columnar``'s renderings, named here so naming them imports no pyarrow."""


def to_table(result: QueryResult) -> Table:
    """A rich table of the result; NULLs dimmed, a caption when rows were cut."""
    count = len(result.rows)
    caption = (f"first {count} rows shown; raise --limit for more" if result.truncated
               else f"{count} row{'' if count == 1 else 's'}")
    table = Table(*result.columns, caption=caption)
    for row in result.rows:
        table.add_row(*(Text("NULL", style="dim") if v is None else Text(cell_text(v)) for v in row))
    return table


def to_json(result: QueryResult) -> str:
    """``{"columns": [...], "rows": [[...]], "truncated": bool}`` as one JSON document."""
    return json.dumps({"columns": list(result.columns), "rows": [list(r) for r in result.rows],
                       "truncated": result.truncated}, default=_plain, ensure_ascii=False)


def to_csv(result: QueryResult) -> str:
    """A header line and one line per row; NULL is an empty field."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([["" if v is None else cell_text(v) for v in row] for row in result.rows])
    return buffer.getvalue()


def cell_text(value: Any) -> str:
    """One value as CSV (and Arrow's text columns) write it: arrays, maps and tuples as JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_plain, ensure_ascii=False)
    plain = _plain(value)
    return plain if isinstance(plain, str) else str(plain)


def _plain(value: Any) -> Any:
    """A JSON-able stand-in for values ``json`` does not know (dates, UUIDs, decimals, bytes)."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
