"""The auditor's rules: pure judgements over signed checkpoints and log entries.

Every finding is a Violation naming the log (its origin), the entry index when there is
one, and a stable rule name from RULES. The functions here read no clock and do no I/O
(the receipt ledger keeps its halves in the database its caller gives it): the caller
fetches the logs, passes ``now`` and the results of signature checks, and decides how to
report. A log's entries are walked once, in order, by walkers that keep only what the
rules need, so an audit's memory does not grow with the entries.

Consent decisions reuse node.core.consent.validate_token, the judgement custodians make
(validate_grant), fed with what the custodian's log said at the moment of each access.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, defaultdict
from collections.abc import (
    Callable,
    Container,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from dataclasses import astuple, dataclass, field
from typing import Any

import msgpack

from node.core.chain import LogChain
from node.core.consent import (
    MAX_TIME,
    OPINIONS,
    AccessRequest,
    ConsentPolicy,
    ConsentView,
    GrantToken,
    KeyStatus,
    Power,
    Revocation,
    Rule,
    decode_delegation,
    delegation_failure,
    is_link_grantee,
    power_failure,
)
from node.core.emergency import EmergencyPolicy, decode_policy, split_references
from node.core.entries import (
    Access,
    BreakGlass,
    Contribution,
    DelegationEntry,
    Denial,
    DeskDelegation,
    EmergencyPolicyEntry,
    Enroll,
    Grant,
    KeyRotation,
    LedgerEntry,
    Receipt,
    Revoke,
    Witness,
    decode_entry,
)
from node.core.key_rotation import KeyChain, chain_of_rotations, rotation_from_entry
from node.core.keys import VerifierKey
from node.core.merkle import LeafHashes, MerkleFrontier, leaf_hash
from node.core.notes import Checkpoint, parse_note, verify_cosignature, verify_note
from node.core.origins import log_id_bytes
from node.core.roster_document import RosterDocument
from node.errors import BadInput, Unauthorized

# Stable rule names: scripts match on these; never rename one.
RULES: dict[str, str] = {
    "bad_checkpoint_signature": "the checkpoint is not validly signed by the log's key",
    "bad_cosignature": "a cosignature by a known node does not verify",
    "key_mismatch": "a node serves the log under a key that is none of the log's keys",
    "bad_key_rotation": "a key rotation is not signed by the key in force and the new key "
    "(or, for a compromised key, not confirmed by the other members)",
    "entries_unavailable": "a node lists the log but does not serve all of it",
    "malformed_entry": "an entry (or the token in it) is not well-formed",
    "broken_chain": "an entry's prev is not the leaf hash of the entry before it",
    "root_mismatch": "the entries do not hash to the checkpoint's root",
    "rollback": "the log is smaller than the checkpoint the auditor verified last time",
    "fork": "the log does not extend the checkpoint the auditor verified last time",
    "split_view": "two nodes serve validly signed, inconsistent checkpoints of the log",
    "equivocation": "a node holds two validly signed, inconsistent checkpoints of the log",
    "witness_mismatch": "a node witnessed a checkpoint of a peer's log that is not its history",
    "time_out_of_order": "an entry is dated well before an entry that precedes it (backdated?)",
    "time_in_future": "an entry is dated after the time of the audit",
    "grant_bad_signature": "a recorded grant's patient signature does not verify",
    "grant_unenrolled_key": "a grant is signed by a key not enrolled (or retired) at that time",
    "grant_wrong_custodian": "a grant recorded in the log names another custodian",
    "revocation_bad_signature": "a revocation is not signed by the grant's patient key",
    "access_without_grant": "an access has no valid grant recorded before it",
    "access_unenrolled_key": "an access relies on a grant whose key was not enrolled or retired",
    "access_after_revocation": "an access happened after its grant was revoked",
    "access_outside_validity": "an access happened outside its grant's validity window",
    "access_wrong_grantee": "an access served a node the grant does not name",
    "access_out_of_scope": "an access served a study outside its grant's scope",
    "access_without_receipt": "an access has no matching receipt in the grantee's log",
    "receipt_without_access": "a receipt has no matching access in the custodian's log",
    "grant_outside_delegation": "a delegate's grant was recorded without a live delegation "
    "giving that power over those studies (not recorded before it, revoked, expired)",
    "revocation_outside_delegation": "a delegate's revocation was recorded without a live "
    "delegation giving the power to revoke that grant (or names no grant of the patient)",
    "emergency_policy_invalid": "an emergency policy is not signed by an enrolled, unretired "
    "key of the patient for this custodian",
    "break_glass_against_policy": "a break-glass access was served against the patient's "
    "emergency policy in force at that moment (or names another policy or key than that one)",
    "access_outside_break_glass": "an access under a break-glass request served another node, "
    "another study, or came before the request was recorded",
    "roster_invalid": "a node serves a federation roster log that does not verify",
    "roster_equivocation": "two validly signed roster versions share one version number",
    "key_not_in_roster": "a member acted under a key the roster of that time does not name",
    "contribution_without_permission": "an opinion was recorded on a link whose "
    "patient-signed grant does not allow opinions (no such link grant before it, no "
    "opinions permission, revoked, outside its validity, or a study outside its scope)",
}

# Findings about the history itself (its signatures, bytes, views across nodes and runs),
# as opposed to what its entries say. A log showing one is not saved as the next run's
# baseline, so it keeps being compared with the last good checkpoint and read whole;
# the other findings are judged again from the saved entries on every run.
HISTORY_RULES = frozenset(
    {
        "bad_checkpoint_signature",
        "bad_cosignature",
        "key_mismatch",
        "bad_key_rotation",
        "entries_unavailable",
        "malformed_entry",
        "broken_chain",
        "root_mismatch",
        "rollback",
        "fork",
        "split_view",
        "equivocation",
    }
)

# Consent's refusal rule -> the auditor's rule for an access that was served anyway.
ACCESS_RULES: dict[Rule, str] = {
    Rule.TAMPERED: "access_without_grant",
    Rule.BAD_SIGNATURE: "access_without_grant",
    Rule.WRONG_CUSTODIAN: "access_without_grant",
    Rule.NOT_RECORDED: "access_without_grant",
    Rule.UNKNOWN_PATIENT: "access_unenrolled_key",
    Rule.KEY_RETIRED: "access_unenrolled_key",
    Rule.LIFETIME_TOO_LONG: "access_outside_validity",
    Rule.NOT_YET_VALID: "access_outside_validity",
    Rule.EXPIRED: "access_outside_validity",
    Rule.REVOKED: "access_after_revocation",
    Rule.WRONG_GRANTEE: "access_wrong_grantee",
    Rule.OUT_OF_SCOPE: "access_out_of_scope",
    Rule.NOT_OWNER: "access_out_of_scope",
}

# Findings of one kind in one history beyond this many are summarised, not listed.
MAX_FINDINGS_PER_RULE = 50
KINDS_COUNTED = tuple(t.kind for t in (Enroll, Grant, Revoke, Access, Denial, Receipt))


@dataclass(frozen=True)
class Violation:
    """One broken rule: in which log, at which entry (if any), and what was seen."""

    log: str
    index: int | None
    rule: str
    detail: str
    source: str | None = None  # the node URL that served the evidence, when it matters

    def as_json(self) -> dict[str, object]:
        return {
            "log": self.log,
            "index": self.index,
            "rule": self.rule,
            "detail": self.detail,
            "source": self.source,
        }


@dataclass(frozen=True)
class CosignatureStatus:
    """One signature on a checkpoint other than the log's own."""

    name: str
    status: str  # "valid", "invalid" or "unknown" (no key known for that name)
    timestamp: int | None = None


