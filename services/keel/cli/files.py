"""Files a person names on the command line: an OS failure is one typed line naming the file, not a traceback.

A missing file (or folder on its path) is ``file_not_found``; any other failure (a directory where a
file belongs, no permission, bytes that are not UTF-8) is ``file_unreadable``, or ``file_unwritable``
when the command writes. ``keel.cli.main`` prints the ``FileError`` as ``[code] path: reason``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keel.errors import FileError


@contextmanager
def user_file(path: Path, *, writing: bool = False) -> Iterator[Path]:
    """Do the block's I/O on ``path`` so that its failure names the file and the OS reason."""
    try:
        yield path
    except FileNotFoundError as exc:
        raise FileError(f"{exc.filename or path}: {exc.strerror or exc}", code="file_not_found") from exc
    except OSError as exc:
        raise FileError(f"{exc.filename or path}: {exc.strerror or exc}",
                        code="file_unwritable" if writing else "file_unreadable") from exc
    except UnicodeDecodeError as exc:
        raise FileError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})", code="file_unreadable") from exc


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a ``FileError`` when it cannot be read."""
    with user_file(path):
        return path.read_text(encoding="utf-8")
