"""The services and their tests type-check under ``mypy --strict`` (pyproject's ``[tool.mypy]``): a type
error fails the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_services_and_tests_type_check_strictly() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "services", "tests"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
