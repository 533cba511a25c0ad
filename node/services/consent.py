"""Consent at the custodian: enrollment, recording grants and revocations, access checks.

Every decision goes through node.core.consent.validate_grant (or admit_grant for
recording); this module only gathers what the node's log says into a ConsentView,
writes the resulting entries, and keeps the consent tables (node.store.consent_state)
in step with the log. Writes are serialised by one lock, so that "check, append, apply"
is atomic within the daemon; the tables are caught up from the log whenever opened.

Study and subject references are keyed hashes: HMAC-SHA256 under a node secret
(``reference.key`` in the data directory, mode 0600), so ledger entries name nothing
that anyone but this node (and the patient, through a signed request) can resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core import atna
from node.core.base64url import b64url_encode
from node.core.consent import (
    RULE_MESSAGES,
    AccessRequest,
    ConsentPolicy,
    ConsentView,
    Delegation,
    GrantToken,
    KeyStatus,
    Power,
    Rule,
    Verdict,
    admit_grant,
    decode_delegation,
    decode_grant,
    decode_revocation,
    power_failure,
    scope_text,
    sign_delegation,
    token_id_of,
    token_text,
    validate_grant,
)
from node.core.entries import (
    DelegationEntry,
    Denial,
    DeskDelegation,
    Enroll,
    EntryBody,
    Grant,
    Revoke,
    decode_entry,
)
from node.core.keys import PUBLIC_KEY_SIZE
from node.core.patient_keys import PatientKey
from node.core.rate_limit import SlidingWindowLimit
from node.errors import BadInput, ConfigError, Conflict, Forbidden, NotFound, Unauthorized
from node.services.ledger import LedgerService
from node.services.runtime import NodeRuntime
from node.store.backends import open_consent_state
from node.store.secrets import read_secret, read_seed, write_secret, write_seed

log = logging.getLogger(__name__)

REFERENCE_KEY_FILE = "reference.key"
# The custodian-held keys of minors, one seed file per subject (enroll_guardian).
MINOR_KEYS_DIR = "minor-keys"
STUDY_REF_DOMAIN = b"imageshare/study-ref/v1\n"
SUBJECT_REF_DOMAIN = b"imageshare/subject-ref/v1\n"
DAY = 86_400
# Own-log entries replayed into the consent tables per transaction.
REPLAY_BATCH = 2000
# The ``source`` of studies fetched from another custodian (see transfer.source_label).
FETCHED_SOURCE_PREFIX = "fetched from "
# consent.max_denials_per_minute counts over this window, in seconds.
DENIAL_WINDOW = 60.0
# consent.max_emergency_per_hour counts over this window, in seconds.
EMERGENCY_WINDOW = 3600.0


@dataclass(frozen=True)
class EnrollResult:
    index: int | None  # None when the key was already enrolled for this patient
    subject: bytes
    replaced: bytes | None
    # Studies of the patient here now: 0 warns staff of a mistyped patient id.
    studies: int = 0
    # Who may break the glass while the patient signs no emergency policy (shown to them).
    emergency_default: str = ""


@dataclass(frozen=True)
class GrantRecord:
    """A grant as recorded in this custodian's log (``newly`` is False if it already was)."""

    token: GrantToken
    index: int
    newly: bool

    @property
    def token_id(self) -> bytes:
        return self.token.token_id


@dataclass(frozen=True)
class RevocationRecord:
    token_id: bytes
    index: int
    newly: bool


@dataclass(frozen=True)
class Appended:
    index: int
    entry: bytes


