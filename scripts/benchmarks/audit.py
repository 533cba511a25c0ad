"""The auditor: end-to-end `imageshare audit` of a generated 100,000-entry ledger.

Two real nodes serve the ledger over HTTP: custodian A's log of 100,000 entries (10,000
with --quick) made of realistic consent traffic (enrollments, grants carrying real
patient Ed25519 signatures, accesses, denials, revocations, witnessed checkpoints), and
grantee B's log with the matching receipts; each node also mirrors the other's log, so
the auditor reads every log twice (from its node and from the mirror). The figure is the
wall time of the `imageshare audit A B --json` process, from start to a clean verdict,
over the distinct entries audited.

Run alone: python -m scripts.benchmarks.audit [--quick]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from node.core.consent import GrantFields, sign_grant, sign_revocation, token_id_of
from node.core.entries import Access, Denial, Enroll, EntryBody, Grant, Receipt, Revoke, Witness
from node.core.keys import NodeIdentity
from node.core.patient_keys import PatientKey
from node.store.ledger import LedgerStore
from node.store.secrets import read_seed
from scripts.benchmarks.common import BenchContext, Row
from tests.support.memory import run_with_peak_rss
from tests.support.nodes import IMAGESHARE, NodeProcess, init_node

A_ORIGIN = "a.example/imageshare"
B_ORIGIN = "b.example/imageshare"
C_ORIGIN = "c.example/imageshare"
DAY = 86_400
# One patient story in A's log: enroll, grant, access (x2), and now and then a denial,
# a revocation and a witnessed peer checkpoint: about 5 entries per patient.


def _ref(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def generate(
    size: int, start: int
) -> tuple[list[tuple[EntryBody, int]], list[tuple[EntryBody, int]]]:
    """A's entries (at least ``size``, whole patient stories) and B's receipts, all consented."""
    a_items: list[tuple[EntryBody, int]] = []
    b_items: list[tuple[EntryBody, int]] = []
    patient = 0
    t = start
    while len(a_items) < size:
        key = PatientKey.derive(_ref("wallet", patient), A_ORIGIN)
        subject, study = _ref("subject", patient), _ref("study", patient)
        a_items.append((Enroll(subject=subject, key=key.public_key, replaces=None), t))
        token = sign_grant(
            GrantFields(key.public_key, A_ORIGIN, B_ORIGIN, None, t, t + 30 * DAY, os.urandom(16)),
            key.sign,
        )
        token_id = token_id_of(token)
        a_items.append((Grant(token=token), t + 1))
        for fetch in range(2):
            digest = _ref("digest", patient, fetch)
            sent = (token_id, study, 400, 2 * 10**8, digest)
            a_items.append((Access(*sent, grantee=B_ORIGIN), t + 2))
            b_items.append((Receipt(*sent, custodian=A_ORIGIN), t + 3))
        if patient % 4 == 0:
            denial = Denial(token_id=token_id, requester=C_ORIGIN, rule="wrong_grantee", study=None)
            a_items.append((denial, t + 4))
        if patient % 5 == 0:
            revocation = sign_revocation(key.public_key, token_id, t + 5, key.sign)
            a_items.append((Revoke(revocation=revocation), t + 5))
        if patient % 3 == 0:
            witness = Witness(log_id=_ref("peer"), size=patient, root=_ref("root", patient))
            a_items.append((witness, t + 6))
        patient += 1
        t += 10
    return a_items, b_items


def _write(node: NodeProcess, items: list[tuple[EntryBody, int]], now: int) -> None:
    identity = NodeIdentity(node.origin, read_seed(node.data_dir / "node.key"))
    store = LedgerStore(node.data_dir)
    try:
        own = store.own_log(node.origin, identity.vkey)
        for i in range(0, len(items), 20_000):
            own.append_many(items[i : i + 20_000])
        own.publish_checkpoint(identity, now)
    finally:
        store.close()


def _mirror(into: NodeProcess, of: NodeProcess) -> None:
    source, target = LedgerStore(of.data_dir), LedgerStore(into.data_dir)
    try:
        own = source.own_log(of.origin)
        note = own.checkpoint_note()
        assert note is not None
        target.mirror(of.origin, of.vkey).extend(own.entries(0, own.size()), note)
    finally:
        source.close()
        target.close()


def build(workdir: Path, size: int) -> tuple[NodeProcess, NodeProcess, int, int]:
    """Two stopped nodes holding the generated ledger; returns them and their log sizes."""
    now = int(time.time())
    a_items, b_items = generate(size, now - 400 * DAY)
    a, b = init_node(workdir, A_ORIGIN), init_node(workdir, B_ORIGIN)
    for node in (a, b):
        node.append_config("[federation]\ndiscovery = false")
    _write(a, a_items, now)
    _write(b, b_items, now)
    _mirror(b, a)
    _mirror(a, b)
    return a, b, len(a_items), len(b_items)


def timed_audit(*urls: str) -> tuple[float, dict[str, Any], float]:
    """Seconds, report and peak RSS (MB, main process) of one `imageshare audit --json`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        measured = run_with_peak_rss(
            [*IMAGESHARE, "audit", *urls, "--json"], stdout=out, stderr=err
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if measured.returncode != 0:
        raise RuntimeError(f"audit exited {measured.returncode}: {stderr}{stdout[:2000]}")
    return measured.seconds, json.loads(stdout), measured.peak_rss / 1024**2


def run(ctx: BenchContext) -> list[Row]:
    size = 10_000 if ctx.quick else 100_000
    a, b, a_size, b_size = build(ctx.workdir, size)
    total = a_size + b_size
    a.start()
    b.start()
    try:
        seconds, report, peak_mb = timed_audit(a.url, b.url)
    finally:
        a.stop()
        b.stop()
    grants = sum(log["counts"].get("grant", 0) for log in report["logs"])
    rate = total / seconds
    label = f"custodian log of {a_size} entries + grantee log of {b_size}"
    return [
        Row(
            f"audit end to end ({label}; {grants} signed grants), entries/s",
            round(rate),
            # The target is for the 100k-entry ledger; a quick run is start-up bound.
            target="" if ctx.quick else ">= 5000/s",
            met=None if ctx.quick else rate >= 5000,
            peak_rss_mb=f"auditor (main process) {peak_mb:.0f}",
            command="imageshare audit URL_A URL_B --json",
        ),
        Row(f"audit end to end ({label}), seconds", round(seconds, 2)),
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
