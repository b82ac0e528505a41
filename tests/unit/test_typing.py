"""The services, their tests and the benchmarks type-check under ``mypy --strict`` (pyproject's
``[tool.mypy]``): a type error fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_services_tests_and_benchmarks_type_check_strictly() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "services", "tests", "benchmarks"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