@dataclass
class History:
    """One log as one node served it, after the structural checks.

    ``checkpoint`` is None when its signature did not verify (nothing else is trusted
    then). ``intact`` means every entry decoded, the chain holds and the root matches.
    Its entries are not held, nor (from a spooled copy) their leaf hashes: those are
    hashed again from the copy only when comparing copies or checking a prefix needs
    them (Leaves); the consent rules judged the entries as they streamed past.
    """

    origin: str
    source: str
    note: str
    checkpoint: Checkpoint | None
    leaves: Leaves = field(default_factory=lambda: Leaves(LeafHashes()))
    intact: bool = False
    cosignatures: list[CosignatureStatus] = field(default_factory=list)
    # The log's keys as its entries prove them, and the one that signed this checkpoint.
    chain: KeyChain | None = None
    signing_key: VerifierKey | None = None
    # The right edge of the entries walked (check_history's), kept with a saved state.
    edge: LogChain | None = None

    @property
    def size(self) -> int:
        return 0 if self.checkpoint is None else self.checkpoint.size

    @property
    def leaf_hashes(self) -> LeafHashes:
        return self.leaves.hashes()

    def prefix_root(self, size: int) -> bytes:
        """The root of this history's first ``size`` entries (an intact history only)."""
        return self.leaves.root(size)


class Leaves:
    """A copy's leaf hashes: held, or hashed again from the copy's entries (``reread``)
    when first asked for, and roots of prefixes known without them (``known``)."""

    def __init__(
        self,
        hashes: LeafHashes | None = None,
        reread: Callable[[], Iterable[bytes]] | None = None,
        known: Mapping[int, bytes] | None = None,
    ) -> None:
        self._hashes, self._reread = hashes, reread
        self.known = dict(known or {})

    def hashes(self) -> LeafHashes:
        if self._hashes is None:
            self._hashes = LeafHashes()
            for raw in self._reread() if self._reread is not None else ():
                self._hashes.append(leaf_hash(raw))
        return self._hashes

    def root(self, size: int) -> bytes:
        known = self.known.get(size)
        return known if known is not None else self.hashes().root(size)


class _Findings:
    """Violations of one history, capped per rule so a shifted log does not flood a report."""

    def __init__(self, origin: str, source: str | None) -> None:
        self.origin, self.source = origin, source
        self.found: list[Violation] = []
        self.counts: Counter[str] = Counter()

    def add(self, rule: str, index: int | None, detail: str) -> None:
        self.counts[rule] += 1
        if self.counts[rule] <= MAX_FINDINGS_PER_RULE:
            self.found.append(Violation(self.origin, index, rule, detail, self.source))

    def done(self) -> list[Violation]:
        summaries = [
            Violation(
                self.origin,
                None,
                rule,
                f"and {count - MAX_FINDINGS_PER_RULE} more like it",
                self.source,
            )
            for rule, count in self.counts.items()
            if count > MAX_FINDINGS_PER_RULE
        ]
        return self.found + summaries

    def state(self) -> list[Any]:
        """What the findings so far are, as msgpack holds it (``restore`` takes it back)."""
        return [[violation_state(v) for v in self.found], dict(self.counts)]

    def restore(self, state: list[Any]) -> None:
        found, counts = state
        self.found = [Violation(*v) for v in found]
        self.counts = Counter(counts)


def violation_state(violation: Violation) -> list[Any]:
    """A violation as msgpack holds it (``Violation(*state)`` takes it back)."""
    v = violation
    return [v.log, v.index, v.rule, v.detail, v.source]


# -- structure: signatures, chain, roots --------------------------------------------------


# Called with each entry of a copy as check_history walks it (None: it does not decode).
EntryObserver = Callable[[int, LedgerEntry | None], None]


@dataclass(frozen=True)
class Walked:
    """Where check_history left a verified prefix of a log (a previous audit): its chain's
    right edge and its key rotations, to walk only what follows."""

    chain: LogChain
    rotations: tuple[tuple[int, LedgerEntry], ...]


