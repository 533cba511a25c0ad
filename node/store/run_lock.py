"""The data directory's run lock: held (shared) by every process that has the node's
stores open (the daemon, `imageshare import`, ...), taken alone by a command that must
have the node to itself (`imageshare migrate`), so that nothing arrives mid-move.

An flock(2) on ``node.run.lock``: the kernel releases it when its holder exits, however
it exits (kill -9 included), so a crashed daemon never leaves the node locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from node.errors import ConfigError

RUN_LOCK_FILE = "node.run.lock"


class RunLock:
    """One hold of the run lock; ``release`` (or the process's end) lets it go."""

    def __init__(self, data_dir: Path, exclusive: bool) -> None:
        self._fd: int | None = os.open(
            Path(data_dir) / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise ConfigError(
                "the node is running (its daemon or another imageshare command has its"
                " stores open): stop it first"
                if exclusive
                else "the node is being migrated (imageshare migrate has it to itself):"
                " start it again when that has finished"
            ) from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
