"""The reference patient wallet: keys per custodian, grants, revocations, token status.

The wallet talks to a custodian only by requests signed with its key for that custodian
(node.core.signed_requests). It trusts nothing the custodian says about the log without
checking: a submitted grant or revocation comes back with its ledger entry, an inclusion
proof and the log's signed checkpoint, and the wallet verifies the checkpoint signature
against the log key it pinned on first contact and the entry's inclusion under that
checkpoint's root.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from node.core.base64url import b64_decode, b64url_decode, b64url_encode
from node.core.consent import (
    OPINIONS,
    Delegation,
    GrantFields,
    Power,
    decode_delegation,
    link_grantee,
    scope_text,
    sign_delegation,
    sign_grant,
    sign_revocation,
    token_id_of,
    token_text,
    token_url,
)
from node.core.emergency import Choice, sign_policy
from node.core.entries import (
    MAX_ENTRY_BYTES,
    DelegationEntry,
    EmergencyPolicyEntry,
    EntryBody,
    Grant,
    Revoke,
    decode_entry,
)
from node.core.key_rotation import chain_of_log
from node.core.keys import parse_verifier_key
from node.core.merkle import HASH_SIZE, leaf_hash, verify_inclusion
from node.core.notes import verify_note
from node.core.origins import is_node_origin, log_id
from node.core.patient_keys import PatientKey
from node.core.shlink import (
    ACCESS_CREDENTIAL,
    FHIR_JSON,
    SECRET_SIZE,
    ShareLink,
    access_credential,
    encode_shlink,
    encrypt_file,
    secret_digest,
    viewer_url,
    with_endpoint,
)
from node.core.signed_requests import patient_signer
from node.errors import BadInput, Forbidden, ImageShareError, PeerUnreachable, Unauthorized
from node.services.audit import fetch_entries
from node.services.federation_roster import parse_desk_pin
from node.services.peer_client import request_json, signed_headers
from node.store.wallet_files import WalletFiles

DEFAULT_WALLET_DIR = Path("~/.imageshare-wallet")
WALLET_ENV = "IMAGESHARE_WALLET"
PASSPHRASE_ENV = "IMAGESHARE_WALLET_PASSPHRASE"
# Every request of the wallet; its sessions come from node.services.peer_client.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


class ProofFailed(ImageShareError):
    """The custodian's answer does not prove what it claims (bad checkpoint or proof)."""


def wallet_directory(explicit: Path | None) -> Path:
    """--wallet, else $IMAGESHARE_WALLET, else ~/.imageshare-wallet."""
    chosen = explicit or Path(os.environ.get(WALLET_ENV) or DEFAULT_WALLET_DIR)
    return chosen.expanduser()


@dataclass(frozen=True)
class Custodian:
    url: str
    origin: str
    vkey: str


@dataclass(frozen=True)
class Recorded:
    """What the custodian proved: the entry's index, under a verified checkpoint size."""

    index: int
    checkpoint_size: int


