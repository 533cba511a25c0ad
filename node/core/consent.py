"""Consent tokens (grants and revocations) and the one function that judges a grant.

Wire format (canonical msgpack, see node.core.encoding)::

    grant      = [1, patient_key bin32, custodian str, grantee str,
                  scope (nil = all my studies there | [study_ref bin32, ...]),
                  not_before uint, expires uint, nonce bin16, signature bin64]
    grant v3   = [3, ...the same fields..., nonce bin16, permissions [str, ...], signature]
    revocation = [1, patient_key bin32, token_id bin32, revoked_at uint, signature bin64]

The signature covers a domain-separation prefix and the canonical encoding of every
field before it: ``b"imageshare/grant/v1\\n" + encode(fields)`` (``imageshare/revoke/v1``
for revocations), so a signature of one kind can never pass as the other. The token id
is SHA-256 of the whole signed token; the text form is unpadded base64url of those bytes,
and the URL form is ``imageshare:grant?t=<text>``. A decoder accepts only the canonical
encoding, so one grant has exactly one token id.

Pure: no I/O, and the clock is always passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from node.core.base64url import b64url_decode, b64url_encode
from node.core.encoding import canonical_decode, canonical_encode
from node.core.keys import PUBLIC_KEY_SIZE, verify_ed25519
from node.core.origins import LINK_PREFIX, check_node_origin, is_node_origin
from node.errors import BadInput

GRANT_DOMAIN = b"imageshare/grant/v1\n"
REVOKE_DOMAIN = b"imageshare/revoke/v1\n"
TOKEN_VERSION = 1
# A grant signed by a delegate carries its delegation (see Delegation).
DELEGATED_VERSION = 2
DELEGATION_MARK = "delegation"
DELEGATION_DOMAIN = b"imageshare/delegation/v1\n"
# A share link's grant that lets its holder do more than read (version 3): the
# permissions are signed by the patient, so an auditor can check what the link allowed.
PERMISSIONS_VERSION = 3
OPINIONS = "opinions"  # the link's holder may return an opinion on its studies
PERMISSIONS = frozenset({OPINIONS})
URL_PREFIX = "imageshare:grant?t="
REFERENCE_SIZE = 32
NONCE_SIZE = 16
SIGNATURE_SIZE = 64
MAX_TOKEN_BYTES = 16 * 1024
MAX_SCOPE = 256
MAX_TIME = 2**40  # far beyond any real date; keeps arithmetic on times exact

Signer = Callable[[bytes], bytes]


class Rule(StrEnum):
    """Why a grant is refused; each value names exactly one rule."""

    TAMPERED = "tampered"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CUSTODIAN = "wrong_custodian"
    UNKNOWN_PATIENT = "unknown_patient"
    KEY_RETIRED = "key_retired"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    WRONG_GRANTEE = "wrong_grantee"
    OUT_OF_SCOPE = "out_of_scope"
    NOT_OWNER = "not_owner"
    NOT_RECORDED = "not_recorded"
    # Share links only (node.services.links): the passcode, and a link it killed.
    WRONG_PASSCODE = "wrong_passcode"
    LINK_DEAD = "link_dead"
    # Break-glass only (node.core.emergency).
    EMERGENCY_STALE = "emergency_stale"
    EMERGENCY_UNKNOWN_PATIENT = "emergency_unknown_patient"
    EMERGENCY_NOT_ALLOWED = "emergency_not_allowed"
    EMERGENCY_RATE_LIMITED = "emergency_rate_limited"
    # A delegate's grant (version 2), judged when it is recorded.
    DELEGATION_NOT_LIVE = "delegation_not_live"
    DELEGATION_REVOKED = "delegation_revoked"
    DELEGATION_NO_POWER = "delegation_no_power"
    DELEGATION_OUT_OF_SCOPE = "delegation_out_of_scope"


RULE_MESSAGES: dict[Rule, str] = {
    Rule.TAMPERED: "the token is not a well-formed grant",
    Rule.BAD_SIGNATURE: "the patient's signature on the token does not verify",
    Rule.WRONG_CUSTODIAN: "the token is for another custodian",
    Rule.UNKNOWN_PATIENT: "the token's patient key is not enrolled here",
    Rule.KEY_RETIRED: "the token's patient key has been replaced and its grants retired",
    Rule.LIFETIME_TOO_LONG: "the token's lifetime is over this custodian's maximum",
    Rule.NOT_YET_VALID: "the token is not valid yet",
    Rule.EXPIRED: "the token has expired",
    Rule.REVOKED: "the patient has revoked the token",
    Rule.WRONG_GRANTEE: "the token was granted to another node",
    Rule.OUT_OF_SCOPE: "a requested study is not in the token's scope",
    Rule.NOT_OWNER: "a study in the token's scope belongs to another patient",
    Rule.NOT_RECORDED: "the token is not recorded in this custodian's log",
    Rule.WRONG_PASSCODE: "the link's passcode is wrong",
    Rule.LINK_DEAD: "the link was closed after too many wrong passcodes",
    Rule.EMERGENCY_STALE: "the emergency request is not fresh, or its access window is over",
    Rule.EMERGENCY_UNKNOWN_PATIENT: "no patient here has the identifier the request names",
    Rule.EMERGENCY_NOT_ALLOWED: "the patient's emergency policy does not allow this node",
    Rule.EMERGENCY_RATE_LIMITED: "this node has made too many emergency requests this hour",
    Rule.DELEGATION_NOT_LIVE: "the delegation was not recorded and in force when it was used",
    Rule.DELEGATION_REVOKED: "the patient revoked the delegation the delegate acts under",
    Rule.DELEGATION_NO_POWER: "the delegation does not give the power this needs",
    Rule.DELEGATION_OUT_OF_SCOPE: "this reaches studies the delegation does not cover",
}


# -- grantees ----------------------------------------------------------------------------

CREDENTIAL_DIGEST_SIZE = 32
_LINK_GRANTEE_LENGTH = len(LINK_PREFIX) + 43  # 32 bytes in unpadded base64url


def link_grantee(credential_digest: bytes) -> str:
    """The grantee of a share link: ``link:`` + base64url of its credential's SHA-256.

    The link's holder proves to be this grantee by presenting the credential, as a node
    proves its origin by signing; the digest names the link without revealing it.
    """
    checked_bytes(credential_digest, CREDENTIAL_DIGEST_SIZE, "credential digest")
    return LINK_PREFIX + b64url_encode(credential_digest)


def is_link_grantee(value: object) -> bool:
    """True if ``value`` is a share link's grantee (never a node origin: see origins.py)."""
    if not isinstance(value, str) or len(value) != _LINK_GRANTEE_LENGTH:
        return False
    if not value.startswith(LINK_PREFIX):
        return False
    try:
        return len(b64url_decode(value[len(LINK_PREFIX) :], "link")) == CREDENTIAL_DIGEST_SIZE
    except BadInput:
        return False


