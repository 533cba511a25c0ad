"""`imageshare import` of a 200 MB CT study: byte-exact WADO-RS, duplicates, bad files,
bounded memory, and a kill -9 in the middle of an import."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from node.samples import SyntheticStudy, make_ct_study
from tests.support.memory import peak_rss_bytes, run_with_peak_rss
from tests.support.nodes import IMAGESHARE, NodeProcess, embedded_store_run, init_node, wait_until

pytestmark = pytest.mark.slow

# The node's peak while it streams a study: the embedded store's target, and on
# PostgreSQL + S3 that plus what its libraries and pools hold (psycopg, boto3): far
# below what holding a 100 MB body in memory would add.
PEAK_RSS_LIMIT = (150 if embedded_store_run() else 190) * 1024 * 1024
INSTANCES = 400


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes


def run_import(node: NodeProcess, *paths: Path) -> Run:
    """`imageshare import --json` as a child process, with its own peak RSS."""
    with (
        open(node.data_dir / "import.out", "w+") as out,
        open(node.data_dir / "import.err", "w+") as err,
    ):
        command = [*IMAGESHARE, "import", "--json", "-c", str(node.config), *map(str, paths)]
        measured = run_with_peak_rss(command, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        return Run(measured.returncode, out.read(), err.read(), measured.peak_rss)


def summary_of(run: Run) -> dict[str, object]:
    assert run.exit_code == 0, run.stderr
    return dict(json.loads(run.stdout))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def streamed_part_digests(response: requests.Response) -> Iterator[str]:
    """SHA-256 of every part of a multipart/related response, read chunk by chunk."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    delimiter = b"--" + boundary.encode()
    chunks = response.iter_content(1 << 20)
    buffer = bytearray()

    def fill(size: int) -> None:
        while len(buffer) < size:
            chunk = next(chunks, None)
            assert chunk is not None, "the response ended in the middle of a part"
            buffer.extend(chunk)

    while True:
        fill(len(delimiter) + 2)
        assert buffer.startswith(delimiter)
        if buffer[len(delimiter) : len(delimiter) + 2] == b"--":
            return
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            fill(len(buffer) + 1)
        head = buffer[len(delimiter) + 2 : end].decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in head)}
        del buffer[: end + 4]
        remaining = int(headers["content-length"])
        digest = hashlib.sha256()
        while remaining:
            fill(1)
            take = min(remaining, len(buffer))
            digest.update(buffer[:take])
            del buffer[:take]
            remaining -= take
        fill(2)
        assert buffer[:2] == b"\r\n"
        del buffer[:2]
        yield digest.hexdigest()


def peak_rss(pid: int) -> int:
    """VmHWM of a running process, in bytes."""
    peak = peak_rss_bytes(pid)
    assert peak is not None, "no VmHWM in /proc status"
    return peak


def indexed_count(node: NodeProcess) -> int:
    import psycopg

    try:
        return int(node.query_index("SELECT COUNT(*) FROM instances")[0][0])
    except (sqlite3.OperationalError, psycopg.Error):
        return 0  # the index or its schema is not created yet


@pytest.fixture(scope="session")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """The reference workload: 2 series x 200 slices of 512x512 16-bit CT (200 MB)."""
    directory = tmp_path_factory.mktemp("big_ct") / "study"
    return make_ct_study(directory, series=2, slices=200, rows=512, columns=512)


@pytest.fixture(scope="session")
def big_study_digests(big_study: SyntheticStudy) -> dict[str, str]:
    return {
        sha256_of(path): uid for path, uid in zip(big_study.files, big_study.sop_uids, strict=True)
    }


@dataclass
class Imported:
    node: NodeProcess
    first: Run


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory, big_study: SyntheticStudy
) -> Iterator[Imported]:
    """A running node into which the big study was imported once."""
    node = init_node(tmp_path_factory.mktemp("import"), "import.example/imageshare")
    node.start()
    try:
        yield Imported(node, run_import(node, big_study.files[0].parent))
    finally:
        node.stop()