class Wallet:
    """An opened wallet: its seed (in memory only) and its files."""

    def __init__(self, files: WalletFiles, seed: bytes) -> None:
        self.files = files
        self._seed = seed

    @classmethod
    def create(cls, directory: Path, passphrase: bytes | None) -> Wallet:
        files = WalletFiles(directory)
        seed = os.urandom(32)
        files.create(seed, passphrase)
        return cls(files, seed)

    @classmethod
    def open(cls, directory: Path, passphrase: bytes | None) -> Wallet:
        files = WalletFiles(directory)
        return cls(files, files.load_seed(passphrase))

    def key_for(self, custodian_origin: str) -> PatientKey:
        return PatientKey.derive(self._seed, custodian_origin)

    # -- talking to a custodian ------------------------------------------------------------

    async def custodian(self, session: aiohttp.ClientSession, url: str) -> Custodian:
        """Learn a custodian's origin and log key; pin both on first contact.

        The origin is what this wallet's requests are addressed to (and what its key
        there is derived from), so an address keeps the origin it first answered with.
        A new log key is pinned only if the custodian's log proves a key rotation from the
        pinned one to it. Raises ProofFailed if it does not, or if ``url`` was first seen
        as another custodian.
        """
        url = url.rstrip("/")
        health = await request_json(session, "GET", url + "/healthz")
        origin = health.get("origin") if isinstance(health, dict) else None
        if not is_node_origin(origin):
            raise BadInput(f"{url} does not look like an ImageShare node")
        vkey = (await _own_listing(session, url, origin)).get("vkey")
        if not isinstance(vkey, str):
            raise BadInput(f"{url} does not publish its own log")
        state = self.files.load_state()
        first_seen_as = next(
            (o for o, c in state["custodians"].items() if c.get("url") == url and o != origin),
            None,
        )
        if first_seen_as is not None:
            raise ProofFailed(
                f"{url} was {first_seen_as} when this wallet first saw it, now {origin}"
            )
        pinned = state["custodians"].get(origin, {}).get("vkey")
        if pinned is not None and pinned != vkey:
            await _follow_key_rotation(session, url, origin, pinned, vkey)
        if pinned != vkey or state["custodians"][origin].get("url") != url:
            known = state["custodians"].get(origin, {})  # keeps a pinned federation key
            state["custodians"][origin] = {**known, "url": url, "vkey": vkey}
            self.files.save_state(state)
        return Custodian(url, origin, vkey)

    async def pin_desk_code(self, session: aiohttp.ClientSession, code: str) -> Custodian:
        """Pin what the enrollment desk's code names: the custodian's log key (which must be
        the one its address serves) and the federation key, if any; ProofFailed if the
        custodian serves another key or a federation key was pinned for it before."""
        url, custodian_vkey, federation = parse_desk_pin(code)
        custodian = await self.custodian(session, url)
        if custodian.vkey != custodian_vkey:
            raise ProofFailed(f"{url} serves another log key than the desk's code names")
        state = self.files.load_state()
        entry = state["custodians"][custodian.origin]
        pinned = entry.get("federation")
        if federation is not None and pinned not in (None, federation):
            raise ProofFailed(f"another federation key is pinned for {custodian.origin}")
        if federation is not None and pinned is None:
            entry["federation"] = federation
            self.files.save_state(state)
        return custodian

    async def signed(
        self,
        session: aiohttp.ClientSession,
        custodian: Custodian,
        method: str,
        path: str,
        body: bytes = b"",
    ) -> Any:
        """A request signed with my key for ``custodian``, addressed to its pinned origin
        (good at no other node); returns its JSON answer."""
        key = self.key_for(custodian.origin)
        target = URL(custodian.url + path)
        signer = patient_signer(key.public_key)
        headers = signed_headers(key.sign, signer, method, target, body, custodian.origin)
        headers["Content-Type"] = "application/octet-stream"
        return await request_json(session, method, target, headers=headers, body=body)

    async def studies(self, session: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
        custodian = await self.custodian(session, url)
        answer = await self.signed(session, custodian, "GET", "/patient/studies")
        return list(answer.get("studies", []))

    async def grant(
        self,
        session: aiohttp.ClientSession,
        url: str,
        grantee: str,
        scope: tuple[bytes, ...] | None,
        lifetime: int,
        now: int | None = None,
    ) -> dict[str, Any]:
        """Sign a grant, submit it, verify its inclusion, and keep it in the wallet."""
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        now = int(time.time()) if now is None else now
        fields = GrantFields(
            key.public_key, custodian.origin, grantee, scope, now, now + lifetime, os.urandom(16)
        )
        token = sign_grant(fields, key.sign)
        answer = await self.signed(session, custodian, "POST", "/patient/grants", token)
        recorded = verify_recorded(answer, custodian, Grant(token=token))
        return self._keep_token(custodian, token, fields, recorded)

    def _keep_token(
        self,
        custodian: Custodian,
        token: bytes,
        fields: GrantFields,
        recorded: Recorded,
        **extra: Any,
    ) -> dict[str, Any]:
        """Keep an issued token (and what else the wallet knows of it) in state.json."""
        record = {
            "token_id": token_id_of(token).hex(),
            "token": token_text(token),
            "url": token_url(token),
            "custodian": custodian.origin,
            "custodian_url": custodian.url,
            "grantee": fields.grantee,
            "scope": scope_text(fields.scope),
            "not_before": fields.not_before,
            "expires": fields.expires,
            "index": recorded.index,
            "status": "active",
            **extra,
        }
        state = self.files.load_state()
        state["tokens"].append(record)
        self.files.save_state(state)
        return record

    async def share(
        self,
        session: aiohttp.ClientSession,
        url: str,
        scope: tuple[bytes, ...] | None,
        lifetime: int,
        passcode: str | None = None,
        label: str = "",
        opinions: bool = False,
    ) -> dict[str, Any]:
        """Make a share link: a grant to a fresh link credential, the manifest's files
        (an ImagingStudy per study and the credential, encrypted under a fresh link key
        the custodian never sees), submitted and proven; kept in the wallet. With
        ``opinions`` its holder may return an opinion on the link's studies.

        Returns ``{"shlink", "url" (the custodian's share page carrying the link in its
        fragment), "link_id" (the grant's token id, what `revoke` takes), "expires",
        "index"}``. Raises as ``grant``.
        """
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        now = int(time.time())
        link_key = os.urandom(32)
        access_token = b64url_encode(os.urandom(SECRET_SIZE))
        manifest_id = b64url_encode(os.urandom(SECRET_SIZE))
        refs = scope
        if refs is None:
            refs = tuple(parse_study_ref(s["ref"]) for s in await self.studies(session, url))
        dicomweb_root = f"{custodian.url}/links/{access_token}/dicomweb"

        def sealed(content_type: str, content: object) -> dict[str, str]:
            plain = json.dumps(content).encode()
            return {
                "contentType": content_type,
                "embedded": encrypt_file(link_key, content_type, plain),
            }

        files = []
        for ref in refs:
            answer = await self.signed(
                session, custodian, "GET", f"/patient/studies/{b64url_encode(ref)}/description"
            )
            if not isinstance(answer, dict):
                raise BadInput("the custodian's study description is not an ImagingStudy")
            files.append(sealed(FHIR_JSON, with_endpoint(answer, dicomweb_root)))
        files.append(
            sealed(ACCESS_CREDENTIAL, access_credential(access_token, dicomweb_root, lifetime))
        )
        grantee = link_grantee(secret_digest(access_token))
        fields = GrantFields(
            key.public_key,
            custodian.origin,
            grantee,
            scope,
            now,
            now + lifetime,
            os.urandom(16),
            permissions=(OPINIONS,) if opinions else (),
        )
        token = sign_grant(fields, key.sign)
        link = ShareLink(
            url=f"{custodian.url}/shl/{manifest_id}",
            key=link_key,
            expires=fields.expires,
            passcode=passcode is not None,
            label=label,
        )
        shlink = encode_shlink(link)  # checks the label before anything is submitted
        body = json.dumps(
            {
                "grant": b64url_encode(token),
                "manifest": b64url_encode(secret_digest(manifest_id)),
                "passcode": passcode,
                "files": files,
            }
        ).encode()
        answer = await self.signed(session, custodian, "POST", "/patient/links", body)
        recorded = verify_recorded(answer, custodian, Grant(token=token))
        # The label stays here (and in the link): the ledger is copied to every node.
        record = self._keep_token(
            custodian, token, fields, recorded, link={"label": label, "shlink": shlink}
        )
        return {
            "shlink": shlink,
            "url": viewer_url(f"{custodian.url}/share/", shlink),
            "link_id": record["token_id"],
            "expires": fields.expires,
            "index": recorded.index,
        }

    async def revoke(
        self, session: aiohttp.ClientSession, url: str, token_id: bytes
    ) -> dict[str, Any]:
        """Sign and submit a revocation; verify its inclusion; mark the token revoked."""
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        revocation = sign_revocation(key.public_key, token_id, int(time.time()), key.sign)
        answer = await self.signed(session, custodian, "POST", "/patient/revocations", revocation)
        recorded = verify_recorded(answer, custodian, Revoke(revocation=revocation))
        state = self.files.load_state()
        for record in state["tokens"]:
            if record["token_id"] == token_id.hex():
                record["status"] = "revoked"
        self.files.save_state(state)
        return {"token_id": token_id.hex(), "index": recorded.index, "status": "revoked"}

    async def delegate(
        self,
        session: aiohttp.ClientSession,
        url: str,
        delegate_key: bytes,
        scope: tuple[bytes, ...] | None,
        powers: tuple[Power, ...],
        lifetime: int,
    ) -> dict[str, Any]:
        """Sign a delegation of ``powers`` to ``delegate_key``, submit it, verify its
        inclusion; returns its id, text (for the delegate's wallet) and log index."""
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        now = int(time.time())
        unsigned = Delegation(
            key.public_key,
            custodian.origin,
            delegate_key,
            scope,
            powers,
            now,
            now + lifetime,
            os.urandom(16),
        )
        delegation = sign_delegation(unsigned, key.sign)
        answer = await self.signed(session, custodian, "POST", "/patient/delegations", delegation)
        recorded = verify_recorded(answer, custodian, DelegationEntry(delegation=delegation))
        return {
            "delegation_id": token_id_of(delegation).hex(),
            "delegation": token_text(delegation),
            "index": recorded.index,
        }

    async def delegations(self, session: aiohttp.ClientSession, url: str) -> list[Any]:
        """My delegations at a custodian, with their status (active, expired, revoked)."""
        custodian = await self.custodian(session, url)
        answer = await self.signed(session, custodian, "GET", "/patient/delegations")
        return list(answer.get("delegations", []))

    def grant_as_delegate(
        self, delegation: bytes, grantee: str, scope: tuple[bytes, ...] | None, lifetime: int
    ) -> dict[str, Any]:
        """As the delegate a patient named: sign a grant carrying the delegation (its
        chain). The custodian records it when the grantee presents it, if the delegation
        is recorded there, unrevoked, in force and gives the power to grant."""
        chain = decode_delegation(delegation)
        key = self.key_for(chain.custodian)
        if key.public_key != chain.delegate_key:
            raise BadInput("the delegation names another key than this wallet's there")
        now = int(time.time())
        fields = GrantFields(
            key.public_key,
            chain.custodian,
            grantee,
            scope,
            now,
            now + lifetime,
            os.urandom(16),
            delegation,
        )
        token = sign_grant(fields, key.sign)
        return {
            "token": token_text(token),
            "token_id": token_id_of(token).hex(),
            "url": token_url(token),
        }

    async def as_delegate(
        self,
        session: aiohttp.ClientSession,
        url: str,
        delegation: bytes,
        method: str,
        path: str,
        body: bytes = b"",
    ) -> Any:
        """A /patient request signed with my key, acting for the patient who delegated to
        me: its query names the patient and the delegation (the custodian checks the
        power the route needs); returns its JSON answer."""
        chain = decode_delegation(delegation)
        custodian = await self.custodian(session, url)
        if self.key_for(custodian.origin).public_key != chain.delegate_key:
            raise BadInput("the delegation names another key than this wallet's there")
        query = f"for={b64url_encode(chain.patient_key)}&delegation={chain.delegation_id.hex()}"
        separator = "&" if "?" in path else "?"
        return await self.signed(session, custodian, method, path + separator + query, body)

    async def revoke_as_delegate(
        self, session: aiohttp.ClientSession, url: str, delegation: bytes, token_id: bytes
    ) -> dict[str, Any]:
        """As a delegate with the power ``revoke``: sign a revocation of one of the
        patient's grants carrying the delegation, submit it, and verify its inclusion."""
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        revocation = sign_revocation(
            key.public_key, token_id, int(time.time()), key.sign, delegation
        )
        answer = await self.as_delegate(
            session, url, delegation, "POST", "/patient/revocations", revocation
        )
        recorded = verify_recorded(answer, custodian, Revoke(revocation=revocation))
        return {"token_id": token_id.hex(), "index": recorded.index, "status": "revoked"}

    async def set_emergency_policy(
        self, session: aiohttp.ClientSession, url: str, choice: Choice, members: tuple[str, ...]
    ) -> dict[str, Any]:
        """Sign and submit my emergency policy at a custodian; verify its inclusion."""
        custodian = await self.custodian(session, url)
        key = self.key_for(custodian.origin)
        policy = sign_policy(
            key.public_key, custodian.origin, choice, members, int(time.time()), key.sign
        )
        path = "/patient/emergency-policy"
        answer = await self.signed(session, custodian, "POST", path, policy)
        recorded = verify_recorded(answer, custodian, EmergencyPolicyEntry(policy=policy))
        return {"choice": choice.value, "members": list(members), "index": recorded.index}

    async def emergency_policy(self, session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        """The emergency policy in force for me at a custodian (mine, or its default)."""
        custodian = await self.custodian(session, url)
        answer = await self.signed(session, custodian, "GET", "/patient/emergency-policy")
        return dict(answer)

    async def tokens(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        """Every token this wallet issued, with its status refreshed from its custodian.

        A custodian that cannot be reached leaves its tokens' last known status, marked
        ``"checked": false``; expiry is always judged by this machine's clock.
        """
        state = self.files.load_state()
        now = int(time.time())
        remote: dict[str, str] = {}
        reached: set[str] = set()
        for url in sorted({t["custodian_url"] for t in state["tokens"]}):
            try:
                custodian = await self.custodian(session, url)
                answer = await self.signed(session, custodian, "GET", "/patient/tokens")
            except (PeerUnreachable, Forbidden, Unauthorized):
                continue
            reached.add(url)
            remote.update({t["token_id"]: t["status"] for t in answer.get("tokens", [])})
        for record in state["tokens"]:
            status = remote.get(record["token_id"], record["status"])
            if status != "revoked" and now > int(record["expires"]):
                status = "expired"
            record["status"] = status
            record["checked"] = record["custodian_url"] in reached
        self.files.save_state(state)
        return list(state["tokens"])


def parse_token_id(text: str) -> bytes:
    """A token id from its hex form; raises BadInput otherwise."""
    try:
        token_id = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise BadInput("a token id is 64 hex digits") from exc
    if len(token_id) != 32:
        raise BadInput("a token id is 64 hex digits")
    return token_id


def parse_study_ref(text: str) -> bytes:
    """A study reference's bytes from its base64url text; raises BadInput otherwise."""
    return b64url_decode(text, "study reference", size=32)


def verify_recorded(answer: Any, custodian: Custodian, expected: EntryBody) -> Recorded:
    """Check that ``answer`` proves an entry holding ``expected`` in the custodian's log."""
    try:
        entry_bytes = b64_decode(answer["entry"], "the entry", max_bytes=MAX_ENTRY_BYTES)
        proof = [b64_decode(h, "a proof hash", size=HASH_SIZE) for h in answer["proof"]]
        index = int(answer["index"])
        note = str(answer["checkpoint"])
    except (KeyError, TypeError, ValueError, BadInput) as exc:
        raise ProofFailed("the custodian's answer carries no well-formed proof") from exc
    try:
        entry = decode_entry(entry_bytes)
    except BadInput as exc:
        raise ProofFailed(f"the custodian's entry is malformed: {exc}") from exc
    kind = expected.kind
    if entry.kind != kind or entry.body != expected:
        raise ProofFailed(f"the custodian's proof is for another entry than my {kind}")
    try:
        checkpoint = verify_note(note, custodian.vkey)
    except (BadInput, Unauthorized) as exc:
        raise ProofFailed(f"the custodian's checkpoint does not verify: {exc}") from exc
    if not verify_inclusion(
        proof, leaf_hash(entry_bytes), index, checkpoint.size, checkpoint.root_hash
    ):
        raise ProofFailed(f"the {kind} is not proven to be in the custodian's log")
    return Recorded(index, checkpoint.size)


async def _follow_key_rotation(
    session: aiohttp.ClientSession, url: str, origin: str, pinned: str, served: str
) -> None:
    """Raise ProofFailed unless ``origin``'s own log rotates its key from ``pinned`` to ``served``.

    Only rotations both keys signed count: the wallet has no roster to confirm a
    compromised-key rotation, so its patient re-pins the custodian after checking with it.
    """
    try:
        pinned_key, served_key = parse_verifier_key(pinned), parse_verifier_key(served)
        size = (await _own_listing(session, url, origin)).get("size")
        if not isinstance(size, int) or size < 0:
            raise BadInput(f"{url} does not list the size of its own log")
        raw = await fetch_entries(session, url, log_id(origin), size)
        chain = chain_of_log(origin, [decode_entry(e) for e in raw], pinned_key.public_key)
    except (BadInput, Unauthorized) as exc:
        raise ProofFailed(
            f"the log key of {origin} changed since this wallet first saw it, "
            f"and its log does not prove the rotation: {exc}"
        ) from exc
    if chain.current_key != served_key.public_key:
        raise ProofFailed(
            f"the log key of {origin} changed since this wallet first saw it, "
            "to a key its log does not rotate to"
        )


async def _own_listing(session: aiohttp.ClientSession, url: str, origin: str) -> dict[str, Any]:
    """The row of ``/ledger/logs`` at ``url`` for the node's own log (empty if none)."""
    logs = await request_json(session, "GET", url + "/ledger/logs")
    rows = logs if isinstance(logs, list) else []
    return next((r for r in rows if isinstance(r, dict) and r.get("origin") == origin), {})
