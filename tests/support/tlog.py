"""Go's golang.org/x/mod/sumdb/tlog and sumdb/note as an outside verifier of a node's
tiles and checkpoint (tests/support/tlogcheck), built offline against Debian's package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

GO_SOURCE = Path(__file__).parent / "tlogcheck"
GO_PATH = Path("/usr/share/gocode")


def build_tlogcheck(directory: Path) -> Path | None:
    """The verifier built in ``directory``; None when Go or golang.org/x/mod is missing
    (scripts/setup-env installs them: Debian golang-go, golang-golang-x-mod-dev)."""
    go = shutil.which("go")
    if go is None or not (GO_PATH / "src/golang.org/x/mod/sumdb/tlog").is_dir():
        return None
    binary = directory / "tlogcheck"
    env = {**os.environ, "GOPATH": str(GO_PATH), "GO111MODULE": "off", "GOPROXY": "off"}
    env["GOFLAGS"] = ""
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=GO_SOURCE, env=env, check=True)
    return binary


def tiles_prefix(url: str, origin: str) -> str:
    """Where a node at ``url`` serves the tiles and checkpoint of ``origin``'s log."""
    return f"{url}/ledger/logs/{hashlib.sha256(origin.encode()).hexdigest()}"


def go_verify(binary: Path, url: str, origin: str, vkey: str) -> dict[str, Any]:
    """What the Go verifier found of ``origin``'s log as served at ``url``; AssertionError
    with its complaint if it refused."""
    done = subprocess.run(
        [str(binary), tiles_prefix(url, origin), vkey], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found
