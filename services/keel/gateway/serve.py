"""Run the gateway in N worker processes, each with its own ``SO_REUSEPORT`` listening socket.

Why not uvicorn's ``--workers``: its workers share one socket, and whichever event loop
wakes first takes the next connection. With keep-alive clients (load balancers, SDKs) one
worker ends up owning most connections and a core sits idle; measured here, 95 % against
19 % CPU. With one socket per worker the kernel spreads connections over the workers by
hash. The supervisor restarts a worker that dies after it has served; one that dies before
it was ready stops the gateway with an error, since a restart would fail the same way.

uvicorn parses requests with httptools, which takes a request target of at most 64 KiB and
answers a longer one with a plain-text 400. Rather than move the gateway to the slower h11
parser (whose limit ``h11_max_incomplete_event_size`` could be raised), the OpenAPI document
allows no longer URL: ``keel.query.http.MAX_SQL_CHARS``.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import FrameType
from typing import Any

import uvicorn

from keel.errors import ConfigError
from keel.gateway.settings import IngressSettings
from keel.gateway.protocol import PROTOCOL

log = logging.getLogger("keel.gateway")

APP = "keel.gateway.app:app_from_env"


def _serving() -> dict[str, Any]:
    """uvicorn's options. No ``Server`` header: it names the software to every caller, and costs
    a header per answer. Forwarded headers only from the proxies configured: uvicorn believes
    those of 127.0.0.1 by default, so any local process could name another client (and its
    middleware cost every request 2 % of the gateway's instructions)."""
    proxies = IngressSettings().gateway_trusted_proxies.strip()
    return {"http": PROTOCOL, "server_header": False, "log_level": "warning", "access_log": False,
            "proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None}


def serve(host: str, port: int, workers: int) -> None:
    """Serve until SIGINT/SIGTERM; blocks."""
    _check_free(host, port)
    if workers == 1:
        uvicorn.run(APP, factory=True, host=host, port=port, **_serving())
        return
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    context = multiprocessing.get_context("spawn")
    running = [_start(context, host, port) for _ in range(workers)]
    try:
        while not stopping:
            time.sleep(0.2)
            for index, (process, ready) in enumerate(running):
                if process.is_alive() or stopping:
                    continue
                if not ready.is_set():
                    raise SystemExit(f"gateway worker {process.pid} failed on start-up (exit {process.exitcode}); "
                                     "its log lines above say why")
                log.error("gateway worker died; restarting it", extra={"pid": process.pid,
                                                                       "exit_code": process.exitcode})
                running[index] = _start(context, host, port)
    finally:
        for process, _ in running:
            if process.is_alive():
                process.terminate()
        for process, _ in running:
            process.join(30)


def _start(context: SpawnContext, host: str, port: int) -> tuple[BaseProcess, EventType]:
    ready = context.Event()
    process = context.Process(target=_worker, args=(host, port, ready), name="keel-gateway-worker")
    process.start()
    return process, ready


class _Server(uvicorn.Server):
    """A uvicorn server that tells the supervisor once it serves."""

    def __init__(self, config: uvicorn.Config, ready: EventType) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.ready.set()


def _worker(host: str, port: int, ready: EventType) -> None:
    """One uvicorn server on its own ``SO_REUSEPORT`` socket (runs in a spawned process)."""
    listener = _listener(host, port)
    config = uvicorn.Config(APP, factory=True, **_serving())
    _Server(config, ready).run(sockets=[listener])


def _listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _check_free(host: str, port: int) -> None:
    """Refuse a taken port up front: ``SO_REUSEPORT`` would otherwise fail in every worker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"the gateway cannot listen on {host}:{port}: {exc.strerror}",
                              code="port_unavailable", field="gateway_port") from None