def check_history(
    origin: str,
    vkey: VerifierKey,
    source: str,
    note: str,
    raw_entries: Iterable[bytes],
    decode: Callable[[bytes], LedgerEntry] = decode_entry,
    confirmed_key: bytes | None = None,
    observe: EntryObserver | None = None,
    resume: Walked | None = None,
    reread: Callable[[], Iterable[bytes]] | None = None,
) -> tuple[History, list[Violation]]:
    """Verify one served log: its key chain, checkpoint signature, every entry, the chain, the root.

    ``vkey`` is the key the auditor trusts for the log (pinned, or served by its node);
    the checkpoint must be signed by the key in force at its size, which the log's own
    key_rotation entries lead to from a chain holding ``vkey`` (node.core.key_rotation;
    ``confirmed_key``, the key the other members pin, confirms a compromised-key
    rotation). ``decode`` must raise BadInput for a malformed entry. The entries are
    walked once, in order, and not kept: ``observe`` sees each (the consent rules judge
    the copy as it streams past). ``reread`` gives the whole copy again (a spool): its
    leaf hashes are then not kept but hashed again if needed. With ``resume``,
    ``raw_entries`` are the entries after that verified prefix, which is not walked
    again; ``reread`` must then be given.
    """
    findings = _Findings(origin, source)
    history = History(origin, source, note, None)
    try:
        claimed = Checkpoint.parse(parse_note(note)[0])
    except BadInput as exc:
        findings.add("bad_checkpoint_signature", None, str(exc))
        return history, findings.done()
    if resume is not None and reread is None:
        raise ValueError("a resumed walk needs the copy's entries to hash again")
    log_chain = LogChain() if resume is None else resume.chain.copy()
    leaves = LeafHashes()
    rotation_entries = [] if resume is None else list(resume.rotations)
    for raw in raw_entries:  # one Link at a time: a log may hold millions
        link = log_chain.append(raw, decode)
        if reread is None:
            leaves.append(link.leaf)
        if observe is not None:
            observe(link.index, link.entry)
        if link.entry is not None and link.entry.kind == KeyRotation.kind:
            rotation_entries.append((link.index, link.entry))
        if link.error is not None:
            findings.add("malformed_entry", link.index, str(link.error))
        elif not link.chains:
            findings.add(
                "broken_chain", link.index, "prev is not the leaf hash of the entry before it"
            )
    served = log_chain.size
    try:
        rotations = [(i, rotation_from_entry(e)) for i, e in rotation_entries if i < claimed.size]
        chain = chain_of_rotations(origin, rotations, vkey.public_key, confirmed_key)
    except (BadInput, Unauthorized) as exc:
        findings.add("bad_key_rotation", None, str(exc))
        return history, findings.done()
    signing_key = chain.verifier_key_at(claimed.size)
    try:
        checkpoint = verify_note(note, signing_key)
    except (BadInput, Unauthorized) as exc:
        findings.add("bad_checkpoint_signature", None, str(exc))
        return history, findings.done()
    history.checkpoint, history.chain, history.signing_key = checkpoint, chain, signing_key
    if served != checkpoint.size:
        findings.add(
            "entries_unavailable",
            served,
            f"served {served} entries for a checkpoint of {checkpoint.size}",
        )
        return history, findings.done()
    if not log_chain.gives_root_of(checkpoint):
        findings.add(
            "root_mismatch", None, f"entries 0..{checkpoint.size - 1} do not hash to the root"
        )
    known = {checkpoint.size: log_chain.root()}
    if resume is not None:
        known[resume.chain.size] = resume.chain.root()
    history.leaves = Leaves(leaves, known=known) if reread is None else Leaves(None, reread, known)
    history.intact, history.edge = not findings.counts, log_chain
    return history, findings.done()


def check_same_copy(
    verified: History,
    source: str,
    note: str,
    raw_entries: Iterable[bytes],
    resume: LogChain | None = None,
) -> History | None:
    """Another node's copy of a history already verified intact, checked without judging
    its entries again; None if it is not provably the same (check_history then judges it).

    Equal roots of equal sizes mean equal entries, so a copy whose checkpoint is validly
    signed for the verified size and root, and whose entries hash to that root, shares
    the verified history's entries, chain and keys; only its cosignatures are its own.
    The entries are only hashed as they stream past, never kept; with ``resume`` (the
    chain of a verified prefix), ``raw_entries`` are those after it.
    """
    if not verified.intact or verified.checkpoint is None or verified.signing_key is None:
        return None
    try:
        checkpoint = verify_note(note, verified.signing_key)
    except (BadInput, Unauthorized):
        return None
    same = (checkpoint.size, checkpoint.root_hash) == (verified.size, verified.checkpoint.root_hash)
    if not same:
        return None
    frontier = MerkleFrontier() if resume is None else resume.frontier.copy()
    for raw in raw_entries:
        frontier.push(leaf_hash(raw))
    if frontier.size != checkpoint.size or frontier.root() != checkpoint.root_hash:
        return None
    copy = History(verified.origin, source, note, checkpoint, verified.leaves)
    copy.intact, copy.chain = True, verified.chain
    copy.signing_key = verified.signing_key
    return copy


def check_cosignatures(
    history: History, keys_by_name: Mapping[str, Sequence[VerifierKey]]
) -> list[Violation]:
    """Record who cosigned the history's checkpoint; a known node's bad cosignature violates.

    ``keys_by_name`` holds every key of each node (a witness may have cosigned before or
    after its own key rotated); a cosignature by any of them is valid.
    """
    log_key = history.signing_key
    if history.checkpoint is None or log_key is None:
        return []
    body, signatures = parse_note(history.note)
    violations = []
    for sig in signatures:
        if sig.name == log_key.name and sig.key_id == log_key.key_id:
            continue
        keys = keys_by_name.get(sig.name)
        if not keys:
            history.cosignatures.append(CosignatureStatus(sig.name, "unknown"))
            continue
        verified = (verify_cosignature(body, sig, key) for key in keys)
        timestamp = next((t for t in verified if t is not None), None)
        if timestamp is None:
            history.cosignatures.append(CosignatureStatus(sig.name, "invalid"))
            violations.append(
                Violation(
                    history.origin,
                    None,
                    "bad_cosignature",
                    f"the cosignature of {sig.name} does not verify",
                    history.source,
                )
            )
        else:
            history.cosignatures.append(CosignatureStatus(sig.name, "valid", timestamp))
    return violations