# -- delegations ---------------------------------------------------------------------------


class Power(StrEnum):
    """What a delegation lets its delegate do for the patient."""

    GRANT = "grant"
    REVOKE = "revoke"
    VIEW_LOG = "view_log"
    DOWNLOAD = "download"


@dataclass(frozen=True)
class Delegation:
    """A patient's signed delegation of powers over some (or all) studies to another key.

    Wire form (canonical msgpack)::

        ["delegation", 1, patient_key bin32, custodian str, delegate_key bin32,
         scope (nil | [study_ref bin32, ...]), powers [str, ...], not_before uint,
         expires uint, nonce bin16, signature bin64]

    signed by the patient over ``"imageshare/delegation/v1\\n" + encode(fields)``. Its id
    is SHA-256 of the signed bytes; the patient ends it by revoking that id.
    """

    patient_key: bytes
    custodian: str
    delegate_key: bytes
    scope: tuple[bytes, ...] | None
    powers: tuple[Power, ...]
    not_before: int
    expires: int
    nonce: bytes
    signature: bytes = b""
    raw: bytes = b""

    @property
    def delegation_id(self) -> bytes:
        return token_id_of(self.raw)

    def as_list(self) -> list[Any]:
        return [
            DELEGATION_MARK,
            TOKEN_VERSION,
            self.patient_key,
            self.custodian,
            self.delegate_key,
            None if self.scope is None else list(self.scope),
            [p.value for p in self.powers],
            self.not_before,
            self.expires,
            self.nonce,
        ]

    def signed_message(self) -> bytes:
        return DELEGATION_DOMAIN + canonical_encode(self.as_list())

    def signature_valid(self) -> bool:
        return verify_ed25519(self.patient_key, self.signed_message(), self.signature)

    def covers(self, scope: tuple[bytes, ...] | None) -> bool:
        """Whether a grant of ``scope`` stays within this delegation's studies."""
        if self.scope is None:
            return True
        return scope is not None and set(scope) <= set(self.scope)