class ConsentService:
    """The consent tables and the reference key of one node."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.state = open_consent_state(runtime.config)
        self.lock = threading.RLock()
        self._reference_key = _load_or_create_reference_key(runtime)
        self.denial_limit = SlidingWindowLimit(
            runtime.config.consent.max_denials_per_minute, DENIAL_WINDOW
        )
        # New break-glass requests a member may make (node.services.emergency).
        self.emergency_limit = SlidingWindowLimit(
            runtime.config.consent.max_emergency_per_hour, EMERGENCY_WINDOW
        )

    def close(self) -> None:
        self.state.close()

    @property
    def ledger(self) -> LedgerService:
        return self.runtime.services.ledger

    def reference(self, domain: bytes, value: str) -> bytes:
        return hmac.new(self._reference_key, domain + value.encode(), hashlib.sha256).digest()

    def catch_up(self) -> None:
        """Apply every own-log entry the consent tables have not seen yet."""
        with self.lock:
            own = self.ledger.own
            start, size = self.state.applied_size, own.size()
            while start < size:
                batch = list(own.entries(start, min(size, start + REPLAY_BATCH)))
                if not batch:
                    break
                decoded = [decode_entry(raw) for raw in batch]
                self.state.apply(start, [e.body for e in decoded])
                start += len(batch)

    def append(self, body: EntryBody) -> Appended:
        """Append an entry durably, then bring the tables up to it; call with the lock held.

        The tables follow the log by replay only (catch_up), never by a second path, so
        a crash between the append and the table update is repaired on the next open.
        """
        result = self.ledger.append(body)
        self.catch_up()
        return Appended(result.index, result.entry)


def _load_or_create_reference_key(runtime: NodeRuntime) -> bytes:
    path = runtime.config.data_dir / REFERENCE_KEY_FILE
    # Created on first use; O_EXCL makes a concurrent creator lose cleanly.
    with contextlib.suppress(FileExistsError):
        write_secret(path, os.urandom(32))
    key = read_secret(path)
    if len(key) != 32:
        raise ConfigError(f"{REFERENCE_KEY_FILE} does not hold a 32-byte key")
    return key


# -- references ----------------------------------------------------------------------------


def study_reference(runtime: NodeRuntime, study_uid: str) -> bytes:
    """The keyed reference of a study (what tokens and ledger entries name); remembered."""
    service = runtime.services.consent
    ref = service.reference(STUDY_REF_DOMAIN, study_uid)
    if service.state.study_of_ref(ref) is None:
        service.state.remember_study_refs({ref: study_uid})
    return ref


def resolve_study_reference(runtime: NodeRuntime, ref: bytes) -> str:
    """The Study Instance UID behind a reference; raises NotFound if no study here has it."""
    service = runtime.services.consent
    uid = service.state.study_of_ref(ref)
    if uid is None:
        # A study indexed since its reference was last computed: compute them all once.
        uids = runtime.store.study_uids()
        refs = {service.reference(STUDY_REF_DOMAIN, uid): uid for uid in uids}
        service.state.remember_study_refs(refs)
        uid = refs.get(ref)
    if uid is None:
        raise NotFound("no study with that reference on this node")
    return uid


def subject_reference(runtime: NodeRuntime, patient_id: str) -> bytes:
    """The keyed reference of a local patient, as written in ``enroll`` entries."""
    return runtime.services.consent.reference(SUBJECT_REF_DOMAIN, patient_id)


def own_studies_of_patient(runtime: NodeRuntime, patient_id: str) -> list[str]:
    """Study UIDs of a local patient that this node made (or was sent by its own PACS),
    then those only in the hospital's PACS ([pacs]).

    Studies fetched from another custodian are left out: their patient id belongs to the
    other hospital, and only their own custodian's patient may grant them.
    """
    local = runtime.store.studies_of_patient(patient_id, FETCHED_SOURCE_PREFIX)
    source = runtime.services.pacs
    if source is None:
        return local
    # The hospital's PACS holds more of the patient's studies than the node was sent.
    held = set(local)
    return local + [
        s.study_uid for s in source.studies_of_patient(patient_id) if s.study_uid not in held
    ]


def patient_of_subject(runtime: NodeRuntime, subject: bytes) -> str | None:
    """The local patient id behind a subject reference, or None if no patient here has it.

    The private table is only a cache: a subject reference is a keyed hash of the patient
    id, so a lost table is rebuilt from the instance index.
    """
    service = runtime.services.consent
    patient_id = service.state.patient_of_subject(subject)
    if patient_id is None:
        for candidate in runtime.store.patient_ids():
            if subject_reference(runtime, candidate) == subject:
                service.state.bind_subject(subject, candidate)
                return str(candidate)
    return patient_id


def _owned_studies(runtime: NodeRuntime, subject: bytes) -> frozenset[bytes]:
    patient_id = patient_of_subject(runtime, subject)
    if patient_id is None:
        return frozenset()
    uids = own_studies_of_patient(runtime, patient_id)
    return frozenset(study_reference(runtime, uid) for uid in uids)


# -- enrollment ----------------------------------------------------------------------------


def enroll_patient(runtime: NodeRuntime, patient_id: str, public_key: bytes) -> EnrollResult:
    """Bind ``public_key`` to the local patient ``patient_id`` by an ``enroll`` entry.

    A new key for an already enrolled patient retires the old key and, with it, every
    grant the old key signed. Raises Conflict if the key belongs to another patient or
    was retired, BadInput for an empty patient id or a malformed key.
    """
    _check_enrollment(patient_id, public_key)
    service = runtime.services.consent
    subject = subject_reference(runtime, patient_id)
    with service.lock:
        service.catch_up()
        existing = service.state.key(public_key)
        if existing is not None:
            if existing.subject != subject:
                raise Conflict("that key is already enrolled for another patient")
            if existing.retired:
                raise Conflict("that key was retired; the patient needs a new one")
            return EnrollResult(
                None,
                subject,
                None,
                len(own_studies_of_patient(runtime, patient_id)),
                runtime.config.consent.emergency_default,
            )
        service.state.bind_subject(subject, patient_id)
        current = service.state.active_key_of_subject(subject)
        replaced = None if current is None else current.public_key
        appended = service.append(Enroll(subject=subject, key=public_key, replaces=replaced))
    studies = len(own_studies_of_patient(runtime, patient_id))
    runtime.security_audit.record(
        atna.configuration_changed,
        "staff",
        "patient key enrolled",
        b64url_encode(public_key),
        patient_id,
    )
    return EnrollResult(
        appended.index, subject, replaced, studies, runtime.config.consent.emergency_default
    )


def _check_enrollment(patient_id: str, public_key: bytes) -> None:
    if not patient_id.strip() or len(patient_id) > 64:
        raise BadInput("a patient id is 1 to 64 characters")
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise BadInput("a patient key is 32 bytes")


@dataclass(frozen=True)
class GuardianResult:
    delegation: bytes
    index: int
    minor_key: bytes
    created_minor_key: bool  # the desk made the minor's custodian-held key just now


def _minor_key_path(runtime: NodeRuntime, subject: bytes) -> Path:
    directory = runtime.config.data_dir / MINOR_KEYS_DIR
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{subject.hex()}.key"


def enroll_guardian(runtime: NodeRuntime, patient_id: str, guardian_key: bytes) -> GuardianResult:
    """Staff at the desk: delegate every power over a minor's studies to ``guardian_key``.

    A minor has no wallet of their own, so the custodian holds their key: made at the
    first guardian's enrollment (seed in the data directory, mode 0600, before its
    ``enroll`` entry) and reused for the next guardian. The delegation it signs, for
    ``[consent] max_lifetime_days``, is written as ``desk_delegation``. Raises Conflict
    if the patient has enrolled a key of their own (their wallet delegates), BadInput
    for a malformed id or key.
    """
    _check_enrollment(patient_id, guardian_key)
    service = runtime.services.consent
    subject = subject_reference(runtime, patient_id)
    path = _minor_key_path(runtime, subject)
    created = False
    with service.lock:
        service.catch_up()
        current = service.state.active_key_of_subject(subject)
        if not path.exists():
            if current is not None:
                raise Conflict("that patient has a key of their own: their wallet delegates")
            write_seed(path, os.urandom(32))
        minor = PatientKey(runtime.config.origin, read_seed(path))
        if current is not None and current.public_key != minor.public_key:
            raise Conflict("that patient has a key of their own: their wallet delegates")
        if current is None:
            service.state.bind_subject(subject, patient_id)
            service.append(Enroll(subject=subject, key=minor.public_key, replaces=None))
            created = True
        now = int(time.time())
        unsigned = Delegation(
            minor.public_key,
            runtime.config.origin,
            guardian_key,
            None,
            tuple(Power),
            now,
            now + runtime.config.consent.max_lifetime_days * DAY,
            os.urandom(16),
        )
        delegation = sign_delegation(unsigned, minor.sign)
        index = service.append(DeskDelegation(delegation=delegation)).index
    runtime.security_audit.record(
        atna.configuration_changed,
        "staff",
        "guardian key enrolled",
        b64url_encode(guardian_key),
        patient_id,
    )
    return GuardianResult(delegation, index, minor.public_key, created)


def guardian_result_json(result: GuardianResult) -> dict[str, Any]:
    """What `imageshare enroll-guardian --json` prints (no patient data)."""
    return {
        "delegation_id": token_id_of(result.delegation).hex(),
        "delegation": token_text(result.delegation),
        "index": result.index,
        "minor_key": b64url_encode(result.minor_key),
        "created_minor_key": result.created_minor_key,
    }


def enroll_result_json(result: EnrollResult, public_key: bytes) -> dict[str, Any]:
    """What `imageshare enroll --json` prints (no patient data, no subject reference)."""
    return {
        "key": b64url_encode(public_key),
        "index": result.index,
        "already_enrolled": result.index is None,
        "replaced": None if result.replaced is None else b64url_encode(result.replaced),
        "studies": result.studies,
        "emergency_default": result.emergency_default,
    }


# -- grants and revocations ----------------------------------------------------------------


def consent_policy(runtime: NodeRuntime) -> ConsentPolicy:
    consent = runtime.config.consent
    return ConsentPolicy(
        custodian_origin=runtime.config.origin,
        max_lifetime=consent.max_lifetime_days * DAY,
        clock_skew=consent.clock_skew_seconds,
        max_link_lifetime=consent.max_link_lifetime_days * DAY,
    )


def consent_view(runtime: NodeRuntime, token: GrantToken) -> ConsentView:
    """What this node's log says about one token's key, studies, revocation and recording."""
    state = runtime.services.consent.state
    key = state.key(token.patient_key)
    keys = {} if key is None else {key.public_key: KeyStatus(key.subject, key.retired)}
    studies = {} if key is None else {key.subject: _owned_studies(runtime, key.subject)}
    token_id = token.token_id
    # The token's own revocation, and for a delegate's grant its delegation's.
    ids = [token_id] if token.delegation is None else [token_id, token.delegation.delegation_id]
    revoked = {
        (token.patient_key, i)
        for i in ids
        if state.revocation_index(token.patient_key, i) is not None
    }
    chain = token.delegation
    return ConsentView(
        keys=keys,
        studies_of_subject=studies,
        revoked=frozenset(revoked),
        recorded=frozenset({token_id} if state.grant(token_id) is not None else set()),
        delegations=frozenset(
            {chain.delegation_id}
            if chain is not None and state.delegation_index(chain.delegation_id) is not None
            else set()
        ),
    )


def record_grant(runtime: NodeRuntime, token_bytes: bytes, now: int | None = None) -> GrantRecord:
    """Record a grant in this node's log on first sight; idempotent.

    Raises BadInput for an undecodable token and Forbidden (naming the rule) for a grant
    that may not be recorded: bad signature, other custodian, unknown or retired key,
    lifetime over the maximum, expired, revoked, or naming another patient's study.
    """
    now = int(time.time()) if now is None else now
    token = decode_grant(token_bytes)
    service = runtime.services.consent
    with service.lock:
        service.catch_up()
        known = service.state.grant(token.token_id)
        if known is not None:
            return GrantRecord(token, known.ledger_index, newly=False)
        verdict = admit_grant(
            token_bytes, consent_view(runtime, token), consent_policy(runtime), now
        )
        if not verdict.allowed:
            raise Forbidden(f"grant refused ({verdict.reason}): {verdict.message}")
        appended = service.append(Grant(token=token_bytes))
    runtime.security_audit.record(
        atna.consent_changed,
        True,
        token.token_id.hex(),
        token.fields.grantee,
        _patient_of_key(runtime, token.patient_key),
    )
    _prefetch_from_pacs(runtime, token)
    return GrantRecord(token, appended.index, newly=True)


def _prefetch_from_pacs(runtime: NodeRuntime, token: GrantToken) -> None:
    """With [pacs] prefetch, start retrieving the granted studies held only in the PACS."""
    source = runtime.services.pacs
    key = runtime.services.consent.state.key(token.patient_key)
    if source is None or not source.config.prefetch or key is None:
        return
    refs = token.fields.scope or _owned_studies(runtime, key.subject)
    uids = []
    for ref in refs:
        with contextlib.suppress(NotFound):
            uids.append(resolve_study_reference(runtime, ref))
    source.prefetch(uids)


def record_revocation(runtime: NodeRuntime, revocation_bytes: bytes) -> RevocationRecord:
    """Record a patient's revocation; idempotent.

    The revocation must verify under an enrolled key. It may name a token this node has
    not seen yet: the token is then refused when it arrives. A delegate's revocation
    (version 2) must name a recorded grant of the patient, under a live delegation with
    the power ``revoke`` covering the grant's studies. Raises BadInput (malformed),
    Unauthorized (bad signature), Forbidden (key not enrolled here, delegation refused).
    """
    revocation = decode_revocation(revocation_bytes)
    if not revocation.signature_valid():
        raise Unauthorized("the revocation's signature does not verify")
    service = runtime.services.consent
    with service.lock:
        service.catch_up()
        if service.state.key(revocation.patient_key) is None:
            raise Forbidden("the revocation's key is not enrolled here")
        known = service.state.revocation_index(revocation.patient_key, revocation.token_id)
        if known is not None:
            return RevocationRecord(revocation.token_id, known, newly=False)
        if revocation.delegation is not None:
            grant = service.state.grant(revocation.token_id)
            if grant is None or grant.patient_key != revocation.patient_key:
                raise Forbidden("a delegate may revoke only a recorded grant of the patient")
            scope = decode_grant(grant.token).fields.scope
            check_delegate(runtime, revocation.delegation, Power.REVOKE, scope)
        appended = service.append(Revoke(revocation=revocation_bytes))
    runtime.security_audit.record(
        atna.consent_changed,
        False,
        revocation.token_id.hex(),
        "",
        _patient_of_key(runtime, revocation.patient_key),
    )
    _release_from_pacs_cache(runtime, revocation.patient_key, revocation.token_id)
    return RevocationRecord(revocation.token_id, appended.index, newly=True)


def recorded_delegation(runtime: NodeRuntime, delegation_id: bytes) -> Delegation | None:
    """A delegation recorded here, by its id, or None."""
    raw = runtime.services.consent.state.delegation(delegation_id)
    return None if raw is None else decode_delegation(raw)


def check_delegate(
    runtime: NodeRuntime,
    chain: Delegation,
    power: Power,
    scope: tuple[bytes, ...] | None,
    now: int | None = None,
) -> None:
    """Raise Forbidden, naming the rule, unless the delegate may use ``power`` over
    ``scope`` (None: every study) now: consent.power_failure on this node's log."""
    state = runtime.services.consent.state
    pair = (chain.patient_key, chain.delegation_id)
    revoked = state.revocation_index(*pair) is not None
    recorded = state.delegation_index(chain.delegation_id) is not None
    view = ConsentView(
        revoked=frozenset({pair} if revoked else set()),
        delegations=frozenset({chain.delegation_id} if recorded else set()),
    )
    now = int(time.time()) if now is None else now
    rule = power_failure(chain, power, scope, view, consent_policy(runtime), now)
    if rule is not None:
        raise Forbidden(f"delegation refused ({rule.value}): {RULE_MESSAGES[rule]}")