def first_difference(a: Sequence[bytes], b: Sequence[bytes]) -> int | None:
    """The first index where two lists of leaf hashes differ, or None if one prefixes the other."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None


def _inconsistent(older: History, newer: History) -> bool:
    """True if the two signed checkpoints cannot both be views of one append-only log."""
    assert older.checkpoint is not None and newer.checkpoint is not None
    if older.size == newer.size:
        return older.checkpoint.root_hash != newer.checkpoint.root_hash
    if newer.intact:
        return newer.prefix_root(older.size) != older.checkpoint.root_hash
    # The newer view's entries are broken (reported already); its prefix proves nothing.
    return False


def check_split_view(histories: Sequence[History]) -> list[Violation]:
    """One violation per pair of nodes serving inconsistent signed checkpoints of a log."""
    signed = sorted((h for h in histories if h.checkpoint is not None), key=lambda h: h.size)
    violations = []
    for i, older in enumerate(signed):
        for newer in signed[i + 1 :]:
            if _inconsistent(older, newer):
                index = first_difference(older.leaf_hashes, newer.leaf_hashes)
                violations.append(
                    Violation(
                        older.origin,
                        index,
                        "split_view",
                        f"{older.source} serves size {older.size} and {newer.source} size "
                        f"{newer.size}, both signed, not one history",
                        newer.source,
                    )
                )
    return violations


def check_against_saved(history: History, saved_size: int, saved_root: bytes) -> list[Violation]:
    """Rollback or fork of a served log relative to the checkpoint verified last time."""
    if history.checkpoint is None:
        return []
    if history.size < saved_size:
        return [
            Violation(
                history.origin,
                history.size,
                "rollback",
                f"size {history.size} is below the size {saved_size} verified last time",
                history.source,
            )
        ]
    if history.size == saved_size:
        forked = history.checkpoint.root_hash != saved_root
    elif history.intact:
        forked = history.prefix_root(saved_size) != saved_root
    else:
        return []
    if not forked:
        return []
    return [
        Violation(
            history.origin,
            None,
            "fork",
            f"its first {saved_size} entries differ from the checkpoint verified last time",
            history.source,
        )
    ]


def witness_claim(entry: LedgerEntry | None, audited: Container[bytes]) -> Witness | None:
    """The checkpoint a ``witness`` entry names, if it is of a log audited (by log id);
    only those are kept for check_witness_entries."""
    if entry is None or not isinstance(witness := entry.body, Witness):
        return None
    return witness if witness.log_id in audited else None


def check_witness_entries(
    histories: Mapping[str, History], claims: Mapping[str, Sequence[tuple[int, Witness]]]
) -> list[Violation]:
    """Every ``witness`` entry must name a checkpoint of the witnessed log's history.

    A node that recorded witnessing (size, root) of a peer's log saw that checkpoint
    signed; if the intact history the auditor holds has another root at that size, the
    peer showed that node another history. Checkpoints beyond what the auditor holds, or
    of logs it did not see, are not judged. ``claims``: by log, the (index, entry) of
    its witness entries (witness_claim).
    """
    by_log_id = {log_id_bytes(origin): h for origin, h in histories.items()}
    judged: list[tuple[str, int, Witness, History]] = []
    for origin in sorted(claims):
        for index, witness in claims[origin]:
            witnessed = by_log_id.get(witness.log_id)
            if witnessed is not None and witnessed.intact and witness.size <= witnessed.size:
                judged.append((origin, index, witness, witnessed))
    sizes: dict[str, list[int]] = defaultdict(list)
    for _, _, witness, witnessed in judged:
        sizes[witnessed.origin].append(witness.size)
    for origin, wanted in sizes.items():  # each witnessed log's prefixes in one pass
        by_log_id[log_id_bytes(origin)].leaf_hashes.roots(wanted)
    violations = []
    for origin, index, witness, witnessed in judged:
        if witnessed.prefix_root(witness.size) != witness.root:
            violations.append(
                Violation(
                    origin,
                    index,
                    "witness_mismatch",
                    f"witnessed {witnessed.origin} at size {witness.size} with another root",
                )
            )
    return violations


class EntryTimes:
    """Entry times must not go back by more than ``tolerance`` nor lie in the future.

    Consent is judged at each entry's time, which its own node writes; a log whose
    times run backwards could backdate an access into a grant's window. Concurrent
    appends may commit a little out of time order, hence the tolerance. Fed the
    entries of one log in order.
    """

    def __init__(self, origin: str, source: str | None, now: int, tolerance: int) -> None:
        self.findings = _Findings(origin, source)
        self.now, self.tolerance = now, tolerance
        self.latest = 0

    def feed(self, index: int, entry: LedgerEntry) -> None:
        if entry.time < self.latest - self.tolerance:
            detail = f"dated {self.latest - entry.time} s before an earlier entry"
            self.findings.add("time_out_of_order", index, detail)
        if entry.time > self.now + self.tolerance:
            detail = f"dated {entry.time - self.now} s after the audit"
            self.findings.add("time_in_future", index, detail)
        self.latest = max(self.latest, entry.time)

    def done(self) -> list[Violation]:
        return self.findings.done()

    def state(self) -> list[Any]:
        return [self.findings.state(), self.latest]

    def restore(self, state: list[Any]) -> None:
        findings, self.latest = state
        self.findings.restore(findings)


# -- consent ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureChecks:
    """Results of the patient-signature checks, done beforehand (possibly in parallel).

    Keyed by the token or revocation bytes; a value None means it did not decode.
    """

    grants: Mapping[bytes, GrantToken | None]
    grants_valid: frozenset[bytes]
    revocations: Mapping[bytes, Revocation | None]
    revocations_valid: frozenset[bytes]


@dataclass(frozen=True)
class AccessCheck:
    """One access to judge with consent.validate_token, and the log state at that moment."""

    log: str
    index: int
    token: GrantToken  # decoded once, with its signature checked once, for all its accesses
    request: AccessRequest
    view: ConsentView
    policy: ConsentPolicy


def signed_items(entries: Sequence[LedgerEntry | None]) -> tuple[list[bytes], list[bytes]]:
    """The grant tokens and revocations a log carries, for the signature checks."""
    grants, revocations = [], []
    for entry in entries:
        if entry is None:
            continue
        match entry.body:
            case Grant(token=token):
                grants.append(token)
            case Revoke(revocation=revocation):
                revocations.append(revocation)
    return grants, revocations


def count_kinds(counts: Mapping[str, int]) -> dict[str, int]:
    """How many entries of each reported kind a log holds, from its count by kind."""
    return {kind: counts.get(kind, 0) for kind in KINDS_COUNTED}


def plan_consent_checks(
    origin: str, entries: Sequence[LedgerEntry | None], signatures: SignatureChecks, clock_skew: int
) -> tuple[list[Violation], list[AccessCheck]]:
    """Walk one custodian's log in order: judge its grants and revocations, plan its accesses
    (ConsentWalk over a whole log at once)."""
    walk = ConsentWalk(origin, clock_skew)
    checks = [c for i, e in enumerate(entries) if (c := walk.feed(i, e, signatures)) is not None]
    return walk.findings.done(), checks


class ConsentWalk:
    """One custodian's log walked in order: its grants and revocations judged, its
    accesses planned, each with a ConsentView holding only what the log said before it.

    The auditor cannot see which studies belong to which patient (references are keyed
    by the custodian), so ownership is taken as the log shows it, and the custodian's
    maximum lifetime is not known: neither is judged here. What the walk remembers grows
    with the patients, not the entries: the grants and enrolled keys (``grants`` and
    ``keys`` may keep them on disk), revocations, delegations and break-glass requests.
    """

    def __init__(
        self,
        origin: str,
        clock_skew: int,
        grants: MutableMapping[bytes, GrantToken] | None = None,
        keys: MutableMapping[bytes, KeyStatus] | None = None,
    ) -> None:
        self.origin = origin
        self.findings = _Findings(origin, None)
        self.keys: MutableMapping[bytes, KeyStatus] = {} if keys is None else keys
        self.grants: MutableMapping[bytes, GrantToken] = {} if grants is None else grants
        # Grant ids whose recorded token does not verify (rare; all others do).
        self.unsigned: set[bytes] = set()
        self.revoked: set[tuple[bytes, bytes]] = set()
        self.policy = ConsentPolicy(origin, max_lifetime=MAX_TIME, clock_skew=clock_skew)
        self.clock_skew = clock_skew
        self.emergencies: dict[bytes, BreakGlass] = {}
        self.delegations: set[bytes] = set()

    def feed(
        self, index: int, entry: LedgerEntry | None, signatures: SignatureChecks
    ) -> AccessCheck | None:
        """Judge the next entry; an access comes back as the check to run on it.
        ``signatures`` must hold the results for this entry's grant or revocation."""
        if entry is None:
            return None
        body = entry.body
        origin, findings, keys, grants = self.origin, self.findings, self.keys, self.grants
        if isinstance(body, BreakGlass):
            self.emergencies.setdefault(body.request, body)
        elif isinstance(body, DelegationEntry | DeskDelegation):
            self.delegations |= _signed_delegation_id(body)
        elif isinstance(body, Enroll):
            keys[body.key] = KeyStatus(body.subject)
            if body.replaces is not None:
                old = keys.get(body.replaces)
                keys[body.replaces] = KeyStatus(body.subject if old is None else old.subject, True)
        elif isinstance(body, Grant):
            _judge_grant(
                origin, index, body.token, keys, grants, self.unsigned, signatures, findings
            )
            token = signatures.grants.get(body.token)
            if token is not None and token.delegation is not None:
                view = ConsentView(
                    revoked=frozenset(self.revoked), delegations=frozenset(self.delegations)
                )
                refused = delegation_failure(token, view, self.policy, entry.time)
                if refused is not None:
                    detail = f"its delegation fails the rule '{refused.value}' when recorded"
                    findings.add("grant_outside_delegation", index, detail)
        elif isinstance(body, Revoke):
            _judge_revocation(index, body.revocation, grants, self.revoked, signatures, findings)
            _judge_delegated_revocation(
                index,
                entry.time,
                body.revocation,
                grants,
                self.revoked,
                self.delegations,
                self.policy,
                signatures,
                findings,
            )
        elif isinstance(body, Access):
            return self._plan_access(index, entry.time, body)
        elif isinstance(body, Contribution):
            problem = contribution_problem(
                body, entry.time, grants, self.unsigned, self.revoked, self.clock_skew
            )
            if problem is not None:
                findings.add("contribution_without_permission", index, problem)
        return None

    def state(self) -> list[Any]:
        """The walk's state besides ``grants`` and ``keys``, as msgpack holds it."""
        emergencies = [[r, b.wire_fields()] for r, b in self.emergencies.items()]
        return [
            self.findings.state(),
            sorted(self.unsigned),
            sorted([list(pair) for pair in self.revoked]),
            emergencies,
            sorted(self.delegations),
        ]

    def restore(self, state: list[Any]) -> None:
        findings, unsigned, revoked, emergencies, delegations = state
        self.findings.restore(findings)
        self.unsigned = set(unsigned)
        self.revoked = {(key, token_id) for key, token_id in revoked}
        self.emergencies = {request: BreakGlass(**fields) for request, fields in emergencies}
        self.delegations = set(delegations)

    def _plan_access(self, index: int, time: int, body: Access) -> AccessCheck | None:
        token = self.grants.get(body.token_id)
        if token is None and body.token_id in self.emergencies:
            problem = break_glass_access_problem(body, self.emergencies[body.token_id])
            if problem is not None:
                self.findings.add("access_outside_break_glass", index, problem)
            return None
        if token is None:
            self.findings.add(
                "access_without_grant", index, "no grant with this token id before it"
            )
            return None
        key = self.keys.get(token.patient_key)
        owned = frozenset(token.fields.scope or ()) | {body.study}
        pair = (token.patient_key, token.token_id)
        view = ConsentView(
            keys={} if key is None else {token.patient_key: key},
            studies_of_subject={} if key is None else {key.subject: owned},
            revoked=frozenset({pair} & self.revoked),
            recorded=frozenset({token.token_id}),
        )
        request = AccessRequest(body.grantee, (body.study,), time)
        return AccessCheck(self.origin, index, token, request, view, self.policy)


