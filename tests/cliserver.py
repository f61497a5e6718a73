"""Start ``imagesieve serve`` (or ``demo``) in a process of its own and wait for its URL."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


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


def settled(url: str, seconds: float = 60) -> dict[str, Any]:
    """GET a background job's status (``running``, ...) until it is no longer running."""
    import requests

    deadline = time.monotonic() + seconds
    while True:
        status = requests.get(url, timeout=10).json()
        if not status["running"] or time.monotonic() > deadline:
            return status
        time.sleep(0.1)