def _check_delegation(delegation: Delegation) -> None:
    checked_bytes(delegation.patient_key, PUBLIC_KEY_SIZE, "patient key")
    checked_bytes(delegation.delegate_key, PUBLIC_KEY_SIZE, "delegate key")
    if delegation.delegate_key == delegation.patient_key:
        raise BadInput("a patient cannot delegate to their own key")
    check_node_origin(delegation.custodian, "custodian")
    _check_scope(delegation.scope, "a delegation")
    if not delegation.powers or len(set(delegation.powers)) != len(delegation.powers):
        raise BadInput("a delegation names each of its powers once, at least one")
    checked_time(delegation.not_before, "not-before")
    checked_time(delegation.expires, "expiry")
    if delegation.expires <= delegation.not_before:
        raise BadInput("a delegation must expire after it starts")
    checked_bytes(delegation.nonce, NONCE_SIZE, "nonce")


def sign_delegation(delegation: Delegation, sign: Signer) -> bytes:
    """The signed bytes of ``delegation`` (its signature and raw fields are ignored)."""
    _check_delegation(delegation)
    return canonical_encode([*delegation.as_list(), sign(delegation.signed_message())])


def decode_delegation(data: bytes) -> Delegation:
    """Decode a delegation (signature not checked); raises BadInput if malformed."""
    if not isinstance(data, bytes) or not data or len(data) > MAX_TOKEN_BYTES:
        raise BadInput("a delegation is empty or too large")
    value = canonical_decode(data)
    if (
        not isinstance(value, list)
        or len(value) != 11
        or value[0] != DELEGATION_MARK
        or type(value[1]) is not int
        or value[1] != TOKEN_VERSION
    ):
        raise BadInput(f"not a version {TOKEN_VERSION} delegation")
    _, _, patient_key, custodian, delegate_key, scope, powers, nb, expires, nonce, sig = value
    if scope is not None and not isinstance(scope, list):
        raise BadInput("a delegation's scope is nil or a list of study references")
    known = {p.value for p in Power}
    if not isinstance(powers, list) or not all(isinstance(p, str) and p in known for p in powers):
        raise BadInput(f"a delegation's powers are some of {', '.join(sorted(known))}")
    delegation = Delegation(
        patient_key,
        custodian,
        delegate_key,
        None if scope is None else tuple(scope),
        tuple(Power(p) for p in powers),
        nb,
        expires,
        nonce,
        checked_bytes(sig, SIGNATURE_SIZE, "signature"),
        data,
    )
    _check_delegation(delegation)
    return delegation


