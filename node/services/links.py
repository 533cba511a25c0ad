"""Share links at the custodian: creating them, the SHL manifest, the link-scoped reads.

A share link is a grant (node.core.consent) whose grantee is ``link:`` + the SHA-256 of
the link's access token, signed by the patient and recorded in the log like any grant;
the patient revokes it like any grant. Beside it the custodian keeps (node.store.links)
the SHA-256 of the manifest id, the passcode's Argon2id hash and the files the wallet
encrypted under the link key, which it never sees.

Every request on a link runs the one consent check (``check_access`` with the link's
grantee as requester), so an expired or revoked link is refused on its next request,
with a ``denial`` in the log. A wrong passcode is a ``wrong_passcode`` denial; the
fifth kills the link (a ``link_dead`` denial), and a dead link is refused from then on.
What a link serves is an ``access`` entry per study (grantee = the link, digest =
node.core.shlink.link_access_digest of manifest, view or download), written before
anything is sent: the manifest on every request, a viewing session on the first
DICOMweb request of each SESSION_SECONDS window, a download on every download.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import nacl.exceptions
import nacl.pwhash

from node.core.base64url import b64url_decode
from node.core.consent import (
    OPINIONS,
    RULE_MESSAGES,
    GrantToken,
    Rule,
    decode_grant,
    is_link_grantee,
    link_grantee,
)
from node.core.entries import Access, Contribution
from node.core.rate_limit import SlidingWindowLimit
from node.core.reports import OpinionSubmission
from node.core.shlink import (
    ACCESS_CREDENTIAL,
    FHIR_JSON,
    ManifestFile,
    SeriesDescription,
    StudyDescription,
    decode_shlink,
    decrypt_file,
    imaging_study,
    json_object,
    link_access_digest,
    parse_access_credential,
    parse_manifest_files,
    parse_manifest_request,
    secret_digest,
    study_uid_of,
)
from node.errors import (
    BadInput,
    Forbidden,
    ImageShareError,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from node.services import consent
from node.services.peer_client import open_session
from node.services.previews import owned_study_uid
from node.services.runtime import NodeRuntime
from node.store.backends import open_link_store
from node.store.instances import Outcome, StagedInstance
from node.store.links import LinkRecord

log = logging.getLogger(__name__)

MAX_PASSCODE_ATTEMPTS = 5
# A viewing session: the first link-scoped DICOMweb request opens one, for this long.
SESSION_SECONDS = 15 * 60
# One ImagingStudy per study in a grant's scope, plus the credential.
MAX_FILES = 257
# Argon2id for passcodes, kept to 32 MiB and one at a time so that a burst of manifest
# requests cannot push the daemon past its memory bound.
PASSCODE_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
PASSCODE_MEMLIMIT = 32 * 1024 * 1024
# Manifest reads of one link per minute: each is a permanent, replicated access entry,
# and a viewer needs one per opening.
MAX_MANIFESTS_PER_MINUTE = 30
# Opinions one link may return an hour: each is stored and recorded for good.
MAX_OPINIONS_PER_HOUR = 20
# A fetched link's manifest and files, at most; instances are bounded by the store.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
COMMIT_INSTANCES = 64


class PasscodeRefused(Unauthorized):
    """A wrong (or missing) passcode; SHL answers it with the attempts left."""

    def __init__(self, message: str, remaining: int) -> None:
        super().__init__(message)
        self.remaining = remaining


class LinkInactive(NotFound):
    """The link is expired, revoked or dead: SHL answers 404 for a link no longer active."""


@dataclass(frozen=True)
class LinkAuthorization:
    """What a link-scoped request may read: the studies of a live link grant."""

    grantee: str
    token_id: bytes
    study_uids: frozenset[str]


class LinkService:
    """The share links of one custodian and its open viewing sessions."""

    def __init__(self, runtime: NodeRuntime) -> None:
        self.runtime = runtime
        self.store = open_link_store(runtime.config)
        self._sessions: dict[str, float] = {}  # grantee -> when its session began
        self._sessions_lock = threading.Lock()
        self._passcode_lock = threading.Lock()
        self.manifest_limit = SlidingWindowLimit(MAX_MANIFESTS_PER_MINUTE, 60.0)
        self.opinion_limit = SlidingWindowLimit(MAX_OPINIONS_PER_HOUR, 3600.0)

    def close(self) -> None:
        self.store.close()

    def begins_session(self, grantee: str, now: float) -> bool:
        """True if a request of ``grantee`` at ``now`` opens a new viewing session."""
        with self._sessions_lock:
            started = self._sessions.get(grantee)
            if started is not None and now - started < SESSION_SECONDS:
                return False
            for other, begun in list(self._sessions.items()):
                if now - begun >= SESSION_SECONDS:
                    del self._sessions[other]
            self._sessions[grantee] = now
            return True

    def passcode_matches(self, stored: bytes, passcode: str) -> bool:
        with self._passcode_lock:
            try:
                return bool(nacl.pwhash.argon2id.verify(stored, passcode.encode()))
            except nacl.exceptions.InvalidkeyError:
                return False


def hash_passcode(passcode: str) -> bytes:
    """The Argon2id hash kept of a link's passcode."""
    return bytes(
        nacl.pwhash.argon2id.str(
            passcode.encode(), opslimit=PASSCODE_OPSLIMIT, memlimit=PASSCODE_MEMLIMIT
        )
    )


