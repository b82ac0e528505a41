"""The gateway's HTTP protocol sends the bytes one turn of the loop writes in one write,
and loses or reorders nothing: a real uvicorn server on a real socket (keel.gateway.transport)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import uvicorn
import uvloop

from keel.gateway.protocol import PROTOCOL
from keel.gateway.transport import TurnBufferedTransport

pytestmark = pytest.mark.integration

Message = MutableMapping[str, Any]


async def _app(scope: Message, receive: Callable[[], Awaitable[Message]],
               send: Callable[[Message], Awaitable[None]]) -> None:
    """``/echo`` answers its body; ``/stream`` answers three chunks, a turn of the loop apart."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 202,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def _request(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "host: test", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _serve(client: Callable[[int], Awaitable[Any]]) -> Any:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(_app, http=PROTOCOL, log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            return await client(port)
        finally:
            server.should_exit = True
            await serving


async def _read_all(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)  # to EOF: the last request says close
    writer.close()
    return received


def test_pipelined_requests_are_answered_whole_and_in_order() -> None:
    bodies = [b'{"n":%d}' % n for n in range(20)]
    data = b"".join(_request("/echo", body) for body in bodies[:-1])
    data += _request("/echo", bodies[-1], "connection: close")
    received = uvloop.run(_serve(lambda port: _read_all(port, data)))
    responses = received.split(b"HTTP/1.1 202 Accepted\r\n")[1:]
    assert [response.rsplit(b"\r\n\r\n", 1)[1] for response in responses] == bodies
    assert b"connection: close" in responses[-1]


def test_a_streamed_response_arrives_whole() -> None:
    received = uvloop.run(_serve(lambda port: _read_all(port, _request("/stream", b"", "connection: close"))))
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"transfer-encoding: chunked" in head
    assert chunked == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"


class _Recording(asyncio.Transport):
    """The socket's side of a transport: what was written to it, write by write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0


def test_one_turns_writes_go_out_in_one_write_and_close_sends_them_first() -> None:
    async def run() -> None:
        inner = _Recording()
        transport = TurnBufferedTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 202 Accepted\r\n\r\n")
        transport.write(b"{}")
        assert inner.writes == [] and transport.get_write_buffer_size() == 27
        await asyncio.sleep(0)  # the end of the turn
        assert inner.writes == [b"HTTP/1.1 202 Accepted\r\n\r\n{}"]
        transport.write(b"last")
        transport.close()
        assert inner.writes[-1] == b"last" and inner.closed
        await asyncio.sleep(0)
        assert len(inner.writes) == 2  # the scheduled flush found nothing left

        dropped = _Recording()
        aborted = TurnBufferedTransport(dropped, asyncio.get_running_loop())
        aborted.write(b"never sent")
        aborted.abort()
        await asyncio.sleep(0)
        assert dropped.writes == [] and dropped.aborted

    asyncio.run(run())
