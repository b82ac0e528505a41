"""A provider simulator: a real HTTP server that acts like a payment API, to test effects against.

``python -m keel.testing.provider [--host 127.0.0.1] [--port 0] [--ready-file PATH] [--exit-with PID]``
serves ``keel.testing.provider_app`` (on uvloop when it is installed) and, once it listens,
prints its URL and writes it to ``--ready-file``; with ``--exit-with`` it stops when that
process has ended (the demo ties it to ``keel dev``, so ``keel down`` stops it too). ``ProviderSimulator`` runs one for a test and
drives its control API::

    with ProviderSimulator() as provider:
        monkeypatch.setenv("SUPPORT_DESK_PAYMENTS_URL", provider.url)
        provider.set_faults(Faults(error_rate=0.3, timeout_rate=0.1, hang_s=2, seed=7))
        ...  # run the effects
        assert all(action.count == 1 for action in provider.performed().values())

It is a separate process, not an in-process fake, so a handler meets what it meets in
production: sockets, timeouts, connection resets and answers that never come.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx
from aiohttp import web
from pydantic import TypeAdapter
from yarl import URL

from keel.errors import InfraError
from keel.testing.provider_app import create_app
from keel.testing.provider_faults import Fault, Faults
from keel.testing.provider_ledger import PerformedAction, Stats

__all__ = ["Fault", "Faults", "PerformedAction", "ProviderSimulator", "Stats", "main"]

_PERFORMED = TypeAdapter(dict[str, PerformedAction])


async def serve(host: str, port: int, ready_file: Path | None, exit_with: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM (or the end of process ``exit_with``); answers still
    hanging then are dropped after a second."""
    runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=4096).start()
        url = str(URL.build(scheme="http", host=host, port=int(runner.addresses[0][1])))
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(_outlive(exit_with, stop)) if exit_with is not None else None
        print(url, flush=True)
        if ready_file is not None:  # whole or absent: a reader never sees half a URL
            partial = ready_file.with_name(ready_file.name + ".partial")
            partial.write_text(url + "\n")
            partial.replace(ready_file)
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
    finally:
        await runner.cleanup()


async def _outlive(pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once process ``pid`` has ended."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stop.set()
            return
        except PermissionError:  # it lives, under another user
            pass
        await asyncio.sleep(1.0)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m keel.testing.provider`: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m keel.testing.provider",
                                     description="Serve a provider simulator for testing effects.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default) picks a free port")
    parser.add_argument("--ready-file", type=Path, help="where to write the URL once listening")
    parser.add_argument("--exit-with", type=int, metavar="PID", help="stop once this process has ended")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(args.host, args.port, args.ready_file, args.exit_with))


class ProviderSimulator:
    """A simulator process: started on entry (returning once it listens), stopped on exit."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 20.0) -> None:
        self.host, self.port, self.startup_timeout_s = host, port, startup_timeout_s
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None

    def __enter__(self) -> ProviderSimulator:
        self._workdir = tempfile.TemporaryDirectory(prefix="keel-provider-")
        ready, log = Path(self._workdir.name, "url"), Path(self._workdir.name, "log")
        with log.open("wb") as out:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "keel.testing.provider", "--host", self.host, "--port", str(self.port),
                 "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT)
        try:
            self._client = httpx.Client(base_url=self._await(ready, log), timeout=10.0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _await(self, ready: Path, log: Path) -> str:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            if self._process.poll() is not None:
                raise InfraError(f"the provider simulator exited with {self._process.returncode}:\n"
                                 + log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise InfraError(f"the provider simulator did not listen within {self.startup_timeout_s}s")
            time.sleep(0.02)
        return ready.read_text().strip()

    @property
    def url(self) -> str:
        """Where the simulator listens, e.g. ``http://127.0.0.1:43117``."""
        return str(self._control.base_url).rstrip("/")

    @property
    def _control(self) -> httpx.Client:
        if self._client is None:
            raise InfraError("the provider simulator is not running: use it in a with block")
        return self._client

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault settings; the dice restart from ``faults.seed``."""
        self._control.post("/_control/faults", content=faults.model_dump_json()).raise_for_status()

    def clear_faults(self) -> None:
        """No faults: every request answered at once."""
        self.set_faults(Faults())

    def performed(self) -> dict[str, PerformedAction]:
        """Every performed action, by idempotency key."""
        answer = self._control.get("/_control/performed").raise_for_status()
        return _PERFORMED.validate_json(answer.content)

    def stats(self) -> Stats:
        """Totals since the last reset."""
        return Stats.model_validate_json(self._control.get("/_control/stats").raise_for_status().content)

    def reset(self) -> None:
        """Forget every key, action, total and fault."""
        self._control.post("/_control/reset").raise_for_status()


if __name__ == "__main__":
    main()
