"""Viewing figures: WADO-RS rendered JPEGs per second beside Orthanc, and the reference
study downloaded as PDI media (time and the node's peak memory)."""

from __future__ import annotations

import http.client
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from node.samples import SyntheticStudy, make_ct_study
from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import (
    at_most,
    fmt_mb,
    measure_import,
    measure_orthanc_storescu,
    node_peak_rss,
    reference_study,
)
from tests.support.nodes import init_node
from tests.support.orthanc import OrthancServer

RENDER_SLICES = 60  # one series of 512x512 CT slices
QUICK_RENDER_SLICES = 12
PASSES = 3
NODE_MEMORY_TARGET_MB = 150

NOTES = [
    "Rendered JPEGs: one client asks for every instance of a 512x512 16-bit CT series as"
    " `GET .../instances/{uid}/rendered` (`Accept: image/jpeg`), one request after another"
    " on one kept-alive connection; the figure is the median of the passes, images per"
    " second. Both servers decode, window (the instance's 40/400) and encode each image.",
    "PDI media: the reference study as `GET /admin/api/studies/{uid}/media.zip`, read to"
    " its end; the node's peak RSS is that of the daemon that served it (and the import"
    " before it).",
]


def _get_all(base_url: str, paths: list[str], headers: dict[str, str]) -> float:
    """Seconds to GET every path in turn on one connection; raises on a non-200 answer."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
    try:
        started = time.perf_counter()
        for path in paths:
            connection.request("GET", url.path + path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or not body.startswith(b"\xff\xd8"):
                raise RuntimeError(f"{path} answered {response.status}, not a JPEG")
        return time.perf_counter() - started
    finally:
        connection.close()


def rendered_per_second(base_url: str, study: SyntheticStudy, headers: dict[str, str]) -> float:
    series = study.series_uids[0]
    paths = [
        f"/studies/{study.study_uid}/series/{series}/instances/{uid}/rendered"
        for uid in study.sop_uids
    ]
    wanted = {**headers, "Accept": "image/jpeg"}
    _get_all(base_url, paths[:2], wanted)  # warm up (first decode, page cache)
    seconds = [_get_all(base_url, paths, wanted) for _ in range(PASSES)]
    return len(paths) / statistics.median(seconds)


def download_seconds(url: str, headers: dict[str, str]) -> float:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=600)
    try:
        started = time.perf_counter()
        connection.request("GET", parts.path, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the download answered {response.status}")
        buffer = memoryview(bytearray(1 << 20))
        while response.readinto(buffer):
            pass
        return time.perf_counter() - started
    finally:
        connection.close()


def run(ctx: BenchContext) -> list[Row]:
    """The rendered-JPEG and PDI download figures of this run, as BENCHMARKS.md rows."""
    work = ctx.workdir / "viewing"
    work.mkdir(parents=True, exist_ok=True)
    slices = QUICK_RENDER_SLICES if ctx.quick else RENDER_SLICES
    series = make_ct_study(
        work / "render-series", series=1, slices=slices, rows=512, columns=512, phantom=True
    )
    reference = reference_study(ctx)
    orthanc = OrthancServer(work, "orthanc-render")
    node = init_node(work, "bench-viewing.example/imageshare", "node-viewing")
    try:
        orthanc.start()
        node.start()
        for study, log in ((series, "import-series.log"), (reference, "import-reference.log")):
            imported = measure_import(node, study, work / log)
            if isinstance(imported.instances_per_s, str):
                raise RuntimeError(f"import into the node {imported.instances_per_s}")
        measure_orthanc_storescu(orthanc, series, work / "storescu-orthanc.log")
        ours = rendered_per_second(node.url + "/dicomweb", series, node.auth)
        theirs = rendered_per_second(orthanc.dicomweb_url, series, {})
        media_url = f"{node.url}/admin/api/studies/{reference.study_uid}/media.zip"
        media_seconds = download_seconds(media_url, node.auth)
        node_rss = node_peak_rss(node)
        orthanc_rss = orthanc.peak_rss_mb()
    finally:
        node.stop()
        orthanc.stop()
    megabytes = sum(Path(p).stat().st_size for p in reference.files) / 1e6
    return [
        Row(
            f"WADO-RS rendered JPEG of a 512x512 CT instance, images/s (median of {PASSES})",
            ours,
            theirs,
            target=">= Orthanc",
            met=ours >= theirs,
            peak_rss_mb=f"node {fmt_mb(node_rss)}; Orthanc {fmt_mb(orthanc_rss)}",
            command="GET /dicomweb/studies/S/series/R/instances/I/rendered (Accept image/jpeg)",
        ),
        Row(
            f"PDI media ZIP of the reference study ({len(reference.files)} instances,"
            f" {megabytes:.0f} MB), s",
            media_seconds,
            peak_rss_mb=f"node {fmt_mb(node_rss)}",
            command="GET /admin/api/studies/UID/media.zip",
        ),
        Row(
            "peak RSS of the node daemon through import, rendering and the PDI download, MB",
            node_rss if node_rss is not None else "?",
            target=f"<= {NODE_MEMORY_TARGET_MB} MB",
            met=at_most(node_rss if node_rss is not None else "?", NODE_MEMORY_TARGET_MB),
            command="VmHWM in /proc/PID/status",
        ),
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
