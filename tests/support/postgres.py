"""A real PostgreSQL server for tests: Debian's server binaries, its own data directory in
a scratch directory, on a free loopback port, with a password (SCRAM), torn down after.

PostgreSQL refuses to run as root; when the tests run as root (CI does) the server runs
as the unprivileged ``nobody`` through ``runuser``, owning only its scratch directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.nodes import free_port
from tests.support.s3 import S3Server, private_file

SUPERUSER = "imageshare"
# Fixed, not random: the server listens on loopback only and lives for one test run.
PASSWORD = "pg-test-password"
UNPRIVILEGED_USER = "nobody"


def server_binaries() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian's postgresql package)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
    )
    if not found:
        raise RuntimeError("no PostgreSQL server installed (scripts/setup-env installs it)")
    return Path(found[-1]).parent


@dataclass(frozen=True)
class PostgresServer:
    port: int
    data_dir: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", UNPRIVILEGED_USER, "--", *command]


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Start a private PostgreSQL server; stop it and remove its files afterwards."""
    bin_dir = server_binaries()
    # Not under pytest's own temporary directory: that is private to the test user, and
    # the server's user must reach its data directory.
    scratch = Path(tempfile.mkdtemp(prefix="imageshare-pg-"))
    data_dir = scratch / "data"
    password_file = scratch / "password"
    password_file.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(scratch, UNPRIVILEGED_USER)
        shutil.chown(password_file, UNPRIVILEGED_USER)
    port = free_port()
    server = PostgresServer(port, data_dir)
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data_dir),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={password_file}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    # Its files live for one test run: no need to wait for them to be flushed.
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={scratch}"
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data_dir),
                    "-l",
                    str(scratch / "server.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
    except subprocess.CalledProcessError as exc:
        log = scratch / "server.log"
        detail = log.read_text() if log.exists() else ""
        _stop(bin_dir, scratch)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stderr!r}\n{detail}") from exc
    try:
        yield server
    finally:
        _stop(bin_dir, scratch)


def _stop(bin_dir: Path, scratch: Path) -> None:
    if (scratch / "data" / "postmaster.pid").exists():
        subprocess.run(
            _as_server_user(
                [str(bin_dir / "pg_ctl"), "-D", str(scratch / "data"), "-m", "immediate", "stop"]
            ),
            capture_output=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)


def _store_table(data_dir: Path, dsn: str) -> str:
    """[store] on the PostgreSQL of ``dsn``, its password in a passfile."""
    passfile = private_file(data_dir / "pgpass", f"*:*:*:*:{PASSWORD}\n")
    password_free = dsn.replace(f":{PASSWORD}@", "@")
    return f'[store]\nbackend = "postgresql"\ndsn = "{password_free}?passfile={passfile}"\n\n'


def ledger_store_settings(data_dir: Path, dsn: str) -> str:
    """The [store] tables of a node whose test uses only its PostgreSQL (the ledger, from
    the command line): the bucket is named, never reached."""
    return _store_table(data_dir, dsn) + '[store.objects]\nbucket = "never-reached"\n'


def node_store_settings(data_dir: Path, dsn: str, s3: S3Server, bucket: str) -> str:
    """The [store] tables of a node on PostgreSQL and ``bucket``, secrets in files."""
    credentials = s3.credentials_file(data_dir / "s3-credentials")
    return (
        _store_table(data_dir, dsn)
        + f'[store.objects]\nendpoint = "{s3.endpoint}"\nbucket = "{bucket}"\n'
        f'credentials_file = "{credentials}"\n'
        # S3's smallest part: an instance of a few megabytes already goes up in parts.
        f"multipart_threshold_bytes = {5 * 1024**2}\npart_bytes = {5 * 1024**2}\n"
    )
