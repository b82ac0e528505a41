"""Renders a ``QueryResult`` as an Arrow IPC stream or a Parquet file, typed columns for dataframes.

Kept apart from ``keel.query.render`` so only these formats pay for importing pyarrow.
With the ClickHouse type names of the columns, each maps to its Arrow type (ints and floats
of their width, ``UUID`` and other text-like types as strings, ``DateTime64(p, tz)`` as a
timestamp of that precision and zone, ``Nullable``/``LowCardinality`` unwrapped, arrays as
lists); without them each column's type is inferred from its values. A column whose values
do not fit its type, and every type Arrow has no match for (maps, tuples, JSON, 128/256-bit
ints), is text, as in CSV. Duplicate column names are kept, as in JSON. The schema metadata
says ``keel.truncated`` when the row limit cut further rows.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.ipc  # type: ignore[import-untyped]  # noqa: F401  (pa.ipc)
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from keel.query.render import cell_text
from keel.query.run import QueryResult

_SIMPLE: dict[str, Any] = {
    "Int8": pa.int8(), "Int16": pa.int16(), "Int32": pa.int32(), "Int64": pa.int64(),
    "UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(),
    "Float32": pa.float32(), "BFloat16": pa.float32(), "Float64": pa.float64(), "Bool": pa.bool_(),
    "Date": pa.date32(), "Date32": pa.date32(),
}
_WRAPPERS = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$")
_DATETIME = re.compile(r"^DateTime(?:64)?(?:\(\s*(\d+)?\s*,?\s*(?:'([^']*)')?\s*\))?$")
_DECIMAL = re.compile(r"^Decimal(32|64|128|256)?\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\)$")
_DECIMAL_PRECISION = {"32": 9, "64": 18, "128": 38, "256": 76}


def to_arrow_stream(result: QueryResult) -> bytes:
    """The result as one Arrow IPC stream (``pyarrow.ipc.open_stream(body).read_all()``)."""
    table = to_table(result)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def to_parquet(result: QueryResult) -> bytes:
    """The result as one Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(to_table(result), sink)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def to_table(result: QueryResult) -> Any:
    """A ``pyarrow.Table`` of the result, typed by its columns' ClickHouse types when it has them."""
    types = result.types
    arrays = [_column([row[index] for row in result.rows], arrow_type(types[index]) if types else None)
              for index in range(len(result.columns))]
    metadata = {"keel.truncated": "true" if result.truncated else "false"}
    return pa.Table.from_arrays(arrays, names=list(result.columns), metadata=metadata)


def arrow_type(clickhouse: str) -> Any:
    """The Arrow type of a ClickHouse column type; ``pa.string()`` when there is no faithful match."""
    name = clickhouse.strip()
    while wrapped := _WRAPPERS.match(name):
        name = wrapped.group(1).strip()
    if name in _SIMPLE:
        return _SIMPLE[name]
    if moment := _DATETIME.match(name):
        precision = int(moment.group(1)) if name.startswith("DateTime64") and moment.group(1) else 0
        unit = "s" if precision == 0 else "ms" if precision <= 3 else "us" if precision <= 6 else "ns"
        return pa.timestamp(unit, tz=moment.group(2) or None)
    if decimal := _DECIMAL.match(name):
        width, first, second = decimal.groups()
        precision, scale = (_DECIMAL_PRECISION[width], int(first)) if width else (int(first), int(second or 0))
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if name.startswith("Array(") and name.endswith(")"):
        return pa.list_(arrow_type(name[len("Array("):-1]))
    return pa.string()


def _column(values: list[Any], kind: Any) -> Any:
    """An Arrow array of ``values`` as ``kind`` (``None``: inferred); text when they do not fit."""
    if kind is not None and pa.types.is_string(kind):
        return _text(values)
    try:
        return pa.array(values if kind is not None else [_plain(v) for v in values], type=kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return _text(values)


def _plain(value: Any) -> Any:
    """A value Arrow infers a type for: numbers, text, times and decimals as they are, the rest as text."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, date, datetime, Decimal)):
        return value
    return cell_text(value)


def _text(values: list[Any]) -> Any:
    return pa.array([None if v is None else cell_text(v) for v in values], type=pa.string())