def record_delegation(runtime: NodeRuntime, delegation_bytes: bytes, signer_key: bytes) -> int:
    """Record a patient's delegation to another key; returns its log index (idempotent).

    Raises BadInput (malformed, or for another custodian), Unauthorized (bad signature),
    Forbidden (not signed by ``signer_key``, or that key is not enrolled and unretired).
    """
    delegation = decode_delegation(delegation_bytes)
    return record_patient_statement(
        runtime,
        "delegation",
        delegation.patient_key,
        signer_key,
        delegation.signature_valid(),
        delegation.custodian,
        lambda: runtime.services.consent.state.delegation_index(delegation.delegation_id),
        DelegationEntry(delegation=delegation_bytes),
    )


def record_patient_statement(
    runtime: NodeRuntime,
    what: str,
    patient_key: bytes,
    signer_key: bytes,
    signature_valid: bool,
    custodian: str,
    recorded_index: Callable[[], int | None],
    body: EntryBody,
) -> int:
    """Append a patient-signed statement (a delegation, an emergency policy) once.

    The one rule for them: submitted by its own key, its signature verifies, it names
    this custodian, and the key is enrolled and unretired. ``recorded_index`` (called
    under the lock) gives the index it is already recorded at, or None; it may raise to
    refuse it. Raises Forbidden, Unauthorized or BadInput naming what failed.
    """
    if patient_key != signer_key:
        raise Forbidden(f"a patient may submit only a {what} signed with their own key")
    if not signature_valid:
        raise Unauthorized(f"the {what}'s signature does not verify")
    if custodian != runtime.config.origin:
        raise BadInput(f"the {what} is for {custodian}, not this custodian")
    service = runtime.services.consent
    with service.lock:
        service.catch_up()
        key = service.state.key(patient_key)
        if key is None or key.retired:
            raise Forbidden(f"the {what}'s key is not enrolled here")
        known = recorded_index()
        if known is not None:
            return known
        return service.append(body).index


