"""Pure parts of the query API: judging a syntax tree, and rendering results."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime

import pytest
from rich.console import Console

from keel.errors import QueryError
from keel.query.guard import check_ast, check_query_tree
from keel.query.render import to_csv, to_json, to_table
from keel.query.run import QueryResult
from keel.query.scope import Scope

SELECT = """SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Literal UInt64_1"""


def test_bare_select_and_set_operations_pass() -> None:
    check_ast(SELECT.splitlines())
    check_ast(["SelectIntersectExceptQuery (children 2)", " SelectQuery (children 1)"])


@pytest.mark.parametrize(("tree", "code"), [
    ("InsertQuery   (children 1)\n Identifier t", "not_read_only"),
    ("DropQuery  t (children 1)\n Identifier t", "not_read_only"),
    ("Explain EXPLAIN (children 1)\n SelectWithUnionQuery (children 1)", "not_read_only"),
    (SELECT + "\n Identifier JSON", "clause_not_allowed"),  # FORMAT JSON
    (SELECT + "\n Literal \\'/tmp/out.csv\\'", "clause_not_allowed"),  # INTO OUTFILE
    (SELECT.replace("(children 1)\n   Expr", "(children 2)\n   Expr") + "\n   Set", "clause_not_allowed"),
    ("", "query_failed"),
])
def test_anything_else_is_refused_with_a_code(tree: str, code: str) -> None:
    with pytest.raises(QueryError) as refused:
        check_ast(tree.splitlines())

    assert refused.value.code == code


RESULT = QueryResult(
    columns=("id", "at", "n", "tags"),
    rows=((uuid.UUID(int=1), datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC), None, ["a", "b"]),),
    truncated=True,
)


def test_json_keeps_columns_rows_and_truncation() -> None:
    document = json.loads(to_json(RESULT))

    assert document == {"columns": ["id", "at", "n", "tags"], "truncated": True, "rows": [
        ["00000000-0000-0000-0000-000000000001", "2030-01-02T03:04:05+00:00", None, ["a", "b"]]]}


def test_csv_has_a_header_and_empty_fields_for_null() -> None:
    lines = list(csv.reader(io.StringIO(to_csv(RESULT))))

    assert lines == [["id", "at", "n", "tags"],
                     ["00000000-0000-0000-0000-000000000001", "2030-01-02T03:04:05+00:00", "", '["a", "b"]']]


def test_table_shows_null_and_says_rows_were_cut() -> None:
    console = Console(record=True, width=200)
    console.print(to_table(RESULT))
    text = console.export_text()

    assert "NULL" in text and "raise --limit" in text


SCOPE = Scope(database="keel__t_abc", tables=frozenset({"events", "commands"}), tenant="acme")


def tree(*tables: str, functions: tuple[str, ...] = ()) -> list[str]:
    lines = ["QUERY id: 0", "  JOIN TREE"]
    lines += [f"    TABLE id: {n + 3}, alias: __table{n + 1}, table_name: {t}" for n, t in enumerate(tables)]
    lines += [f"    FUNCTION id: {n + 20}, function_name: {f}, function_type: ordinary, result_type: UInt8"
              for n, f in enumerate(functions)]
    return lines


def test_query_tree_over_the_scope_passes() -> None:
    check_query_tree(tree("keel__t_abc.events", "keel__t_abc.commands", "system.one", functions=("equals",)), SCOPE)


@pytest.mark.parametrize(("lines", "code"), [
    (tree("keel.events"), "table_not_allowed"),
    (tree("keel__t_abc.events", "system.tables"), "table_not_allowed"),
    (tree("keel__t_abc.tenant_hourly"), "table_not_allowed"),
    (tree("keel__t_abc.events") + ["    TABLE_FUNCTION id: 3, alias: __table1, table_function_name: numbers"],
     "table_not_allowed"),
    (tree("keel__t_abc.events", functions=("file",)), "function_not_allowed"),
    (tree("keel__t_abc.events", functions=("dictGetString",)), "function_not_allowed"),
])
def test_query_tree_reaching_out_of_scope_is_refused(lines: list[str], code: str) -> None:
    with pytest.raises(QueryError) as refused:
        check_query_tree(lines, SCOPE)

    assert refused.value.code == code


@pytest.mark.parametrize(("line", "code"), [
    ("      TableIdentifier keel.events", "table_not_allowed"),
    ("      Identifier system.tables", "table_not_allowed"),
    ("      Function joinGet (children 1)", "function_not_allowed"),
    ("      QueryParameter t:Identifier", "table_not_allowed"),
])
def test_syntax_tree_naming_another_database_or_a_denied_function_is_refused(line: str, code: str) -> None:
    with pytest.raises(QueryError) as refused:
        check_ast([*SELECT.splitlines(), line], databases={"keel", "system"})

    assert refused.value.code == code


def test_a_column_qualified_by_a_table_alias_passes() -> None:
    check_ast([*SELECT.splitlines(), "    Identifier e.tenant_id"], databases={"keel", "system"})


def test_a_final_modifier_in_the_tree_does_not_hide_the_table_name() -> None:
    check_query_tree(["    TABLE id: 3, alias: __table1, table_name: keel__t_abc.events, final: 1"], SCOPE)
    with pytest.raises(QueryError):
        check_query_tree(["    TABLE id: 3, alias: __table1, table_name: keel.events, final: 1"], SCOPE)
