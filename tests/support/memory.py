"""Peak memory (RSS) of a process, as tests and benchmarks measure it.

VmHWM in /proc/PID/status is the high-water mark of the process's own address space.
The rusage figures (wait4, RUSAGE_CHILDREN) are not used: Linux carries the parent's
peak across fork and exec into the child's ru_maxrss, so a child of a large test process
would seem as large as its parent. A process with its children (an auditor's worker
pool) is sampled as the sum of their VmRSS, pages they share counted in each.
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
    return _status_bytes(pid, "VmHWM:")


def _status_bytes(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children of any of its threads, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(child) for child in f.read().split()]
            except OSError:
                continue
            found += children
            pending += children
    return found


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of a process and every process below it, summed (pages they share count
    once per process: an upper bound)."""
    return sum(_status_bytes(p, "VmRSS:") or 0 for p in [pid, *descendants(pid)])


@dataclass
class MeasuredRun:
    returncode: int
    seconds: float
    peak_rss: int  # bytes, the process itself
    peak_tree_rss: int = 0  # bytes, the largest sum over it and its children at one sample


def run_with_peak_rss(command: list[str], **popen_args: Any) -> MeasuredRun:
    """Run ``command`` to completion, sampling its VmHWM, and the RSS of it and its
    children together, until it exits."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen_args)
    peak = tree_peak = 0
    while True:
        # WNOWAIT leaves the exited child unreaped until its last sample is taken.
        exited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if exited is not None:
            break
        peak = max(peak, peak_rss_bytes(process.pid) or 0)
        tree_peak = max(tree_peak, tree_rss_bytes(process.pid))
        time.sleep(SAMPLE_INTERVAL)
    returncode = process.wait()
    return MeasuredRun(returncode, time.perf_counter() - started, peak, max(peak, tree_peak))