class TestImportOfALargeStudy:
    def test_summary_counts_every_instance(self, imported: Imported) -> None:
        summary = summary_of(imported.first)
        assert summary["stored"] == INSTANCES
        assert summary["duplicate"] == 0
        assert summary["rejected"] == []
        assert summary["studies"] == 1
        assert indexed_count(imported.node) == INSTANCES

    def test_importer_memory_stays_bounded(self, imported: Imported) -> None:
        assert 0 < imported.first.peak_rss < PEAK_RSS_LIMIT

    def test_every_instance_comes_back_byte_for_byte_through_wado(
        self, imported: Imported, big_study: SyntheticStudy, big_study_digests: dict[str, str]
    ) -> None:
        node = imported.node
        headers = {
            **node.auth,
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*',
        }
        url = f"{node.url}/dicomweb/studies/{big_study.study_uid}"
        with requests.get(url, headers=headers, stream=True, timeout=120) as response:
            assert response.status_code == 200
            sent = list(streamed_part_digests(response))
        assert len(sent) == INSTANCES
        assert set(sent) == set(big_study_digests)
        assert node.process is not None
        assert peak_rss(node.process.pid) < PEAK_RSS_LIMIT

    def test_reimport_reports_every_instance_as_duplicate(
        self, imported: Imported, big_study: SyntheticStudy
    ) -> None:
        summary = summary_of(run_import(imported.node, big_study.files[0].parent))
        assert (summary["stored"], summary["duplicate"], summary["rejected"]) == (0, INSTANCES, [])
        assert indexed_count(imported.node) == INSTANCES

    def test_bad_files_are_rejected_one_by_one_with_reasons(
        self, imported: Imported, tmp_path: Path
    ) -> None:
        good = make_ct_study(tmp_path / "good", series=1, slices=1, rows=16, columns=16)
        source = good.files[0].read_bytes()
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "notes.txt").write_text("not an image")
        (bad / "truncated.dcm").write_bytes(source[: len(source) - 100])
        no_uid = make_ct_study(tmp_path / "nouid", series=1, slices=1, rows=16, columns=16)
        raw = no_uid.files[0].read_bytes()
        uid = no_uid.study_uid.encode()
        (bad / "no_study_uid.dcm").write_bytes(raw.replace(uid, b"\0" * len(uid)))
        before = indexed_count(imported.node)
        summary = summary_of(run_import(imported.node, good.files[0], bad))
        assert summary["stored"] == 1
        rejected = summary["rejected"]
        assert isinstance(rejected, list)
        reasons = {Path(r["path"]).name: r["reason"] for r in rejected}
        assert set(reasons) == {"notes.txt", "truncated.dcm", "no_study_uid.dcm"}
        assert "not a DICOM" in reasons["notes.txt"]
        assert "truncated" in reasons["truncated.dcm"]
        assert "StudyInstanceUID" in reasons["no_study_uid.dcm"]
        assert indexed_count(imported.node) == before + 1
        assert list((imported.node.data_dir / "tmp").iterdir()) == []


class TestKilledImport:
    def test_kill_9_mid_import_leaves_a_consistent_store_and_reimport_completes(
        self, tmp_path: Path, big_study: SyntheticStudy
    ) -> None:
        node = init_node(tmp_path, "killed.example/imageshare")
        node.append_config("[store]\nbatch_size = 32")
        importer = subprocess.Popen(
            [*IMAGESHARE, "import", "-c", str(node.config), str(big_study.files[0].parent)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: indexed_count(node) > 0, timeout=60, interval=0.01)
        finally:
            importer.send_signal(signal.SIGKILL)
            importer.wait()
        assert importer.returncode == -signal.SIGKILL
        indexed = indexed_count(node)
        assert 0 < indexed < INSTANCES, "the import finished before it could be killed"

        rows = node.query_index("SELECT sop_instance_uid, digest FROM instances")
        assert len(rows) == indexed
        for uid, digest in rows:
            stored = node.stored_object(digest)
            assert stored is not None and hashlib.sha256(stored).hexdigest() == digest, uid

        summary = summary_of(run_import(node, big_study.files[0].parent))
        assert summary["duplicate"] == indexed
        assert summary["stored"] == INSTANCES - indexed
        assert summary["rejected"] == []
        assert indexed_count(node) == INSTANCES
        # The killed import's partial files went when the next one opened the store.
        assert list((node.data_dir / "tmp").iterdir()) == []


def multipart_upload(files: list[Path], boundary: str) -> Iterator[bytes]:
    """A STOW-RS body streamed from disk, one megabyte at a time."""
    for path in files:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


class TestStowOfALargeStudy:
    def test_streamed_upload_is_stored_whole_in_bounded_memory(
        self, tmp_path: Path, big_study: SyntheticStudy, big_study_digests: dict[str, str]
    ) -> None:
        # One series (100 MB) in one request: a node holding the body in memory would pass
        # the limit, and it halves the test's time.
        files = [f for f in big_study.files if f.name.startswith("s01_")]
        expected = {d for d, uid in big_study_digests.items() if uid in big_study.sop_uids[:200]}
        assert len(files) == len(expected) == INSTANCES // 2
        node = init_node(tmp_path, "stow-big.example/imageshare").start()
        try:
            boundary = "big-study-upload"
            response = requests.post(
                f"{node.url}/dicomweb/studies",
                data=multipart_upload(files, boundary),
                headers={
                    **node.auth,
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                    f"boundary={boundary}",
                },
                timeout=120,
            )
            assert response.status_code == 200
            assert len(response.json()["00081199"]["Value"]) == len(files)
            assert node.process is not None
            assert peak_rss(node.process.pid) < PEAK_RSS_LIMIT
            digests = {r[0] for r in node.query_index("SELECT digest FROM instances")}
            assert digests == expected
            assert list((node.data_dir / "tmp").iterdir()) == []
        finally:
            node.stop()
