"""The gateway's protocol answers submits without the ASGI exchange exactly as the ASGI route does:
a real uvicorn server with the gateway app, on a real socket (keel.gateway.protocol)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop

from keel.config import Settings
from keel.gateway.app import create_app
from keel.gateway.protocol import PROTOCOL
from keel.gateway.settings import IngressSettings
from keel.gateway.submit import SubmitFastPath
from keel.observability.http import Metered
from tests.helpers import outbox_with_agent_key

pytestmark = pytest.mark.integration

LIMIT = 1024  # the smallest body limit the settings allow


class Gateway:
    """The gateway app, its key, and how many submits its protocol took without the ASGI app."""

    def __init__(self, app: Metered, token: str) -> None:
        self.app, self.token, self.taken = app, token, 0
        front: SubmitFastPath = app.inner
        begin = front.begin

        def counted(*args: Any) -> bool:
            taken = begin(*args)
            self.taken += taken
            return taken

        front.begin = counted  # type: ignore[method-assign,assignment]

    def post(self, body: object, *extra: str, version: str = "1.1", raw: bytes | None = None) -> bytes:
        data = raw if raw is not None else json.dumps(body).encode()
        head = [f"POST /v1/commands HTTP/{version}", "host: gw", "content-type: application/json",
                f"authorization: Bearer {self.token}", *extra]
        if not any(line.startswith("transfer-encoding") for line in extra):
            head.append(f"content-length: {len(data)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + data


@pytest.fixture
def gateway(settings: Settings, tmp_path: Path) -> Iterator[Gateway]:
    dsn = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    token = outbox_with_agent_key(dsn)
    yield Gateway(create_app(settings.model_copy(update={"data_dir": tmp_path}),
                             IngressSettings(outbox_dsn=dsn, gateway_max_body_bytes=LIMIT)), token)


def refund(command_id: str, amount: int = 500, **more: object) -> dict[str, Any]:
    return {"id": command_id, "type": "IssueRefund", "aggregate_id": "sub-1",
            "payload": {"amount_cents": amount, "currency": "EUR", "reason": "late"}, **more}


def serve(gateway: Gateway, client: Callable[[int], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            server = uvicorn.Server(uvicorn.Config(gateway.app, http=PROTOCOL, log_level="warning",
                                                   server_header=False, proxy_headers=False))
            serving = asyncio.create_task(server.serve(sockets=[listener]))
            while not server.started:
                await asyncio.sleep(0.01)
            try:
                return await client(listener.getsockname()[1])
            finally:
                server.should_exit = True
                await serving

    return uvloop.run(run())


Response = tuple[int, dict[str, str], bytes]


async def responses(reader: asyncio.StreamReader, count: int) -> list[Response]:
    """``count`` responses with a Content-Length, in the order they came."""
    found = []
    for _ in range(count):
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        found.append((int(head[0].split()[1]), headers, await reader.readexactly(int(headers["content-length"]))))
    return found


def test_pipelined_submits_are_answered_in_order_as_the_asgi_route_answers_them(gateway: Gateway) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    pipelined = [
        refund(second),                          # 202
        refund(str(uuid.uuid4()), tenant_id="globex"),  # 403 wrong_tenant, recorded
        refund(second, amount=9),                # 409: the id again, another body
        {"type": "Nope"},                        # 422
        refund(second),                          # 202 again: a retry
    ]

    async def client(port: int) -> tuple[list[Response], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(gateway.post(refund(first)))  # the key is read: the ASGI route answers
        [asgi] = await responses(reader, 1)
        writer.write(b"".join(gateway.post(body) for body in pipelined[:-1])
                     + gateway.post(pipelined[-1], "connection: close"))
        answers = await responses(reader, len(pipelined))
        rest = await asyncio.wait_for(reader.read(), 10)  # closed after the last answer
        writer.close()
        return [asgi, *answers], rest

    answers, rest = serve(gateway, client)
    assert rest == b"" and gateway.taken == len(pipelined)
    assert [status for status, _, _ in answers] == [202, 202, 403, 409, 422, 202]
    bodies = [json.loads(body) for _, _, body in answers]
    assert bodies[0] == {"command_id": first, "status": "accepted", "replayed": False,
                         "status_url": f"/v1/commands/{first}"}
    assert bodies[1] == {**bodies[0], "command_id": second, "status_url": f"/v1/commands/{second}"}
    assert [b["error"]["code"] for b in bodies[2:5]] == ["wrong_tenant", "idempotency_conflict", "schema_violation"]
    assert bodies[5] == {**bodies[1], "replayed": True}
    asgi_headers = answers[0][1]
    for _, headers, _ in answers[1:]:
        assert headers.keys() - {"connection"} == asgi_headers.keys() == {"date", "content-type", "content-length"}
        assert headers["content-type"] == "application/json"
    assert answers[-1][1]["connection"] == "close" and "connection" not in answers[1][1]


def test_bodies_in_parts_past_the_limit_or_awaiting_100_continue_are_answered(gateway: Gateway) -> None:
    async def client(port: int) -> list[Response]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(gateway.post(refund(str(uuid.uuid4()))))  # the key into the cache
        found = await responses(reader, 1)
        request = gateway.post(refund(str(uuid.uuid4())))
        for start in range(0, len(request), 40):  # headers and body in small parts, turns apart
            writer.write(request[start:start + 40])
            await writer.drain()
            await asyncio.sleep(0.005)
        found += await responses(reader, 1)
        chunk = b"x" * 700
        writer.write(gateway.post(None, "transfer-encoding: chunked", raw=b""))
        for _ in range(2):  # 1,400 bytes: past the limit, which no header said
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        found += await responses(reader, 1)
        writer.write(gateway.post(refund(str(uuid.uuid4())), "expect: 100-continue"))
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        found += await responses(reader, 1)
        writer.close()
        assert continued.startswith(b"HTTP/1.1 100 Continue")
        return found

    found = serve(gateway, client)
    assert [status for status, _, _ in found] == [202, 202, 413, 202]
    assert json.loads(found[2][2])["error"]["code"] == "payload_too_large"
    assert gateway.taken == 1  # the body in parts; the others took the ASGI route


def test_an_http_1_0_submit_is_answered_and_its_connection_closed(gateway: Gateway) -> None:
    async def client(port: int) -> tuple[list[Response], bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(gateway.post(refund(str(uuid.uuid4())), "connection: keep-alive"))
        found = await responses(reader, 1)
        writer.write(gateway.post(refund(str(uuid.uuid4())), version="1.0"))
        found += await responses(reader, 1)
        rest = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return found, rest

    found, rest = serve(gateway, client)
    assert [status for status, _, _ in found] == [202, 202] and rest == b""
    assert found[1][1]["connection"] == "close" and gateway.taken == 1
