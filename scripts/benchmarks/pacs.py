"""A grantee's fetch of a study the custodian holds only in its PACS, beside the same
study from the custodian's own store (docs/pacs.md).

Orthanc plays the hospital's PACS (loaded by storescu); the custodian node has `[pacs]`
pointing at its Query/Retrieve SCP and retrieves by C-GET when the grantee asks. Then
the study is imported into the custodian and a second grantee fetches it from there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scripts.benchmarks.common import BenchContext, Row
from scripts.benchmarks.dataplane import describe, reference_study, study_directory
from scripts.benchmarks.transfer import FetchTimes, enroll_wallet, timed_fetch_steps
from tests.support.nodes import NodeProcess, init_node, run_cli
from tests.support.orthanc import OrthancServer, storescu

CUSTODIAN_AE = "IMAGESHARE"
NOTES = [
    "Fetch from the PACS: the custodian lists the study by C-FIND, then on the grantee's"
    " request retrieves it by C-GET from Orthanc (on loopback) into its cache, checking"
    " every instance's header and fsyncing it; meanwhile it answers the grantee with"
    " partial manifests of the instances already cached (each with its digest), so the"
    " study streams onward while the retrieve runs. Timed as the transfer row:"
    " POST /admin/api/fetch at the grantee, polled every 10 ms; first byte is the first"
    " poll that saw bytes received.",
]


def _grant(custodian: NodeProcess, grantee: NodeProcess, wallet: list[str]) -> str:
    result = run_cli(
        "patient", "grant", "--custodian", custodian.url, "--to", grantee.origin, "--all",
        *wallet, "--json", input="",
    )  # fmt: skip
    return str(json.loads(result.stdout)["token"])


def _measure(ctx: BenchContext, work: Path) -> tuple[FetchTimes | str, FetchTimes | str]:
    study = reference_study(ctx)
    custodian = init_node(work, "custodian.example/imageshare", "custodian")
    from_pacs = init_node(work, "grantee.example/imageshare", "grantee")
    from_store = init_node(work, "second.example/imageshare", "second")
    orthanc = OrthancServer(work).allow_retrieve(CUSTODIAN_AE, custodian.dimse_port)
    wallet = ["--wallet", str(work / "wallet")]
    nodes = [custodian, from_pacs, from_store]
    try:
        orthanc.start()
        loaded = storescu(
            study_directory(study), "127.0.0.1", orthanc.dicom_port, "ORTHANC", work / "load.log"
        )
        if loaded.returncode != 0:
            raise RuntimeError(f"loading Orthanc failed: {loaded.failure()}")
        for grantee in (from_pacs, from_store):
            grantee.append_config(custodian.roster_entry())
            custodian.append_config(grantee.roster_entry())
        custodian.append_config(
            f'[pacs]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        )
        for node in nodes:
            node.start()
        enroll_wallet(custodian, study.patient_id, wallet)
        pacs = timed_fetch_steps(from_pacs, _grant(custodian, from_pacs, wallet), len(study.files))
        custodian.cli("import", str(study_directory(study)), input="")
        store = timed_fetch_steps(
            from_store, _grant(custodian, from_store, wallet), len(study.files)
        )
        return pacs, store
    finally:
        for node in nodes:
            node.stop()
        orthanc.stop()


def run(ctx: BenchContext) -> list[Row]:
    """Time to first byte and total of the fetch: study only in the PACS, then in the store."""
    study = reference_study(ctx)
    work = ctx.workdir / "pacs"
    work.mkdir(parents=True, exist_ok=True)
    pacs, store = _measure(ctx, work)
    command = "imageshare fetch TOKEN (custodian with [pacs] C-GET from Orthanc)"
    rows = []
    for where, times in (
        ("only in the custodian's PACS", pacs),
        ("in the custodian's store", store),
    ):
        for figure in ("first byte", "total"):
            value: float | str
            if isinstance(times, str):  # why it could not be measured
                value = times
            else:
                value = round(times.first_byte if figure == "first byte" else times.seconds, 3)
            rows.append(
                Row(
                    f"grantee fetch of the study ({describe(study)}) {where}: {figure}, s",
                    value,
                    command=command,
                )
            )
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