# -- the patient's side --------------------------------------------------------------------


def describe_own_study(runtime: NodeRuntime, public_key: bytes, study_ref: bytes) -> dict[str, Any]:
    """The FHIR ImagingStudy of one of the patient's studies, for the wallet to put in a
    link (it sets the Endpoint's address, which only it knows: node.core.shlink
    .with_endpoint).

    Only for the patient's own signed request (the study's UIDs are theirs to share).
    Raises Forbidden if the study is not theirs, NotFound if no study has the reference.
    """
    study_uid = owned_study_uid(runtime, public_key, study_ref)
    row = runtime.store.study_row(study_uid)
    by_series: dict[str, int] = {}
    for record in runtime.store.instances(study_uid):
        by_series[record.series_instance_uid] = by_series.get(record.series_instance_uid, 0) + 1
    series = runtime.store.series_of_study(study_uid)
    study = StudyDescription(
        study_uid,
        row.get("study_date") or "",
        row.get("study_description") or "",
        tuple(
            SeriesDescription(
                s.series_instance_uid,
                s.number,
                s.modality,
                s.description,
                by_series.get(s.series_instance_uid, 0),
            )
            for s in series
        ),
    )
    return imaging_study(study, "")


def create_link(
    runtime: NodeRuntime, patient_key: bytes, document: Any, now: int | None = None
) -> consent.GrantRecord:
    """Record a share link the patient made: its grant (in the log) and its manifest.

    ``document`` is the wallet's JSON: ``{"grant": bytes, "manifest": SHA-256 of the
    manifest id, "passcode": text or None, "files": [...], "opinions": bool}`` (bytes as
    base64url). The holder may return an opinion when the patient signed the grant with
    the ``opinions`` permission (version 3); ``opinions``, when given, must say the same.
    Raises BadInput (malformed), Forbidden (not the caller's grant, not a link grant, or
    a consent rule refuses it: the lifetime over ``max_link_lifetime_days``...).
    """
    if not isinstance(document, dict):
        raise BadInput("a share link is JSON {grant, manifest, passcode, files}")
    grant_text, manifest_text = document.get("grant"), document.get("manifest")
    passcode = document.get("passcode")
    if not isinstance(grant_text, str) or not isinstance(manifest_text, str):
        raise BadInput("a share link names its grant and manifest digest")
    token_bytes = b64url_decode(grant_text, "grant", max_bytes=16 * 1024)
    manifest_digest = b64url_decode(manifest_text, "manifest digest", size=32)
    if len(manifest_digest) != 32:
        raise BadInput("a manifest digest is 32 bytes")
    if passcode is not None and (not isinstance(passcode, str) or not 1 <= len(passcode) <= 256):
        raise BadInput("a link's passcode is 1 to 256 characters")
    files = parse_manifest_files(document.get("files"), MAX_FILES)
    opinions = document.get("opinions", False)
    if not isinstance(opinions, bool):
        raise BadInput("a link's opinions permission is true or false")
    token = decode_grant(token_bytes)
    if token.patient_key != patient_key:
        raise Forbidden("a patient may submit only grants signed with their own key")
    if not is_link_grantee(token.fields.grantee):
        raise BadInput("a share link's grant names a link as its grantee")
    if opinions != token.fields.permits(OPINIONS) and "opinions" in document:
        raise BadInput("the opinions permission is granted in the signed grant (version 3)")
    passcode_hash = None if passcode is None else hash_passcode(passcode)
    recorded = consent.record_grant(runtime, token_bytes, now)
    runtime.services.links.store.add(
        LinkRecord(
            token.fields.grantee,
            manifest_digest,
            token.token_id,
            passcode_hash,
            0,
            False,
            files,
            token.fields.permits(OPINIONS),
        )
    )
    return recorded


