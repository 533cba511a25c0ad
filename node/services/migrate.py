"""`imageshare migrate --to postgresql`: move a stopped node from SQLite and files to
PostgreSQL and an S3-compatible object store, verified before the node is switched.

1. The node must be stopped: the data directory's run lock is taken alone
   (node/store/run_lock.py), so no instance can arrive mid-move.
2. The target settings (a TOML file holding only the ``[store]`` tables) are merged into
   a copy of node.toml and loaded, so a bad setting is refused before anything moves.
3. Every stored file is checked against its SHA-256, then put in the bucket under its
   content address (a rerun puts the same object again, harmlessly).
4. The index's tables are copied row by row, under the same names, in one PostgreSQL
   transaction per batch; an instance keeps its arrival position (SQLite's rowid), so
   what the forwarder has sent stays sent.
5. The ledger (the own log and the mirrors) and the state stores' SQLite files (nonces,
   consent, links, transfers, forwarding, federation, opinions) are copied the same
   way, each into the tables its PostgreSQL store creates, under the same names: nothing
   a patient shared or the node promised is left behind, and a request seen before the
   move is still a replay after it.
6. Verified: each table's rows and a digest over them are equal on both sides; every
   object is read back from the bucket and its SHA-256 checked; the node's own log
   verifies (``imageshare ledger verify``) on SQLite before and on PostgreSQL after, at
   the same size.
7. Only then node.toml is switched (the old one kept beside it as
   ``node.toml.sqlite``), atomically. The SQLite files stay in the data directory until
   the operator removes them, so a failed move changes nothing the node serves.

A copy that stops part-way (a crash, a full disk) is resumed by running the command
again: rows already copied are kept (``ON CONFLICT DO NOTHING``) and the verification
covers everything.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import NodeConfig, load_config
from node.errors import ConfigError
from node.services.ledger import verify_own_log
from node.store.backends import open_instance_store
from node.store.instances import SqliteInstanceStore, fsync_path
from node.store.migration import (
    INDEX_TABLES,
    STATE_STORES,
    MigrationUnverified,
    TableCopy,
    check_index_table,
    check_state_table,
    continue_positions,
    copy_index_table,
    copy_state,
    index_objects,
    put_objects,
    read_back,
)
from node.store.postgres import PostgresInstanceStore
from node.store.run_lock import RunLock

__all__ = ["STATE_STORES", "MigrationReport", "MigrationUnverified", "migrate_to_postgresql"]

BACKUP_SUFFIX = ".sqlite"  # node.toml as it was, beside the switched one
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


@dataclass(frozen=True)
class MigrationReport:
    tables: list[TableCopy]
    objects: int
    object_bytes: int
    ledger_size: int
    config_backup: Path

    def as_json(self) -> dict[str, Any]:
        return {
            "to": "postgresql",
            "tables": {t.table: {"rows": t.rows, "sha256": t.digest} for t in self.tables},
            "objects": self.objects,
            "object_bytes": self.object_bytes,
            "ledger_entries": self.ledger_size,
            "config_backup": str(self.config_backup),
            "verified": True,
        }


Progress = Callable[[str], None]


def migrate_to_postgresql(
    config_path: Path, settings_path: Path, progress: Progress | None = None
) -> MigrationReport:
    """Move the stopped node of ``config_path`` to the ``[store]`` of ``settings_path``
    (see the module docstring). ConfigError for a running node, a node already on
    PostgreSQL or bad settings; MigrationUnverified when the copy does not match."""
    say = progress or (lambda _message: None)
    config_path = config_path.resolve()
    config = load_config(config_path)
    if config.store.backend != "sqlite":
        raise ConfigError(f"{config_path.name}: the node is already on {config.store.backend}")
    lock = RunLock(config.data_dir, exclusive=True)
    staged_config = config_path.with_name(f".{config_path.name}.migrating")
    try:
        staged_config.write_text(with_store_settings(config_path.read_text(), settings_path))
        target_config = load_config(staged_config)
        if target_config.store.backend != "postgresql":
            raise ConfigError(f'{settings_path.name}: [store] backend must be "postgresql"')
        report = _move(config, target_config, say)
        backup = config_path.with_name(config_path.name + BACKUP_SUFFIX)
        shutil.copy2(config_path, backup)
        fsync_path(backup)
        fsync_path(staged_config)
        os.replace(staged_config, config_path)
        fsync_path(config_path.parent)
        say(f"switched {config_path.name} to PostgreSQL; the old one is {backup.name}")
        return MigrationReport(
            report.tables, report.objects, report.object_bytes, report.ledger_size, backup
        )
    finally:
        staged_config.unlink(missing_ok=True)
        lock.release()


def with_store_settings(node_toml: str, settings_path: Path) -> str:
    """node.toml's text with its ``[store]`` tables replaced by those of the settings
    file (which must hold nothing else); the rest, comments included, unchanged."""
    try:
        settings_text = settings_path.read_text()
        settings = tomllib.loads(settings_text)
    except FileNotFoundError as exc:
        raise ConfigError(f"no store settings at {settings_path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{settings_path.name}: not valid TOML: {exc}") from exc
    if set(settings) != {"store"}:
        raise ConfigError(f"{settings_path.name}: must hold the [store] tables and nothing else")
    if "store" in tomllib.loads(node_toml) and not any(
        _is_store_table(line) for line in node_toml.splitlines()
    ):
        raise ConfigError("node.toml sets store keys outside a [store] table; move them into one")
    kept: list[str] = []
    in_store = False
    for line in node_toml.splitlines(keepends=True):
        header = _TABLE_HEADER.match(line)
        if header:
            in_store = _is_store_table(line)
        if not in_store:
            kept.append(line)
    text = "".join(kept).rstrip("\n")
    return f"{text}\n\n{settings_text.strip()}\n"


def _is_store_table(line: str) -> bool:
    header = _TABLE_HEADER.match(line)
    if header is None:
        return False
    name = header.group(1).replace(" ", "").replace('"', "")
    return name == "store" or name.startswith("store.")


@dataclass(frozen=True)
class _Moved:
    tables: list[TableCopy]
    objects: int
    object_bytes: int
    ledger_size: int


def _move(config: NodeConfig, target_config: NodeConfig, say: Progress) -> _Moved:
    ledger_size = _verify_own_log(config)
    source = SqliteInstanceStore(
        config.data_dir, config.store.max_instance_bytes, config.store.max_inflation_ratio
    )
    try:
        target = open_instance_store(target_config)
        assert isinstance(target, PostgresInstanceStore)
        try:
            objects = index_objects(source)
            say(f"putting {len(objects)} instance files in the bucket")
            object_bytes = put_objects(source, target, objects)
            for table in INDEX_TABLES:
                say(f"copying the {table} table")
                copy_index_table(source, target, table)
            continue_positions(target)
            say("copying the state stores")
            state_tables = copy_state(config, target_config)
            say("verifying")
            tables = [check_index_table(source, target, table) for table in INDEX_TABLES]
            tables += [check_state_table(config, target_config, *t) for t in state_tables]
            read_back(target, objects, config.store.max_instance_bytes)
            moved_log = verify_own_log(target_config)
            if not moved_log.ok or moved_log.size != ledger_size:
                raise MigrationUnverified(
                    f"the node's own log on PostgreSQL does not verify at its {ledger_size}"
                    " entries; nothing was switched"
                )
        finally:
            target.close()
    finally:
        source.close()
    return _Moved(tables, len(objects), object_bytes, ledger_size)


def _verify_own_log(config: NodeConfig) -> int:
    """The node's own log, checked end to end before anything moves."""
    report = verify_own_log(config)
    if not report.ok:
        raise MigrationUnverified(
            f"the node's own log does not verify ({report.problems[0].message});"
            " nothing was moved"
        )
    return report.size
