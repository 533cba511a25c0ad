"""Data plane of one hospital, ours beside Orthanc, on the reference workload.

The reference workload is one CT study: 2 series x 200 instances of 512x512 16-bit
(about 200 MB). Measured in one run: `imageshare import` into a fresh node; DIMSE ingest
with dcmtk storescu into a running node and into Orthanc; WADO-RS whole-study retrieve
from both (median of a few runs); and the peak RSS of the node daemons and of Orthanc.

Run alone: python -m scripts.benchmarks.dataplane [--quick]
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import statistics
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from node.samples import SyntheticStudy, make_ct_study
from scripts.benchmarks.common import BenchContext, Row
from tests.support.nodes import IMAGESHARE, NodeProcess, init_node
from tests.support.orthanc import (
    OrthancServer,
    peak_rss_mb,
    run_measured,
    storescu,
    storescu_command_text,
)

# The reference workload: 2 series of 512x512 16-bit CT slices, 200 each (20 when quick).
SERIES, SIZE = 2, 512
SLICES, QUICK_SLICES = 200, 20
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
NODE_MEMORY_TARGET_MB = 150.0
NOT_AVAILABLE = "not available"
NOTES = [
    "DIMSE ingest: dcmtk `storescu` sends the study over one association with TCP_NODELAY=1."
    " Orthanc also runs with TCP_NODELAY=1: Debian's Orthanc links the system DCMTK, which"
    " otherwise leaves Nagle's algorithm on, and each C-STORE then waits about 40 ms for a"
    " delayed ACK (about ten times slower on this study); Orthanc's own builds"
    " turn Nagle off, so this is the configuration a site would run. Both sides fsync every"
    " stored file (Orthanc: SyncStorageArea) before they answer. The second DIMSE row runs"
    " the same storescu into a second Orthanc started exactly as Debian ships it (Nagle"
    " on), the package the design names as the reference.",
    "Where the node's DIMSE time goes (docs/dimse.md, profile): it answers each C-STORE"
    " only once the file is fsynced and its index row committed, and storescu sends the"
    " next instance only after that answer, so nothing overlaps: two device flushes per"
    " instance (file, SQLite WAL) against Orthanc's one (it does not sync its index per"
    " instance), 0.3 s of the study on a quiet disk, 2-3 s when other work loads it; and"
    " about 9 ms of CPU per instance in pynetdicom's message handling, the header check"
    " and the hash, which a loaded CPU stretches most.",
    "`imageshare import` reads the files from the local disk and commits them durably in"
    " batches; the daemon of that node runs beside it. Its figure has no Orthanc"
    " counterpart.",
    "WADO-RS: one Python client on loopback streams the whole study as"
    ' `multipart/related; type="application/dicom"` and counts the bytes; the figure is'
    " the median of several runs against each server, with the files in the page cache.",
    "Peak memory of the node: the daemon that served the import and WADO-RS, and the daemon"
    " that received the storescu association; the row shows the larger one. Orthanc's"
    " figure is one process through storescu and WADO-RS.",
]


def reference_study(ctx: BenchContext) -> SyntheticStudy:
    """The reference CT study, generated once per run in the scratch directory.

    Benchmark modules run in separate processes, so the study is found again through a
    small manifest beside it (not inside: storescu and import send a whole directory).
    """
    manifest = ctx.workdir / "reference-study.json"
    if manifest.exists():
        fields = json.loads(manifest.read_text())
        fields["files"] = [Path(f) for f in fields["files"]]
        return SyntheticStudy(**fields)
    study = make_ct_study(
        ctx.workdir / "reference-study",
        series=SERIES,
        slices=QUICK_SLICES if ctx.quick else SLICES,
        rows=SIZE,
        columns=SIZE,
        phantom=True,
    )
    written = manifest.with_suffix(".tmp")
    written.write_text(json.dumps({**asdict(study), "files": [str(f) for f in study.files]}))
    written.replace(manifest)  # whole or absent
    return study


def study_directory(study: SyntheticStudy) -> Path:
    return study.files[0].parent


def study_megabytes(study: SyntheticStudy) -> float:
    return sum(path.stat().st_size for path in study.files) / 1e6


def describe(study: SyntheticStudy) -> str:
    return f"{len(study.files)} instances, {study_megabytes(study):.0f} MB"


class RetrieveFailed(Exception):
    """A WADO-RS retrieve did not answer 200 with the whole study."""


def retrieve_study(base_url: str, study_uid: str, headers: dict[str, str]) -> int:
    """GET a whole study by WADO-RS, streaming; returns the number of body bytes read.

    Raises RetrieveFailed on a status other than 200 or a non-multipart answer.
    """
    url = urllib.parse.urlsplit(f"{base_url}/studies/{study_uid}")
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    try:
        connection.request("GET", url.path, headers={"Accept": MULTIPART_DICOM, **headers})
        response = connection.getresponse()
        if response.status != 200:
            raise RetrieveFailed(f"HTTP {response.status}")
        content_type = response.getheader("Content-Type", "")
        if not content_type.startswith("multipart/related"):
            raise RetrieveFailed(f"answered {content_type!r}, not multipart/related")
        buffer = memoryview(bytearray(1 << 20))
        total = 0
        while read := response.readinto(buffer):
            total += read
        return total
    finally:
        connection.close()


@dataclass
class Retrievals:
    seconds: list[float]
    body_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_retrievals(
    base_url: str, study: SyntheticStudy, headers: dict[str, str], runs: int
) -> Retrievals:
    """Retrieve the study ``runs`` times; raises RetrieveFailed if any answer is short."""
    expected = sum(path.stat().st_size for path in study.files)
    seconds = []
    body_bytes = 0
    for _ in range(runs):
        started = time.perf_counter()
        body_bytes = retrieve_study(base_url, study.study_uid, headers)
        seconds.append(time.perf_counter() - started)
        if body_bytes < expected:
            raise RetrieveFailed(f"only {body_bytes} of at least {expected} bytes arrived")
    return Retrievals(seconds, body_bytes)


def port_listening(port: int, timeout: float) -> bool:
    """Whether something accepts TCP connections on loopback ``port`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def indexed_instances(node: NodeProcess) -> int:
    """How many instances the node's index holds (read-only, beside the running daemon)."""
    uri = f"file:{node.data_dir / 'index.sqlite'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def explain_if_exited(node: NodeProcess, figure: float | str) -> float | str:
    """``figure``, or why it is missing if the node's daemon has exited (its last log line)."""
    if node.process is None or node.process.poll() is None or not isinstance(figure, str):
        return figure
    lines = [ln for ln in node.log_path.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1].strip()[:200] if lines else "no log"
    return f"{figure}; the node exited with {node.process.returncode}: {last}"


def node_peak_rss(node: NodeProcess) -> float | None:
    return peak_rss_mb(node.process.pid) if node.process is not None else None


def fmt_mb(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "?"


@dataclass
class ImportFigures:
    instances_per_s: float | str
    mb_per_s: float | str
    importer_rss_mb: float | None = None


def measure_import(node: NodeProcess, study: SyntheticStudy, log: Path) -> ImportFigures:
    """`imageshare import` the study into ``node``; checks that every instance was stored."""
    result = run_measured(
        [*IMAGESHARE, "import", "-c", str(node.config), "--json", str(study_directory(study))],
        log,
    )
    if result.returncode != 0:
        failed = f"failed ({result.failure()})"
        return ImportFigures(failed, failed, result.peak_rss_mb)
    stored = json.loads(result.stdout).get("stored")
    if stored != len(study.files):
        failed = f"failed ({stored} of {len(study.files)} stored)"
        return ImportFigures(failed, failed, result.peak_rss_mb)
    return ImportFigures(
        len(study.files) / result.seconds,
        study_megabytes(study) / result.seconds,
        result.peak_rss_mb,
    )


def measure_node_storescu(node: NodeProcess, study: SyntheticStudy, log: Path) -> float | str:
    """Seconds for storescu to send the study to the node; NOT_AVAILABLE without a DIMSE SCP."""
    # The HTTP side answers before the background services (DIMSE) have started.
    if not port_listening(node.dimse_port, timeout=15):
        return f"{NOT_AVAILABLE} (no DIMSE listener)"
    result = storescu(study_directory(study), "127.0.0.1", node.dimse_port, "IMAGESHARE", log)
    if result.returncode != 0:
        return f"failed ({result.failure()})"
    stored = indexed_instances(node)
    if stored != len(study.files):
        return f"failed ({stored} of {len(study.files)} indexed)"
    return result.seconds


def measure_orthanc_storescu(orthanc: OrthancServer, study: SyntheticStudy, log: Path) -> float:
    result = storescu(
        study_directory(study), "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, log
    )
    if result.returncode != 0:
        raise RuntimeError(f"storescu into Orthanc failed: {result.failure()}")
    if orthanc.instance_count() != len(study.files):
        raise RuntimeError("Orthanc did not store every instance")
    return result.seconds


def retrieve_or_reason(
    base_url: str, study: SyntheticStudy, headers: dict[str, str], runs: int
) -> float | str:
    try:
        return time_retrievals(base_url, study, headers, runs).median
    except RetrieveFailed as exc:
        reason = str(exc)
        if reason in ("HTTP 404", "HTTP 405", "HTTP 501"):
            return f"{NOT_AVAILABLE} ({reason})"
        return f"failed ({reason})"
    except OSError as exc:
        return f"failed ({exc})"


def at_most(ours: float | str, limit: float | str | None, factor: float = 1.0) -> bool | None:
    if isinstance(ours, float | int) and isinstance(limit, float | int):
        return ours <= limit * factor
    return None


def run(ctx: BenchContext) -> list[Row]:
    """Every data-plane figure of this run, ours and Orthanc's, as BENCHMARKS.md rows."""
    study = reference_study(ctx)
    work = ctx.workdir / "dataplane"
    work.mkdir(parents=True, exist_ok=True)
    runs = 3 if ctx.quick else 5
    workload = describe(study)

    orthanc = OrthancServer(work, "orthanc")
    stock_orthanc = OrthancServer(work, "orthanc-stock", tcp_nodelay=False)
    importing = init_node(work, "bench-import.example/imageshare", "node-import")
    receiving = init_node(work, "bench-dimse.example/imageshare", "node-dimse")
    try:
        orthanc.start()
        importing.start()
        receiving.start()

        imported = measure_import(importing, study, work / "import.log")
        ours_wado = retrieve_or_reason(importing.url + "/dicomweb", study, importing.auth, runs)
        orthanc_storescu = measure_orthanc_storescu(orthanc, study, work / "storescu-orthanc.log")
        ours_storescu = measure_node_storescu(receiving, study, work / "storescu-node.log")
        stock_orthanc.start()
        stock_storescu = measure_orthanc_storescu(
            stock_orthanc, study, work / "storescu-orthanc-stock.log"
        )
        stock_orthanc.stop()
        orthanc_wado = time_retrievals(orthanc.dicomweb_url, study, {}, runs).median

        ours_wado = explain_if_exited(importing, ours_wado)
        ours_storescu = explain_if_exited(receiving, ours_storescu)
        importing_rss = node_peak_rss(importing)
        receiving_rss = node_peak_rss(receiving)
        orthanc_rss = orthanc.peak_rss_mb()
    finally:
        importing.stop()
        receiving.stop()
        orthanc.stop()
        stock_orthanc.stop()

    node_rss = max((v for v in (importing_rss, receiving_rss) if v is not None), default=None)
    return [
        Row(
            f"`imageshare import` of the study ({workload}), instances/s",
            imported.instances_per_s,
            command="imageshare import STUDY_DIR",
            peak_rss_mb=f"importer {fmt_mb(imported.importer_rss_mb)}",
        ),
        Row(
            "`imageshare import` of the study, MB/s",
            imported.mb_per_s,
            command="imageshare import STUDY_DIR",
            peak_rss_mb=f"importer {fmt_mb(imported.importer_rss_mb)}",
        ),
        Row(
            "DIMSE ingest with storescu, beside Orthanc with Nagle off (as its own builds), s",
            ours_storescu,
            orthanc_storescu,
            target="<= 0.5 x Orthanc",
            met=at_most(ours_storescu, orthanc_storescu, 0.5),
            peak_rss_mb=f"node {fmt_mb(receiving_rss)}; Orthanc {fmt_mb(orthanc_rss)}",
            command=storescu_command_text("AE"),
        ),
        Row(
            "DIMSE ingest with storescu, beside Orthanc as Debian ships it (Nagle on), s",
            ours_storescu,
            stock_storescu,
            target="<= 0.5 x Orthanc",
            met=at_most(ours_storescu, stock_storescu, 0.5),
            peak_rss_mb=f"node {fmt_mb(receiving_rss)}",
            command=storescu_command_text("AE"),
        ),
        Row(
            f"WADO-RS whole-study retrieve, s (median of {runs})",
            ours_wado,
            orthanc_wado,
            target="<= Orthanc",
            met=at_most(ours_wado, orthanc_wado),
            peak_rss_mb=f"node {fmt_mb(importing_rss)}; Orthanc {fmt_mb(orthanc_rss)}",
            command="GET /dicomweb/studies/UID (Accept multipart/related; application/dicom)",
        ),
        Row(
            "peak RSS of the node daemon through import, WADO-RS and storescu, MB",
            node_rss if node_rss is not None else "?",
            orthanc_rss,
            target=f"<= {NODE_MEMORY_TARGET_MB:.0f} MB",
            met=at_most(node_rss if node_rss is not None else "?", NODE_MEMORY_TARGET_MB),
            peak_rss_mb=(
                f"node (import, WADO-RS) {fmt_mb(importing_rss)}; "
                f"node (storescu) {fmt_mb(receiving_rss)}; Orthanc {fmt_mb(orthanc_rss)}"
            ),
            command="VmHWM in /proc/PID/status",
        ),
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
