"""Break-glass: the patient's standing emergency policy, a node's emergency request, the rule.

Two signed formats (canonical msgpack, node.core.encoding)::

    emergency policy  = ["emergency-policy", 1, patient_key bin32, custodian str,
                         choice str, members [origin str, ...], issued_at uint,
                         signature bin64]
    signed            = "imageshare/emergency-policy/v1\\n" + encode(fields before it)

    emergency request = ["emergency", 1, requester str, custodian str, reason str,
                         sealed_identity bin, issued_at uint, nonce bin16,
                         signature bin64]
    signed            = "imageshare/emergency-request/v1\\n" + encode(fields before it)

A policy is signed by the patient's key at the custodian: ``choice`` is ``any_member``,
``named_members`` (only the origins in ``members``) or ``never``. The latest policy signed
by the patient's key in force decides; without one, the federation's default does.

A request is signed by the requesting node's key and names the custodian it is for (its
audience), a reason code (HL7 v3 ActReason: ETREAT emergency treatment, BTG break the
glass), a time and a nonce. ``sealed_identity`` is the patient's identifier at the
custodian and the clinician's note, encrypted to the custodian's key (a libsodium sealed
box to the X25519 form of its Ed25519 key): a request crosses plain HTTP and the
custodian's log carries only its id, SHA-256 of the whole signed request, so neither the
wire nor the ledger shows the patient id or the note. The request's first element is a
string, so a request never decodes as a grant (whose first element is its version).

Pure: no I/O, and the clock is always passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from node.core.channel import x25519_public_from_ed25519, x25519_secret_from_ed25519_seed
from node.core.consent import (  # the one check of each wire type
    NONCE_SIZE,
    SIGNATURE_SIZE,
    Rule,
    checked_bytes,
    checked_time,
    token_id_of,
)
from node.core.encoding import canonical_decode, canonical_encode
from node.core.keys import PUBLIC_KEY_SIZE, verify_ed25519
from node.core.origins import check_node_origin
from node.errors import BadInput

POLICY_MARK = "emergency-policy"
REQUEST_MARK = "emergency"
VERSION = 1
POLICY_DOMAIN = b"imageshare/emergency-policy/v1\n"
REQUEST_DOMAIN = b"imageshare/emergency-request/v1\n"
MAX_MEMBERS = 64
MAX_PATIENT_ID = 64
MAX_NOTE = 500
MAX_SIGNED_BYTES = 16 * 1024
# HL7 v3 ActReason codes for access in an emergency.
REASONS = {
    "ETREAT": "emergency treatment",
    "BTG": "break the glass",
}
REFERENCE_SIZE = 32

Signer = Callable[[bytes], bytes]


class Choice(StrEnum):
    """Who may break the glass for a patient."""

    ANY_MEMBER = "any_member"
    NAMED_MEMBERS = "named_members"
    NEVER = "never"


def _decode_marked(data: Any, mark: str, length: int, what: str) -> list[Any]:
    if not isinstance(data, bytes) or not data or len(data) > MAX_SIGNED_BYTES:
        raise BadInput(f"{what} is empty or too large")
    value = canonical_decode(data)
    if (
        not isinstance(value, list)
        or len(value) != length
        or value[0] != mark
        or type(value[1]) is not int
        or value[1] != VERSION
    ):
        raise BadInput(f"{what} is not a version {VERSION} {mark}")
    return value


# -- the patient's policy -------------------------------------------------------------------


@dataclass(frozen=True)
class EmergencyPolicy:
    """A decoded emergency policy (signature not checked until ``signature_valid``)."""

    patient_key: bytes
    custodian: str
    choice: Choice
    members: tuple[str, ...]
    issued_at: int
    signature: bytes
    raw: bytes

    def signed_message(self) -> bytes:
        return POLICY_DOMAIN + canonical_encode(_policy_fields(self))

    def signature_valid(self) -> bool:
        return verify_ed25519(self.patient_key, self.signed_message(), self.signature)

    def allows(self, requester: str) -> bool:
        """Whether this policy lets the member ``requester`` break the glass."""
        return allows(self.choice, self.members, requester)


def allows(choice: Choice, members: tuple[str, ...], requester: str) -> bool:
    """The one rule of a policy's choice: any member, the named ones, or none."""
    if choice is Choice.ANY_MEMBER:
        return True
    if choice is Choice.NAMED_MEMBERS:
        return requester in members
    return False