# -- the link holder's side ------------------------------------------------------------------


def _grant_of(runtime: NodeRuntime, link: LinkRecord) -> GrantToken:
    row = runtime.services.consent.state.grant(link.token_id)
    if row is None:  # the links table is written only after the grant is in the log
        raise NotFound("no such share link")
    return decode_grant(row.token)


def _refuse(runtime: NodeRuntime, link: LinkRecord, rule: Rule, now: int) -> None:
    consent.record_denial(runtime, _grant_of(runtime, link), link.grantee, rule, None, now)


def _record_access(
    runtime: NodeRuntime, link: LinkRecord, refs: tuple[bytes, ...], kind: str, sent: int
) -> None:
    """One ``access`` entry per study for what the link is about to serve (durable first)."""
    ledger = runtime.services.ledger
    digest = link_access_digest(kind)
    accesses = []
    for ref in refs:
        instances, size = 0, sent
        if kind != "manifest":
            records = runtime.store.instances(consent.resolve_study_reference(runtime, ref))
            instances, size = len(records), sum(r.size for r in records)
        accesses.append(
            Access(
                token_id=link.token_id,
                grantee=link.grantee,
                study=ref,
                instances=instances,
                bytes=size,
                digest=digest,
            )
        )
    ledger.append_many(accesses)


def _live_studies(runtime: NodeRuntime, link: LinkRecord, now: int) -> tuple[bytes, ...]:
    """The study references a link may read now; raises LinkInactive (denial written)."""
    if link.dead:
        _refuse(runtime, link, Rule.LINK_DEAD, now)
        raise LinkInactive(f"the link is no longer active ({Rule.LINK_DEAD})")
    token = _grant_of(runtime, link)
    verdict = consent.check_access(runtime, token.raw, link.grantee, None, now)
    if not verdict.allowed:
        raise LinkInactive(f"the link is no longer active ({verdict.reason}): {verdict.message}")
    return verdict.studies


def open_manifest(
    runtime: NodeRuntime, manifest_id: str, body: bytes, now: int | None = None
) -> list[ManifestFile]:
    """Answer a manifest request: the link's encrypted files, if it is live and the
    passcode (when it has one) is right.

    Raises BadInput (malformed request), NotFound (no such link), TooManyRequests (over
    MAX_MANIFESTS_PER_MINUTE for the link), LinkInactive (expired, revoked, dead) and
    PasscodeRefused (wrong passcode, with the attempts left).
    """
    now = int(time.time()) if now is None else now
    service = runtime.services.links
    link = service.store.by_manifest(secret_digest(manifest_id))
    if link is None:
        raise NotFound("no such share link")
    request = parse_manifest_request(body)  # the recipient is not kept: the holder's own text
    if not service.manifest_limit.admit(link.grantee, time.monotonic()):
        raise TooManyRequests(
            f"the link's manifest was read {MAX_MANIFESTS_PER_MINUTE} times this minute"
        )
    refs = _live_studies(runtime, link, now)
    if link.passcode_hash is not None and not (
        request.passcode is not None
        and service.passcode_matches(link.passcode_hash, request.passcode)
    ):
        failures, dead = service.store.count_failure(link.grantee, MAX_PASSCODE_ATTEMPTS)
        _refuse(runtime, link, Rule.LINK_DEAD if dead else Rule.WRONG_PASSCODE, now)
        if dead:
            raise LinkInactive(f"the link is no longer active ({Rule.LINK_DEAD})")
        raise PasscodeRefused(RULE_MESSAGES[Rule.WRONG_PASSCODE], MAX_PASSCODE_ATTEMPTS - failures)
    _record_access(runtime, link, refs, "manifest", sum(len(f.embedded) for f in link.files))
    return link.files


