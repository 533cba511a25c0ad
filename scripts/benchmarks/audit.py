"""The auditor: end-to-end `imageshare audit` of a generated federation of 10^6 entries.

Two real nodes serve the ledger over HTTP: custodian A's log (about 705,000 entries;
10,000 with --quick) made of realistic consent traffic (enrollments, grants carrying
real patient Ed25519 signatures, accesses, denials, revocations, witnessed checkpoints),
and grantee B's log with the matching receipts (about 295,000), 10^6 distinct entries in
all; each node also mirrors the other's log, so the auditor reads every log twice (from
its node and from the mirror). The first figure is the wall time of the
`imageshare audit A B --state DIR --json` process, from start to a clean verdict, over
the distinct entries audited, with its peak RSS (the auditor's process with its
signature-checking worker processes, summed). Then about 7,000 entries (5,000 in A's
log, their receipts in B's) are appended and mirrored, and the rerun with the same
--state is timed, with the number of entries it read from the nodes.

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


# Distinct entries in the federation audited (A's log and B's), and the rerun's extra stories.
FEDERATION_ENTRIES = 1_000_000
QUICK_ENTRIES = 14_000
RERUN_ENTRIES = 5_000
# A's share of the entries: each patient story is ~4.93 entries in A and 2 receipts in B.
A_SHARE = 0.7115


def generate(
    size: int, start: int, first_patient: int = 0
) -> tuple[list[tuple[EntryBody, int]], list[tuple[EntryBody, int]]]:
    """A's entries (at least ``size``, whole patient stories, patients numbered from
    ``first_patient``) and B's receipts, all consented."""
    a_items: list[tuple[EntryBody, int]] = []
    b_items: list[tuple[EntryBody, int]] = []
    patient = first_patient
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
    """Append to the stopped node's own log and sign a checkpoint of it."""
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
    """Bring ``into``'s mirror of ``of``'s log up to its checkpoint, as replication would."""
    source, target = LedgerStore(of.data_dir), LedgerStore(into.data_dir)
    try:
        own = source.own_log(of.origin)
        note = own.checkpoint_note()
        assert note is not None
        held = target.mirror(of.origin, of.vkey)
        held.extend(own.entries(held.size(), own.size()), note)
    finally:
        source.close()
        target.close()


def build(workdir: Path, size: int, now: int) -> tuple[NodeProcess, NodeProcess, int, int, int]:
    """Two stopped nodes holding the generated ledger (A's log of at least ``size``
    entries), each mirroring the other; returns them, the log sizes and the patients."""
    a_items, b_items = generate(size, now - 400 * DAY)
    patients = sum(isinstance(body, Enroll) for body, _ in a_items)
    a, b = init_node(workdir, A_ORIGIN), init_node(workdir, B_ORIGIN)
    for node in (a, b):
        node.append_config("[federation]\ndiscovery = false")
    _write(a, a_items, now)
    _write(b, b_items, now)
    _mirror(b, a)
    _mirror(a, b)
    return a, b, len(a_items), len(b_items), patients


def grow(a: NodeProcess, b: NodeProcess, patients: int, size: int, now: int) -> int:
    """Append stories of new patients to A's log (at least ``size`` entries) and their
    receipts to B's, after the ``patients`` stories written (both nodes stopped), and
    mirror them; returns the number of entries added to the two logs."""
    start = now - 400 * DAY + 10 * patients  # the time after the stories already written
    a_items, b_items = generate(size, start, patients)
    _write(a, a_items, now)
    _write(b, b_items, now)
    _mirror(b, a)
    _mirror(a, b)
    return len(a_items) + len(b_items)


def timed_audit(*urls: str, state: Path) -> tuple[float, dict[str, Any], float, float]:
    """Seconds, report and peak RSS (MB: the main process, then it with its worker
    processes together) of one `imageshare audit --json`."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        measured = run_with_peak_rss(
            [*IMAGESHARE, "audit", *urls, "--state", str(state), "--json"], stdout=out, stderr=err
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if measured.returncode != 0:
        raise RuntimeError(f"audit exited {measured.returncode}: {stderr}{stdout[:2000]}")
    mb = 1024**2
    return measured.seconds, json.loads(stdout), measured.peak_rss / mb, measured.peak_tree_rss / mb


def run(ctx: BenchContext) -> list[Row]:
    total_target = QUICK_ENTRIES if ctx.quick else FEDERATION_ENTRIES
    now = int(time.time())
    started = time.perf_counter()
    a, b, a_size, b_size, patients = build(ctx.workdir, int(total_target * A_SHARE), now)
    built = time.perf_counter() - started
    total = a_size + b_size
    state = ctx.workdir / "audit-state"
    a.start()
    b.start()
    try:
        seconds, report, main_mb, peak_mb = timed_audit(a.url, b.url, state=state)
    finally:
        a.stop()
        b.stop()
    # Shown at once: on a loaded machine the module may run out of time in the rerun.
    print(
        f"audit: {total} entries in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB; built in"
        f" {built:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    added = grow(a, b, patients, RERUN_ENTRIES // 10 if ctx.quick else RERUN_ENTRIES, now)
    a.start()
    b.start()
    try:
        rerun_seconds, rerun, rerun_main_mb, rerun_peak_mb = timed_audit(a.url, b.url, state=state)
    finally:
        a.stop()
        b.stop()
    grants = sum(log["counts"].get("grant", 0) for log in report["logs"])
    rate = total / seconds
    label = f"custodian log of {a_size} entries + grantee log of {b_size}, each mirrored"
    big = not ctx.quick
    return [
        Row(
            f"audit end to end ({label}; {grants} signed grants), entries/s",
            round(rate),
            # The targets are for the 10^6-entry federation; a quick run is start-up bound.
            target=">= 10000/s" if big else "",
            met=rate >= 10_000 if big else None,
            peak_rss_mb=f"auditor (main process) {main_mb:.0f}, with its workers {peak_mb:.0f}",
            command="imageshare audit URL_A URL_B --state DIR --json",
        ),
        Row(
            f"audit end to end ({label}), auditor peak RSS (MB)",
            round(peak_mb),
            target="< 200" if big else "",
            met=peak_mb < 200 if big else None,
        ),
        Row(f"audit end to end ({label}), seconds", round(seconds, 2)),
        Row(
            f"audit rerun with --state after {added} new entries, seconds",
            round(rerun_seconds, 2),
            peak_rss_mb=f"auditor (main process) {rerun_main_mb:.0f}, with its workers"
            f" {rerun_peak_mb:.0f}",
            command="imageshare audit URL_A URL_B --state DIR --json (again)",
        ),
        Row(
            f"audit rerun with --state after {added} new entries (each log read from its node"
            " and its mirror), entries read from the nodes",
            rerun["entries_read"],
            target=f"= {2 * added}",
            met=rerun["entries_read"] == 2 * added,
        ),
        Row("audit benchmark: building the federation, seconds", round(built, 1)),
    ]


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