# -- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrantFields:
    """What a patient grants: the unsigned part of a grant token."""

    patient_key: bytes
    custodian: str
    grantee: str
    # None grants every study of this patient at the custodian.
    scope: tuple[bytes, ...] | None
    not_before: int
    expires: int
    nonce: bytes
    # A grant by a delegate (version 2): the patient-signed delegation it acts under;
    # ``patient_key`` is then the delegate's key, which signs the grant.
    delegation: bytes | None = None
    # What a share link's holder may do besides reading (version 3): sorted PERMISSIONS.
    permissions: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        if self.delegation is not None:
            return DELEGATED_VERSION
        return PERMISSIONS_VERSION if self.permissions else TOKEN_VERSION

    def permits(self, permission: str) -> bool:
        return permission in self.permissions

    def as_list(self) -> list[Any]:
        scope = None if self.scope is None else list(self.scope)
        fields = [
            self.version,
            self.patient_key,
            self.custodian,
            self.grantee,
            scope,
            self.not_before,
            self.expires,
            self.nonce,
        ]
        if self.delegation is not None:
            return [*fields, self.delegation]
        return [*fields, list(self.permissions)] if self.permissions else fields

    def signed_message(self) -> bytes:
        return GRANT_DOMAIN + canonical_encode(self.as_list())


@dataclass(frozen=True)
class GrantToken:
    """A decoded grant token: its fields, signature, and the exact bytes it came from."""

    fields: GrantFields
    signature: bytes
    raw: bytes
    # The delegation a delegate's grant carries (its chain), decoded.
    delegation: Delegation | None = None

    @cached_property
    def token_id(self) -> bytes:
        # Cached: an auditor looks a grant up by it at each of its accesses.
        return token_id_of(self.raw)

    @property
    def patient_key(self) -> bytes:
        """The patient's key: the signer's, or for a delegate's grant, the delegator's."""
        if self.delegation is not None:
            return self.delegation.patient_key
        return self.fields.patient_key

    def signature_valid(self) -> bool:
        """The signer's signature, and for a delegate's grant, the whole chain: the
        delegation is the patient's, for this custodian, and names the signer."""
        return self._signature_valid

    @cached_property
    def _signature_valid(self) -> bool:
        # Checked once per decoded token: an auditor judges every access by its grant.
        signer = self.fields.patient_key
        if not verify_ed25519(signer, self.fields.signed_message(), self.signature):
            return False
        chain = self.delegation
        return chain is None or (
            chain.signature_valid()
            and chain.delegate_key == self.fields.patient_key
            and chain.custodian == self.fields.custodian
        )


def token_id_of(token_bytes: bytes) -> bytes:
    """A token's id: SHA-256 of its signed bytes."""
    return hashlib.sha256(token_bytes).digest()


def sign_grant(fields: GrantFields, sign: Signer) -> bytes:
    """The signed token bytes of ``fields``; raises BadInput if a field is out of range."""
    _check_grant_fields(fields)
    return canonical_encode([*fields.as_list(), sign(fields.signed_message())])


def checked_bytes(value: Any, size: int, what: str) -> bytes:
    """``value`` if it is exactly ``size`` bytes; BadInput naming ``what`` otherwise."""
    if not isinstance(value, bytes) or len(value) != size:
        raise BadInput(f"{what} must be {size} bytes")
    return value


def checked_time(value: Any, what: str) -> int:
    """``value`` if it is a time (whole seconds in range); BadInput naming ``what`` otherwise."""
    # bool is an int in Python; msgpack booleans are not times.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_TIME:
        raise BadInput(f"{what} is not a time")
    return value


def _check_scope(scope: tuple[bytes, ...] | None, what: str) -> None:
    """A scope is nil (every study) or 1 to MAX_SCOPE distinct study references."""
    if scope is None:
        return
    if not 1 <= len(scope) <= MAX_SCOPE:
        raise BadInput(f"{what}'s scope lists 1 to {MAX_SCOPE} studies")
    for ref in scope:
        checked_bytes(ref, REFERENCE_SIZE, "study reference")
    if len(set(scope)) != len(scope):
        raise BadInput(f"{what}'s scope lists a study twice")


