"""Each service's ``/metrics`` server, and where Prometheus (and ``keel top``) find it.

A service that has no HTTP server of its own starts prometheus-client's on
``KEEL_METRICS_HOST:KEEL_METRICS_PORT``. The default port 0 takes a free port, so the nine
services ``keel dev`` runs on one host (and any number of workers beside them) never
collide and need no port plan; each then publishes its address as a Prometheus file_sd
target group, ``<data dir>/run/metrics/<prefix>.<service>.<instance>.json``, which the
shipped ``infra/prometheus/prometheus.yml`` watches. The target's ``instance`` label is
the service's name, not its port, so a restarted service continues the same series. A
clean exit withdraws the file; a killed service's file stays, so Prometheus sees it down
(``up == 0``) until it is back or the file is removed. In a container, set a fixed port
and ``KEEL_METRICS_HOST=0.0.0.0`` and scrape it as usual.

A supervised worker (``keel process``) exposes from the child that does the work: the
parent only restarts it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from keel.config import Settings
from keel.observability.metrics import use_tenant_labels
from keel.observability.tenants import TenantLabels, parse_allow_list
from keel.supervision import probes
from keel.supervision.progress import replace_json

log = logging.getLogger(__name__)

PID_LABEL = "__keel_pid"
"""A target label Prometheus drops (``__`` prefix): which process published the file."""


@dataclass(frozen=True)
class Target:
    """One published metrics address."""

    service: str
    instance: str
    address: str
    pid: int
    path: Path

    @property
    def url(self) -> str:
        """Where its metrics are served."""
        return f"http://{self.address}/metrics"


def targets_dir(settings: Settings) -> Path:
    """Where services publish their metrics addresses (Prometheus file_sd reads ``*.json`` there)."""
    return settings.data_dir / "run" / "metrics"


def target_path(settings: Settings, service: str, instance: str) -> Path:
    """The file_sd file of one service instance."""
    return targets_dir(settings) / f"{settings.topic_prefix}.{service}.{instance}.json"


def configure_tenants(settings: Settings) -> None:
    """Bound this process's tenant labels as the settings say."""
    use_tenant_labels(TenantLabels(allow=parse_allow_list(settings.metrics_tenants),
                                   top=settings.metrics_top_tenants))


def start(settings: Settings, service: str, instance: str = "0") -> Target | None:
    """Serve this process's metrics and publish the address; ``None`` when metrics are off."""
    if not settings.metrics_enabled:
        return None
    configure_tenants(settings)
    server, _thread = start_http_server(settings.metrics_port, settings.metrics_host)
    probes.attach(server, settings.bootstrap_servers)  # /healthz and /readyz on the same port
    host = settings.metrics_host if settings.metrics_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    target = publish(settings, service, instance, f"{host}:{server.server_port}")
    log.info("metrics at %s", target.url, extra={"service": service, "metrics_url": target.url})
    return target


def publish(settings: Settings, service: str, instance: str, address: str) -> Target:
    """Write the file_sd target group of ``address``; withdrawn when this process exits cleanly."""
    path = target_path(settings, service, instance)
    _forget_dead(settings, service)
    replace_json(path, [{"targets": [address], "labels": {
        "service": service, "instance": f"{socket.gethostname()}/{service}/{instance}",
        "topic_prefix": settings.topic_prefix, PID_LABEL: str(os.getpid())}}])
    pid = os.getpid()
    atexit.register(_withdraw, path, pid)
    return Target(service, instance, address, pid, path)


def published(settings: Settings) -> list[Target]:
    """Every metrics address published under ``settings``' data dir and topic prefix (for ``keel top``)."""
    found = []
    for path in sorted(targets_dir(settings).glob(f"{settings.topic_prefix}.*.json")):
        target = _read(path)
        if target is not None:
            found.append(target)
    return found


def _read(path: Path) -> Target | None:
    try:
        group: dict[str, Any] = json.loads(path.read_text())[0]
        labels = group["labels"]
        return Target(labels["service"], path.stem.split(".")[-1], group["targets"][0], int(labels[PID_LABEL]), path)
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _forget_dead(settings: Settings, service: str) -> None:
    """Drop the files of this service's per-process instances that are gone (killed gateway workers).

    Only instances named by their pid: a named instance that died keeps its file, so that
    Prometheus reports it down until it is back.
    """
    for target in published(settings):
        if target.service == service and target.instance == str(target.pid) and not _alive(target.pid):
            target.path.unlink(missing_ok=True)


def _withdraw(path: Path, pid: int) -> None:
    target = _read(path)
    if target is not None and target.pid == pid == os.getpid():  # never a file a restarted successor wrote
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