def _policy_fields(policy: EmergencyPolicy) -> list[Any]:
    return [
        POLICY_MARK,
        VERSION,
        policy.patient_key,
        policy.custodian,
        policy.choice.value,
        list(policy.members),
        policy.issued_at,
    ]


def _check_policy(policy: EmergencyPolicy) -> None:
    checked_bytes(policy.patient_key, PUBLIC_KEY_SIZE, "patient key")
    check_node_origin(policy.custodian, "custodian")
    if len(policy.members) > MAX_MEMBERS:
        raise BadInput(f"an emergency policy names at most {MAX_MEMBERS} members")
    for member in policy.members:
        check_node_origin(member, "emergency policy member")
    if len(set(policy.members)) != len(policy.members):
        raise BadInput("an emergency policy names a member twice")
    if (policy.choice is Choice.NAMED_MEMBERS) != bool(policy.members):
        raise BadInput("an emergency policy names members exactly when its choice is named_members")
    checked_time(policy.issued_at, "policy time")


def sign_policy(
    patient_key: bytes,
    custodian: str,
    choice: Choice,
    members: tuple[str, ...],
    issued_at: int,
    sign: Signer,
) -> bytes:
    """The signed bytes of an emergency policy; raises BadInput if a field is out of range."""
    unsigned = EmergencyPolicy(patient_key, custodian, choice, members, issued_at, b"", b"")
    _check_policy(unsigned)
    fields = _policy_fields(unsigned)
    return canonical_encode([*fields, sign(POLICY_DOMAIN + canonical_encode(fields))])


def decode_policy(data: bytes) -> EmergencyPolicy:
    """Decode an emergency policy (signature not checked); raises BadInput if malformed."""
    value = _decode_marked(data, POLICY_MARK, 8, "emergency policy")
    _, _, patient_key, custodian, choice, members, issued_at, signature = value
    if choice not in {c.value for c in Choice}:
        raise BadInput("an emergency policy's choice is any_member, named_members or never")
    if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
        raise BadInput("an emergency policy's members are a list of origins")
    policy = EmergencyPolicy(
        patient_key,
        custodian,
        Choice(choice),
        tuple(members),
        issued_at,
        checked_bytes(signature, SIGNATURE_SIZE, "signature"),
        data,
    )
    _check_policy(policy)
    return policy


# -- a node's emergency request ------------------------------------------------------------


@dataclass(frozen=True)
class PatientIdentity:
    """What only the custodian reads: the patient's identifier there, the clinician's note."""

    patient_id: str
    note: str


@dataclass(frozen=True)
class EmergencyRequest:
    """A decoded emergency request (signature not checked until ``signature_valid``)."""

    requester: str
    custodian: str
    reason: str
    sealed_identity: bytes
    issued_at: int
    nonce: bytes
    signature: bytes
    raw: bytes

    @property
    def request_id(self) -> bytes:
        """SHA-256 of the signed request: how the ledger and the transfer name it."""
        return token_id_of(self.raw)

    def signed_message(self) -> bytes:
        return REQUEST_DOMAIN + canonical_encode(_request_fields(self))

    def signature_valid(self, requester_key: bytes) -> bool:
        return verify_ed25519(requester_key, self.signed_message(), self.signature)


def _request_fields(request: EmergencyRequest) -> list[Any]:
    return [
        REQUEST_MARK,
        VERSION,
        request.requester,
        request.custodian,
        request.reason,
        request.sealed_identity,
        request.issued_at,
        request.nonce,
    ]


def _check_identity(identity: PatientIdentity) -> None:
    if not 1 <= len(identity.patient_id.strip()) <= MAX_PATIENT_ID:
        raise BadInput(f"a patient id is 1 to {MAX_PATIENT_ID} characters")
    if len(identity.note) > MAX_NOTE:
        raise BadInput(f"an emergency note is at most {MAX_NOTE} characters")


def _check_request(request: EmergencyRequest) -> None:
    check_node_origin(request.requester, "requester")
    check_node_origin(request.custodian, "custodian")
    if request.reason not in REASONS:
        raise BadInput(f"an emergency reason is one of {', '.join(sorted(REASONS))}")
    if not isinstance(request.sealed_identity, bytes) or len(request.sealed_identity) > 4096:
        raise BadInput("an emergency request's sealed identity is at most 4096 bytes")
    checked_time(request.issued_at, "request time")
    checked_bytes(request.nonce, NONCE_SIZE, "nonce")


