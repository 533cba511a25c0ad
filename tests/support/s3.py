"""Two independent S3-compatible servers for the object-store backend's tests: moto's
server mode (Python, from PyPI) and s3rver (Node.js, from npm, installed by
scripts/setup-env into vendor/s3rver). Each runs on a free loopback port with its own
scratch state and is stopped after. The node is tested against both and uses only the
core S3 API, so that it does not come to depend on one server's quirks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.nodes import free_port, terminate, wait_until

ROOT = Path(__file__).resolve().parents[2]
S3RVER = ROOT / "vendor" / "s3rver" / "node_modules" / "s3rver" / "bin" / "s3rver.js"
SERVERS = ("moto", "s3rver")


@dataclass(frozen=True)
class S3Server:
    name: str
    endpoint: str
    access_key: str
    secret_key: str

    def credentials_file(self, path: Path) -> Path:
        """This server's key pair as a node's [store.objects] credentials_file."""
        return private_file(
            path,
            f"[default]\naws_access_key_id = {self.access_key}\n"
            f"aws_secret_access_key = {self.secret_key}\n",
        )

    def client(self) -> object:
        """A boto3 client of this server, as the node configures its own."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )


def private_file(path: Path, text: str) -> Path:
    """A secret file (mode 600, as the node requires)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def _command(name: str, port: int, scratch: Path) -> list[str]:
    if name == "moto":
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    if not S3RVER.exists():
        raise RuntimeError("s3rver is not installed (scripts/setup-env installs it)")
    return ["node", str(S3RVER), "-d", str(scratch), "-a", "127.0.0.1", "-p", str(port), "-s"]


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # an S3 error document (e.g. 403 for an unsigned request): it is up
    except OSError:
        return False


@contextmanager
def running_s3(name: str) -> Iterator[S3Server]:
    """Start the S3 server ``name`` (one of SERVERS); stop it and remove its state after."""
    scratch = Path(tempfile.mkdtemp(prefix=f"imageshare-{name}-"))
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(scratch / "server.log", "wb") as log:
        process = subprocess.Popen(
            _command(name, port, scratch / "objects"), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: process.poll() is not None or _answers(endpoint), timeout=30)
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{(scratch / 'server.log').read_text()}")
        # s3rver checks signatures against its one fixed key pair; moto accepts any.
        yield S3Server(name, endpoint, "S3RVER", "S3RVER")
    finally:
        terminate(process, 10)
        shutil.rmtree(scratch, ignore_errors=True)
