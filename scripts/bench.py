#!/usr/bin/env python3
"""Run every benchmark module in scripts/benchmarks/ and write BENCHMARKS.md.

Usage: ./scripts/bench [--quick] [--only NAME...] [--output FILE] [--keep]
       (the wrapper sets the machine up first; this script also works on its own from the
       project's virtual environment: .venv/bin/python scripts/bench.py)

A benchmark module is any module in scripts/benchmarks/ with ``run(ctx) -> list[Row]``;
modules without ``run`` are helpers. The modules share one scratch directory, so the
reference study is generated once; each runs in its own forked process, so that its
memory figures are its own. A module that raises or dies is reported as a failed row; the
others still run. A module may also hold ``NOTES``, a list of sentences
on how to read its figures, printed under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import multiprocessing
import os
import pkgutil
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `scripts` and `tests` importable
    sys.path.insert(0, str(ROOT))

from scripts import benchmarks  # noqa: E402
from scripts.benchmarks.common import BenchContext, Row  # noqa: E402
from tests.support.orthanc import POSTGRESQL_PLUGINS  # noqa: E402

# Modules that share the generated study run first, in this order; the rest alphabetically.
FIRST = ["dataplane", "transfer"]
NOT_BENCHMARKS = {"common"}  # shared helpers, not benchmarks
COLUMNS = ["figure", "ours", "Orthanc", "ratio", "target", "met", "peak memory (MB)", "command"]
RunFunction = Callable[[BenchContext], list[Row]]
# The audit module builds and audits a federation of 10^6 entries: about 12 min alone.
MODULE_TIMEOUT_SECONDS = 2400


class ModuleTimedOut(Exception):
    """A benchmark module ran past its time limit."""


def _time_out(signum: int, frame: object) -> None:
    raise ModuleTimedOut(f"no result within {MODULE_TIMEOUT_SECONDS} s")


def discover() -> dict[str, str]:
    """Benchmark module names in run order, mapped to their import path."""
    names = [
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name not in NOT_BENCHMARKS and not info.name.startswith("_")
    ]
    ordered = [n for n in FIRST if n in names] + sorted(n for n in names if n not in FIRST)
    return {name: f"{benchmarks.__name__}.{name}" for name in ordered}


def failed_row(name: str, exc: BaseException) -> Row:
    message = " ".join(str(exc).split())[:300] or type(exc).__name__
    return Row(
        f"{name}: benchmark failed",
        f"failed: {type(exc).__name__}: {message}",
        command=f"./scripts/bench --only {name}",
    )


def run_module(
    name: str, import_path: str, ctx: BenchContext, notes: list[str]
) -> list[Row] | None:
    """The module's rows; None if it is a helper; one failed row if it raises.

    The module's NOTES, if any, are appended to ``notes``.
    """
    try:
        module = importlib.import_module(import_path)
        notes += [str(note) for note in getattr(module, "NOTES", [])]
        run: RunFunction | None = getattr(module, "run", None)
        if run is None:
            return None
        print(f"== {name}", file=sys.stderr, flush=True)
        # A hung module fails with its own row; its finally blocks stop what it started.
        previous = signal.signal(signal.SIGALRM, _time_out)
        signal.alarm(MODULE_TIMEOUT_SECONDS)
        try:
            rows = run(ctx)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        if not isinstance(rows, list) or not all(isinstance(r, Row) for r in rows):
            raise TypeError("run() must return a list of Row")
        for row in rows:
            row.command = row.command or f"./scripts/bench --only {name}"
        return rows
    except Exception as exc:  # one broken module must not stop the others
        traceback.print_exc()
        return [failed_row(name, exc)]


def _run_in_child(name: str, import_path: str, ctx: BenchContext, results: Connection) -> None:
    notes: list[str] = []
    rows = run_module(name, import_path, ctx, notes)
    results.send((rows, notes))
    results.close()


def run_isolated(
    name: str, import_path: str, ctx: BenchContext, notes: list[str]
) -> list[Row] | None:
    """run_module in a forked child process, so that each module's own peak-memory readings
    (getrusage of its children, VmHWM) and any crash or leak stay its own.

    Modules share work only through ``ctx.workdir`` (files), not ``ctx.shared``.
    """
    forking = multiprocessing.get_context("fork")
    receiver, sender = forking.Pipe(duplex=False)
    child = forking.Process(target=_run_in_child, args=(name, import_path, ctx, sender))
    child.start()
    sender.close()
    result: tuple[list[Row] | None, list[str]] | None = None
    # The child's own alarm ends a hung module cleanly; this is the backstop.
    if receiver.poll(MODULE_TIMEOUT_SECONDS + 120):
        with contextlib.suppress(EOFError):
            result = receiver.recv()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    if result is None:
        exc = RuntimeError(f"its process ended (exit {child.exitcode}) without a result")
        return [failed_row(name, exc)]
    rows, module_notes = result
    notes += module_notes
    return rows


def format_value(value: float | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"  # short durations keep three significant digits


def format_met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


def cells(row: Row) -> list[str]:
    return [
        row.figure,
        format_value(row.ours),
        format_value(row.orthanc),
        row.ratio,
        row.target,
        format_met(row.met),
        row.peak_rss_mb,
        f"`{row.command}`" if row.command else "",
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    out = [line(COLUMNS), line(["---"] * len(COLUMNS))]
    out += [line(cells(row)) for row in rows]
    return "\n".join(out)


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip(" $") if lines else "unknown"


def machine_description() -> list[str]:
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total_kb = next((int(ln.split()[1]) for ln in meminfo.splitlines() if "MemTotal" in ln), 0)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "unknown",
    )
    return [
        f"- CPU: {os.cpu_count()} cores (nproc), {cpu}",
        f"- memory: {total_kb / 1024**2:.1f} GiB",
        f"- system: {platform.system()} {platform.release()}, Python {platform.python_version()}",
        f"- Orthanc: {_first_line(['Orthanc', '--version'])} with its DICOMweb plugin",
        f"- DCMTK: {_first_line(['storescu', '--version'])}",
    ]


def render_report(
    rows: Sequence[Row],
    notes: Sequence[str],
    durations: dict[str, float],
    quick: bool,
    started: datetime.datetime,
) -> str:
    ran = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in durations.items())
    workload = (
        "the quick smoke workload (a tenth of the reference study), NOT the reference"
        if quick
        else "the reference workload: one CT study, 2 series x 200 instances of 512x512 16-bit"
        " (about 200 MB)"
    )
    return "\n".join(
        [
            "# Benchmarks",
            "",
            f"Run on {started:%Y-%m-%d %H:%M} UTC with {workload}. Our node and Orthanc (the"
            " Debian packages `orthanc` and `orthanc-dicomweb`, the DICOM server most sites"
            " would pick instead; with `orthanc-postgresql` where a row says Orthanc on"
            " PostgreSQL) were measured on the same machine in the same run, each on"
            " loopback with its own fresh storage.",
            "",
            "Figures are from one run on a shared 2-core machine, where other work may run at"
            " the same time: absolute numbers are noisy; compare the ratios, which come from"
            " the same minute. Ratio = ours / Orthanc; a ratio below 1 means ours took less"
            " time (for durations). Peak memory is the peak resident set size (VmHWM) of each"
            " process named.",
            "",
            markdown_table(rows),
            "",
            *(["## Notes", "", *(f"- {note}" for note in notes), ""] if notes else []),
            "## Machine",
            "",
            *machine_description(),
            "",
            "## How to reproduce",
            "",
            "`./scripts/bench` installs what is missing (Orthanc, its DICOMweb and PostgreSQL"
            " plugins, DCMTK, PostgreSQL, the Python environment), runs every module in"
            " `scripts/benchmarks/` and rewrites this file; `./scripts/bench --only NAME` runs"
            " some modules,"
            " `python -m scripts.benchmarks.NAME` runs one alone and prints its rows.",
            "",
            f"Time per module in this run: {ran}.",
            "",
        ]
    )


@contextlib.contextmanager
def scratch_context(quick: bool = False, keep: bool = False) -> Iterator[BenchContext]:
    """A BenchContext over a fresh scratch directory, removed afterwards unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix="imageshare-bench-"))
    try:
        yield BenchContext(workdir=workdir, quick=quick)
    finally:
        if keep:
            print(f"scratch directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def print_rows(rows: Sequence[Row]) -> None:
    print(markdown_table(rows))


def run_standalone(run: RunFunction) -> int:
    """Entry point of `python -m scripts.benchmarks.NAME [--quick] [--keep]`: print the rows."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    with scratch_context(args.quick, args.keep) as ctx:
        print_rows(run(ctx))
    return 0


def ensure_tools() -> None:
    """Install Orthanc, its DICOMweb and PostgreSQL plugins and DCMTK through
    scripts/setup-env if missing."""
    plugins = all(plugin.exists() for plugin in POSTGRESQL_PLUGINS)
    if shutil.which("Orthanc") and shutil.which("storescu") and plugins:
        return
    subprocess.run(
        ["bash", "-c", 'source "$1/scripts/setup-env"', "setup", str(ROOT)],
        env={**os.environ, "IMAGESHARE_NEED_ORTHANC": "1"},
        check=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workload, for a smoke run")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these modules")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    modules = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(modules))
        if unknown:
            parser.error(f"no benchmark module {unknown[0]!r}; known: {', '.join(modules)}")
        modules = {name: path for name, path in modules.items() if name in args.only}
    ensure_tools()
    os.chdir(ROOT)

    started = datetime.datetime.now(datetime.UTC)
    rows: list[Row] = []
    notes: list[str] = []
    durations: dict[str, float] = {}
    with scratch_context(args.quick, args.keep) as ctx:
        for name, import_path in modules.items():
            began = time.monotonic()
            module_rows = run_isolated(name, import_path, ctx, notes)
            if module_rows is None:
                continue
            durations[name] = time.monotonic() - began
            rows += module_rows
            print(markdown_table(module_rows), file=sys.stderr, flush=True)

    args.output.write_text(render_report(rows, notes, durations, args.quick, started))
    print(f"wrote {args.output}", file=sys.stderr)
    failed = any(isinstance(row.ours, str) and row.ours.startswith("failed") for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
