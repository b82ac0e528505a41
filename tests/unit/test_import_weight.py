"""Services that do not host the embedded engine never load chDB (~340 MiB resident per process)."""

from __future__ import annotations

import subprocess
import sys


def test_the_cli_imports_without_chdb() -> None:
    probe = "import sys, keel.cli.main; print(sorted(m for m in ('chdb', 'pyarrow') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
