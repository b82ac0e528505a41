"""The gateway's metrics: ``GET /metrics``, request series, and one scrape target per worker process.

``Metered`` wraps the gateway's outermost ASGI app (the submit fast path answers
``POST /v1/commands`` before FastAPI sees it, so FastAPI middleware would miss the busiest
route). Requests are labelled by route template (``/v1/commands/{command_id}``), never by
raw path, so ids cannot grow the label set; a path no route matched is ``unmatched``.

``keel gateway --workers N`` runs N processes behind one ``SO_REUSEPORT`` socket, and a
scrape of the shared port reaches one of them at random: each worker therefore also
publishes a side metrics server of its own (``start_worker_exporter``), named by its pid,
which is what Prometheus scrapes. ``/metrics`` on the gateway's port stays for humans and
single-worker setups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from keel.config import Settings
from keel.observability import exporter
from keel.observability.exporter import Target
from keel.observability.metrics import SECONDS_BUCKETS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SUBMIT_PATH = "/v1/commands"
REQUESTS = Counter("keel_gateway_requests", "HTTP requests answered, by route template, method and status.",
                   ["route", "method", "status"])
REQUEST_SECONDS = Histogram("keel_gateway_request_duration_seconds", "Time to answer an HTTP request "
                            "(to the end of the response; SSE streams included).", ["route", "method"],
                            buckets=SECONDS_BUCKETS)


def add_metrics_route(app: FastAPI) -> None:
    """``GET /metrics`` on ``app`` (this process's registry)."""

    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)


def start_worker_exporter(settings: Settings) -> Target | None:
    """This gateway process's own scrape target (instance: its pid); ``None`` when metrics are off."""
    return exporter.start(settings, "gateway", str(os.getpid()))


class Metered:
    """An ASGI app that counts and times the requests of the app it wraps (``.app`` is the wrapped one's)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        # Each label set's series, looked up once: ``labels()`` cost as much as counting and timing.
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    @property
    def app(self) -> Any:
        """The wrapped front's FastAPI app (tests and callers reach ``.app.state`` through it)."""
        return self.inner.app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.inner(scope, receive, sending)
        finally:
            self.count(scope, status, started)

    def count(self, scope: Scope, status: int, started: float) -> None:
        """Count a request answered with ``status`` and time it from ``started`` (``time.perf_counter``);
        for the requests the gateway's protocol answers without the ASGI app."""
        route, method = route_of(scope), scope.get("method", "")
        series = self._series.get((route, method, status))
        if series is None:
            series = self._series[route, method, status] = (REQUESTS.labels(route, method, str(status)),
                                                             REQUEST_SECONDS.labels(route, method))
        series[0].inc()
        series[1].observe(time.perf_counter() - started)


def route_of(scope: Scope) -> str:
    """The route template that answered, the submit path, or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return SUBMIT_PATH if scope.get("path") == SUBMIT_PATH else "unmatched"
