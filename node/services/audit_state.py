"""The auditor's memory between runs: the last verified checkpoint of every log.

One JSON file per log, named by the log ID (hex SHA-256 of the origin), holding the
origin, the verifier key first seen for it, and the last checkpoint that verified
(size, root, signed note). Files are replaced atomically (write, fsync, rename, fsync
the directory) so that a crash mid-save leaves either the old or the new state, never a
torn one. A rollback or fork seen by a later audit is judged against these files.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from node.core.origins import log_id
from node.errors import BadInput

STATE_VERSION = 1


@dataclass(frozen=True)
class SavedCheckpoint:
    """The last checkpoint of one log that the auditor verified."""

    origin: str
    vkey: str
    size: int
    root_hash: bytes
    note: str

    @property
    def log_id(self) -> str:
        return log_id(self.origin)

    def to_json(self) -> dict[str, object]:
        return {
            "v": STATE_VERSION,
            "origin": self.origin,
            "vkey": self.vkey,
            "size": self.size,
            "root": base64.b64encode(self.root_hash).decode(),
            "note": self.note,
        }

    @classmethod
    def from_json(cls, raw: object) -> SavedCheckpoint:
        """Parse one state file's document; raises BadInput if it is not what save wrote."""
        if not isinstance(raw, dict) or raw.get("v") != STATE_VERSION:
            raise BadInput("audit state file has an unknown format")
        try:
            origin, vkey, size, note = raw["origin"], raw["vkey"], raw["size"], raw["note"]
            root_hash = base64.b64decode(raw["root"], validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise BadInput("audit state file is incomplete") from exc
        if not (
            isinstance(origin, str)
            and isinstance(vkey, str)
            and isinstance(note, str)
            and isinstance(size, int)
            and not isinstance(size, bool)
            and size >= 0
            and len(root_hash) == 32
        ):
            raise BadInput("audit state file has mistyped fields")
        return cls(origin, vkey, size, root_hash, note)


class AuditState:
    """The --state directory: load every saved checkpoint, save verified ones atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self) -> dict[str, SavedCheckpoint]:
        """Saved checkpoints by origin; raises BadInput naming a corrupt state file."""
        saved: dict[str, SavedCheckpoint] = {}
        if not self.directory.is_dir():
            return saved
        for path in sorted(self.directory.glob("*.json")):
            try:
                checkpoint = SavedCheckpoint.from_json(json.loads(path.read_text()))
            except (ValueError, BadInput) as exc:
                raise BadInput(f"audit state file {path.name} is corrupt: {exc}") from exc
            if path.stem != checkpoint.log_id:
                raise BadInput(f"audit state file {path.name} does not match its origin")
            saved[checkpoint.origin] = checkpoint
        return saved

    def save(self, checkpoint: SavedCheckpoint) -> None:
        """Replace the log's saved checkpoint atomically and durably."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.directory / f"{checkpoint.log_id}.json"
        data = json.dumps(checkpoint.to_json(), indent=1, sort_keys=True).encode()
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
