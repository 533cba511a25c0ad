"""Peak memory (RSS) of a process, as tests and benchmarks measure it.

VmHWM in /proc/PID/status is the high-water mark of the process's own address space.
The rusage figures (wait4, RUSAGE_CHILDREN) are not used: Linux carries the parent's
peak across fork and exec into the child's ru_maxrss, so a child of a large test process
would seem as large as its parent.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any

SAMPLE_INTERVAL = 0.005


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM of a running process in bytes, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class MeasuredRun:
    returncode: int
    seconds: float
    peak_rss: int  # bytes


def run_with_peak_rss(command: list[str], **popen_args: Any) -> MeasuredRun:
    """Run ``command`` to completion, sampling its VmHWM until it exits."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen_args)
    peak = 0
    while True:
        # WNOWAIT leaves the exited child unreaped until its last sample is taken.
        exited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if exited is not None:
            break
        peak = max(peak, peak_rss_bytes(process.pid) or 0)
        time.sleep(SAMPLE_INTERVAL)
    returncode = process.wait()
    return MeasuredRun(returncode, time.perf_counter() - started, peak)
