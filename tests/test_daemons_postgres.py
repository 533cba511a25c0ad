"""Two `imageshare run` daemons of one node on one PostgreSQL and one bucket: both serve
DICOMweb and DIMSE, both append to the node's one log, and when the log writer is killed
mid-burst (of grants, or of C-STOREs) the other takes over: nothing it acknowledged is
lost, `imageshare ledger verify` and `imageshare audit` pass, and Go's sumdb/tlog
verifies the log's tiles and checkpoint as the survivor serves them."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.core.entries import decode_entry, encode_entry
from node.samples import make_ct_study
from tests.support.nodes import (
    NodeProcess,
    free_port,
    init_node,
    log_entries,
    run_cli,
    wait_until,
)
from tests.support.patients import call, enroll_new_key, make_grant
from tests.support.postgres import PostgresServer, node_store_settings
from tests.support.s3 import SERVERS, running_s3
from tests.support.tlog import build_tlogcheck, go_verify

ORIGIN = "twin.example/imageshare"
GRANTEE = "b.example/imageshare"
TAKE_OVER = "this daemon now writes the node's log"


def second_daemon(first: NodeProcess, base: Path) -> NodeProcess:
    """A daemon of ``first``'s node (its node.toml, key and token) in a data directory
    of its own, on ports of its own."""
    data_dir = base / "second"
    shutil.copytree(first.data_dir, data_dir, ignore=shutil.ignore_patterns("daemon.log"))
    http_port, dimse_port = free_port(), free_port()
    config = (data_dir / "node.toml").read_text()
    config = config.replace(f"127.0.0.1:{first.http_port}", f"127.0.0.1:{http_port}")
    config = config.replace(f"port = {first.dimse_port}", f"port = {dimse_port}")
    (data_dir / "node.toml").write_text(config)
    return NodeProcess(
        data_dir, first.origin, http_port, dimse_port, first.vkey, first.admin_token
    )


@pytest.fixture
def twins(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    with running_s3(SERVERS[0]) as s3:
        name = f"twins-{uuid.uuid4().hex[:12]}"  # each test's node its own database and bucket
        s3.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
        first = init_node(tmp_path, ORIGIN, "first")
        dsn = postgres.create_database(name.replace("-", "_"))
        first.append_config(node_store_settings(first.data_dir, dsn, s3, name))
        second = second_daemon(first, tmp_path)
        try:
            first.start()
            wait_until(lambda: TAKE_OVER in first.log_path.read_text(), message="a writer")
            second.start()
            yield first, second
        finally:
            first.stop()
            second.stop()


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    return build_tlogcheck(tmp_path_factory.mktemp("go"))


def test_two_daemons_append_to_one_log_and_the_survivor_takes_over_from_a_killed_writer(
    twins: tuple[NodeProcess, NodeProcess], tlogcheck: Path | None
) -> None:
    first, second = twins
    for daemon in twins:
        assert daemon.get_json("/dicomweb/studies") == []
    assert TAKE_OVER not in second.log_path.read_text()  # one writer at a time
    key = enroll_new_key(second, "PAT-TWIN")
    acknowledged: dict[int, bytes] = {}
    through = {first.http_port: 0, second.http_port: 0}
    lock = threading.Lock()

    def grant_through(daemon: NodeProcess, count: int) -> None:
        for _ in range(count):
            try:
                status, answer = call(
                    daemon, key, "POST", "/patient/grants", make_grant(key, ORIGIN, GRANTEE)
                )
            except OSError:
                return  # the daemon was killed: nothing more is acknowledged by it
            if status == 200:
                with lock:
                    assert answer["index"] not in acknowledged, "an index given twice"
                    acknowledged[answer["index"]] = base64.b64decode(answer["entry"])
                    through[daemon.http_port] += 1

    burst = [
        threading.Thread(target=grant_through, args=(daemon, 40)) for daemon in (first, second)
    ]
    for thread in burst:
        thread.start()
    wait_until(lambda: min(through.values()) >= 10, timeout=60, message="grants through both")
    first.kill9()
    for thread in burst:
        thread.join(timeout=120)
    wait_until(
        lambda: TAKE_OVER in second.log_path.read_text(), timeout=10, message="a take-over"
    )
    assert through[second.http_port] == 40  # the survivor acknowledged all it was sent
    entries = log_entries(second)
    assert all(encode_entry(entries[i]) == raw for i, raw in acknowledged.items())
    assert sum(1 for e in entries if e.body.kind == "grant") >= len(acknowledged)
    second.cli("ledger", "verify")
    assert decode_entry(acknowledged[max(acknowledged)]).body.kind == "grant"
    audited = run_cli("audit", second.url, "--json", check=False)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert json.loads(audited.stdout)["violations"] == []
    if tlogcheck is not None:
        found = go_verify(tlogcheck, second.url, ORIGIN, second.vkey)
        assert found["size"] == len(entries)


def send_until_refused(daemon: NodeProcess, files: list[Path], acknowledged: list[str]) -> None:
    """C-STORE ``files`` one by one into ``daemon`` over one association, recording each
    SOP Instance UID the daemon acknowledged with success; stops at the first failure
    (the daemon killed under it)."""
    ae = AE(ae_title="TWINSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", daemon.dimse_port, ae_title="IMAGESHARE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            dataset = pydicom.dcmread(path)
            status = assoc.send_c_store(dataset)
            if not status or status.Status != 0x0000:
                return
            acknowledged.append(dataset.SOPInstanceUID)
    finally:
        if assoc.is_established:
            assoc.release()


def indexed(daemon: NodeProcess, study_uid: str) -> set[str]:
    found = daemon.get_json(f"/dicomweb/studies/{study_uid}/instances")
    return {item["00080018"]["Value"][0] for item in found}


def test_both_daemons_take_c_stores_and_none_acknowledged_by_a_killed_writer_is_lost(
    twins: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    first, second = twins
    study = make_ct_study(tmp_path / "study", series=2, slices=40, patient_id="PAT-TWIN-2")
    into_second = [f for f in study.files if f.name.startswith("s02_")]
    stored = dcmtk_storescu(second, into_second)
    assert stored.returncode == 0, stored.stderr
    assert indexed(first, study.study_uid) == {
        pydicom.dcmread(f).SOPInstanceUID for f in into_second
    }  # stored through one daemon, found through the other
    acknowledged: list[str] = []
    into_first = [f for f in study.files if f.name.startswith("s01_")]
    sender = threading.Thread(target=send_until_refused, args=(first, into_first, acknowledged))
    sender.start()
    wait_until(lambda: len(acknowledged) >= 10, timeout=60, message="C-STOREs acknowledged")
    first.kill9()
    sender.join(timeout=60)
    assert 10 <= len(acknowledged) < len(into_first), "the writer was killed mid-burst"
    wait_until(
        lambda: TAKE_OVER in second.log_path.read_text(), timeout=10, message="a take-over"
    )
    assert set(acknowledged) <= indexed(second, study.study_uid)
    again = dcmtk_storescu(second, into_first)  # the rest, and the acknowledged again
    assert again.returncode == 0, again.stderr
    assert len(indexed(second, study.study_uid)) == len(study.files)
    second.cli("ledger", "verify")


def dcmtk_storescu(daemon: NodeProcess, files: list[Path]) -> subprocess.CompletedProcess[str]:
    command = ["storescu", "-aet", "TWINSCU", "-aec", "IMAGESHARE", "127.0.0.1"]
    return subprocess.run(
        [*command, str(daemon.dimse_port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