def _check_grant_fields(fields: GrantFields) -> None:
    checked_bytes(fields.patient_key, PUBLIC_KEY_SIZE, "patient key")
    check_node_origin(fields.custodian, "custodian")
    if not is_node_origin(fields.grantee) and not is_link_grantee(fields.grantee):
        raise BadInput("grantee is neither a node origin nor a share link")
    _check_scope(fields.scope, "a grant")
    checked_time(fields.not_before, "not-before")
    checked_time(fields.expires, "expiry")
    if fields.expires <= fields.not_before:
        raise BadInput("a grant must expire after it starts")
    checked_bytes(fields.nonce, NONCE_SIZE, "nonce")
    _check_permissions(fields)


def _check_permissions(fields: GrantFields) -> None:
    """Permissions are for a link's own grant: known, distinct, sorted (one encoding)."""
    permissions = fields.permissions
    if not permissions:
        return
    if not isinstance(permissions, tuple) or not all(isinstance(p, str) for p in permissions):
        raise BadInput("a grant's permissions are a list of words")
    if not set(permissions) <= PERMISSIONS:
        raise BadInput(f"a grant's permissions are some of {sorted(PERMISSIONS)}")
    if list(permissions) != sorted(set(permissions)):
        raise BadInput("a grant's permissions are sorted and distinct")
    if fields.delegation is not None:
        raise BadInput("a delegate's grant carries no permissions")
    if not is_link_grantee(fields.grantee):
        raise BadInput("only a share link's grant carries permissions")


def _decode_canonical_list(
    data: bytes, length: int, what: str, versions: Mapping[int, int] | None = None
) -> list[Any]:
    """The canonical list in ``data``: version 1 of ``length`` fields, or one of the
    ``versions`` (version -> field count)."""
    if not isinstance(data, bytes) or not data or len(data) > MAX_TOKEN_BYTES:
        raise BadInput(f"{what} is empty or too large")
    lengths = versions or {TOKEN_VERSION: length}
    value = canonical_decode(data)
    if (
        not isinstance(value, list)
        or not value
        or type(value[0]) is not int
        or lengths.get(value[0]) != len(value)
    ):
        known = " or ".join(str(v) for v in sorted(lengths))
        raise BadInput(f"{what} is not a version {known} token")
    return value


def decode_grant(token_bytes: bytes) -> GrantToken:
    """Decode a grant token's bytes (signature not checked); raises BadInput if malformed.

    Version 1 is the patient's own grant; version 2 a delegate's, carrying its delegation;
    version 3 a link's grant carrying permissions.
    """
    value = _decode_canonical_list(
        token_bytes,
        9,
        "grant token",
        {TOKEN_VERSION: 9, DELEGATED_VERSION: 10, PERMISSIONS_VERSION: 10},
    )
    chain_bytes = value.pop(8) if value[0] == DELEGATED_VERSION else None
    permissions = value.pop(8) if value[0] == PERMISSIONS_VERSION else ()
    if not isinstance(permissions, list | tuple) or (
        value[0] == PERMISSIONS_VERSION and not permissions
    ):
        raise BadInput("a version 3 grant lists one or more permissions")
    chain = None if chain_bytes is None else decode_delegation(chain_bytes)
    _, patient_key, custodian, grantee, scope, not_before, expires, nonce, signature = value
    if scope is not None and not isinstance(scope, list):
        raise BadInput("a grant's scope is nil or a list of study references")
    fields = GrantFields(
        patient_key=patient_key,
        custodian=custodian,
        grantee=grantee,
        scope=None if scope is None else tuple(scope),
        not_before=not_before,
        expires=expires,
        nonce=nonce,
        delegation=chain_bytes,
        permissions=tuple(permissions),
    )
    _check_grant_fields(fields)
    checked_bytes(signature, SIGNATURE_SIZE, "signature")
    return GrantToken(fields, signature, token_bytes, chain)


