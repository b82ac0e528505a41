"""The gateway's HTTP protocol: uvicorn's, with ``POST /v1/commands`` answered without the ASGI exchange.

Why: uvicorn's per-request machinery (a task, the ``receive``/``send`` coroutines and their
message dicts, the middleware frames) cost about 100,000 instructions a request under
callgrind, against 17,000 for a bare protocol parsing the same requests with the same parser:
a quarter of everything the gateway did for a command. Here uvicorn still owns the
connection: parsing, keep-alive and its timeout, pipelined requests in order, flow control,
graceful shutdown, and every other route. Only when a submit's whole body has arrived is it
handed to ``SubmitFastPath.begin``, which admits it as the ASGI route does, and the answer is
written as uvicorn's ``send`` writes one (its status line and default headers, ``connection:
close`` when the connection ends). A request ``begin`` does not take (its key must be read
first, tracing is on), one that expects ``100 Continue``, and one whose body grows past the
limit go the ASGI way, as does everything when the app is wrapped by other middleware (the
trusted proxies' headers), since the request would then skip it.
"""

from __future__ import annotations

import time
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle

from keel.gateway.submit import SubmitFastPath, submits
from keel.gateway.transport import TurnBufferedHttpToolsProtocol
from keel.observability.http import Metered, Scope

_Waiting = tuple[RequestResponseCycle, Any]


class GatewayHttpProtocol(TurnBufferedHttpToolsProtocol):
    """``TurnBufferedHttpToolsProtocol`` answering whole submits through ``SubmitFastPath.begin``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app
        self._metered: Metered | None = app if isinstance(app, Metered) and isinstance(app.inner, SubmitFastPath) \
            else None
        self._waiting: _Waiting | None = None  # a submit whose body is still arriving

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self._metered is None or not submits(cast(Scope, cycle.scope)) or cycle.waiting_for_100_continue:
            super()._start_asgi_task(cycle, app)
        elif cycle.more_body:
            self._waiting = (cycle, app)
        else:
            self._submit(cycle, app)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        waiting = self._waiting
        if waiting is None or waiting[0] is not self.cycle:
            return
        if len(self.cycle.body) > self._front().max_body_bytes:
            self._waiting = None
            super()._start_asgi_task(*waiting)  # which refuses it as it reads
        else:
            self.flow.resume_reading()  # nobody reads the body as it comes: the whole of it is waited for

    def on_message_complete(self) -> None:
        super().on_message_complete()
        waiting, self._waiting = self._waiting, None
        if waiting is not None and waiting[0] is self.cycle:
            self._submit(*waiting)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting = None
        super().connection_lost(exc)

    def _front(self) -> SubmitFastPath:
        assert self._metered is not None
        front: SubmitFastPath = self._metered.inner
        return front

    def _submit(self, cycle: RequestResponseCycle, app: Any) -> None:
        started = time.perf_counter()

        def respond(status: int, body: bytes) -> None:
            self._respond(cycle, status, body, started)

        if not self._front().begin(dict(cycle.scope["headers"]), bytes(cycle.body), respond):
            super()._start_asgi_task(cycle, app)

    def _respond(self, cycle: RequestResponseCycle, status: int, body: bytes, started: float) -> None:
        """Write the answer as ``RequestResponseCycle.send`` writes a response with a length, then
        end the request as it does (which starts the next pipelined one)."""
        assert self._metered is not None
        self._metered.count(cast(Scope, cycle.scope), status, started)
        if cycle.disconnected or cycle.response_complete:
            return
        head = [STATUS_LINE[status]]
        head += [b"%s: %s\r\n" % (name.lower(), value) for name, value in cycle.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += [b"\r\n", body]
        self.transport.write(b"".join(head))
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        cycle.on_response()


PROTOCOL = f"{__name__}:{GatewayHttpProtocol.__name__}"
"""The protocol as uvicorn's ``http`` setting names it."""
