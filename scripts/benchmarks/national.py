"""National simulation: 1,000 nodes in one process, full mirroring versus selective.

Each simulated node has a real signing key, a real log (entries encoded by
node.core.entries, chained, in a node.core.merkle tree, each append signed as a C2SP
checkpoint) and patients enrolled with real patient keys. One seeded event stream is
played: grants 40% (a patient-signed token appended by the custodian), access + receipt
40% (the custodian's ``access``, the grantee's ``receipt``), revocations 10% (a
patient-signed revocation), share links 10% (a grant to a ``link:`` grantee). Custodians
are drawn uniformly; a grantee is one of the custodian's regular partners (most in its
region, 20 regions) and, one time in twenty, any node.

Which node mirrors which log is the product's rule (node.core.dealings: ``counterparts``
of each node's own entries, a fetch started at the grantee, ``mirrors_log``); full
mirroring is ``mirror = "all"`` on every node. The network is simulated: the bytes of
every exchange the product makes for an append are the real encodings (signed notify,
``/ledger/logs`` rows, checkpoint note, entries or, for a log not mirrored, a consistency
proof, the tlog-witness add-checkpoint and its cosignature), plus HTTP_OVERHEAD per
exchange. A first half of the events is a warm-up (dealings form); bytes are counted
over the second half and scaled to DAY_EVENTS events a day.

Witnessing runs the real witness code (parse_add_checkpoint, judge, cosign_checkpoint)
at every other node for a sample of appends; the time for an append to be witnessed by
policy is the log's signing time plus the third-fastest answer (simulated round trip +
the witness's measured time). The auditor is node.services.audit.audit_views, as it
is, over the views the nodes serve (each its own log and the logs it mirrors): with full
mirroring AUDIT_SOURCES nodes already serve every log, selectively it takes every node.

Run alone: python -m scripts.benchmarks.national [--quick]
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import yarl

from node.core import entries
from node.core.base64url import b64_encode
from node.core.consent import GrantFields, link_grantee, sign_grant, sign_revocation, token_id_of
from node.core.dealings import counterparts, mirrors_log
from node.core.keys import NodeIdentity
from node.core.merkle import ZERO_HASH, MemoryTree, consistency_proof, leaf_hash
from node.core.notes import Checkpoint, cosign_checkpoint, parse_vkey, sign_note
from node.core.origins import log_id
from node.core.patient_keys import PatientKey
from node.core.witness import Witnessed, encode_add_checkpoint, judge, parse_add_checkpoint
from node.services.peer_client import node_signed_headers
from node.store.ledger import LogInfo
from scripts.benchmarks.common import BenchContext, Row

SEED = 19
DAY_EVENTS = 1_000_000
REGIONS = 20
PATIENTS_PER_NODE = 3
PARTNERS_REGIONAL, PARTNERS_NATIONAL = 8, 2
STRANGER_CHANCE = 0.05
POLICY_THRESHOLD = 3
# Request line + headers, and status line + headers, of one HTTP exchange.
HTTP_OVERHEAD = 400
# Simulated round trips (s) within a region and across the country.
RTT_REGIONAL, RTT_NATIONAL = 0.008, 0.035
# With full mirroring this many nodes serve every log (and the as-built auditor checks
# every copy it is served: all N nodes would be N^2 copies).
AUDIT_SOURCES = 10
COMMAND = "python -m scripts.benchmarks.national"
MODES = ("all", "dealings")

NOTES = [
    "national: bytes are one node's HTTP traffic (both directions) for the exchanges the "
    "product makes per append, scaled to 10^6 events a day over 1,000 nodes; the idle "
    "polling of each member's /ledger/logs every replicate_interval is not counted.",
    "national: the listing a follower fetches on each notify names every log its node "
    "mirrors, so with full mirroring it dominates; without it, selective mirroring trades "
    "each append's entry for a consistency proof of about the same size, and saves the "
    "storage of the entries.",
    "national: the served checkpoint is counted with its log's signature and the "
    "policy's three cosignatures; as built a checkpoint carries at most 99 cosignatures "
    "(a signed note holds at most 100 signatures), the policy's witnesses kept first.",
]


def _rtt(a: int, b: int, regions: list[int]) -> float:
    base = RTT_REGIONAL if regions[a] == regions[b] else RTT_NATIONAL
    spread = hashlib.sha256(f"{min(a, b)}:{max(a, b)}".encode()).digest()[0] / 255
    return base * (0.8 + 0.45 * spread)


@dataclass
class SimNode:
    identity: NodeIdentity
    region: int
    partners: list[int]
    tree: MemoryTree = field(default_factory=MemoryTree)
    entries: list[bytes] = field(default_factory=list)
    entry_bytes: int = 0
    note: str = ""
    patients: list[PatientKey] = field(default_factory=list)
    grants: list[tuple[bytes, int, PatientKey]] = field(default_factory=list)  # token, grantee
    dealings: set[str] = field(default_factory=set)

    @property
    def origin(self) -> str:
        return self.identity.origin


@dataclass
class Traffic:
    """Bytes per node: ``everyone`` is what every node but the log's own was charged."""

    nodes: int
    everyone: float = 0.0
    own: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.own = [0.0] * self.nodes

    def broadcast(self, part: str, log: int, size: int) -> None:
        """Every other node receives ``size`` bytes from ``log``, which sends them all."""
        self.everyone += size
        self.own[log] += (self.nodes - 1) * size - size
        self.parts[part] = self.parts.get(part, 0.0) + size * 2 * (self.nodes - 1)

    def one(self, part: str, log: int, node: int, size: int) -> None:
        self.own[log] += size
        self.own[node] += size
        self.parts[part] = self.parts.get(part, 0.0) + 2 * size

    def per_node(self) -> list[float]:
        return [self.everyone + own for own in self.own]


