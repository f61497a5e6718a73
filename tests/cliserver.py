"""Start ``imagesieve serve`` (or ``demo``) in a process of its own and wait for its URL."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def start_cli_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Run ``python -m imagesieve.cli ARGS`` until it prints where it serves: (process, URL).

    Its stderr goes to ``log`` (a pipe nobody reads could fill and block it).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesieve.cli", *args],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("serving "):
            return proc, re.search(r"on (http://\S+)", line)[1]
    proc.wait(timeout=60)
    raise AssertionError(f"the server did not start:\n{log.read_text()}")
