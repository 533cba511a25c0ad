"""SMART Health Links (HL7 SHL STU1) as ImageShare shares a study: formats, pure.

A share link is ``shlink:/`` + base64url of the JSON payload ``{"url", "key", "exp",
"flag", "label", "v"}`` (a viewer URL carries it after ``#``, so it never reaches a
server). ``url`` is the custodian's manifest address, ``key`` the 32-byte AES key
(unpadded base64url) that every file of the manifest is encrypted under, as a compact
JWE (``alg: dir``, ``enc: A256GCM``). The manifest answers ``POST url`` with
``{"recipient", "passcode"?}`` with ``{"files": [{"contentType", "embedded"}]}``.

The files ImageShare puts in a link (made by the wallet; the custodian stores only their
ciphertext): a FHIR R4 ImagingStudy per study, as SMART Imaging Access profiles it (the
Study Instance UID as an ``urn:dicom:uid`` identifier, series, modalities, instance
counts, a contained WADO-RS Endpoint), and one ``application/smart-api-access`` file
holding the credential of the link's DICOMweb root.

Ledger ``access`` entries of a link name what was accessed through their ``digest``
(link_access_digest): nothing was sent to a grantee node that could match it.

Pure: no I/O, no clock; random values are passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from node.core.base64url import b64url_decode, b64url_encode
from node.errors import BadInput

SHLINK_PREFIX = "shlink:/"
SHL_VERSION = 1
KEY_SIZE = 32
SECRET_SIZE = 32  # manifest ids and access tokens: 256 bits, like the SHL key
MAX_SHLINK_CHARS = 8192
MAX_LABEL = 80  # SHL STU1
MAX_FILE_CHARS = 256 * 1024
FHIR_JSON = "application/fhir+json"
ACCESS_CREDENTIAL = "application/smart-api-access"
DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM_CODES = "http://dicom.nema.org/resources/ontology/DCM"
ENDPOINT_TYPES = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
LINK_ACCESS_DOMAIN = b"imageshare/link-access/v1\n"
# What a link's access entry records: the manifest read, a viewing session, a download.
LINK_ACCESS_KINDS = ("manifest", "view", "download")


# -- the link ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareLink:
    """A decoded SMART Health Link payload."""

    url: str
    key: bytes
    expires: int | None = None
    passcode: bool = False
    label: str = ""

    def payload(self) -> dict[str, Any]:
        document: dict[str, Any] = {"url": self.url, "key": b64url_encode(self.key)}
        if self.expires is not None:
            document["exp"] = self.expires
        if self.passcode:
            document["flag"] = "P"
        if self.label:
            document["label"] = self.label
        document["v"] = SHL_VERSION
        return document


def _check_url(url: object) -> str:
    if not isinstance(url, str) or len(url) > 1024:
        raise BadInput("a share link's url is missing or too long")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise BadInput("a share link's url must be an http(s) URL")
    return url


def _check_label(label: object) -> str:
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise BadInput(f"a share link's label is text of at most {MAX_LABEL} characters")
    if any(ord(c) < 32 for c in label):
        raise BadInput("a share link's label may not hold control characters")
    return label


def json_object(data: bytes, what: str) -> dict[str, Any]:
    """``data`` parsed as a JSON object; raises BadInput naming ``what`` otherwise."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"{what} is not JSON") from exc
    if not isinstance(document, dict):
        raise BadInput(f"{what} is not a JSON object")
    return document


def encode_shlink(link: ShareLink) -> str:
    """The ``shlink:/...`` text of a link; raises BadInput if a field is out of range."""
    _check_url(link.url)
    _check_label(link.label)
    if len(link.key) != KEY_SIZE:
        raise BadInput("a share link's key is 32 bytes")
    payload = json.dumps(link.payload(), separators=(",", ":")).encode()
    return SHLINK_PREFIX + b64url_encode(payload)