def sign_request(
    requester: str,
    custodian: str,
    custodian_key: bytes,
    reason: str,
    identity: PatientIdentity,
    issued_at: int,
    nonce: bytes,
    sign: Signer,
) -> bytes:
    """A signed emergency request to ``custodian``, the identity sealed to ``custodian_key``.

    Raises BadInput for a field out of range or a custodian key that is not Ed25519.
    """
    _check_identity(identity)
    recipient = PublicKey(x25519_public_from_ed25519(custodian_key))
    sealed = SealedBox(recipient).encrypt(canonical_encode([identity.patient_id, identity.note]))
    unsigned = EmergencyRequest(requester, custodian, reason, sealed, issued_at, nonce, b"", b"")
    _check_request(unsigned)
    fields = _request_fields(unsigned)
    return canonical_encode([*fields, sign(REQUEST_DOMAIN + canonical_encode(fields))])


def is_emergency_request(data: bytes) -> bool:
    """Whether ``data`` is shaped as an emergency request (and so is no grant)."""
    try:
        decode_request(data)
    except BadInput:
        return False
    return True


def decode_request(data: bytes) -> EmergencyRequest:
    """Decode an emergency request (signature not checked); raises BadInput if malformed."""
    value = _decode_marked(data, REQUEST_MARK, 9, "emergency request")
    _, _, requester, custodian, reason, sealed, issued_at, nonce, signature = value
    request = EmergencyRequest(
        requester,
        custodian,
        reason,
        sealed,
        issued_at,
        nonce,
        checked_bytes(signature, SIGNATURE_SIZE, "signature"),
        data,
    )
    _check_request(request)
    return request


def open_identity(request: EmergencyRequest, custodian_seed: bytes) -> PatientIdentity:
    """The patient id and note, opened with the custodian's key; BadInput if they do not open."""
    secret = PrivateKey(x25519_secret_from_ed25519_seed(custodian_seed))
    try:
        plain = SealedBox(secret).decrypt(request.sealed_identity)
    except CryptoError as exc:
        raise BadInput("the emergency request's identity is not sealed to this node") from exc
    value = canonical_decode(plain)
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise BadInput("the emergency request's identity is not [patient id, note]")
    identity = PatientIdentity(value[0], value[1])
    _check_identity(identity)
    return identity


# -- the rule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmergencyCase:
    """What the custodian knows when it judges a new emergency request."""

    requester: str  # the node that signed the transfer request
    requester_key: bytes
    custodian: str
    now: int
    clock_skew: int
    # The policy in force for the patient's key, or None: the federation default applies.
    policy: EmergencyPolicy | None
    default: Choice
    patient_known: bool


def judge_request(request: EmergencyRequest, case: EmergencyCase) -> Rule | None:
    """The rule an emergency request fails, or None if the custodian may serve it.

    Checked in order: signature, audience (custodian), requester, freshness (the request's
    time within the clock skew of now), a patient matched, and the policy in force.
    """
    if not request.signature_valid(case.requester_key):
        return Rule.BAD_SIGNATURE
    if request.custodian != case.custodian:
        return Rule.WRONG_CUSTODIAN
    if request.requester != case.requester:
        return Rule.WRONG_GRANTEE
    if abs(case.now - request.issued_at) > case.clock_skew:
        return Rule.EMERGENCY_STALE
    if not case.patient_known:
        return Rule.EMERGENCY_UNKNOWN_PATIENT
    if case.policy is None:
        allowed = allows(case.default, (), case.requester)
    else:
        allowed = case.policy.allows(case.requester)
    return None if allowed else Rule.EMERGENCY_NOT_ALLOWED


def join_references(refs: tuple[bytes, ...]) -> bytes:
    """Study references as one ``break_glass`` field: their bytes, concatenated in order."""
    return b"".join(refs)


def split_references(joined: bytes) -> tuple[bytes, ...]:
    """The study references of a ``break_glass`` field; raises BadInput if not whole."""
    if len(joined) % REFERENCE_SIZE:
        raise BadInput("a break_glass entry's studies are not whole 32-byte references")
    return tuple(joined[i : i + REFERENCE_SIZE] for i in range(0, len(joined), REFERENCE_SIZE))
