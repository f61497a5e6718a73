"""A process's memory figures from /proc/PID/status, shared by the benchmark scripts.

Peak RSS is VmHWM: the most this process has held since it started or since its last
``reset_peak``, so a phase can be measured on its own (Linux; ru_maxrss is only a fallback).
"""

from __future__ import annotations

import math
import resource
from pathlib import Path


def status_mb(key: str = "VmHWM", pid: int | str = "self", *, missing: float = math.nan) -> float:
    """A /proc/PID/status memory figure in MB (VmHWM: peak since start or the last reset; VmRSS:
    now); ``missing`` when the process is gone (or a zombie) or has no such line."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return missing
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return missing


def peak_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process, this one by default (VmHWM; nan when it has none). Not
    ru_maxrss: that survives exec, so a child of a big parent reports the parent's peak."""
    peak = status_mb("VmHWM", pid)
    if math.isnan(peak) and pid == "self":  # no /proc: ru_maxrss (KB on Linux) is all there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0: "5" to /proc/PID/clear_refs), so
    the next ``peak_mb`` is one phase's; False when it cannot (no such process, older kernel)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True
