"""Orthanc, the DICOM server most sites would pick, run beside our node for comparison.

Each OrthancServer is a private instance on loopback: free ports, its own storage and
index in a scratch directory (or in a database of a private PostgreSQL, through Debian's
orthanc-postgresql plugins), a generated JSON configuration with the DICOMweb plugin,
no remote access and no authentication. Also the process helpers every benchmark shares:
peak RSS of a running process and of a finished child, and loading a study with storescu.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.memory import peak_rss_bytes, run_with_peak_rss
from tests.support.nodes import free_port, terminate, wait_until

ORTHANC_BINARY = "Orthanc"
# Debian's orthanc-dicomweb installs the plugin here (dpkg -L orthanc-dicomweb).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Debian's orthanc-gdcm: GDCM's codecs (JPEG 2000, JPEG-LS, ...) for Orthanc's transcoding.
GDCM_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancGdcm.so")
# Debian's orthanc-postgresql: Orthanc's index, and its storage area, in PostgreSQL.
POSTGRESQL_PLUGINS = (
    Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so"),
    Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so"),
)
DICOMWEB_ROOT = "/dicom-web/"
# Debian's Orthanc links the system DCMTK, which leaves Nagle's algorithm on unless this is
# set; with it on, every C-STORE response waits for a delayed ACK (about 40 ms an instance).
# Orthanc's own builds compile DCMTK with Nagle off, so this is how sites run it.
ORTHANC_ENVIRONMENT = {"TCP_NODELAY": "1"}


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a running process in MB, or None if it is gone."""
    peak = peak_rss_bytes(pid)
    return None if peak is None else peak / 1024**2


@dataclass
class Measured:
    """A finished child process: exit status, wall time, its own peak RSS, and its output."""

    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def failure(self) -> str:
        """One line saying why the command failed (the last line of its error output)."""
        lines = [line for line in (self.stderr or self.stdout).splitlines() if line.strip()]
        return f"exit {self.returncode}: {lines[-1] if lines else 'no output'}"