def _release_from_pacs_cache(runtime: NodeRuntime, patient_key: bytes, token_id: bytes) -> None:
    """Drop from the PACS cache the revoked grant's studies that no other live grant of
    the patient still covers: the copy was made for grantees, and none may have it now."""
    source = runtime.services.pacs
    state = runtime.services.consent.state
    revoked = state.grant(token_id)
    key = state.key(patient_key)
    if source is None or revoked is None or key is None:
        return
    owned: frozenset[bytes] | None = None

    def scope_of(token: bytes) -> frozenset[bytes]:
        nonlocal owned
        refs = decode_grant(token).fields.scope
        if refs:
            return frozenset(refs)
        if owned is None:
            owned = _owned_studies(runtime, key.subject)
        return owned

    needed: set[bytes] = set()
    now = int(time.time())
    for row in [] if key.retired else state.grants_of_key(patient_key):
        live = (
            row.token_id != token_id
            and state.revocation_index(patient_key, row.token_id) is None
            and decode_grant(row.token).fields.expires >= now
        )
        if live:
            needed |= scope_of(row.token)
    uids = []
    for ref in scope_of(revoked.token) - needed:
        with contextlib.suppress(NotFound):
            uids.append(resolve_study_reference(runtime, ref))
    source.release(token_id, uids)


