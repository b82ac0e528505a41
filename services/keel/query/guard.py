"""Admits only a single read-only SELECT (or WITH ... SELECT), as ClickHouse's own parser sees it.

The user's text is never executed as given. chDB runs every ``;``-separated statement of
one query (``EXPLAIN AST SELECT 1; DROP TABLE t`` drops ``t``), and a refused multi-statement
leaves ``readonly`` stuck on the client's session. Instead the text travels as a bound
parameter to ``formatQuery``, which parses exactly one statement (multi-statements are a
syntax error) and returns its canonical text; ``EXPLAIN AST`` of that text must then be a
SELECT without FORMAT, INTO OUTFILE or SETTINGS clauses (readonly does not stop INTO
OUTFILE on chDB; the limits are Keel's).
Only the canonical text runs, with ``readonly=1`` as a second line of defence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

from keel.errors import QueryError

_SELECT_ROOTS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery"})
_SYNTAX_ERROR = 62
_MULTI_STATEMENT = "Multi-statements are not allowed"


def admit(client: Client, sql: str, parameters: Mapping[str, Any] | None = None) -> str:
    """The canonical text of ``sql`` if it is one plain SELECT; raises ``QueryError`` otherwise.

    ``{name:Type}`` placeholders stay in the text; ``parameters`` binds them server-side.
    """
    if not sql.strip():
        raise QueryError("the query is empty", code="empty_query")
    try:
        formatted = str(client.query("SELECT formatQuery({sql:String})",
                                     parameters={"sql": sql}).result_rows[0][0])
    except DatabaseError as exc:
        if exc.code != _SYNTAX_ERROR:
            raise QueryError(f"the query could not be parsed: {exc}", code="query_failed") from exc
        if _MULTI_STATEMENT in str(exc):
            raise QueryError("only one statement may run at a time; remove the ';'-separated rest",
                             code="multi_statement") from exc
        raise QueryError(_parser_message(str(exc)), code="syntax_error") from exc
    try:
        ast = client.command(f"EXPLAIN AST {formatted}", parameters=dict(parameters or {}))
    except ClickHouseError as exc:
        raise QueryError(f"the query could not be analysed: {exc}", code="query_failed") from exc
    check_ast(str(ast).splitlines())
    return formatted


def check_ast(lines: Sequence[str]) -> None:
    """Refuse an ``EXPLAIN AST`` tree that is not a bare SELECT."""
    if not lines or not lines[0].strip():
        raise QueryError("ClickHouse returned no syntax tree for the query", code="query_failed")
    root = lines[0].split()[0]
    if root not in _SELECT_ROOTS:
        raise QueryError(f"only SELECT and WITH ... SELECT queries may run here, not {root}",
                         code="not_read_only")
    root_children = [line for line in lines[1:] if _depth(line) == 1]
    if len(root_children) > 1:  # the union list, plus an output file or a FORMAT name
        raise QueryError("FORMAT and INTO OUTFILE clauses are not allowed; pick the output format "
                         "with --format", code="clause_not_allowed")
    if any(line.strip() == "Set" for line in lines):
        raise QueryError("SETTINGS clauses are not allowed; Keel sets the query limits",
                         code="clause_not_allowed")


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _parser_message(message: str) -> str:
    """The parser's complaint and position, without the engine prefix, the long list of
    tokens it expected and the ``formatQuery(...)`` scope that wraps it."""
    message = message.split("DB::Exception: ", 1)[-1]
    return message.split(": In scope")[0].split(" Expected one of:")[0].strip()
