"""Break-glass at the custodian: the patient's emergency policy and members' emergency requests.

A patient records a standing choice (node.core.emergency: any member, named members, or
never) by an ``emergency_policy`` entry in the custodian's log; without one, the
federation's default (``[consent] emergency_default``) applies. A member's transfer
request may carry a signed emergency request instead of a grant: the custodian opens
the sealed patient identifier, matches it to a local patient, and judges it with
node.core.emergency.judge_request against the policy in force. A request it serves is
written as a ``break_glass`` entry (requester, reason, the request's id, the patient's
subject and key, the policy applied, the studies) before the manifest goes out, so
before any byte of the studies; a refusal is a ``denial`` entry naming the rule, written
only for a patient matched here and within the requester's denial allowance, as for
tokens. Each member may make at most ``[consent] max_emergency_per_hour`` new requests.

A served request then behaves as a grant for the transfer that follows: its id is the
token id of the manifest, the ``access`` and the grantee's ``receipt`` entries, and a
cut stream may resume under it for ``[consent] emergency_window_minutes`` after the
request's time.
"""

from __future__ import annotations

import logging
from typing import Any

from node.core import atna
from node.core.consent import Rule, Verdict
from node.core.emergency import (
    Choice,
    EmergencyCase,
    EmergencyPolicy,
    EmergencyRequest,
    PatientIdentity,
    decode_policy,
    decode_request,
    join_references,
    judge_request,
    open_identity,
    split_references,
)
from node.core.entries import BreakGlass, Denial, EmergencyPolicyEntry, decode_entry
from node.errors import BadInput
from node.services.consent import (
    own_studies_of_patient,
    record_patient_statement,
    study_reference,
    subject_reference,
)
from node.services.runtime import NodeRuntime
from node.store.consent_state import PolicyRow

log = logging.getLogger(__name__)

MINUTE = 60


def access_window(runtime: NodeRuntime) -> int:
    """Seconds after its time in which a served emergency request still opens access."""
    return runtime.config.consent.emergency_window_minutes * MINUTE


def default_choice(runtime: NodeRuntime) -> Choice:
    """The federation's default, for patients who signed no emergency policy."""
    return Choice(runtime.config.consent.emergency_default)


# -- the patient's policy ----------------------------------------------------------------


def record_policy(runtime: NodeRuntime, policy_bytes: bytes, signer_key: bytes) -> int:
    """Record a patient's emergency policy; returns its log index (the same if recorded).

    Raises BadInput (malformed, for another custodian, or older than the one recorded),
    Unauthorized (bad signature), Forbidden (not signed by ``signer_key``, or the key is
    not enrolled and unretired).
    """
    policy = decode_policy(policy_bytes)
    state = runtime.services.consent.state

    def recorded_index() -> int | None:
        latest = state.latest_policy(policy.patient_key)
        if latest is None:
            return None
        if latest.policy == policy_bytes:
            return latest.ledger_index
        if decode_policy(latest.policy).issued_at > policy.issued_at:
            raise BadInput("a newer emergency policy is already recorded")
        return None

    return record_patient_statement(
        runtime,
        "emergency policy",
        policy.patient_key,
        signer_key,
        policy.signature_valid(),
        policy.custodian,
        recorded_index,
        EmergencyPolicyEntry(policy=policy_bytes),
    )


def _policy_of(row: PolicyRow | None) -> EmergencyPolicy | None:
    return None if row is None else decode_policy(row.policy)


def policy_json(runtime: NodeRuntime, public_key: bytes) -> dict[str, Any]:
    """The policy in force for a patient key: theirs, or the federation default."""
    row = runtime.services.consent.state.latest_policy(public_key)
    policy = _policy_of(row)
    if policy is None or row is None:
        return {"choice": default_choice(runtime).value, "members": [], "default": True}
    return {
        "choice": policy.choice.value,
        "members": list(policy.members),
        "default": False,
        "index": row.ledger_index,
        "issued_at": policy.issued_at,
    }


# -- a member's emergency request -----------------------------------------------------------


