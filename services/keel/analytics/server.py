"""Serves this process's embedded chDB engine over the ClickHouse HTTP interface.

chDB lets one process open a data path. The process that owns it runs an ``EngineServer``,
and every other process reaches the same engine with an ordinary ``http://127.0.0.1:<port>``
DSN through clickhouse-connect, running the same SQL it would run on chDB.

The protocol is the subset of ClickHouse's HTTP interface that clickhouse-connect's HTTP
client uses:

* ``GET /ping`` answers ``Ok.``.
* ``GET`` or ``POST /`` runs one statement: the ``query`` URL parameter and the body joined by
  a newline (either may be missing), or the ``query`` field of a ``multipart/form-data``
  body. ``GET`` runs with ``readonly=2`` unless ``readonly`` is given, as ClickHouse does.
* ``database`` picks the current database; ``param_<name>`` binds ``{name:Type}``
  placeholders; every other URL parameter is a setting, applied in URL order, except the
  transport parameters in ``TRANSPORT_PARAMETERS``, which are ignored.
* A result is in the format of the statement's trailing ``FORMAT`` clause, else
  TabSeparated; ``X-ClickHouse-Format`` names it when the statement produces a result set,
  as ClickHouse does, so ``command()`` tells an empty result from no result.
* ``INSERT ... FORMAT <name>`` takes its data from what follows the statement (the body, for
  clickhouse-connect's inserts) and hands it to chDB's streaming insert, no temporary file.
* Request bodies may be chunked and compressed with ``Content-Encoding`` lz4, zstd or gzip
  (clickhouse-connect compresses inserts unless ``compress=False``). Responses are never
  compressed, and carry ``X-ClickHouse-Summary``, ``X-ClickHouse-Query-Id`` and
  ``X-ClickHouse-Timezone``.
* Errors are HTTP 500 with ClickHouse's body (``Code: N. DB::Exception: ...``) and
  ``X-ClickHouse-Exception-Code: N``, so clickhouse-connect raises its ``DatabaseError``
  with the engine's code and message.

There are no sessions: each request runs on a fresh engine handle (chDB keeps ``USE`` and
``SET`` per handle), so nothing a statement changes outlives its request, and a
``session_id`` is ignored. Requests run in parallel, each on its own handle; chDB runs
statements from different handles concurrently. There is no authentication: the server
binds 127.0.0.1 only and is meant for processes on this machine, which also lets
statements read files those processes wrote (``file(...)``). Request bodies and results
are held in memory, which suits Keel's batch-sized inserts and bounded query results.
A statement is not cancelled when its client goes away: one that outlasts the client's read
timeout (clickhouse-connect's ``send_receive_timeout``, 300 s by default) fails there and
still finishes here.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, urlsplit

import lz4.frame  # type: ignore[import-untyped]
from clickhouse_connect.driver.binding import quote_identifier

from keel.analytics import allocator
from keel.errors import InfraError, KeelError

if TYPE_CHECKING:
    from chdb.state.sqlitelike import Connection as Handle

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

# URL parameters that steer the HTTP exchange rather than the engine: never applied as settings.
TRANSPORT_PARAMETERS = frozenset({
    "buffer_size", "session_id", "session_timeout", "session_check", "quota_key", "compress",
    "decompress", "wait_end_of_query", "client_protocol_version", "role", "user", "password",
    "stacktrace", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "enable_http_compression",
})

# ClickHouse error codes for failures found before the engine runs anything.
_BAD_ARGUMENTS = 36
_NOT_IMPLEMENTED = 48
_ABORTED = 236
_CANNOT_DECOMPRESS = 271
_STD_EXCEPTION = 1001

_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENGINE_ERROR = re.compile(r"Code: (?P<code>\d+)\. (?P<message>.*)", re.DOTALL)
_TRAILING_FORMAT = re.compile(rb"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_TOKEN = re.compile(rb"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<quoted>'(?:\\.|''|[^'\\])*'|"(?:\\.|""|[^"\\])*"|`(?:\\.|``|[^`\\])*`)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<symbol>.)
""", re.VERBOSE | re.DOTALL)
# After these, no FORMAT clause introduces inline data: the rows come from SQL or a file.
_NO_INLINE_DATA = frozenset({b"VALUES", b"SELECT", b"WITH", b"INFILE"})
# A FORMAT word right after these (or a dot) names a table, not a format clause.
_TABLE_NAME_BEFORE = frozenset({b"INTO", b"TABLE", b"FUNCTION", b"."})


