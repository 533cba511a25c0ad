"""The patient wallet on disk: its secret seed and its record of issued tokens.

A wallet is a directory (mode 0700) holding two files, both mode 0600:

- ``seed.json``: the 32-byte wallet seed, either in the clear
  (``{"version": 1, "encryption": "none", "seed": b64}``) or sealed with a passphrase
  (``"encryption": "argon2id-secretbox"``: key = Argon2id(passphrase, salt) with the
  recorded ops and memory limits, seed = SecretBox(key).decrypt(box)). Written once.
- ``state.json``: the custodians the wallet has talked to (origin, URL, pinned log
  verifier key) and every token it issued. Replaced atomically on each change.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from node.errors import BadInput, ConfigError, Unauthorized
from node.store.secrets import read_secret, write_secret

SEED_FILE = "seed.json"
STATE_FILE = "state.json"
SEED_SIZE = 32
KDF = nacl.pwhash.argon2id


class WalletFiles:
    """One wallet directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def seed_path(self) -> Path:
        return self.directory / SEED_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def exists(self) -> bool:
        return self.seed_path.exists()

    def is_encrypted(self) -> bool:
        return bool(self._seed_document().get("encryption") != "none")

    def create(self, seed: bytes, passphrase: bytes | None) -> None:
        """Write a new wallet seed, sealed if ``passphrase``; refuses an existing wallet."""
        if len(seed) != SEED_SIZE:
            raise BadInput("a wallet seed is 32 bytes")
        if self.exists():
            raise ConfigError(
                f"a wallet already exists in {self.directory}; refusing to replace it"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        document: dict[str, Any] = {"version": 1}
        if passphrase:
            salt = nacl.utils.random(KDF.SALTBYTES)
            ops, mem = KDF.OPSLIMIT_INTERACTIVE, KDF.MEMLIMIT_INTERACTIVE
            box = nacl.secret.SecretBox(_derive_key(passphrase, salt, ops, mem))
            document |= {
                "encryption": "argon2id-secretbox",
                "salt": _b64(salt),
                "opslimit": ops,
                "memlimit": mem,
                "box": _b64(bytes(box.encrypt(seed))),
            }
        else:
            document |= {"encryption": "none", "seed": _b64(seed)}
        write_secret(self.seed_path, json.dumps(document, indent=2).encode() + b"\n")

    def load_seed(self, passphrase: bytes | None) -> bytes:
        """The wallet seed; raises Unauthorized for a missing or wrong passphrase."""
        document = self._seed_document()
        try:
            if document.get("encryption") == "none":
                seed = _unb64(document["seed"])
            elif document.get("encryption") == "argon2id-secretbox":
                if not passphrase:
                    raise Unauthorized(
                        "the wallet is passphrase-protected: set IMAGESHARE_WALLET_PASSPHRASE"
                        " or run on a terminal"
                    )
                key = _derive_key(
                    passphrase,
                    _unb64(document["salt"]),
                    int(document["opslimit"]),
                    int(document["memlimit"]),
                )
                try:
                    seed = nacl.secret.SecretBox(key).decrypt(_unb64(document["box"]))
                except nacl.exceptions.CryptoError as exc:
                    raise Unauthorized("wrong wallet passphrase") from exc
            else:
                raise ConfigError("the wallet's seed file uses an unknown encryption")
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("the wallet's seed file is damaged") from exc
        if len(seed) != SEED_SIZE:
            raise ConfigError("the wallet's seed file is damaged")
        return seed

    def _seed_document(self) -> dict[str, Any]:
        if not self.exists():
            raise ConfigError(
                f"no wallet in {self.directory} (run 'imageshare patient keygen' first)"
            )
        try:
            document = json.loads(read_secret(self.seed_path))
        except ValueError as exc:
            raise ConfigError("the wallet's seed file is damaged") from exc
        if not isinstance(document, dict) or document.get("version") != 1:
            raise ConfigError("the wallet's seed file is damaged or from a newer version")
        return document

    def load_state(self) -> dict[str, Any]:
        """The wallet's custodians and tokens (empty on a new wallet)."""
        if not self.state_path.exists():
            return {"custodians": {}, "tokens": []}
        try:
            state = json.loads(read_secret(self.state_path))
        except ValueError as exc:
            raise ConfigError("the wallet's state file is damaged") from exc
        if not isinstance(state, dict):
            raise ConfigError("the wallet's state file is damaged")
        state.setdefault("custodians", {})
        state.setdefault("tokens", [])
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically and durably (0600)."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        write_secret(tmp, json.dumps(state, indent=2, sort_keys=True).encode() + b"\n")
        os.replace(tmp, self.state_path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _derive_key(passphrase: bytes, salt: bytes, ops: int, mem: int) -> bytes:
    return bytes(
        KDF.kdf(nacl.secret.SecretBox.KEY_SIZE, passphrase, salt, opslimit=ops, memlimit=mem)
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
