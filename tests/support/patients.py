"""Patient-side helpers for tests: signed /patient calls and grants, and the wallet CLI."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from node.core.consent import GrantFields, sign_grant
from node.core.patient_keys import PatientKey
from node.core.signed_requests import make_headers, patient_signer
from tests.support.nodes import NodeProcess, run_cli

T = TypeVar("T")


def send(
    node: NodeProcess, method: str, path: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, Any]:
    """One HTTP request to ``node``; returns (status, parsed JSON answer)."""
    request = urllib.request.Request(
        node.url + path, data=body if method == "POST" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def signed_headers(
    key: PatientKey,
    method: str,
    path: str,
    body: bytes = b"",
    now: int | None = None,
    audience: str | None = None,
) -> dict[str, str]:
    """Signature headers by ``key``, addressed to its custodian unless ``audience`` says."""
    return make_headers(
        key.sign,
        patient_signer(key.public_key),
        method,
        path,
        body,
        int(time.time()) if now is None else now,
        os.urandom(16),
        audience=key.custodian_origin if audience is None else audience,
    )


def call(node: NodeProcess, key: PatientKey, method: str, path: str, body: bytes = b"") -> Any:
    """A /patient request signed by ``key``; returns (status, answer)."""
    return send(node, method, path, signed_headers(key, method, path, body), body)


def make_grant(
    key: PatientKey,
    custodian: str,
    grantee: str,
    scope: tuple[bytes, ...] | None = None,
    **changes: Any,
) -> bytes:
    """A grant signed by ``key``, valid for an hour from now unless ``changes`` say otherwise."""
    now = int(time.time())
    fields: dict[str, Any] = {
        "patient_key": key.public_key,
        "custodian": custodian,
        "grantee": grantee,
        "scope": scope,
        "not_before": now,
        "expires": now + 3600,
        "nonce": os.urandom(16),
    }
    fields.update(changes)
    return sign_grant(GrantFields(**fields), key.sign)


def enroll_new_key(node: NodeProcess, patient_id: str) -> PatientKey:
    """A fresh patient key, enrolled at ``node`` for ``patient_id`` by the staff CLI."""
    key = PatientKey.derive(os.urandom(32), node.origin)
    # --key=...: a base64url key may begin with "-".
    node.cli("enroll", "--patient-id", patient_id, f"--key={key.public_key_text}")
    return key


def patient(wallet: Path, *args: str, check: bool = True) -> Any:
    """`imageshare patient ARGS --wallet W --json`, parsed (the raw result if check=False)."""
    result = run_cli("patient", *args, "--wallet", str(wallet), "--json", check=check)
    return json.loads(result.stdout) if check else result


async def with_session(action: Callable[[aiohttp.ClientSession], Awaitable[T]]) -> T:
    """Run one wallet library call with a fresh HTTP session."""
    async with aiohttp.ClientSession() as session:
        return await action(session)