class _Failure(Exception):
    """A request failed: a ClickHouse error code and the body ClickHouse would answer."""

    def __init__(self, code: int, message: str, *, body: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = (body or f"Code: {code}. DB::Exception: {message}").encode() + b"\n"

    @classmethod
    def from_engine(cls, exc: Exception) -> _Failure:
        """The engine's own ``Code: N. DB::Exception: ...``, without the prefixes chDB adds."""
        match = _ENGINE_ERROR.search(str(exc))
        if match is None:
            return cls(_STD_EXCEPTION, str(exc))
        return cls(int(match["code"]), match["message"], body=match[0].strip())


@dataclass(frozen=True)
class _Statement:
    """One request's statement and what it runs with."""

    text: bytes
    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Insert:
    """An ``INSERT ... FORMAT <fmt>`` split into the statement before FORMAT and its data."""

    statement: bytes
    fmt: str
    data: bytes


@dataclass(frozen=True)
class _Outcome:
    """A statement's response body, its result format (None: no result set) and statistics."""

    body: bytes
    fmt: str | None
    summary: dict[str, str]


def open_handle(path: str) -> Handle:
    """A new handle onto the engine at ``path``. chDB is imported here, by the one process that hosts
    the engine: loading its library costs a process ~340 MiB of resident memory, which every other
    Keel service (they all import this module through the CLI) would otherwise carry for nothing.
    The allocator's options (``keel.analytics.allocator``) are set before the import."""
    allocator.configure()
    from chdb.state.sqlitelike import connect  # noqa: PLC0415 (deferred on purpose)

    return connect(path)


class _Engine:
    """Opens a fresh handle per request onto the engine of ``path``, which this process holds."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.timezone = "UTC"
        self._anchor: Handle | None = None
        self._lock = threading.Lock()  # orders opening a handle against close(); never held while running

    def open(self) -> None:
        """Take the engine: fails when another process owns the path or this one holds another."""
        try:
            anchor = open_handle(self.path)
        except RuntimeError as exc:
            raise InfraError(
                f"cannot serve the embedded ClickHouse (chDB) at {self.path}: another process owns this "
                f"data path, or this process has a different chDB path open. Engine said: {exc}",
                code="chdb_path_in_use") from exc
        try:
            self.timezone = anchor.query("SELECT timezone()", "TabSeparated").bytes().decode().strip()
        except RuntimeError as exc:
            anchor.close()
            raise InfraError(f"the embedded ClickHouse (chDB) at {self.path} does not answer: {exc}",
                             code="clickhouse_unavailable") from exc
        self._anchor = anchor

    def close(self) -> None:
        """Open no more handles; statements still running finish on theirs."""
        with self._lock:
            anchor, self._anchor = self._anchor, None
        if anchor is not None:
            anchor.close()

    def execute(self, statement: _Statement) -> _Outcome:
        """Run ``statement`` on a handle of its own, so its USE and SETs die with it."""
        with self._lock:
            if self._anchor is None:
                raise _Failure(_ABORTED, "the analytics engine is shutting down")
            handle = open_handle(self.path)
        try:
            if statement.database:
                handle.query(f"USE {quote_identifier(statement.database)}", "TabSeparated")
            if statement.settings:
                handle.query("SET " + ", ".join(f"{_setting_name(name)} = {_literal(value)}"
                                                for name, value in statement.settings.items()), "TabSeparated")
            insert = _split_insert(statement.text)
            if insert is not None:
                if statement.params:
                    raise _Failure(_NOT_IMPLEMENTED, "query parameters are not supported in an INSERT with data")
                return _insert(handle, insert)
            return _query(handle, statement)
        except RuntimeError as exc:  # chDB's errors (ChdbError is one)
            raise _Failure.from_engine(exc) from exc
        finally:
            handle.close()


def _query(handle: Handle, statement: _Statement) -> _Outcome:
    match = _TRAILING_FORMAT.search(statement.text)
    fmt = match[1].decode() if match else None
    # With no FORMAT clause, the names line tells a result set (even an empty one) from none.
    # The statement goes as bytes: chDB runs them as they are, binary literals included.
    result = handle.query(cast(str, statement.text), fmt or "TabSeparatedWithNames", params=statement.params)
    body = bytes(result.bytes())
    if fmt is None and body:
        fmt, body = "TabSeparated", body[body.find(b"\n") + 1:]
    summary = {"read_rows": result.rows_read(), "read_bytes": result.bytes_read(),
               "written_rows": result.rows_written(), "written_bytes": result.bytes_written(),
               "elapsed_ns": int(result.elapsed() * 1e9)}
    return _Outcome(body, fmt, {key: str(value) for key, value in summary.items()})


def _insert(handle: Handle, insert: _Insert) -> _Outcome:
    try:
        statement = insert.statement.decode()
    except UnicodeDecodeError as exc:
        raise _Failure(_BAD_ARGUMENTS, f"the INSERT statement is not UTF-8: {exc}") from exc
    with handle.send_insert(statement, insert.fmt) as inserter:
        if insert.data:
            inserter.append(insert.data)
        done = inserter.finish()
    summary = {"written_rows": done.rows_written, "written_bytes": done.bytes_written,
               "elapsed_ns": int(done.elapsed * 1e9)}
    return _Outcome(b"", None, {key: str(value) for key, value in summary.items()})


def _split_insert(text: bytes) -> _Insert | None:
    """``text`` as statement, format and data if it is an ``INSERT ... FORMAT <name>`` whose
    data follows the statement; else None (the whole text is SQL).

    Data starts after the format name, its trailing spaces and one line break, as in
    ClickHouse. Quoted names, strings and comments are skipped while looking for FORMAT.
    """
    tokens = _tokens(text)
    first = next(tokens, None)
    if first is None or first[0].upper() != b"INSERT":
        return None
    depth, previous = 0, first[0]
    for word, start, _ in tokens:
        upper = word.upper()
        depth += (word == b"(") - (word == b")")
        if depth == 0 and upper in _NO_INLINE_DATA:
            return None
        if depth == 0 and upper == b"FORMAT" and previous.upper() not in _TABLE_NAME_BEFORE:
            name = next(tokens, None)
            if name is None or not re.fullmatch(rb"[A-Za-z_]\w*", name[0]):
                return None
            data = name[2]
            while data < len(text) and text[data] in b" \t\f":
                data += 1
            data += text.startswith(b"\r", data)
            data += text.startswith(b"\n", data)
            return _Insert(text[:start], name[0].decode(), text[data:])
        previous = word
    return None


def _tokens(text: bytes) -> Iterator[tuple[bytes, int, int]]:
    """The SQL tokens of ``text`` as (token, start, end), without spaces and comments."""
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        assert match is not None  # the symbol branch matches any byte
        position = match.end()
        if match.lastgroup not in ("space", "comment"):
            yield match[0], match.start(), match.end()


def _setting_name(name: str) -> str:
    if not _SETTING_NAME.fullmatch(name):
        raise _Failure(_BAD_ARGUMENTS, f"{name!r} is not a setting name")
    return name


def _literal(value: str) -> str:
    """A quoted SQL literal: ClickHouse converts it to the setting's type, numeric or not."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _decompressed(body: bytes, encoding: str) -> bytes:
    """``body`` decoded per ``Content-Encoding``; clickhouse-connect compresses inserts by default."""
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "zstd":
            return zstd.decompress(body)
        if encoding == "lz4":  # one frame per insert block
            frames = []
            while body:
                decompressor = lz4.frame.LZ4FrameDecompressor()
                frames.append(decompressor.decompress(body))
                if not decompressor.eof:
                    raise ValueError("the last lz4 frame is cut short")
                body = decompressor.unused_data
            return b"".join(frames)
    except (OSError, EOFError, ValueError, RuntimeError, zlib.error, zstd.ZstdError) as exc:
        raise _Failure(_CANNOT_DECOMPRESS, f"cannot decompress the {encoding} request body: {exc}") from exc
    raise _Failure(_NOT_IMPLEMENTED, f"Content-Encoding {encoding!r} is not supported; use lz4, zstd or gzip")


def _form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """The fields of a ``multipart/form-data`` body (clickhouse-connect sends long parameters so)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise _Failure(_BAD_ARGUMENTS, "the multipart/form-data body has no boundary")
    fields: dict[str, str] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = BytesHeaderParser().parsebytes(head)
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or headers.get_filename() is not None:
            raise _Failure(_NOT_IMPLEMENTED, "external data (files in a form) is not supported")
        try:
            fields[name] = value.removesuffix(b"\r\n").decode()
        except UnicodeDecodeError as exc:
            raise _Failure(_BAD_ARGUMENTS, f"form field {name!r} is not UTF-8: {exc}") from exc
    return fields


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection; remembers open connections so ``close`` can end idle keep-alives."""

    daemon_threads = True
    block_on_close = False  # close() does not wait for running statements; they finish on their handles
    request_queue_size = 128

    def __init__(self, port: int, engine: _Engine) -> None:
        super().__init__((HOST, port), _Handler)
        self.engine = engine
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)

    def end_connections(self) -> None:
        """Stop reading from every connection: idle ones end, a running request still answers."""
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass  # already gone

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("a connection from %s ended abruptly", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """One connection: reads each request whole, runs it, answers as ClickHouse would."""

    protocol_version = "HTTP/1.1"  # keep-alive: clickhouse-connect pools its connections
    disable_nagle_algorithm = True  # headers and body go as two writes; Nagle would hold the second ~40 ms
    server: _HTTPServer

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        logger.debug(format, *args)

    def _serve(self) -> None:
        query_id = str(uuid.uuid4())
        try:
            body = self._body()  # read first, whatever follows: the connection's next request comes after it
            url = urlsplit(self.path)
            if url.path == "/ping":
                self._reply(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
                return
            if url.path != "/":
                self._reply(404, f"There is no handle {url.path}\n".encode(),
                            {"Content-Type": "text/plain; charset=UTF-8"})
                return
            statement, query_id = self._statement(url.query, body, query_id)
            outcome = self.server.engine.execute(statement)
        except _Failure as failure:
            self._fail(failure, query_id)
            return
        except (ConnectionError, TimeoutError):  # the client went away mid-request: no one to answer
            self.close_connection = True
            return
        except Exception as exc:  # a bug here must still answer, not leave the client waiting
            logger.exception("the analytics server failed on a request")
            self._fail(_Failure(_STD_EXCEPTION, f"the analytics server failed: {exc!r}"), query_id)
            return
        timezone = statement.settings.get("session_timezone") or self.server.engine.timezone
        headers = {"Content-Type": "application/octet-stream", "X-ClickHouse-Query-Id": query_id,
                   "X-ClickHouse-Summary": json.dumps(outcome.summary), "X-ClickHouse-Timezone": timezone}
        if outcome.fmt is not None:
            headers["X-ClickHouse-Format"] = outcome.fmt
        self._reply(200, outcome.body, headers)

    def _statement(self, url_query: str, body: bytes, query_id: str) -> tuple[_Statement, str]:
        """The statement and its database, settings, bind parameters and query id."""
        body = _decompressed(body, self.headers.get("Content-Encoding", "").strip().lower())
        sql = ""
        database = None
        settings: dict[str, str] = {}
        params: dict[str, str] = {}
        for name, value in parse_qsl(url_query, keep_blank_values=True):
            if name.startswith("param_"):
                params[name.removeprefix("param_")] = value
            elif name == "query":
                sql = value
            elif name == "database":
                database = value
            elif name == "query_id":
                query_id = value or query_id
            elif name not in TRANSPORT_PARAMETERS:
                settings[name] = value
        if self.command == "GET":
            settings.setdefault("readonly", "2")
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            fields = _form_fields(body, content_type)
            sql, body = fields.pop("query", ""), b""
            for name, value in fields.items():
                if not name.startswith("param_"):
                    raise _Failure(_NOT_IMPLEMENTED, f"form field {name!r} is not supported (external data)")
                params[name.removeprefix("param_")] = value
        text = body
        if sql:  # ClickHouse reads the URL's query, a line break, then the body
            text = sql.encode() + b"\n" + body
        return _Statement(text, database, settings, params), query_id

    def _body(self) -> bytes:
        """The request body, whole: by Content-Length or chunked (clickhouse-connect streams inserts)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self.close_connection = True
                    raise _Failure(_BAD_ARGUMENTS, f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    break
                chunks.append(self._read(size))
                self.rfile.readline(3)  # the CRLF ending the chunk
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        try:
            return self._read(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True
            raise _Failure(_BAD_ARGUMENTS, "bad Content-Length") from None

    def _read(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            self.close_connection = True
            raise _Failure(_BAD_ARGUMENTS, f"the request body ended after {len(data)} of {size} bytes")
        return data

    def _fail(self, failure: _Failure, query_id: str) -> None:
        self._reply(500, failure.body, {"Content-Type": "text/plain; charset=UTF-8",
                                          "X-ClickHouse-Exception-Code": str(failure.code),
                                          "X-ClickHouse-Query-Id": query_id})

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class EngineServer:
    """A ClickHouse HTTP endpoint on 127.0.0.1 running on this process's chDB engine at ``path``.

    ``start()`` takes the engine (``InfraError`` ``chdb_path_in_use`` when another process
    owns the path) and serves from a daemon thread; ``close()`` stops serving.
    """

    def __init__(self, path: str | Path, port: int = 0) -> None:
        # chDB compares engine paths literally; resolve like clickhouse-connect's chdb client does
        self._engine = _Engine(os.path.realpath(path))
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port served on (an ephemeral one unless given); valid after ``start()``."""
        if self._httpd is None:
            raise InfraError("the analytics server is not running", code="analytics_server_stopped")
        return int(self._httpd.server_address[1])

    @property
    def dsn(self) -> str:
        """The DSN other processes on this machine connect with."""
        return f"http://{HOST}:{self.port}"

    def start(self) -> int:
        """Take the engine and serve; returns the port."""
        self._engine.open()
        try:
            self._httpd = _HTTPServer(self._port, self._engine)
        except OSError as exc:
            self._engine.close()
            raise InfraError(f"cannot serve the analytics engine on {HOST}:{self._port}: {exc}",
                             code="analytics_port_unavailable") from exc
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="keel-analytics-server",
                                        daemon=True)
        self._thread.start()
        logger.info("serving the analytics engine", extra={"path": self._engine.path, "dsn": self.dsn})
        return self.port

    def close(self) -> None:
        """Stop accepting, end idle connections and release this server's hold on the engine."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.end_connections()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._engine.close()

    def __enter__(self) -> EngineServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keel.analytics.server CHDB_PATH``: serve CHDB_PATH on an ephemeral port until
    SIGTERM or Ctrl-C, after printing the port on a line of its own (tests run it so)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m keel.analytics.server CHDB_PATH", file=sys.stderr)
        return 2
    server = EngineServer(args[0])
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        port = server.start()
    except KeelError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(port, flush=True)
    stop.wait()
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
