"""Batches of any length become ``IN`` lists of a few fixed lengths, covering every value."""

from __future__ import annotations

import sqlite3

from keel.sqlmarks import LENGTHS, in_lists


def test_any_batch_is_cut_into_fixed_lengths_that_cover_it() -> None:
    for count in (0, 1, 2, 7, 8, 9, 63, 64, 65, 511, 512, 513, 1_500, 5_000):
        values = list(range(count))
        lists = list(in_lists(values))
        assert all(marks.count("?") == len(chunk) and len(chunk) in LENGTHS for marks, chunk in lists)
        assert sorted({v for _, chunk in lists for v in chunk}) == values


def test_deleting_batches_of_many_lengths_prepares_few_statements() -> None:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    connection.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(20_000)])
    statements = set()
    start = 0
    for count in range(1, 200, 7):  # 29 batch lengths
        batch = list(range(start, start + count))
        start += count
        for marks, chunk in in_lists(batch):
            statement = f"DELETE FROM t WHERE id IN ({marks})"
            statements.add(statement)
            connection.execute(statement, chunk)
    assert len(statements) <= len(LENGTHS)
    assert connection.execute("SELECT min(id) FROM t").fetchone()[0] == start
