"""Faults for reliability and security tests: a small file system, slow and stalling
HTTP clients, raw requests that no well-behaved client library would send."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class MountImpossible(Exception):
    """This machine does not let the test mount a file system (not root, no tmpfs)."""


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of ``size_bytes`` mounted at ``mount_point`` for the block; unmounted after.

    Raises MountImpossible (with the reason) when mounting is not allowed here.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise MountImpossible(result.stderr.strip() or f"mount exited {result.returncode}")
    try:
        yield mount_point
    finally:
        # Lazy: a daemon killed a moment ago may still hold a file open.
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False)


def fill_until(path: Path, free_bytes_left: int) -> int:
    """Write a filler file at ``path`` until about ``free_bytes_left`` remain; returns its size."""
    stats = os.statvfs(path.parent)
    free = stats.f_bavail * stats.f_frsize
    size = max(0, free - free_bytes_left)
    with open(path, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    return size


def request_head(
    method: str, path: str, headers: dict[str, str], content_length: int | None = None
) -> bytes:
    """The bytes of an HTTP/1.1 request line and headers, as a raw client sends them."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SlowClient:
    """A client on a raw socket that sends what the test says, when the test says.

    ``trickle`` sends one byte at a time in a thread until the server hangs up;
    ``cut_off_after`` tells how long after its creation the server closed the connection.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.opened = time.monotonic()
        self.closed_at: float | None = None
        self._trickler: threading.Thread | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def trickle(self, data: bytes, interval: float) -> None:
        def run() -> None:
            for i in range(len(data)):
                try:
                    self.sock.sendall(data[i : i + 1])
                except OSError:
                    self._mark_closed()
                    return
                if self._server_hung_up():
                    return
                time.sleep(interval)

        self._trickler = threading.Thread(target=run, daemon=True)
        self._trickler.start()

    def _mark_closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()

    def _server_hung_up(self) -> bool:
        """Whether the server closed its side (an answer, then EOF, counts as closed)."""
        if self.closed_at is not None:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            while True:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                if not data:
                    break
        except BlockingIOError:
            return False
        except OSError:
            pass
        self._mark_closed()
        return True

    def is_cut_off(self) -> bool:
        return self._server_hung_up()

    @property
    def cut_off_after(self) -> float | None:
        return None if self.closed_at is None else self.closed_at - self.opened

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def store_problems(data_dir: Path) -> list[str]:
    """Every way the node's instance store is inconsistent: an index row whose file is
    missing or does not hash to its digest (a half-indexed instance), an instance still
    unconfirmed (its file's fsync unsettled) while no commit runs, or a leftover in tmp.
    """
    problems: list[str] = []
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite")) as conn:
        rows = conn.execute("SELECT sop_instance_uid, digest, size FROM instances").fetchall()
        unsettled = [r[0] for r in conn.execute("SELECT sop_instance_uid FROM unconfirmed")]
    problems += [f"{uid}: still unconfirmed" for uid in unsettled]
    for uid, digest, size in rows:
        path = data_dir / "objects" / digest[:2] / f"{digest}.dcm"
        if not path.exists():
            problems.append(f"{uid}: indexed but its file is missing")
            continue
        data = path.read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{uid}: its file does not match its index row")
    problems += [f"left in tmp: {p.name}" for p in (data_dir / "tmp").iterdir()]
    return problems


def leave_unconfirmed(data_dir: Path, sop_instance_uid: str, damage: bool) -> Path:
    """Put an indexed instance back where a stop between its index commit and the end of
    its file's fsync leaves it (named in ``unconfirmed``); with ``damage``, also truncate
    its file as a power cut before the file reached the disk would. Returns the file."""
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite")) as conn:
        (digest,) = conn.execute(
            "SELECT digest FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        with conn:
            conn.execute(
                "INSERT INTO unconfirmed (sop_instance_uid) VALUES (?)", (sop_instance_uid,)
            )
    path = data_dir / "objects" / digest[:2] / f"{digest}.dcm"
    if damage:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    return path


def indexed_digests(data_dir: Path) -> dict[str, str]:
    """SOP instance UID -> SHA-256 digest of every indexed instance."""
    with contextlib.closing(sqlite3.connect(data_dir / "index.sqlite")) as conn:
        return dict(conn.execute("SELECT sop_instance_uid, digest FROM instances").fetchall())