def decode_shlink(text: str) -> ShareLink:
    """A link from its ``shlink:/`` text or a viewer URL carrying it after ``#``.

    Raises BadInput for anything else, an unknown version, or a field out of range.
    """
    text = text.strip()
    if len(text) > MAX_SHLINK_CHARS:
        raise BadInput("a share link is too long")
    if "#" in text:
        text = text.split("#", 1)[1]
    if not text.startswith(SHLINK_PREFIX):
        raise BadInput("a share link starts with shlink:/ (or is a URL carrying it after #)")
    raw = b64url_decode(text[len(SHLINK_PREFIX) :], "share link", max_bytes=MAX_SHLINK_CHARS)
    document = json_object(raw, "a share link's payload")
    version = document.get("v", SHL_VERSION)
    if version != SHL_VERSION or isinstance(version, bool):
        raise BadInput(f"share link version {version!r} is not supported")
    key_text = document.get("key")
    if not isinstance(key_text, str) or len(key_text) != 43:
        raise BadInput("a share link's key is 43 characters of base64url")
    key = b64url_decode(key_text, "share link key", size=KEY_SIZE)
    expires = document.get("exp")
    if expires is not None and (
        not isinstance(expires, int) or isinstance(expires, bool) or expires < 0
    ):
        raise BadInput("a share link's exp is a time in seconds")
    flag = document.get("flag", "")
    if not isinstance(flag, str) or not set(flag) <= set("LPU"):
        raise BadInput("a share link's flag holds only the letters L, P and U")
    if "U" in flag:
        raise BadInput("direct-file share links (flag U) are not supported")
    return ShareLink(
        url=_check_url(document.get("url")),
        key=key,
        expires=expires,
        passcode="P" in flag,
        label=_check_label(document.get("label", "")),
    )


def viewer_url(share_page: str, shlink: str) -> str:
    """The share page's URL carrying the link in its fragment (never sent to a server)."""
    return f"{share_page}#{shlink}"


def secret_digest(secret: str) -> bytes:
    """SHA-256 of a link secret (a manifest id or an access token): what is stored."""
    return hashlib.sha256(secret.encode()).digest()


def link_access_digest(kind: str) -> bytes:
    """The ``digest`` of a link's access entry: which kind of access it records."""
    if kind not in LINK_ACCESS_KINDS:
        raise BadInput(f"unknown kind of link access {kind!r}")
    return hashlib.sha256(LINK_ACCESS_DOMAIN + kind.encode()).digest()


def link_access_kind(digest: bytes) -> str | None:
    """The kind of link access a digest records, or None if it is none of them."""
    return next((k for k in LINK_ACCESS_KINDS if link_access_digest(k) == digest), None)


# -- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestRequest:
    recipient: str
    passcode: str | None


def parse_manifest_request(body: bytes) -> ManifestRequest:
    """The JSON body of a manifest request; raises BadInput if malformed."""
    document = json_object(body, "a manifest request")
    recipient, passcode = document.get("recipient"), document.get("passcode")
    if not isinstance(recipient, str) or not 1 <= len(recipient) <= 256:
        raise BadInput("a manifest request names its recipient (1 to 256 characters)")
    if passcode is not None and (not isinstance(passcode, str) or len(passcode) > 256):
        raise BadInput("a manifest request's passcode is text of at most 256 characters")
    return ManifestRequest(recipient, passcode)


@dataclass(frozen=True)
class ManifestFile:
    content_type: str
    embedded: str  # compact JWE

    def as_json(self) -> dict[str, str]:
        return {"contentType": self.content_type, "embedded": self.embedded}


def parse_manifest_files(files: object, max_files: int) -> list[ManifestFile]:
    """The ``files`` list of a manifest (as the wallet submits it, or a custodian answers).

    Raises BadInput unless it is 1 to ``max_files`` embedded files whose content is a
    compact JWE of at most MAX_FILE_CHARS characters.
    """
    if not isinstance(files, list) or not 1 <= len(files) <= max_files:
        raise BadInput(f"a manifest lists 1 to {max_files} files")
    parsed = []
    for item in files:
        if not isinstance(item, dict):
            raise BadInput("a manifest file is an object {contentType, embedded}")
        content_type, embedded = item.get("contentType"), item.get("embedded")
        if content_type not in (FHIR_JSON, ACCESS_CREDENTIAL):
            raise BadInput(f"a manifest file's contentType is {FHIR_JSON} or {ACCESS_CREDENTIAL}")
        if not isinstance(embedded, str) or not 0 < len(embedded) <= MAX_FILE_CHARS:
            raise BadInput("a manifest file embeds a compact JWE")
        if embedded.count(".") != 4:
            raise BadInput("a manifest file's JWE is not in compact form")
        parsed.append(ManifestFile(content_type, embedded))
    return parsed


def encrypt_file(key: bytes, content_type: str, content: bytes) -> str:
    """``content`` as a compact JWE under the link key (alg dir, enc A256GCM)."""
    header = {"alg": "dir", "enc": "A256GCM", "cty": content_type}
    return jwe.encrypt_compact(header, content, OctKey.import_key(key))