def authorize_link(
    runtime: NodeRuntime, access_token: str, now: int | None = None
) -> LinkAuthorization:
    """The studies a link's access token opens now, and a viewing session's access entry
    when this request begins one.

    Raises Unauthorized for a credential of no link, LinkInactive for an expired,
    revoked or dead link (its denial written).
    """
    now = int(time.time()) if now is None else now
    service = runtime.services.links
    grantee = link_grantee(secret_digest(access_token))
    link = service.store.by_grantee(grantee)
    # Looked up by the credential's digest; compared again in constant time all the same.
    if link is None or not hmac.compare_digest(link.grantee.encode(), grantee.encode()):
        raise Unauthorized("no share link has that credential")
    refs = _live_studies(runtime, link, now)
    if service.begins_session(link.grantee, time.monotonic()):
        _record_access(runtime, link, refs, "view", 0)
    uids = frozenset(consent.resolve_study_reference(runtime, ref) for ref in refs)
    return LinkAuthorization(link.grantee, link.token_id, uids)


def authorize_download(
    runtime: NodeRuntime, access_token: str, now: int | None = None
) -> LinkAuthorization:
    """authorize_link for a download, which is recorded as a download of every study."""
    authorization = authorize_link(runtime, access_token, now)
    link = runtime.services.links.store.by_grantee(authorization.grantee)
    assert link is not None
    refs = tuple(consent.study_reference(runtime, uid) for uid in sorted(authorization.study_uids))
    _record_access(runtime, link, refs, "download", 0)
    return authorization


def authorize_opinion(
    runtime: NodeRuntime, access_token: str, now: int | None = None
) -> LinkAuthorization:
    """authorize_link for returning an opinion, checked before its body is read: Forbidden
    for a link whose patient-signed grant lacks the opinions permission (what an auditor
    checks of each ``contribution``), TooManyRequests past MAX_OPINIONS_PER_HOUR for the
    link (each one stored is kept and recorded for good)."""
    authorization = authorize_link(runtime, access_token, now)
    service = runtime.services.links
    link = service.store.by_grantee(authorization.grantee)
    if link is None or not _grant_of(runtime, link).fields.permits(OPINIONS):
        raise Forbidden("this link was not made to return an opinion")
    if not service.opinion_limit.admit(link.grantee, time.monotonic()):
        raise TooManyRequests(
            f"the link returned {MAX_OPINIONS_PER_HOUR} opinions in the last hour"
        )
    return authorization


def return_opinion(
    runtime: NodeRuntime, authorization: LinkAuthorization, opinion: OpinionSubmission
) -> dict[str, Any]:
    """Keep an opinion returned through an authorized link (authorize_opinion) on one of
    its studies, and record it as a ``contribution`` (the link's grant, the study's
    reference, the stored instance's SHA-256) once it is stored; blocking.

    Raises Forbidden for a study outside the link's scope, BadInput for a document that
    cannot be kept.
    """
    if opinion.study_uid not in authorization.study_uids:
        raise Forbidden("the study is not one of the link's")
    stored, digest = runtime.services.reports.submit_opinion(opinion, authorization.grantee)
    if stored.outcome is Outcome.STORED:
        runtime.services.ledger.append(
            Contribution(
                token_id=authorization.token_id,
                study=consent.study_reference(runtime, opinion.study_uid),
                digest=digest,
            )
        )
    return stored.as_json()


# -- a node taking a link: `imageshare fetch SHLINK` -----------------------------------------


@dataclass
class LinkFetch:
    """What a fetched link brought: per study, how many instances were stored."""

    custodian: str
    studies: dict[str, int]
    stored: int = 0
    duplicate: int = 0
    bytes: int = 0

    def as_json(self, dicomweb_root: str) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "instances": self.stored + self.duplicate,
            "stored": self.stored,
            "duplicate": self.duplicate,
            "bytes": self.bytes,
            "studies": [
                {"study_uid": uid, "instances": n, "dicomweb_url": f"{dicomweb_root}/studies/{uid}"}
                for uid, n in sorted(self.studies.items())
            ],
        }


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise BadInput("the custodian's answer is over its size limit")
    return bytes(data)


