"""Real `imageshare` node processes on loopback, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGESHARE = [sys.executable, "-m", "node.edges.cli"]


# Ports handed out below the kernel's ephemeral range (32768 and up), in one slice per
# pytest-xdist worker: a port chosen by bind(0) and closed could be chosen again by
# another worker, or taken as a client's source port, before its server binds it.
PORT_BASE, PORT_SLICE = 12000, 4000
_next_port: list[int] = []


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def free_port() -> int:
    """A loopback TCP port nobody listens on, unique within this test run."""
    if not _next_port:  # a random start, so that two runs side by side rarely meet
        _next_port.append(int.from_bytes(os.urandom(2), "big") % PORT_SLICE)
    first = PORT_BASE + (_worker_index() % 5) * PORT_SLICE
    for _ in range(PORT_SLICE):
        port = first + _next_port[0] % PORT_SLICE
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (another run, or a server of this one)
            return port
    raise RuntimeError("no free port left in this worker's slice")


def run_cli(
    *args: str,
    config: Path | None = None,
    check: bool = True,
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `imageshare ARGS` in a subprocess and return its result."""
    cmd = [*IMAGESHARE, *args]
    if config is not None:
        cmd += ["-c", str(config)]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"imageshare {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        )
    return result


def wait_until(
    predicate: Any, timeout: float = 20.0, interval: float = 0.05, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop a server process cleanly (SIGTERM), killing it only if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_STORE_TABLE = re.compile(r"^\[store\]\n(?P<keys>(?:(?!\[).*\n?)*)", re.MULTILINE)
_FEDERATION_HEADER = re.compile(r"^\[federation\][ \t]*$", re.MULTILINE)
_MIRROR_ALL_LINE = '\nmirror = "all"'
_MIRROR_ALL_TABLE = "\n[federation]" + _MIRROR_ALL_LINE + "\n"


@dataclass
class NodeProcess:
    """One initialised node and, while running, its daemon process."""

    data_dir: Path
    origin: str
    http_port: int
    dimse_port: int
    vkey: str
    admin_token: str
    # The CA its HTTPS certificate chains to (`init --tls-self-signed`); None: plain HTTP.
    ca_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir / "daemon.log"

    @property
    def config(self) -> Path:
        return self.data_dir / "node.toml"

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def peer_table(self) -> str:
        """This node as a ``[[peers]]`` table of another node's node.toml."""
        return f'[[peers]]\norigin = "{self.origin}"\nurl = "{self.url}"\nvkey = "{self.vkey}"\n'

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """What a client trusts to reach this node over HTTPS (its CA), or None."""
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def cli(
        self, *args: str, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config, check=check, **kwargs)

    def roster_entry(self) -> str:
        """This node as a ``[[peers]]`` table for another node's node.toml."""
        return f'[[peers]]\norigin = "{self.origin}"\nurl = "{self.url}"\nvkey = "{self.vkey}"\n'

    def append_config(self, text: str) -> None:
        if _FEDERATION_HEADER.search(text):
            # A [federation] table of the test's own replaces the default one added at start.
            self.config.write_text(self.config.read_text().replace(_MIRROR_ALL_TABLE, ""))
        current = self.config.read_text()
        table = _STORE_TABLE.search(text)
        if table and "\n[store]\n" in current:
            # A test's own [store] keys join the scale-out run's [store] table.
            keys = table.group("keys").strip()
            current = current.replace("\n[store]\n", f"\n[store]\n{keys}\n", 1)
            self.config.write_text(current)
            text = text[: table.start()] + text[table.end() :]
        with open(self.config, "a") as f:
            f.write("\n" + text + "\n")

    def start(self, timeout: float = 30.0) -> NodeProcess:
        self._mirror_all_unless_configured()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*IMAGESHARE, "run", "-v", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self._healthy, timeout=timeout, message=f"{self.origin} to serve")
        return self

    def _mirror_all_unless_configured(self) -> None:
        """Tests written before selective mirroring expect every log mirrored: a node whose
        node.toml does not choose ``[federation] mirror`` is an archive (``"all"``)."""
        text = self.config.read_text()
        try:
            if "mirror" in tomllib.loads(text).get("federation", {}):
                return
        except tomllib.TOMLDecodeError:
            return  # a test of a bad node.toml: left as it is
        header = _FEDERATION_HEADER.search(text)
        if header is None:
            self.config.write_text(text + _MIRROR_ALL_TABLE)
        else:
            at = header.end()
            self.config.write_text(text[:at] + _MIRROR_ALL_LINE + text[at:])

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(
                f"{self.origin} exited with {self.process.returncode}:\n{self.log_path.read_text()}"
            )
        try:
            healthz = self.url + "/healthz"
            with urllib.request.urlopen(healthz, timeout=1, context=self.tls_context) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is not None:
            terminate(self.process, timeout)
        self.process = None

    def kill9(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def _store_settings(self) -> dict[str, Any]:
        store: dict[str, Any] = tomllib.loads(self.config.read_text()).get("store", {})
        return store

    def query_index(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (``?`` placeholders) on the node's instance index, read
        directly, wherever it is: SQLite in the data directory, or PostgreSQL."""
        store = self._store_settings()
        if store.get("backend", "sqlite") == "sqlite":
            import sqlite3

            index = self.data_dir / "index.sqlite"
            db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
            try:
                return [tuple(row) for row in db.execute(sql, parameters)]
            finally:
                db.close()
        import psycopg

        with psycopg.connect(store["dsn"]) as conn:
            rows = conn.execute(sql.replace("?", "%s"), parameters).fetchall()
        return [tuple(row) for row in rows]

    def state_database(self, name: str) -> StateDatabase:
        """The stopped node's database ``name`` ("ledger", "consent", "federation"),
        read and written behind its stores' back, wherever it is: ``name.sqlite`` in the
        data directory, or the node's PostgreSQL database (the same tables)."""
        store = self._store_settings()
        if store.get("backend", "sqlite") == "sqlite":
            return StateDatabase(sqlite_path=self.data_dir / f"{name}.sqlite")
        return StateDatabase(dsn=store["dsn"])

    def forget_state(self, names: tuple[str, ...]) -> None:
        """Throw away the stopped node's state ``names`` ("ledger", "consent",
        "federation"), as if never written: the SQLite files deleted, or the same
        tables emptied on PostgreSQL (their identities restarted)."""
        store = self._store_settings()
        if store.get("backend", "sqlite") == "sqlite":
            for name in names:
                for path in self.data_dir.glob(f"{name}.sqlite*"):
                    path.unlink()
            return
        import psycopg

        tables = [table for name in names for table in STATE_TABLES[name]]
        with psycopg.connect(store["dsn"]) as conn:
            present = [
                table
                for table in tables
                if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() != (None,)
            ]
            if present:
                conn.execute(f"TRUNCATE {', '.join(present)} RESTART IDENTITY")

    def stored_object(self, digest: str) -> bytes | None:
        """The stored bytes of the instance file of SHA-256 ``digest`` (None if absent):
        from objects/ in the data directory, or from the node's bucket."""
        bucket = self._bucket()
        if bucket is None:
            path = self.data_dir / "objects" / digest[:2] / f"{digest}.dcm"
            return path.read_bytes() if path.exists() else None
        client, name = bucket
        try:
            answer = client.get_object(Bucket=name, Key=f"{digest[:2]}/{digest}.dcm")
        except client.exceptions.NoSuchKey:
            return None
        return bytes(answer["Body"].read())

    def stored_digests(self) -> set[str]:
        """The SHA-256 of every instance file the node has stored, in files or bucket."""
        bucket = self._bucket()
        if bucket is None:
            return {path.stem for path in (self.data_dir / "objects").rglob("*.dcm")}
        client, name = bucket
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return {Path(key).stem for key in keys if key.endswith(".dcm")}

    def _bucket(self) -> tuple[Any, str] | None:
        """A client of the node's bucket and its name; None for the embedded store."""
        store = self._store_settings()
        if store.get("backend", "sqlite") == "sqlite":
            return None
        import boto3

        from node.store.objects import read_credentials

        objects = store["objects"]
        key_id, secret = read_credentials(Path(objects["credentials_file"]))
        client = boto3.client(
            "s3",
            endpoint_url=objects["endpoint"],
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )
        return client, objects["bucket"]

    def get_json(self, path: str, auth: bool = True) -> Any:
        request = urllib.request.Request(self.url + path, headers=self.auth if auth else {})
        with urllib.request.urlopen(request, timeout=30, context=self.tls_context) as r:
            return json.loads(r.read())


# Each state's tables, named alike on both engines (node/store/pg_ledger.py _SCHEMA,
# node/store/consent_state.py, node/store/federation_state.py).
STATE_TABLES: dict[str, tuple[str, ...]] = {
    "ledger": ("logs", "entries", "subtrees", "log_keys", "witnessed"),
    "consent": (
        "subjects",
        "study_refs",
        "patient_keys",
        "grants",
        "revocations",
        "replay",
        "delegations",
        "emergency_policies",
        "break_glass",
    ),
    "federation": ("equivocations", "dealings", "dealings_scanned", "checkpoints"),
}


class StateDatabase:
    """A direct connection to one of a stopped node's databases, on either engine
    (``?`` placeholders); what it wrote is committed on a clean exit."""

    def __init__(self, *, sqlite_path: Path | None = None, dsn: str | None = None) -> None:
        self._conn: Any
        if sqlite_path is not None:
            import sqlite3

            self._conn = sqlite3.connect(sqlite_path)
            self._placeholder = "?"
        else:
            import psycopg

            assert dsn is not None
            self._conn = psycopg.connect(dsn)
            self._placeholder = "%s"

    def __enter__(self) -> StateDatabase:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        try:
            if kind is None:
                self._conn.commit()
            else:
                self._conn.rollback()
        finally:
            self._conn.close()

    def execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of ``sql`` (none for a write)."""
        cursor = self._conn.execute(sql.replace("?", self._placeholder), parameters)
        return [tuple(row) for row in cursor.fetchall()] if cursor.description else []


# With IMAGESHARE_TEST_STORE=postgresql, every node a test makes keeps its instances on
# PostgreSQL + S3: tests/conftest.py starts the servers and registers what gives each
# node its own database and bucket (its [store] tables).
SCALE_OUT_STORE_ENV = "IMAGESHARE_TEST_STORE"
_scale_out_store: list[Callable[[Path], str]] = []


def use_scale_out_store(store_tables: Callable[[Path], str] | None) -> None:
    """Make every node from now on use the [store] tables ``store_tables(data_dir)``
    gives (None: the embedded store again)."""
    _scale_out_store[:] = [store_tables] if store_tables else []


def embedded_store_run() -> bool:
    """Whether this test run's nodes keep their instances in files and SQLite (the
    default), read at collection, before any server starts."""
    return os.environ.get(SCALE_OUT_STORE_ENV, "sqlite") == "sqlite"


def init_node(base: Path, origin: str, name: str | None = None, *init_args: str) -> NodeProcess:
    """`imageshare init` a node in ``base/name`` on free ports, with more ``init_args``
    (e.g. ``--tls-self-signed``); not started."""
    http_port, dimse_port = free_port(), free_port()
    data_dir = base / (name or origin.split(".")[0].replace("/", "_"))
    result = run_cli(
        "init",
        str(data_dir),
        "--origin",
        origin,
        "--http",
        f"127.0.0.1:{http_port}",
        "--dimse-port",
        str(dimse_port),
        "--json",
        *init_args,
    )
    info = json.loads(result.stdout)
    # `init --tls-self-signed` puts the CA to pin here.
    pinned = data_dir / "tls" / "ca.pem"
    ca_file = pinned if pinned.exists() else None
    node = NodeProcess(
        data_dir, origin, http_port, dimse_port, info["vkey"], info["admin_token"], ca_file
    )
    for store_tables in _scale_out_store:
        # Before the last table, so that keys a test appends still land in that table.
        config = node.config.read_text()
        last = config.rfind("\n[")
        node.config.write_text(f"{config[:last]}\n\n{store_tables(data_dir)}{config[last:]}")
    return node


def peer_each_other(a: NodeProcess, b: NodeProcess) -> None:
    """Make two (not yet started) nodes roster peers that replicate, and so cosign, each
    other's logs quickly, without LAN discovery."""
    for one, other in ((a, b), (b, a)):
        one.append_config(
            "[federation]\ndiscovery = false\nreplicate_interval = 0.2\n\n"
            f'[[peers]]\norigin = "{other.origin}"\nurl = "{other.url}"\nvkey = "{other.vkey}"'
        )


def log_entries(node: NodeProcess, origin: str | None = None) -> list[Any]:
    """Every entry (decoded LedgerEntry values) of ``origin``'s log as ``node`` serves it
    through its ledger API: its own log by default, else its mirror (empty if none)."""
    import msgpack

    from node.core.entries import decode_entry
    from node.core.origins import log_id

    wanted = log_id(origin or node.origin)
    logs = node.get_json("/ledger/logs", auth=False)
    size = next((log["size"] for log in logs if log["log_id"] == wanted), 0)
    raw: list[bytes] = []
    while len(raw) < size:
        path = f"/ledger/logs/{wanted}/entries?start={len(raw)}&end={size}"
        with urllib.request.urlopen(node.url + path, timeout=10) as response:
            batch = msgpack.unpackb(response.read())
        assert batch, f"{node.origin} served no entries from {len(raw)}"
        raw += batch
    return [decode_entry(r) for r in raw]