def contribution_problem(
    body: Contribution,
    time: int,
    grants: Mapping[bytes, GrantToken],
    unsigned: Container[bytes],
    revoked: set[tuple[bytes, bytes]],
    clock_skew: int,
) -> str | None:
    """Why the link grant a ``contribution`` names did not allow it when it was recorded
    (only grants and revocations recorded before it are passed, ``unsigned`` the ids of
    those whose signature does not verify), or None."""
    token = grants.get(body.token_id)
    if token is None:
        return "no grant with this token id before it"
    fields = token.fields
    if token.token_id in unsigned:
        return "its grant's patient signature does not verify"
    if not is_link_grantee(fields.grantee):
        return "its grant is not a share link's"
    if not fields.permits(OPINIONS):
        return "its link's grant was not signed with the opinions permission"
    if (token.patient_key, token.token_id) in revoked:
        return "its link was revoked before it"
    if not fields.not_before - clock_skew <= time <= fields.expires + clock_skew:
        return "it was recorded outside its link's validity window"
    if fields.scope is not None and body.study not in fields.scope:
        return "its study is outside its link's scope"
    return None


def _signed_delegation_id(body: DelegationEntry | DeskDelegation) -> set[bytes]:
    """The id of a recorded delegation whose patient signature verifies (else nothing)."""
    try:
        delegation = decode_delegation(body.delegation)
    except BadInput:
        return set()
    return {delegation.delegation_id} if delegation.signature_valid() else set()


