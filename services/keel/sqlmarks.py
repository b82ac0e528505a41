"""Parameter lists of a few fixed lengths, for ``IN (?, ?, …)`` over a batch of values.

Python's sqlite3 keeps the last 128 prepared statements of each connection, and a statement
with thousands of parameters compiles to a program of about 0.6 MB. A list as long as each
batch is a new statement at every new length: the relay's retention, which deletes a
different number of commands each minute, grew the relay by about 1.5 MiB a minute (found
by the soak) until the cache would hold 128 of them. Cut into lists of a few fixed lengths,
the statements stay few and are reused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

LENGTHS = (1, 8, 64, 512)
"""The list lengths used: a batch is cut into lists of the longest, and what is left is padded up to the
shortest length that holds it."""


def in_lists(values: Sequence[T]) -> Iterator[tuple[str, list[T]]]:
    """``values`` in lists of the fixed ``LENGTHS``, each with its marks (``?, ?, …``).

    A list is padded by repeating its last value, which changes nothing in ``IN (...)``.
    Nothing is yielded for no values.
    """
    start = 0
    while start < len(values):
        left = len(values) - start
        length = next((n for n in LENGTHS if n >= left), LENGTHS[-1])
        chunk = list(values[start:start + length])
        start += len(chunk)
        chunk += [chunk[-1]] * (length - len(chunk))
        yield ", ".join("?" * length), chunk