def _patient_of_key(runtime: NodeRuntime, public_key: bytes) -> str:
    """The local patient ID of an enrolled key, for the security audit ("" if none)."""
    key = runtime.services.consent.state.key(public_key)
    return (patient_of_subject(runtime, key.subject) or "") if key is not None else ""


def check_access(
    runtime: NodeRuntime,
    token_bytes: bytes,
    requester_origin: str,
    study_refs: tuple[bytes, ...] | list[bytes] | None,
    now: int,
) -> Verdict:
    """Decide whether ``requester_origin`` (already authenticated) may have the studies.

    Records the grant on first sight (so the grantee may present a token the wallet
    never submitted), then validates. A refusal is written to the log as a ``denial``
    entry naming the rule only if the token is signed by a patient key enrolled here
    (see record_denial for the rule and its rate limit). Never raises for a bad token:
    the Verdict says why.
    """
    refs = None if study_refs is None else tuple(study_refs)
    # A grant that may not be recorded is refused below by the rule that fails.
    with contextlib.suppress(BadInput, Forbidden):
        record_grant(runtime, token_bytes, now)
    token: GrantToken | None
    try:
        token = decode_grant(token_bytes)
    except BadInput:
        token = None
    view = ConsentView() if token is None else consent_view(runtime, token)
    verdict = validate_grant(
        token_bytes, AccessRequest(requester_origin, refs, now), view, consent_policy(runtime)
    )
    if not verdict.allowed:
        runtime.security_audit.record(
            atna.consent_denied,
            requester_origin,
            str(verdict.rule),
            token.token_id.hex() if token is not None else "undecodable token",
            "",
        )
    if not verdict.allowed and token is not None:
        record_denial(runtime, token, requester_origin, verdict.rule, refs, now)
    return verdict