def _judge_grant(
    origin: str,
    index: int,
    raw: bytes,
    keys: Mapping[bytes, KeyStatus],
    grants: MutableMapping[bytes, GrantToken],
    unsigned: set[bytes],
    signatures: SignatureChecks,
    findings: _Findings,
) -> None:
    token = signatures.grants.get(raw)
    if token is None:
        findings.add("malformed_entry", index, "the grant's token is not a well-formed grant")
        return
    if token.token_id not in grants:  # the first grant of an id is the one in force
        grants[token.token_id] = token
        if raw not in signatures.grants_valid:
            unsigned.add(token.token_id)
    if raw not in signatures.grants_valid:
        findings.add("grant_bad_signature", index, "the patient signature does not verify")
    elif token.fields.custodian != origin:
        findings.add("grant_wrong_custodian", index, f"names custodian {token.fields.custodian}")
    elif token.patient_key not in keys:
        findings.add("grant_unenrolled_key", index, "its key was not enrolled before it")
    elif keys[token.patient_key].retired:
        findings.add("grant_unenrolled_key", index, "its key was retired before it")


def _judge_revocation(
    index: int,
    raw: bytes,
    grants: Mapping[bytes, GrantToken],
    revoked: set[tuple[bytes, bytes]],
    signatures: SignatureChecks,
    findings: _Findings,
) -> None:
    revocation = signatures.revocations.get(raw)
    if revocation is None:
        findings.add("malformed_entry", index, "the revocation is not well-formed")
        return
    grant = grants.get(revocation.token_id)
    if raw not in signatures.revocations_valid:
        findings.add("revocation_bad_signature", index, "the patient signature does not verify")
    elif grant is not None and grant.patient_key != revocation.patient_key:
        findings.add("revocation_bad_signature", index, "signed by another key than the grant's")
    else:
        revoked.add((revocation.patient_key, revocation.token_id))


def _judge_delegated_revocation(
    index: int,
    time: int,
    raw: bytes,
    grants: Mapping[bytes, GrantToken],
    revoked: set[tuple[bytes, bytes]],
    delegations: set[bytes],
    policy: ConsentPolicy,
    signatures: SignatureChecks,
    findings: _Findings,
) -> None:
    """A delegate's revocation, judged by the custodian's rule on the log before it."""
    revocation = signatures.revocations.get(raw)
    if revocation is None or revocation.delegation is None:
        return
    grant = grants.get(revocation.token_id)
    if grant is None or grant.patient_key != revocation.patient_key:
        findings.add("revocation_outside_delegation", index, "it names no grant of the patient")
        return
    view = ConsentView(revoked=frozenset(revoked), delegations=frozenset(delegations))
    rule = power_failure(
        revocation.delegation, Power.REVOKE, grant.fields.scope, view, policy, time
    )
    if rule is not None:
        detail = f"its delegation fails the rule '{rule.value}' when recorded"
        findings.add("revocation_outside_delegation", index, detail)


def access_violation(check: AccessCheck, refused: Rule | None) -> Violation | None:
    """The violation for an access that validate_token refused with ``refused`` (or None)."""
    if refused is None:
        return None
    return Violation(
        check.log,
        check.index,
        ACCESS_RULES.get(refused, "access_without_grant"),
        f"its grant fails the consent rule '{refused.value}' at the time of the access",
    )


# -- break-glass ------------------------------------------------------------------------------


def break_glass_access_problem(access: Access, served: BreakGlass) -> str | None:
    """Why an access under a recorded break-glass request is not covered by it, or None.

    Only requests recorded before the access are passed (the planner walks in order).
    """
    if access.grantee != served.requester:
        return f"served {access.grantee}, but the emergency request was {served.requester}'s"
    try:
        studies = split_references(served.studies)
    except BadInput:
        return "its break_glass entry lists no whole study references"
    if access.study not in studies:
        return "served a study the break_glass entry does not list"
    return None


@dataclass(frozen=True)
class BreakGlassReview:
    """One break-glass access for an auditor's review; ``problems`` flag a broken policy."""

    log: str
    index: int
    time: int
    requester: str
    reason: str
    policy: str
    default_policy: bool
    studies: int
    problems: tuple[str, ...]

    def as_json(self) -> dict[str, object]:
        return {
            "log": self.log,
            "index": self.index,
            "time": self.time,
            "requester": self.requester,
            "reason": self.reason,
            "policy": self.policy,
            "default_policy": self.default_policy,
            "studies": self.studies,
            "flagged": bool(self.problems),
            "problems": list(self.problems),
        }


@dataclass
class _PolicyInForce:
    index: int
    policy: EmergencyPolicy