def run_measured(command: list[str], log: Path, env: dict[str, str] | None = None) -> Measured:
    """Run ``command`` to completion; time it and sample its peak RSS (VmHWM).

    Its stdout goes to ``log`` and its stderr to ``log`` + ".stderr"; both are returned too.
    """
    err_path = log.with_name(log.name + ".stderr")
    with open(log, "wb") as out, open(err_path, "wb") as err:
        run = run_with_peak_rss(command, stdout=out, stderr=err, env={**os.environ, **(env or {})})
    return Measured(
        run.returncode,
        run.seconds,
        run.peak_rss / 1024**2,
        log.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


def storescu(
    files_dir: Path, host: str, port: int, called_ae: str, log: Path, calling_ae: str = "BENCH"
) -> Measured:
    """Send every file under ``files_dir`` by C-STORE with dcmtk storescu (TCP_NODELAY=1)."""
    command = [
        "storescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "+sd",
        "+r",
        host,
        str(port),
        str(files_dir),
    ]
    return run_measured(command, log, env={"TCP_NODELAY": "1"})


def storescu_command_text(called_ae: str, port: str = "PORT") -> str:
    return f"TCP_NODELAY=1 storescu -aec {called_ae} +sd +r 127.0.0.1 {port} STUDY_DIR"


@dataclass
class OrthancServer:
    """One private Orthanc on loopback; ``peers`` maps a peer name to its HTTP base URL."""

    workdir: Path
    name: str = "orthanc"
    ae_title: str = "ORTHANC"
    peers: dict[str, str] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    last_peak_rss_mb: float | None = None
    # False runs Orthanc exactly as Debian ships it: its DCMTK leaves Nagle's algorithm on.
    tcp_nodelay: bool = True
    # Load the GDCM plugin, without which Orthanc decodes no JPEG 2000 or JPEG-LS.
    gdcm: bool = False
    # A libpq URI: the index and the DICOM files in that PostgreSQL database, not on disk.
    postgresql_uri: str | None = None
    # More configuration on top of the generated one (e.g. DicomModalities).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + DICOMWEB_ROOT.rstrip("/")

    @property
    def directory(self) -> Path:
        return self.workdir / self.name

    def allow_retrieve(self, ae_title: str, port: int) -> OrthancServer:
        """Let the AE ``ae_title`` (on loopback) C-FIND and C-GET, as a PACS in front of
        which a node runs (docs/pacs.md); before start()."""
        modality = {"AET": ae_title, "Host": "127.0.0.1", "Port": port, "AllowGet": True}
        self.extra.setdefault("DicomModalities", {})[ae_title] = modality
        return self

    def plugins(self) -> list[Path]:
        return [
            DICOMWEB_PLUGIN,
            *([GDCM_PLUGIN] if self.gdcm else []),
            *(POSTGRESQL_PLUGINS if self.postgresql_uri else ()),
        ]

    def configuration(self) -> dict[str, Any]:
        postgresql = {
            "PostgreSQL": {
                "EnableIndex": True,
                "EnableStorage": True,
                "ConnectionUri": self.postgresql_uri,
                "Lock": True,  # this Orthanc alone uses the database
            }
        }
        return {
            "Name": self.name,
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "StorageCompression": False,
            "SyncStorageArea": True,  # fsync every stored file, as our node does
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "DicomModalities": {},
            "OrthancPeers": {name: [url.rstrip("/") + "/"] for name, url in self.peers.items()},
            "Plugins": [str(plugin) for plugin in self.plugins()],
            "DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT},
            **(postgresql if self.postgresql_uri else {}),
            **self.extra,
        }

    def start(self, timeout: float = 60.0) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers /system.

        Raises RuntimeError if the binary or a plugin it loads is missing, or if it
        exits or does not answer in time.
        """
        missing = [plugin for plugin in self.plugins() if not plugin.exists()]
        if missing:
            raise RuntimeError(f"an Orthanc plugin is missing ({missing[0]})")
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        # The child keeps its own copy of the log's descriptor.
        with open(self.directory / "orthanc.log", "wb") as log:
            try:
                self.process = subprocess.Popen(
                    [ORTHANC_BINARY, str(config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(ORTHANC_ENVIRONMENT if self.tcp_nodelay else {})},
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise RuntimeError("Orthanc is not installed (Debian package orthanc)") from exc
        try:
            wait_until(self._answers, timeout=timeout, message=f"Orthanc {self.name} to answer")
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from exc
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "orthanc.log").read_text(errors="replace")
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {log[-2000:]}")
        try:
            self.get_json("/system", timeout=1)
        except OSError:
            return False
        return True

    def peak_rss_mb(self) -> float | None:
        """Peak RSS so far while running; after stop(), the last value read before it."""
        if self.process is not None:
            value = peak_rss_mb(self.process.pid)
            if value is not None:
                self.last_peak_rss_mb = value
        return self.last_peak_rss_mb

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Orthanc cleanly (SIGTERM), killing it only if it does not exit in time."""
        if self.process is None:
            return
        self.peak_rss_mb()
        terminate(self.process, timeout)
        self.process = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 600
    ) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return bytes(response.read())

    def get_json(self, path: str, timeout: float = 60) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def study_id(self, study_uid: str) -> str:
        """Orthanc's own identifier of a study, by its Study Instance UID."""
        found = json.loads(self.request("POST", "/tools/lookup", study_uid.encode()))
        for item in found:
            if item.get("Type") == "Study":
                return str(item["ID"])
        raise RuntimeError(f"Orthanc {self.name} does not hold the study")

    def instance_count(self) -> int:
        return int(self.get_json("/statistics")["CountInstances"])


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, OrthancServer(Path(scratch)) as orthanc:
        print(json.dumps(orthanc.get_json("/system"), indent=2))
        print(f"peak RSS {orthanc.peak_rss_mb():.0f} MB")