async def check_access_async(
    runtime: NodeRuntime,
    token_bytes: bytes,
    requester_origin: str,
    study_refs: tuple[bytes, ...] | list[bytes] | None,
    now: int,
) -> Verdict:
    """check_access from a coroutine: it may append to the log, so it runs in a thread."""
    return await asyncio.to_thread(
        check_access, runtime, token_bytes, requester_origin, study_refs, now
    )


def record_denial(
    runtime: NodeRuntime,
    token: GrantToken,
    requester_origin: str,
    rule: Rule | None,
    refs: tuple[bytes, ...] | None,
    now: int,
) -> None:
    """Write a ``denial`` for a refused token, if it is one the record is for.

    The ledger is permanent and copied to every member, so it keeps only refusals of
    tokens a patient enrolled here really signed (retired keys included: a stolen phone's
    old grants being tried is what the patient must see), and at most
    ``consent.max_denials_per_minute`` of them per requester. Anything else is only
    logged: anyone can make a token with a bad signature or an unknown key.
    """
    service = runtime.services.consent
    if service.state.key(token.patient_key) is None or not token.signature_valid():
        log.info(
            "refused %s from %s (%s); not recorded: not signed by a key enrolled here",
            token.token_id.hex()[:16],
            requester_origin,
            rule,
        )
        return
    if not service.denial_limit.admit(requester_origin, now):
        log.info(
            "refused %s from %s (%s); not recorded: over %d denials a minute",
            token.token_id.hex()[:16],
            requester_origin,
            rule,
            service.denial_limit.limit,
        )
        return
    with service.lock:
        service.append(
            Denial(
                token_id=token.token_id,
                requester=requester_origin,
                rule=str(rule),
                study=refs[0] if refs else None,
            )
        )