class BreakGlassWalk:
    """Every break-glass entry of one custodian's log, judged against the policy in force.

    The policy in force is the last valid ``emergency_policy`` signed, before the entry,
    by the patient's key enrolled then (the subject's newest unretired key). Without one,
    the federation default applied: the auditor does not know it, so the entry is listed
    for review but only flagged if it claims a policy the log does not show in force.
    Fed the entries of the log in order; ``active`` and ``holders`` (which may keep them
    on disk) follow each subject's newest key and how many subjects hold each key.
    """

    def __init__(
        self,
        origin: str,
        active: MutableMapping[bytes, bytes] | None = None,
        holders: MutableMapping[bytes, int] | None = None,
    ) -> None:
        self.origin = origin
        self.findings = _Findings(origin, None)
        self.reviews: list[BreakGlassReview] = []
        self.active: MutableMapping[bytes, bytes] = {} if active is None else active
        self.holders: MutableMapping[bytes, int] = {} if holders is None else holders
        self.retired: set[bytes] = set()
        self.policies: dict[bytes, _PolicyInForce] = {}

    def feed(self, index: int, entry: LedgerEntry) -> None:
        body = entry.body
        if isinstance(body, Enroll):
            if body.replaces is not None:
                self.retired.add(body.replaces)
            before = self.active.get(body.subject)
            if before is not None:
                self.holders[before] -= 1
            self.active[body.subject] = body.key
            self.holders[body.key] = self.holders.get(body.key, 0) + 1
        elif isinstance(body, EmergencyPolicyEntry):
            policy = _valid_policy(self.origin, body.policy, self._enrolled)
            if isinstance(policy, str):
                self.findings.add("emergency_policy_invalid", index, policy)
            else:
                self.policies[policy.patient_key] = _PolicyInForce(index, policy)
        elif isinstance(body, BreakGlass):
            key = self.active.get(body.subject)
            in_force = None if key is None else self.policies.get(key)
            problems = _break_glass_problems(body, key, in_force)
            for problem in problems:
                self.findings.add("break_glass_against_policy", index, problem)
            try:
                count = len(split_references(body.studies))
            except BadInput:
                count = 0
            self.reviews.append(
                BreakGlassReview(
                    self.origin,
                    index,
                    entry.time,
                    body.requester,
                    body.reason,
                    body.policy,
                    body.policy_index is None,
                    count,
                    tuple(problems),
                )
            )

    def _enrolled(self, key: bytes) -> bool:
        """Whether ``key`` is some subject's newest key and not retired."""
        return self.holders.get(key, 0) > 0 and key not in self.retired

    def done(self) -> tuple[list[BreakGlassReview], list[Violation]]:
        return self.reviews, self.findings.done()

    def state(self) -> list[Any]:
        """The walk's state besides ``active`` and ``holders``, as msgpack holds it."""
        reviews = [[*astuple(r)[:8], list(r.problems)] for r in self.reviews]
        policies = [[key, p.index, p.policy.raw] for key, p in self.policies.items()]
        return [self.findings.state(), reviews, sorted(self.retired), policies]

    def restore(self, state: list[Any]) -> None:
        findings, reviews, retired, policies = state
        self.findings.restore(findings)
        self.reviews = []
        for log, index, time, requester, reason, policy, default, studies, problems in reviews:
            self.reviews.append(
                BreakGlassReview(
                    log, index, time, requester, reason, policy, default, studies, tuple(problems)
                )
            )
        self.retired = set(retired)
        self.policies = {
            key: _PolicyInForce(index, decode_policy(raw)) for key, index, raw in policies
        }


def _valid_policy(
    origin: str, raw: bytes, enrolled: Callable[[bytes], bool]
) -> EmergencyPolicy | str:
    """The policy, or why it does not count."""
    try:
        policy = decode_policy(raw)
    except BadInput as exc:
        return f"not a well-formed emergency policy: {exc}"
    if not policy.signature_valid():
        return "the patient signature does not verify"
    if policy.custodian != origin:
        return f"names custodian {policy.custodian}"
    if not enrolled(policy.patient_key):
        return "its key was not enrolled (or was retired) before it"
    return policy


def _break_glass_problems(
    body: BreakGlass, key: bytes | None, in_force: _PolicyInForce | None
) -> list[str]:
    problems = []
    if body.patient_key != key:
        problems.append("names another key than the patient's enrolled key at that moment")
    if in_force is None:
        if body.policy_index is not None:
            problems.append("names a policy entry, but no valid policy of the patient was in force")
        return problems
    if body.policy_index != in_force.index:
        problems.append(f"does not name the policy in force (entry {in_force.index})")
    if not in_force.policy.allows(body.requester):
        choice = in_force.policy.choice.value
        problems.append(
            f"the patient's policy at entry {in_force.index} ({choice}) does not allow"
            f" {body.requester}"
        )
    return problems


# -- two-sided accountability ---------------------------------------------------------------


def match_receipts(
    logs: Mapping[str, Sequence[LedgerEntry | None]], now: int, grace: int
) -> list[Violation]:
    """ReceiptLedger over whole logs at once."""
    ledger = ReceiptLedger(sqlite3.connect(":memory:"))
    for origin, entries in logs.items():
        for index, entry in enumerate(entries):
            ledger.feed(origin, index, entry)
    return ledger.violations(set(logs), now, grace)