def check_emergency(
    runtime: NodeRuntime, request_bytes: bytes, requester: str, requester_key: bytes, now: int
) -> Verdict:
    """Judge an emergency request from the authenticated member ``requester``.

    A new request that passes is recorded by a ``break_glass`` entry before this returns;
    one already served is allowed again (a resumed transfer) within the access window.
    Never raises for a bad request: the Verdict names the rule.
    """
    try:
        request = decode_request(request_bytes)
    except BadInput:
        return Verdict(False, Rule.TAMPERED)
    service = runtime.services.consent
    with service.lock:
        service.catch_up()
        served = service.state.break_glass(request.request_id)
    if served is not None:
        if served.requester != requester:
            return Verdict(False, Rule.WRONG_GRANTEE)
        if now > request.issued_at + access_window(runtime):
            return Verdict(False, Rule.EMERGENCY_STALE)
        return Verdict(True, None, None, split_references(served.studies))
    if not request.signature_valid(requester_key):
        return Verdict(False, Rule.BAD_SIGNATURE)
    if not service.emergency_limit.admit(requester, now):
        log.info("emergency request from %s refused: over its hourly limit", requester)
        return Verdict(False, Rule.EMERGENCY_RATE_LIMITED)
    try:
        identity = open_identity(request, runtime.identity.seed)
    except BadInput:
        return Verdict(False, Rule.TAMPERED)
    return _judge_new(runtime, request, identity, requester, requester_key, now)


def _judge_new(
    runtime: NodeRuntime,
    request: EmergencyRequest,
    identity: PatientIdentity,
    requester: str,
    requester_key: bytes,
    now: int,
) -> Verdict:
    service = runtime.services.consent
    subject = subject_reference(runtime, identity.patient_id)
    uids = own_studies_of_patient(runtime, identity.patient_id)
    with service.lock:
        key = service.state.active_key_of_subject(subject)
        row = None if key is None else service.state.latest_policy(key.public_key)
        policy = _policy_of(row)
        case = EmergencyCase(
            requester=requester,
            requester_key=requester_key,
            custodian=runtime.config.origin,
            now=now,
            clock_skew=runtime.config.consent.clock_skew_seconds,
            policy=policy,
            default=default_choice(runtime),
            patient_known=bool(uids) or key is not None,
        )
        rule = judge_request(request, case)
        if rule is not None:
            _record_refusal(runtime, request, requester, rule, case.patient_known, now)
            return Verdict(False, rule)
        studies = tuple(sorted(study_reference(runtime, uid) for uid in uids))
        choice = policy.choice if policy is not None else case.default
        appended = service.append(
            BreakGlass(
                request=request.request_id,
                requester=requester,
                reason=request.reason,
                subject=subject,
                patient_key=None if key is None else key.public_key,
                policy=choice.value,
                policy_index=None if row is None else row.ledger_index,
                studies=join_references(studies),
            )
        )
    log.warning(
        "break-glass: %s given %d studies (%s) at entry %d",
        requester,
        len(studies),
        request.reason,
        appended.index,
    )
    runtime.security_audit.record(
        atna.consent_changed, True, request.request_id.hex(), requester, identity.patient_id
    )
    runtime.services.alerts.raise_break_glass(
        request.request_id, requester, request.reason, request.issued_at + access_window(runtime)
    )
    return Verdict(True, None, None, studies)


def _record_refusal(
    runtime: NodeRuntime,
    request: EmergencyRequest,
    requester: str,
    rule: Rule,
    patient_known: bool,
    now: int,
) -> None:
    """A ``denial`` for a refused request about a patient here (call with the lock held).

    As for tokens, the permanent log keeps only refusals that concern a real patient of
    this node, and at most the requester's denial allowance of them.
    """
    runtime.security_audit.record(
        atna.consent_denied, requester, rule.value, request.request_id.hex(), ""
    )
    service = runtime.services.consent
    if not patient_known or not service.denial_limit.admit(requester, now):
        log.info("emergency request from %s refused (%s); not recorded", requester, rule.value)
        return
    service.append(
        Denial(token_id=request.request_id, requester=requester, rule=rule.value, study=None)
    )


def break_glass_json(runtime: NodeRuntime, limit: int = 100) -> list[dict[str, Any]]:
    """The emergency requests this node served, newest first, for the dashboard."""
    own = runtime.services.ledger.own
    events: list[dict[str, Any]] = []
    for row in runtime.services.consent.state.recent_break_glass(limit):
        raw = next(iter(own.entries(row.ledger_index, row.ledger_index + 1)))
        entry = decode_entry(raw)
        body = entry.body
        if not isinstance(body, BreakGlass):
            continue
        events.append(
            {
                "index": row.ledger_index,
                "time": entry.time,
                "requester": body.requester,
                "reason": body.reason,
                "policy": body.policy,
                "default_policy": body.policy_index is None,
                "studies": len(split_references(body.studies)),
                "request_id": body.request.hex(),
            }
        )
    return events