@dataclass(frozen=True)
class Revocation:
    """A patient's signed statement that one of its tokens is no longer valid.

    Version 2 is a delegate's: signed by the delegate's key, carrying the patient-signed
    delegation it acts under (``[2, delegate_key, token_id, revoked_at, delegation,
    signature]``). ``patient_key`` is always the patient's: the signer's, or the
    delegation's patient.
    """

    patient_key: bytes
    token_id: bytes
    revoked_at: int
    signature: bytes
    raw: bytes
    delegation: Delegation | None = None

    @property
    def signer_key(self) -> bytes:
        """The key that signed it: the patient's, or the delegate's."""
        return self.patient_key if self.delegation is None else self.delegation.delegate_key

    def signed_message(self) -> bytes:
        return REVOKE_DOMAIN + canonical_encode(
            _revocation_fields(self.signer_key, self.token_id, self.revoked_at, self.delegation)
        )

    def signature_valid(self) -> bool:
        """The signer's signature, and for a delegate's, the delegation's patient signature."""
        if not verify_ed25519(self.signer_key, self.signed_message(), self.signature):
            return False
        return self.delegation is None or self.delegation.signature_valid()


def _revocation_fields(
    signer_key: bytes, token_id: bytes, revoked_at: int, delegation: Delegation | None
) -> list[Any]:
    if delegation is None:
        return [TOKEN_VERSION, signer_key, token_id, revoked_at]
    return [DELEGATED_VERSION, signer_key, token_id, revoked_at, delegation.raw]


def sign_revocation(
    patient_key: bytes,
    token_id: bytes,
    revoked_at: int,
    sign: Signer,
    delegation: bytes | None = None,
) -> bytes:
    """The signed revocation bytes of one token id; with ``delegation``, a delegate's
    (``patient_key`` is then the delegate's key, which signs)."""
    checked_bytes(patient_key, PUBLIC_KEY_SIZE, "patient key")
    checked_bytes(token_id, 32, "token id")
    checked_time(revoked_at, "revocation time")
    chain = None if delegation is None else decode_delegation(delegation)
    if chain is not None and chain.delegate_key != patient_key:
        raise BadInput("a delegate's revocation is signed by the delegation's delegate")
    fields = _revocation_fields(patient_key, token_id, revoked_at, chain)
    return canonical_encode([*fields, sign(REVOKE_DOMAIN + canonical_encode(fields))])


def decode_revocation(data: bytes) -> Revocation:
    """Decode a revocation (signature not checked); raises BadInput if malformed."""
    value = _decode_canonical_list(data, 5, "revocation", {TOKEN_VERSION: 5, DELEGATED_VERSION: 6})
    chain = decode_delegation(value.pop(4)) if value[0] == DELEGATED_VERSION else None
    _, signer_key, token_id, revoked_at, signature = value
    checked_bytes(signer_key, PUBLIC_KEY_SIZE, "patient key")
    if chain is not None and chain.delegate_key != signer_key:
        raise BadInput("a delegate's revocation is signed by the delegation's delegate")
    return Revocation(
        signer_key if chain is None else chain.patient_key,
        checked_bytes(token_id, 32, "token id"),
        checked_time(revoked_at, "revocation time"),
        checked_bytes(signature, SIGNATURE_SIZE, "signature"),
        data,
        chain,
    )


def token_text(token_bytes: bytes) -> str:
    """The printable form of a token (unpadded base64url)."""
    return b64url_encode(token_bytes)


def token_url(token_bytes: bytes) -> str:
    """The ``imageshare:`` URL form of a token."""
    return URL_PREFIX + token_text(token_bytes)


