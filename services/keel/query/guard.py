"""Admits one read-only SELECT that reads only its scope's tables, as ClickHouse's parser sees it.

The user's text is never executed as given. chDB runs every ``;``-separated statement of
one query, so the text travels as a bound parameter to ``formatQuery``, which parses
exactly one statement and returns its canonical text (comments and escapes resolved).
Two trees of that text are then judged, deny by default:

1. ``EXPLAIN AST`` (a parse, nothing runs): a SELECT without FORMAT, INTO OUTFILE or
   SETTINGS anywhere; no table function; no ``db.table`` reference and no identifier whose
   first part names a database; no function that reads outside the scope (``file``,
   ``dictGet*``, ``joinGet``...). This must come first: analysing a query evaluates its
   scalar subqueries and constant functions, so nothing out of scope may reach analysis.
2. ``EXPLAIN QUERY TREE`` (ClickHouse's resolved names): every table read is one of the
   scope's views (``system.one``, the table of a SELECT without FROM, aside), and no table
   function or denied function survived resolution.

Only the canonical text runs, with ``readonly=1`` as a further line of defence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError

from keel.errors import QueryError
from keel.query.scope import Scope

_SELECT_ROOTS = frozenset({"SelectWithUnionQuery", "SelectIntersectExceptQuery"})
_SYNTAX_ERROR = 62
_MULTI_STATEMENT = "Multi-statements are not allowed"
_DENIED_FUNCTIONS = frozenset({
    "file", "joinget", "joingetornull", "hascolumnintable", "catboostevaluate", "sleep",
    "sleepeachrow", "getserversetting", "getmacro", "filesystemavailable", "filesystemcapacity",
    "filesystemunreserved", "getclienthttpheader", "input", "evalmlmethod",
})
_DENIED_PREFIXES = ("dict",)
_ALWAYS_DATABASES = frozenset({"system", "information_schema"})
_DUMMY_TABLE = "system.one"
# the name ends at the first ", " (", final: 1" may follow); only the scope's views can match
_TREE_TABLE = re.compile(r"^\s*TABLE id: \d+, (?:alias: [^,]*, )?table_name: (?P<name>[^,]+)")
_TREE_FUNCTION = re.compile(r"^\s*FUNCTION id: \d+, function_name: (?P<name>[^,]+),")


def admit(client: Client, sql: str, scope: Scope, parameters: Mapping[str, Any] | None = None,
          settings: Mapping[str, Any] | None = None) -> str:
    """The canonical text of ``sql`` if it is one plain SELECT over ``scope``; else ``QueryError``.

    ``client`` runs in ``scope.database``; ``{name:Type}`` placeholders stay in the text and
    ``parameters`` binds them server-side; ``settings`` bound the analysis like the query.
    """
    if not sql.strip():
        raise QueryError("the query is empty", code="empty_query")
    formatted, databases = _canonical(client, sql)
    bound = dict(parameters or {})
    try:
        ast = str(client.command(f"EXPLAIN AST {formatted}", parameters=bound))
    except ClickHouseError as exc:
        raise QueryError(f"the query could not be analysed: {exc}", code="query_failed") from exc
    check_ast(ast.splitlines(), databases | _ALWAYS_DATABASES)
    try:
        # query(), not command(): on chDB command() settings would outlive the call in the session
        tree = "\n".join(str(row[0]) for row in client.query(
            f"EXPLAIN QUERY TREE {formatted}", parameters=bound, settings=dict(settings or {})).result_rows)
    except DatabaseError as exc:
        raise QueryError(f"the query failed: {_engine_message(str(exc))}", code="query_failed") from exc
    except ClickHouseError as exc:
        raise QueryError(f"the query could not be analysed: {exc}", code="query_failed") from exc
    check_query_tree(tree.splitlines(), scope)
    return formatted


def _canonical(client: Client, sql: str) -> tuple[str, set[str]]:
    """The canonical text of ``sql`` and the names of the engine's databases, in one round trip."""
    try:
        text, databases = client.query(
            "SELECT formatQuery({sql:String}), (SELECT groupArray(lower(name)) FROM system.databases)",
            parameters={"sql": sql}).result_rows[0]
        return str(text), {str(name) for name in databases}
    except DatabaseError as exc:
        if exc.code != _SYNTAX_ERROR:
            raise QueryError(f"the query could not be parsed: {exc}", code="query_failed") from exc
        if _MULTI_STATEMENT in str(exc):
            raise QueryError("only one statement may run at a time; remove the ';'-separated rest",
                             code="multi_statement") from exc
        raise QueryError(_engine_message(str(exc)), code="syntax_error") from exc


def check_ast(lines: Sequence[str], databases: Iterable[str] = _ALWAYS_DATABASES) -> None:
    """Refuse an ``EXPLAIN AST`` tree that is not a bare SELECT over unqualified tables."""
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
    known = {name.lower() for name in databases}
    for index, line in enumerate(lines):
        node, _, rest = line.strip().partition(" ")
        name = rest.split(" (", 1)[0].strip()
        if node == "Set":
            raise QueryError("SETTINGS clauses are not allowed; Keel sets the query limits",
                             code="clause_not_allowed")
        if node == "QueryParameter" and name.endswith(":Identifier"):
            raise QueryError("identifier parameters are not allowed", code="table_not_allowed")
        if node == "TableIdentifier" and "." in name:
            raise QueryError(f"{name}: name tables without a database; you can read only your "
                             "tenant's projections", code="table_not_allowed")
        if node == "Identifier" and "." in name and name.split(".", 1)[0].strip("`\"").lower() in known:
            raise QueryError(f"{name}: references to other databases are not allowed",
                             code="table_not_allowed")
        if node == "Function" and index > 0 and lines[index - 1].strip().startswith("TableExpression"):
            raise QueryError(f"table functions such as {name}() are not allowed; query the "
                             "projections", code="table_not_allowed")
        if node == "Function" and _denied(name):
            raise QueryError(f"the function {name} is not allowed in analyst queries",
                             code="function_not_allowed")


def check_query_tree(lines: Sequence[str], scope: Scope) -> None:
    """Refuse a resolved query tree that reads anything but the scope's tables."""
    allowed = scope.qualified | {_DUMMY_TABLE}
    for line in lines:
        if line.lstrip().startswith("TABLE_FUNCTION "):
            raise QueryError("table functions are not allowed; query the projections",
                             code="table_not_allowed")
        table = _TREE_TABLE.match(line)
        if table is not None and table["name"].strip() not in allowed:
            raise QueryError(f"{table['name'].strip()} is not one of your projections "
                             f"({', '.join(sorted(scope.tables))})", code="table_not_allowed")
        function = _TREE_FUNCTION.match(line)
        if function is not None and _denied(function["name"]):
            raise QueryError(f"the function {function['name']} is not allowed in analyst queries",
                             code="function_not_allowed")


def _denied(function: str) -> bool:
    name = function.strip().lower()
    return name in _DENIED_FUNCTIONS or name.startswith(_DENIED_PREFIXES)


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _engine_message(message: str) -> str:
    """The engine's complaint and position, without the engine prefix, the long list of
    tokens it expected and the ``formatQuery(...)`` scope that wraps it."""
    message = message.split("DB::Exception: ", 1)[-1]
    return message.split(": In scope")[0].split(" Expected one of:")[0].strip()