def decrypt_file(key: bytes, embedded: str) -> bytes:
    """The plaintext of a compact JWE made by encrypt_file; raises BadInput otherwise."""
    if len(embedded) > MAX_FILE_CHARS:
        raise BadInput("an embedded file is too large")
    try:
        header = json.loads(base64.urlsafe_b64decode(embedded.split(".")[0] + "=="))
    except (ValueError, binascii.Error) as exc:
        raise BadInput("an embedded file's JWE header is malformed") from exc
    if not isinstance(header, dict) or (header.get("alg"), header.get("enc")) != (
        "dir",
        "A256GCM",
    ):
        raise BadInput("an embedded file is not a dir/A256GCM JWE")
    try:
        return bytes(jwe.decrypt_compact(embedded, OctKey.import_key(key)).plaintext or b"")
    except (JoseError, ValueError) as exc:
        raise BadInput("an embedded file does not decrypt under the link key") from exc


# -- what the files say --------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesDescription:
    uid: str
    number: int | None
    modality: str
    description: str
    instances: int


@dataclass(frozen=True)
class StudyDescription:
    """What the wallet learns of one of its studies to describe it in a link."""

    uid: str
    date: str  # DICOM DA (YYYYMMDD) or ""
    description: str
    series: tuple[SeriesDescription, ...]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})


def _coding(code: str) -> dict[str, str]:
    return {"system": DCM_CODES, "code": code}


def imaging_study(study: StudyDescription, wado_root: str) -> dict[str, Any]:
    """The FHIR R4 ImagingStudy of a study, with a contained WADO-RS Endpoint."""
    document: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {"system": ENDPOINT_TYPES, "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "address": wado_root,
            }
        ],
        "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study.uid}"}],
        "status": "available",
        "subject": {"display": "the patient who shared this link"},
        "endpoint": [{"reference": "#wado"}],
        "numberOfSeries": len(study.series),
        "numberOfInstances": study.instances,
        "series": [
            {
                "uid": s.uid,
                **({"number": s.number} if s.number is not None else {}),
                "modality": _coding(s.modality or "OT"),
                **({"description": s.description} if s.description else {}),
                "numberOfInstances": s.instances,
            }
            for s in study.series
        ],
    }
    if study.modalities:
        document["modality"] = [_coding(m) for m in study.modalities]
    if len(study.date) == 8 and study.date.isdigit():
        document["started"] = f"{study.date[:4]}-{study.date[4:6]}-{study.date[6:]}"
    if study.description:
        document["description"] = study.description
    return document


def with_endpoint(document: dict[str, Any], wado_root: str) -> dict[str, Any]:
    """An ImagingStudy made by imaging_study, its Endpoint's address set to ``wado_root``.

    The custodian describes a study without knowing the link (the wallet makes the
    credential); the wallet sets the address. Raises BadInput if it has no such Endpoint.
    """
    contained = document.get("contained")
    endpoints = [
        c
        for c in (contained if isinstance(contained, list) else [])
        if isinstance(c, dict) and c.get("resourceType") == "Endpoint" and c.get("id") == "wado"
    ]
    if len(endpoints) != 1:
        raise BadInput("the study description has no WADO-RS Endpoint to point at the link")
    endpoints[0]["address"] = wado_root
    return document


def study_uid_of(document: object) -> str:
    """The Study Instance UID an ImagingStudy names; raises BadInput if it names none."""
    if not isinstance(document, dict) or document.get("resourceType") != "ImagingStudy":
        raise BadInput("the file is not an ImagingStudy")
    for identifier in document.get("identifier") or []:
        value = identifier.get("value") if isinstance(identifier, dict) else None
        if (
            isinstance(identifier, dict)
            and identifier.get("system") == DICOM_UID_SYSTEM
            and isinstance(value, str)
            and value.startswith("urn:oid:")
        ):
            uid = value[len("urn:oid:") :]
            if 0 < len(uid) <= 64 and all(c.isdigit() or c == "." for c in uid):
                return uid
    raise BadInput("the ImagingStudy names no Study Instance UID")


def access_credential(access_token: str, dicomweb_root: str, expires_in: int) -> dict[str, Any]:
    """The ``application/smart-api-access`` file: the link's DICOMweb credential."""
    return {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": "dicomweb.read",
        "aud": dicomweb_root,
    }


@dataclass(frozen=True)
class Credential:
    access_token: str
    dicomweb_root: str


def parse_access_credential(data: bytes) -> Credential:
    """The credential a link's smart-api-access file holds; raises BadInput otherwise."""
    document = json_object(data, "the link's credential")
    token, root = document.get("access_token"), document.get("aud")
    if not isinstance(token, str) or len(token) != 43:
        raise BadInput("the link's credential holds no access token")
    b64url_decode(token, "access token", size=SECRET_SIZE)
    return Credential(token, _check_url(root))