class ReceiptLedger:
    """Every access needs its receipt in the grantee's log, and every receipt its access.

    They match on (custodian, grantee, token id, study, digest), counted as multisets.
    Entries younger than ``grace`` seconds are not judged yet: the other side may still be
    writing its half. An access by a share link expects no receipt: a link's holder has
    no log (the access itself is judged against the link's grant like any other).

    Both halves of every log wait in an SQLite table (``db``, a scratch database) until
    every log was read: an access and its receipt sit in different logs, read one after
    the other, so the halves waiting are as many as the entries.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(
            "CREATE TABLE IF NOT EXISTS halves (key BLOB NOT NULL, receipt INTEGER NOT NULL,"
            " other TEXT NOT NULL, log TEXT NOT NULL, idx INTEGER NOT NULL,"
            " time INTEGER NOT NULL, walk INTEGER NOT NULL)"
        )
        self._pending: list[tuple[bytes, int, str, str, int, int, int]] = []
        self.walk = 0

    def new_walk(self) -> int:
        """An id for the halves of one copy's walk (forget them with ``forget``)."""
        self.walk += 1
        return self.walk

    def feed(self, origin: str, index: int, entry: LedgerEntry | None, walk: int = 0) -> None:
        if entry is None:
            return
        body = entry.body
        if isinstance(body, Access) and not is_link_grantee(body.grantee):
            key = (origin, body.grantee, body.token_id, body.study, body.digest)
            self._add(key, 0, body.grantee, origin, index, entry.time, walk)
        elif isinstance(body, Receipt):
            key = (body.custodian, origin, body.token_id, body.study, body.digest)
            self._add(key, 1, body.custodian, origin, index, entry.time, walk)

    def _add(
        self,
        key: tuple[str, str, bytes, bytes, bytes],
        receipt: int,
        other: str,
        log: str,
        index: int,
        time: int,
        walk: int,
    ) -> None:
        packed = msgpack.packb(key)
        self._pending.append((packed, receipt, other, log, index, time, walk))
        if len(self._pending) >= RECEIPT_BATCH:
            self._flush()

    def _flush(self) -> None:
        self.db.executemany("INSERT INTO halves VALUES (?, ?, ?, ?, ?, ?, ?)", self._pending)
        self._pending = []

    def forget(self, walk: int) -> None:
        """Drop the halves fed under ``walk`` (a copy that turned out not to be judged)."""
        self._flush()
        self.db.execute("DELETE FROM halves WHERE walk = ?", (walk,))

    def halves(self, log: str, walk: int) -> Iterator[bytes]:
        """The halves of one log fed under ``walk``, each packed, in order (to save)."""
        self._flush()
        rows = self.db.execute(
            "SELECT key, receipt, other, idx, time FROM halves WHERE log = ? AND walk = ?"
            " ORDER BY rowid",
            (log, walk),
        )
        while batch := rows.fetchmany(RECEIPT_BATCH):
            for row in batch:
                yield msgpack.packb(list(row))

    def restore(self, log: str, halves: Iterable[bytes], walk: int) -> None:
        """Take back the halves ``halves`` gave for ``log``, under ``walk``; BadInput if
        one is not a packed half."""
        for packed in halves:
            try:
                key, receipt, other, index, time = msgpack.unpackb(packed)
            except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
                raise BadInput("a saved receipt half is not one") from exc
            self._pending.append((key, receipt, other, log, index, time, walk))
            if len(self._pending) >= RECEIPT_BATCH:
                self._flush()

    def violations(self, seen: Container[str], now: int, grace: int) -> list[Violation]:
        """The unmatched halves older than ``grace``; ``seen``: the logs read."""
        self._flush()
        rows = self.db.execute(
            "SELECT key, receipt, other, log, idx, time FROM halves WHERE key IN"
            " (SELECT key FROM halves GROUP BY key HAVING 2 * sum(receipt) != count(*))"
            " ORDER BY key, rowid"
        )
        violations: list[Violation] = []
        group: list[tuple[int, str, str, int, int]] = []
        current: bytes | None = None
        for key, receipt, other, log, index, time in rows:
            if key != current and group:
                violations += _unmatched(group, seen, now, grace)
                group = []
            current = key
            group.append((receipt, other, log, index, time))
        if group:
            violations += _unmatched(group, seen, now, grace)
        return violations


# Halves written to the scratch database per statement.
RECEIPT_BATCH = 2000


def _unmatched(
    halves: Sequence[tuple[int, str, str, int, int]], seen: Container[str], now: int, grace: int
) -> list[Violation]:
    """The halves of one key beyond the other side's count (the latest ones), if old enough."""
    sent = [h for h in halves if h[0] == 0]
    arrived = [h for h in halves if h[0] == 1]
    unmatched = len(sent) - len(arrived)
    if unmatched > 0:
        rule, extra = "access_without_receipt", sent[-unmatched:]
    else:
        rule, extra = "receipt_without_access", arrived[unmatched:]
    violations = []
    for _, other, log, index, time in extra:
        if time + grace > now:
            continue
        detail = f"no matching entry in the log of {other}"
        if other not in seen:
            detail += " (that log was not seen)"
        violations.append(Violation(log, index, rule, detail))
    return violations


# -- the federation roster (node.core.roster_document) ------------------------------------------


@dataclass(frozen=True)
class ServedRoster:
    """The roster versions one node's roster log proves (already verified), by source."""

    source: str
    federation: str
    versions: tuple[RosterDocument, ...]


def check_roster_equivocation(served: Sequence[ServedRoster]) -> list[Violation]:
    """Two verified versions of one federation with one number and different contents."""
    seen: dict[tuple[str, int], tuple[RosterDocument, str]] = {}
    violations = []
    for roster in served:
        for version in roster.versions:
            first = seen.setdefault((roster.federation, version.version), (version, roster.source))
            if first[0] != version:
                violations.append(
                    Violation(
                        roster.federation,
                        version.version,
                        "roster_equivocation",
                        f"roster version {version.version} served by {roster.source} differs "
                        f"from the version {version.version} served by {first[1]}",
                        roster.source,
                    )
                )
    return violations


def roster_at(versions: Sequence[RosterDocument], time: int) -> RosterDocument | None:
    """The roster version in force at ``time``: the newest one valid from then or before."""
    current = None
    for version in versions:
        if version.not_before <= time:
            current = version
    return current


def check_keys_in_roster(
    history: History, versions: Sequence[RosterDocument], times: Sequence[int]
) -> list[Violation]:
    """Entries and cosignatures of a member's log under keys the roster then in force
    does not name for their signer (first entry per key, every cosignature).

    An entry counts under the key that signs the checkpoints including it; a log dated
    before the first roster version is not judged. ``times``: each entry's time.
    """
    if not versions or history.chain is None:
        return []
    violations: list[Violation] = []
    reported: set[bytes] = set()
    for index, time in enumerate(times):
        roster = roster_at(versions, time)
        if roster is None:
            continue
        key = history.chain.key_at(index + 1)
        if key in reported or roster.names_key(history.origin, key):
            continue
        reported.add(key)
        violations.append(
            Violation(
                history.origin,
                index,
                "key_not_in_roster",
                f"entry {index} is under a key roster version {roster.version} does not name "
                f"for {history.origin}",
                history.source,
            )
        )
    body, signatures = parse_note(history.note)
    cosigned = {c.name for c in history.cosignatures if c.status == "valid"}
    own = history.signing_key
    for signature in signatures:
        is_own = own is not None and (signature.name, signature.key_id) == (own.name, own.key_id)
        if is_own or signature.name not in cosigned or len(signature.signature) < 8:
            continue
        roster = roster_at(versions, int.from_bytes(signature.signature[:8], "big"))
        if roster is None:
            continue
        member = roster.member(signature.name)
        if member is None or verify_cosignature(body, signature, member.vkey) is None:
            violations.append(
                Violation(
                    history.origin,
                    None,
                    "key_not_in_roster",
                    f"{signature.name} cosigned under a key roster version {roster.version} "
                    "does not name for it",
                    history.source,
                )
            )
    return violations
