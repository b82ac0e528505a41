"""Running a faust app in the foreground without the ``faust`` command-line tool.

``faust.Worker`` installs the SIGINT/SIGTERM handlers, starts the app's services and runs
until stopped, then exits the process. At INFO, faust, mode and aiokafka print a dozen
lines per rebalance (subscription tables, highwater tables, every service starting), so
their loggers get their own, quieter level while Keel's loggers follow ``loglevel``. The
start-up spinner is kept for terminals only: in a log file it is stray escape codes.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import faust

LIBRARY_LOGGERS = ("faust", "mode", "aiokafka")


class _Worker(faust.Worker):
    """A faust worker whose library loggers are quieter than the root logger."""

    def __init__(self, app: faust.App, *, library_loglevel: str, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.library_loglevel = library_loglevel.upper()
        if self.spinner is not None and not self.spinner.file.isatty():
            self.spinner = None

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(self.library_loglevel)


def run_worker(app: faust.App, *, loglevel: str = "info", library_loglevel: str = "warning") -> NoReturn:
    """Run ``app`` in this process until SIGTERM or SIGINT, then exit."""
    worker = _Worker(app, loglevel=loglevel, library_loglevel=library_loglevel,
                     quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