class Federation:
    """The simulated nodes, the event stream, and what each mode costs."""

    def __init__(self, count: int, rng: random.Random) -> None:
        self.rng = rng
        regions = [i * REGIONS // count for i in range(count)]
        self.regions = regions
        by_region: dict[int, list[int]] = {}
        for i, r in enumerate(regions):
            by_region.setdefault(r, []).append(i)
        self.nodes: list[SimNode] = []
        for i in range(count):
            mates = [j for j in by_region[regions[i]] if j != i]
            others = [j for j in range(count) if regions[j] != regions[i]]
            partners = rng.sample(mates, min(PARTNERS_REGIONAL, len(mates)))
            partners += rng.sample(others, min(PARTNERS_NATIONAL, len(others)))
            identity = NodeIdentity(
                f"n{i:04d}.r{regions[i]:02d}.example/imageshare", rng.randbytes(32)
            )
            self.nodes.append(SimNode(identity, regions[i], partners))
        self.index = {n.origin: i for i, n in enumerate(self.nodes)}
        self.traffic = {mode: Traffic(count) for mode in MODES}
        self.mirrored_by: dict[int, set[int]] = {i: set() for i in range(count)}
        # Entry bytes stored in mirrors, summed over the nodes, per mode.
        self.stored = dict.fromkeys(MODES, 0.0)
        self.counting = False
        self.clock = 1_700_000_000
        self.appends = 0
        self.sizes = self._exchange_sizes()

    def _exchange_sizes(self) -> dict[str, int]:
        a, b = self.nodes[0], self.nodes[1]
        hint = json.dumps({"log_id": log_id(a.origin), "size": 123456}).encode()
        target = yarl.URL("https://b.example/p2p/notify")
        headers = node_signed_headers(a.identity, "POST", target, hint, b.origin)
        signed = sum(len(k) + len(v) + 4 for k, v in headers.items())
        row = LogInfo(a.origin, log_id(a.origin), a.identity.vkey, 123456, False, ZERO_HASH)
        body = Checkpoint(a.origin, 123456, ZERO_HASH).body()
        cosignature = cosign_checkpoint(body, b.identity, self.clock).line()
        return {
            "notify": len(hint) + signed + HTTP_OVERHEAD,
            "row": len(json.dumps(row.as_json())) + 2,
            "cosignature": len(cosignature),
        }

    # ---- the ledger ---------------------------------------------------------------------

    def append(self, i: int, body: entries.EntryBody) -> None:
        node = self.nodes[i]
        prev = leaf_hash(node.entries[-1]) if node.entries else ZERO_HASH
        self.clock += 1
        raw = entries.encode_entry(entries.LedgerEntry.of(prev, self.clock, body))
        old = node.tree.size
        node.entries.append(raw)
        node.entry_bytes += len(raw)
        node.tree.append(leaf_hash(raw))
        checkpoint = Checkpoint(node.origin, node.tree.size, node.tree.root())
        node.note = sign_note(checkpoint.body(), node.identity)
        self.appends += 1
        for origin in counterparts(raw, node.origin):
            self.start_dealing(i, self.index[origin])
        if self.counting:
            self._charge(i, old, raw)

    def start_dealing(self, node: int, log: int) -> None:
        """``node`` deals with ``log`` from now on: selective mode mirrors it from its start."""
        origin = self.nodes[log].origin
        if origin in self.nodes[node].dealings:
            return
        self.nodes[node].dealings.add(origin)
        self.mirrored_by[log].add(node)
        if self.counting:
            served = self.nodes[log]
            bundles = -(-len(served.entries) // 256)
            catch_up = served.entry_bytes + 2 * len(served.entries) + bundles * HTTP_OVERHEAD
            self.traffic["dealings"].one("entries", log, node, catch_up)
            self.stored["dealings"] += served.entry_bytes

    def _charge(self, i: int, old: int, raw: bytes) -> None:
        """The bytes of one append at log ``i`` (size ``old`` to ``old + 1``), per mode."""
        node, count = self.nodes[i], len(self.nodes)
        proof = consistency_proof(node.tree, old, old + 1) if old else []
        served_note = len(node.note) + POLICY_THRESHOLD * self.sizes["cosignature"]
        witness = len(encode_add_checkpoint(old, proof, node.note)) + HTTP_OVERHEAD
        answer = self.sizes["cosignature"] + HTTP_OVERHEAD
        proof_json = len(
            json.dumps({"old": old, "new": old + 1, "proof": [b64_encode(h) for h in proof]})
        )
        entry = len(raw) + 2 + HTTP_OVERHEAD  # a partial entry bundle
        self.stored["all"] += len(raw) * (count - 1)
        self.stored["dealings"] += len(raw) * len(self.mirrored_by[i])
        for mode, traffic in self.traffic.items():
            traffic.broadcast("witnessing", i, witness + answer)
            traffic.broadcast("notify", i, self.sizes["notify"])
            mirrored = count - 1 if mode == "all" else len(node.dealings)
            traffic.broadcast("listing", i, (1 + mirrored) * self.sizes["row"] + HTTP_OVERHEAD)
            traffic.broadcast("checkpoints", i, served_note + HTTP_OVERHEAD)
            if mode == "all":
                traffic.broadcast("entries", i, entry)
                continue
            traffic.broadcast("checkpoints", i, proof_json + HTTP_OVERHEAD)
            for reader in self.mirrored_by[i]:
                traffic.one("entries", i, reader, entry)
                traffic.one("checkpoints", i, reader, -(proof_json + HTTP_OVERHEAD))

    # ---- the events ---------------------------------------------------------------------

    def enroll_patients(self) -> None:
        for i, node in enumerate(self.nodes):
            for _ in range(PATIENTS_PER_NODE):
                patient = PatientKey.derive(self.rng.randbytes(32), node.origin)
                node.patients.append(patient)
                self.append(i, entries.Enroll(self.rng.randbytes(32), patient.public_key, None))

    def grantee_of(self, custodian: int) -> int:
        node = self.nodes[custodian]
        if self.rng.random() < STRANGER_CHANCE:
            other = self.rng.randrange(len(self.nodes) - 1)
            return other if other < custodian else other + 1
        # A skew among partners: the first ones are dealt with most.
        weights = [1 / (k + 1) for k in range(len(node.partners))]
        return self.rng.choices(node.partners, weights)[0]

    def event(self) -> None:
        roll = self.rng.random()
        c = self.rng.randrange(len(self.nodes))
        custodian = self.nodes[c]
        patient = self.rng.choice(custodian.patients)
        if roll < 0.4 or (roll < 0.9 and not custodian.grants):
            g = self.grantee_of(c)
            token = self._grant(patient, custodian.origin, self.nodes[g].origin)
            custodian.grants.append((token, g, patient))
            self.append(c, entries.Grant(token))
        elif roll < 0.8:
            token, g, _ = self.rng.choice(custodian.grants)
            study, digest = self.rng.randbytes(32), self.rng.randbytes(32)
            tid, instances = token_id_of(token), self.rng.randint(1, 900)
            size = instances * 520_000  # bytes sent: a CT slice is about half a megabyte
            grantee = self.nodes[g]
            # The grantee starts its fetch (and so its dealing) before the custodian sends.
            self.start_dealing(g, c)
            self.append(c, entries.Access(tid, study, instances, size, digest, grantee.origin))
            self.append(g, entries.Receipt(tid, study, instances, size, digest, custodian.origin))
        elif roll < 0.9:
            token, _, owner = custodian.grants.pop(self.rng.randrange(len(custodian.grants)))
            tid = token_id_of(token)
            revocation = sign_revocation(owner.public_key, tid, self.clock, owner.sign)
            self.append(c, entries.Revoke(revocation))
        else:
            link = link_grantee(self.rng.randbytes(32))
            self.append(c, entries.Grant(self._grant(patient, custodian.origin, link)))

    def _grant(self, patient: PatientKey, custodian: str, grantee: str) -> bytes:
        fields = GrantFields(
            patient_key=patient.public_key,
            custodian=custodian,
            grantee=grantee,
            scope=None,
            not_before=self.clock,
            expires=self.clock + 30 * 86400,
            nonce=self.rng.randbytes(16),
        )
        return sign_grant(fields, patient.sign)


# ---- witnessing --------------------------------------------------------------------------


def witnessed_times(fed: Federation, samples: int) -> list[float]:
    """For ``samples`` appends spread over the logs: seconds until the policy's threshold of
    witnesses cosigned (the log signs, every other node judges and cosigns for real)."""
    count = len(fed.nodes)
    keys = [[parse_vkey(n.identity.vkey)] for n in fed.nodes]
    held: dict[tuple[int, int], Witnessed] = {}
    times = []
    for s in range(samples):
        log = (s * 7919) % count
        node = fed.nodes[log]
        started = time.perf_counter()
        body = Checkpoint(node.origin, node.tree.size, node.tree.root()).body()
        note = sign_note(body, node.identity)
        signing = time.perf_counter() - started
        answers = []
        for w in range(count):
            if w == log:
                continue
            before = held.get((w, log))
            old = before.size if before is not None else 0
            proof = consistency_proof(node.tree, old, node.tree.size) if old else []
            request_body = encode_add_checkpoint(old, proof, note)
            started = time.perf_counter()
            request = parse_add_checkpoint(request_body)
            held[(w, log)] = judge(request, keys[log], before)
            cosign_checkpoint(request.checkpoint.body(), fed.nodes[w].identity, fed.clock)
            answers.append(time.perf_counter() - started + _rtt(log, w, fed.regions))
        times.append(signing + sorted(answers)[POLICY_THRESHOLD - 1])
        fed.append(log, entries.Enroll(fed.rng.randbytes(32), fed.rng.randbytes(32), None))
    return times


# ---- the auditor -------------------------------------------------------------------------


def _audit_in_child(fed: Federation, mode: str, results: Any) -> None:
    from node.services.audit import LogListing, PeerView, ServedLog, Workers, audit_views

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    views = []
    sources = fed.nodes[:AUDIT_SOURCES] if mode == "all" else fed.nodes
    for i, node in enumerate(sources):
        url = f"https://{node.origin.split('/')[0]}"
        held = [i] + [
            j
            for j in range(len(fed.nodes))
            if j != i and mirrors_log(mode, fed.nodes[j].origin, node.dealings, ())
        ]
        logs = []
        for j in held:
            served = fed.nodes[j]
            listing = LogListing(
                served.origin, log_id(served.origin), served.identity.vkey, len(served.entries)
            )
            logs.append(ServedLog(url, listing, served.note, served.entries))
        views.append(PeerView(url, node.origin, logs, []))
    workers = Workers()
    try:
        report, _ = audit_views(views, {}, fed.clock + 60, workers=workers)
    finally:
        workers.close()
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline
    copies = sum(len(v.logs) for v in views)
    results.send((seconds, peak_kb / 1024, len(views), copies, len(report.logs)))


def audit(fed: Federation, mode: str) -> tuple[float, float, int, int, int]:
    """Seconds, extra peak RSS (MB), nodes read, log copies and logs reported of one
    audit, in a fork."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_audit_in_child, args=(fed, mode, send))
    child.start()
    result = receive.recv()
    child.join()
    return result


# ---- the run -----------------------------------------------------------------------------


def simulate(count: int, events: int, samples: int) -> dict[str, Any]:
    rng = random.Random(SEED)
    fed = Federation(count, rng)
    started = time.perf_counter()
    fed.enroll_patients()
    for _ in range(events // 2):
        fed.event()
    fed.counting = True
    for _ in range(events - events // 2):
        fed.event()
    fed.counting = False
    simulated = time.perf_counter() - started
    measured_events = events - events // 2
    scale = DAY_EVENTS / measured_events
    result: dict[str, Any] = {"fed": fed, "simulated_s": simulated}
    for mode, traffic in fed.traffic.items():
        per_node = sorted(traffic.per_node())
        result[mode] = {
            "median": statistics.median(per_node) * scale,
            "p95": per_node[int(0.95 * (len(per_node) - 1))] * scale,
            "parts": {k: v * scale / count for k, v in traffic.parts.items()},
            "stored": fed.stored[mode] * scale / count,
        }
    dealt = [len(n.dealings) for n in fed.nodes]
    result["dealings_median"] = statistics.median(dealt)
    result["witnessed"] = witnessed_times(fed, samples)
    for mode in MODES:
        result[f"audit_{mode}"] = audit(fed, mode)
    return result


def _gb(value: float) -> float:
    return round(value / 1e9, 2)


def run(ctx: BenchContext) -> list[Row]:
    count, events, samples = (200, 2_000, 10) if ctx.quick else (1_000, 20_000, 40)
    result = simulate(count, events, samples)
    label = f"{count} nodes, {events} events"
    rows = []
    names = {"all": "full mirroring", "dealings": "selective (dealings)"}
    for mode in MODES:
        figures = result[mode]
        rows.append(
            Row(
                f"national ({label}): bytes per node per day at 10^6 events/day, "
                f"{names[mode]}, median GB",
                _gb(figures["median"]),
                command=COMMAND,
            )
        )
        rows.append(
            Row(
                f"national ({label}): bytes per node per day, {names[mode]}, p95 GB",
                _gb(figures["p95"]),
                command=COMMAND,
            )
        )
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in sorted(figures["parts"].items()))
        rows.append(
            Row(
                f"national ({label}): mean GB per node per day by exchange, {names[mode]}",
                parts,
                command=COMMAND,
            )
        )
    for mode in MODES:
        rows.append(
            Row(
                f"national ({label}): entries stored in mirrors per node per day, "
                f"{names[mode]}, mean MB",
                round(result[mode]["stored"] / 1e6, 1),
                command=COMMAND,
            )
        )
    without_listing = {
        mode: sum(v for k, v in result[mode]["parts"].items() if k != "listing") for mode in MODES
    }
    rows.append(
        Row(
            f"national ({label}): selective / full bytes per node per day, "
            "all exchanges but /ledger/logs listings (mean)",
            round(without_listing["dealings"] / without_listing["all"], 3),
            command=COMMAND,
        )
    )
    full, selective = result["all"]["median"], result["dealings"]["median"]
    rows.append(
        Row(
            f"national ({label}): selective / full bytes per node per day (median)",
            round(selective / full, 3),
            target="< 1",
            met=selective < full,
            command=COMMAND,
        )
    )
    rows.append(
        Row(
            f"national ({label}): logs a node deals with (median of nodes)",
            result["dealings_median"],
            command=COMMAND,
        )
    )
    witnessed = sorted(result["witnessed"])
    rows.append(
        Row(
            f"national ({label}): append witnessed by {POLICY_THRESHOLD} of {count - 1} "
            f"witnesses (same in both modes), median ms ({len(witnessed)} appends)",
            round(1000 * statistics.median(witnessed), 1),
            command=COMMAND,
        )
    )
    rows.append(
        Row(
            f"national ({label}): append witnessed by policy, max ms",
            round(1000 * witnessed[-1], 1),
            command=COMMAND,
        )
    )
    for mode in MODES:
        seconds, peak_mb, sources, copies, logs = result[f"audit_{mode}"]
        rows.append(
            Row(
                f"national ({label}): auditor (audit_views) over what {sources} nodes serve, "
                f"{names[mode]}: {copies} copies of {logs} logs, s",
                round(seconds, 1),
                peak_rss_mb=f"auditor +{peak_mb:.0f}",
                command=COMMAND,
            )
        )
    return rows


if __name__ == "__main__":
    from scripts.bench import run_standalone

    sys.exit(run_standalone(run))