def parse_token_text(text: str) -> bytes:
    """Token bytes from its text or URL form; raises BadInput if it is neither."""
    text = text.strip()
    if text.startswith("imageshare:"):
        if not text.startswith(URL_PREFIX):
            raise BadInput("an imageshare: token URL looks like imageshare:grant?t=TOKEN")
        text = text[len(URL_PREFIX) :]
    return b64url_decode(text, "token", max_bytes=MAX_TOKEN_BYTES)


# -- validation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    """Who asks, for which studies (None: everything the token grants), and when."""

    requester_origin: str
    study_refs: tuple[bytes, ...] | None
    now: int


@dataclass(frozen=True)
class KeyStatus:
    subject: bytes
    retired: bool = False


@dataclass(frozen=True)
class ConsentView:
    """What the custodian's log says, as far as one decision needs it.

    ``revoked`` holds (patient key, token id) pairs: a revocation counts only when
    signed by the key that signed the grant.
    """

    keys: Mapping[bytes, KeyStatus] = field(default_factory=dict)
    studies_of_subject: Mapping[bytes, frozenset[bytes]] = field(default_factory=dict)
    revoked: frozenset[tuple[bytes, bytes]] = frozenset()
    recorded: frozenset[bytes] = frozenset()
    # Ids of the delegations recorded in the log (a delegate's grant needs its own).
    delegations: frozenset[bytes] = frozenset()


@dataclass(frozen=True)
class ConsentPolicy:
    custodian_origin: str
    max_lifetime: int
    clock_skew: int
    # A share link opens a study to whoever holds it: its lifetime has its own bound.
    max_link_lifetime: int = MAX_TIME

    def lifetime_limit(self, grantee: str) -> int:
        """The longest lifetime a grant to ``grantee`` may have."""
        return self.max_link_lifetime if is_link_grantee(grantee) else self.max_lifetime


@dataclass(frozen=True)
class Verdict:
    """The decision on a grant; ``studies`` are the references it allows (sorted)."""

    allowed: bool
    rule: Rule | None = None
    token: GrantToken | None = None
    studies: tuple[bytes, ...] = ()

    @property
    def reason(self) -> str:
        return "ok" if self.rule is None else self.rule.value

    @property
    def message(self) -> str:
        return "the token allows this request" if self.rule is None else RULE_MESSAGES[self.rule]

    @property
    def token_id(self) -> bytes | None:
        return None if self.token is None else self.token.token_id


def _refuse(rule: Rule, token: GrantToken | None = None) -> Verdict:
    return Verdict(False, rule, token)


def _standing_failure(
    token: GrantToken, state: ConsentView, policy: ConsentPolicy, now: int
) -> Rule | None:
    """The rules that make a grant worthless whoever asks: the ones checked on recording."""
    grant = token.fields
    key = state.keys.get(token.patient_key)
    if not token.signature_valid():
        return Rule.BAD_SIGNATURE
    if grant.custodian != policy.custodian_origin:
        return Rule.WRONG_CUSTODIAN
    if key is None:
        return Rule.UNKNOWN_PATIENT
    if key.retired:
        return Rule.KEY_RETIRED
    if grant.expires - grant.not_before > policy.lifetime_limit(grant.grantee):
        return Rule.LIFETIME_TOO_LONG
    if now - policy.clock_skew > grant.expires:
        return Rule.EXPIRED
    if (token.patient_key, token.token_id) in state.revoked:
        return Rule.REVOKED
    owned = state.studies_of_subject.get(key.subject, frozenset())
    if grant.scope is not None and not set(grant.scope) <= owned:
        return Rule.NOT_OWNER
    return None


def admit_grant(token_bytes: bytes, state: ConsentView, policy: ConsentPolicy, now: int) -> Verdict:
    """May this grant be recorded in the custodian's log? (Not-yet-valid grants may.)"""
    try:
        token = decode_grant(token_bytes)
    except BadInput:
        return _refuse(Rule.TAMPERED)
    rule = _standing_failure(token, state, policy, now) or delegation_failure(
        token, state, policy, now
    )
    return _refuse(rule, token) if rule else Verdict(True, None, token, _scope_of(token, state))