# -- what a patient may ask about their own key ---------------------------------------------


def enrolled_key(runtime: NodeRuntime, public_key: bytes) -> bytes | None:
    """``public_key`` if it is enrolled here and not retired, else None (request signer check)."""
    key = runtime.services.consent.state.key(public_key)
    return public_key if key is not None and not key.retired else None


def patient_studies(runtime: NodeRuntime, public_key: bytes) -> list[dict[str, Any]]:
    """The studies of the patient holding ``public_key``, described without identifiers.

    Only for the patient's own signed request: references with date, modalities,
    description and instance count. Raises Forbidden if the key is not enrolled.
    """
    service = runtime.services.consent
    key = service.state.key(public_key)
    if key is None or key.retired:
        raise Forbidden("that key is not enrolled here")
    patient_id = patient_of_subject(runtime, key.subject)
    if patient_id is None:
        return []  # no study here is this patient's (never the studies without a PatientID)
    studies: list[dict[str, Any]] = []
    for uid in own_studies_of_patient(runtime, patient_id):
        studies.append(
            {"ref": b64url_encode(study_reference(runtime, uid)), **_described(runtime, uid)}
        )
    return studies


def _described(runtime: NodeRuntime, study_uid: str) -> dict[str, Any]:
    """Date, modalities, description and instance count of a local or PACS study."""
    try:
        row = runtime.store.study_row(study_uid)
    except NotFound:
        source = runtime.services.pacs
        listed = None if source is None else source.study(study_uid)
        if listed is None:
            raise
        return {
            "date": listed.date,
            "modalities": sorted(m for m in listed.modalities if m),
            "description": listed.description,
            "instances": listed.instances,
        }
    modalities = {series.modality for series in runtime.store.series_of_study(study_uid)}
    return {
        "date": row.get("study_date") or "",
        "modalities": sorted(m for m in modalities if m),
        "description": row.get("study_description") or "",
        "instances": runtime.store.instance_count(study_uid),
    }


def token_statuses(runtime: NodeRuntime, public_key: bytes, now: int) -> list[dict[str, Any]]:
    """Every grant recorded for ``public_key``, with status active, expired or revoked."""
    service = runtime.services.consent
    key = service.state.key(public_key)
    if key is None:
        raise Forbidden("that key is not enrolled here")
    statuses = []
    for row in service.state.grants_of_key(public_key):
        grant = decode_grant(row.token).fields
        revoked = service.state.revocation_index(public_key, row.token_id) is not None
        if revoked or key.retired:
            status = "revoked"
        elif now > grant.expires:
            status = "expired"
        else:
            status = "active"
        statuses.append(
            {
                "token_id": row.token_id.hex(),
                "grantee": grant.grantee,
                "expires": grant.expires,
                "index": row.ledger_index,
                "status": status,
                "key_retired": key.retired,
            }
        )
    return statuses


def delegation_statuses(runtime: NodeRuntime, public_key: bytes) -> list[dict[str, Any]]:
    """Every delegation ``public_key`` recorded here, with status active, expired or revoked."""
    state = runtime.services.consent.state
    now = int(time.time())
    listed = []
    for raw, index in state.delegations_of_key(public_key):
        delegation = decode_delegation(raw)
        revoked = state.revocation_index(public_key, delegation.delegation_id) is not None
        listed.append(
            {
                "delegation_id": delegation.delegation_id.hex(),
                "delegate": b64url_encode(delegation.delegate_key),
                "powers": [p.value for p in delegation.powers],
                "scope": scope_text(delegation.scope),
                "expires": delegation.expires,
                "index": index,
                "status": "revoked"
                if revoked
                else "expired"
                if now > delegation.expires
                else "active",
            }
        )
    return listed