async def read_manifest(
    http: aiohttp.ClientSession, shlink: str, recipient: str, passcode: str | None
) -> tuple[list[dict[str, Any]], list[str], str]:
    """Request a link's manifest and decrypt it: (ImagingStudies, access tokens, the
    DICOMweb root of the credential). Raises BadInput, Forbidden or ImageShareError."""
    link = decode_shlink(shlink)
    if link.passcode and passcode is None:
        raise BadInput("the link needs its passcode (--passcode)")
    body: dict[str, Any] = {"recipient": recipient}
    if passcode is not None:
        body["passcode"] = passcode
    try:
        async with http.post(link.url, json=body) as response:
            data = await _read_limited(response, MAX_MANIFEST_BYTES)
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ImageShareError(f"the link's custodian is unreachable: {exc}") from exc
    document = json_object(data, "the link's manifest")
    if status != 200:
        raise Forbidden(f"the custodian refused the link: {document.get('error') or status}")
    files = parse_manifest_files(document.get("files"), MAX_FILES)
    studies, credential = [], None
    for item in files:
        plain = decrypt_file(link.key, item.embedded)
        if item.content_type == ACCESS_CREDENTIAL:
            credential = parse_access_credential(plain)
        elif item.content_type == FHIR_JSON:
            studies.append(json_object(plain, "an ImagingStudy of the link"))
    if credential is None:
        raise BadInput("the link's manifest holds no DICOMweb credential")
    if urlsplit(credential.dicomweb_root).netloc != urlsplit(link.url).netloc:
        # The images come from the link's custodian only, never from where a file points.
        raise BadInput("the link's DICOMweb root is not on the link's custodian")
    return studies, [credential.access_token], credential.dicomweb_root


async def _parts(response: aiohttp.ClientResponse) -> AsyncIterator[aiohttp.BodyPartReader]:
    try:
        reader = aiohttp.MultipartReader.from_response(response)
    except (ValueError, KeyError) as exc:
        raise BadInput("the custodian's answer is not multipart/related") from exc
    while True:
        part = await reader.next()
        if part is None:
            return
        if isinstance(part, aiohttp.BodyPartReader):
            yield part


async def fetch_link(runtime: NodeRuntime, shlink: str, passcode: str | None) -> LinkFetch:
    """Import the studies a share link opens into this node, through the store's durable
    path (staged, then committed in batches); raises as read_manifest, or BadInput for a
    malformed answer. No ``receipt`` is written: a link is not a federation member."""
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
    async with open_session(runtime.config.http.trusted_ca_file, timeout) as http:
        studies, _, root = await read_manifest(http, shlink, runtime.config.origin, passcode)
        custodian = urlsplit(root).netloc
        result = LinkFetch(custodian, {})
        source = f"{consent.FETCHED_SOURCE_PREFIX}{custodian} by a share link"
        for document in studies:
            try:
                await _fetch_study(
                    runtime, http, f"{root}/studies/{study_uid_of(document)}", source, result
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ImageShareError(f"a study could not be read through the link: {exc}") from exc
    return result


async def _fetch_study(
    runtime: NodeRuntime, http: aiohttp.ClientSession, url: str, source: str, result: LinkFetch
) -> None:
    store = runtime.store
    batch: list[StagedInstance] = []

    async def commit() -> None:
        results = await store.off_loop(store.commit, list(batch), source)
        batch.clear()
        for item in results:
            result.stored += item.outcome is Outcome.STORED
            result.duplicate += item.outcome is not Outcome.STORED
            uid = item.study_instance_uid
            result.studies[uid] = result.studies.get(uid, 0) + 1

    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    try:
        async with http.get(url, headers=headers) as response:
            if response.status != 200:
                raise Forbidden(f"the custodian refused the study ({response.status})")
            async for part in _parts(response):
                staging = store.open_staging()
                try:
                    while chunk := await part.read_chunk(256 * 1024):
                        staging.write(chunk)
                        result.bytes += len(chunk)
                    staging.close()
                except BaseException:
                    staging.abort()
                    raise
                batch.append(await asyncio.to_thread(staging.finish))
                if len(batch) >= COMMIT_INSTANCES:
                    await commit()
        await commit()
    finally:
        store.discard(batch)