def delegation_failure(
    token: GrantToken, state: ConsentView, policy: ConsentPolicy, now: int
) -> Rule | None:
    """For a delegate's grant, the rule its delegation fails at ``now`` (the grant's
    recording), or None. Once recorded, the grant keeps its own validity: revoking the
    delegation ends the delegate's power to make grants, not the grants it made."""
    chain = token.delegation
    if chain is None:
        return None
    return power_failure(chain, Power.GRANT, token.fields.scope, state, policy, now)


def power_failure(
    chain: Delegation,
    power: Power,
    scope: tuple[bytes, ...] | None,
    state: ConsentView,
    policy: ConsentPolicy,
    now: int,
) -> Rule | None:
    """The rule a delegate's act fails, or None: its delegation is recorded, unrevoked
    and live at ``now``, gives ``power``, and covers ``scope`` (None: every study)."""
    if chain.delegation_id not in state.delegations:
        return Rule.DELEGATION_NOT_LIVE
    if (chain.patient_key, chain.delegation_id) in state.revoked:
        return Rule.DELEGATION_REVOKED
    if not chain.not_before - policy.clock_skew <= now <= chain.expires + policy.clock_skew:
        return Rule.DELEGATION_NOT_LIVE
    if power not in chain.powers:
        return Rule.DELEGATION_NO_POWER
    if not chain.covers(scope):
        return Rule.DELEGATION_OUT_OF_SCOPE
    return None


def _scope_of(token: GrantToken, state: ConsentView) -> tuple[bytes, ...]:
    if token.fields.scope is not None:
        return tuple(sorted(token.fields.scope))
    subject = state.keys[token.patient_key].subject
    return tuple(sorted(state.studies_of_subject.get(subject, frozenset())))


def validate_grant(
    token_bytes: bytes, request: AccessRequest, state: ConsentView, policy: ConsentPolicy
) -> Verdict:
    """Decide whether ``token_bytes`` lets ``request`` through, and if not, by which rule.

    Every refusal names one Rule. Never raises on any input: undecodable bytes are
    refused as TAMPERED.
    """
    try:
        token = decode_grant(token_bytes)
    except BadInput:
        return _refuse(Rule.TAMPERED)
    return validate_token(token, request, state, policy)


def validate_token(
    token: GrantToken, request: AccessRequest, state: ConsentView, policy: ConsentPolicy
) -> Verdict:
    """validate_grant for a grant already decoded (its signature is checked once per token)."""
    grant = token.fields
    rule = _standing_failure(token, state, policy, request.now)
    if rule is not None:
        return _refuse(rule, token)
    if request.now + policy.clock_skew < grant.not_before:
        return _refuse(Rule.NOT_YET_VALID, token)
    if request.requester_origin != grant.grantee:
        return _refuse(Rule.WRONG_GRANTEE, token)
    granted = _scope_of(token, state)
    if request.study_refs is not None:
        requested = set(request.study_refs)
        if grant.scope is not None and not requested <= set(grant.scope):
            return _refuse(Rule.OUT_OF_SCOPE, token)
        if grant.scope is None and not requested <= set(granted):
            return _refuse(Rule.NOT_OWNER, token)
        granted = tuple(sorted(requested))
    if token.token_id not in state.recorded:
        # A delegate's grant the log could not record says why: its delegation.
        rule = delegation_failure(token, state, policy, request.now) or Rule.NOT_RECORDED
        return _refuse(rule, token)
    return Verdict(True, None, token, granted)


def scope_text(scope: Sequence[bytes] | None) -> list[str] | str:
    """A scope for people and JSON: "all", or the study references in base64url."""
    return "all" if scope is None else [b64url_encode(ref) for ref in scope]
