"""Rotating this node's key: ``imageshare key rotate`` (a short-lived process).

The steps and why they are safe at any crash are in node.store.node_keys; the entry and
its signatures are node.core.key_rotation. A running daemon needs no restart: its ledger
service switches to the new key when it next signs (node.services.ledger).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from node.config import NodeConfig
from node.core import atna
from node.core.key_rotation import sign_rotation
from node.core.keys import verifier_key_string
from node.services.audit_export import local_user, record_once
from node.store.backends import open_ledger_store
from node.store.node_keys import create_next_key, finish_rotation, load_identity


@dataclass(frozen=True)
class RotationDone:
    """A rotation the log has recorded durably."""

    origin: str
    old_vkey: str
    vkey: str
    index: int
    reason: str

    def as_json(self) -> dict[str, object]:
        return {
            "origin": self.origin,
            "old_vkey": self.old_vkey,
            "vkey": self.vkey,
            "index": self.index,
            "reason": self.reason,
        }


def rotate_node_key(config: NodeConfig, compromised: bool = False) -> RotationDone:
    """Replace the node's key: new key, ``key_rotation`` entry, old key retired.

    ``compromised``: the old key does not sign (whoever stole it could sign anything);
    members then follow only once each operator confirms the new key in its roster.
    Raises ConfigError if the key files do not match the log, BadInput or Unauthorized if
    the log refuses the rotation (another rotation won a race).
    """
    store = open_ledger_store(config)
    try:
        own = store.own_log(config.origin)
        chain = own.key_chain()
        old = load_identity(
            config.key_path, config.origin, chain.current_key if chain is not None else None
        )
        new = create_next_key(config.key_path, config.origin)
        rotation = sign_rotation(None if compromised else old, new, old.public_key)
        result = own.append(rotation, int(time.time()))
    finally:
        store.close()
    finish_rotation(config.key_path, config.origin, new.public_key)
    record_once(
        config,
        atna.key_rotation,
        local_user(),
        verifier_key_string(config.origin, old.public_key),
        new.vkey,
    )
    return RotationDone(config.origin, old.vkey, new.vkey, result.index, rotation.reason)
