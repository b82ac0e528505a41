"""``/healthz`` and ``/readyz`` beside ``/metrics`` on every service's metrics server.

The services without an HTTP server of their own (relay, processor, chainer, effects,
projector, watchers) already serve Prometheus metrics (``keel.observability.exporter``);
answering the probes on that port gives Kubernetes-style HTTP probes to every service
without a second listener. ``/healthz`` answers 200 while the process serves (a stalled
worker ends itself: ``keel.supervision.watchdog``); ``/readyz`` answers 200 or 503 with
the installed ``Readiness``'s last verdict, never waiting on a check. A process that
installed none by its first ``/readyz`` gets a broker check then: installed earlier, it would
judge (and log) "ready" in the moment before the service installs the checks it means.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from keel.supervision import readiness

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class WsgiServer(Protocol):
    """wsgiref's server, as prometheus-client's ``start_http_server`` returns it."""

    def get_app(self) -> WsgiApp | None: ...

    def set_app(self, application: WsgiApp) -> None: ...


def attach(server: WsgiServer, bootstrap: str) -> None:
    """Answer the probes on ``server`` (a metrics server); a broker check unless the service installs checks."""
    metrics = server.get_app()
    assert metrics is not None, "the metrics server has an application"
    server.set_app(with_probes(metrics, lambda: readiness.Readiness({"broker": readiness.broker(bootstrap)})))


def with_probes(metrics: WsgiApp, default: Callable[[], readiness.Readiness] | None = None) -> WsgiApp:
    """``metrics`` with ``/healthz`` and ``/readyz`` answered first; ``default`` is installed by the
    first ``/readyz`` when the process has installed no readiness by then."""
    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _json(start_response, 200, {"live": True})
        if path == "/readyz":
            installed = readiness.current()
            if installed is None and default is not None:
                installed = readiness.install(default())
            verdict = readiness.NOT_CHECKED if installed is None else installed.verdict()
            return _json(start_response, 200 if verdict.ready else 503, verdict.as_dict())
        return metrics(environ, start_response)
    return application


def _json(start_response: StartResponse, status: int, body: dict[str, object]) -> list[bytes]:
    raw = json.dumps(body).encode()
    phrase = "OK" if status == 200 else "Service Unavailable"
    start_response(f"{status} {phrase}", [("Content-Type", "application/json"), ("Content-Length", str(len(raw)))])
    return [raw]


def ask_ready(address: str, timeout_s: float = 1.0) -> str | None:
    """Why the service serving probes at ``host:port`` is not ready, or ``None`` when it is (``keel status``)."""
    try:
        with urllib.request.urlopen(f"http://{address}/readyz", timeout=timeout_s) as answer:
            answer.read()
        return None
    except urllib.error.HTTPError as exc:  # 503: the body says why
        try:
            body = json.loads(exc.read())
            return "not ready: " + "; ".join(str(reason) for reason in body.get("reasons", ()))
        except (ValueError, AttributeError):
            return f"not ready (HTTP {exc.code})"
    except OSError as exc:
        return f"its probes at {address} do not answer: {exc}"
