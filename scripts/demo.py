#!/usr/bin/env python3
"""The ImageShare demo: three hospitals on this machine and one patient, step by step.

Everything runs for real, the way hospital IT and a patient would do it by hand with the
`imageshare` command: three nodes (hospital A, B and C) are created, joined into one
federation and started on loopback, speaking HTTPS to each other (certificates from one
lab CA that every node, wallet and the auditor pin); hospital A imports sample studies
(pydicom's bundled files and two generated CT phantoms of the demo patient); the patient
makes a wallet, is enrolled at A, lists their studies and grants hospital B one of them;
B fetches it and shows it over DICOMweb; A's record of that access reaches B's and C's
copies of A's log; the patient revokes the grant, B's next fetch is refused; the patient
reads their access log, proven; an auditor checks every log of the federation. Then the
nodes keep running with their URLs printed until Ctrl-C (or SIGTERM), which stops them
all cleanly.

Any failed step stops the demo with the reason and the tail of each node's log, exit 1.

Usage: ./scripts/demo [--no-wait] [--base-port N] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `node` importable
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402
import pydicom  # noqa: E402

from node.core.entries import decode_entry  # noqa: E402
from node.core.origins import log_id  # noqa: E402
from node.samples import make_ct_study  # noqa: E402

DEFAULT_DEMO_DIR = ROOT / "demo-data"
DEMO_MARKER = ".imageshare-demo"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
PATIENT_ID = "DEMO-0001"
# Files that ship inside the pydicom package (no download): CT, MR, JPEG 2000, RGB, an RT
# plan and an ECG waveform; MR_truncated.dcm is cut short on purpose and must be refused.
PYDICOM_SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "examples_rgb_color.dcm",
    "liver_1frame.dcm",
    "rtplan.dcm",
    "waveform_ecg.dcm",
    "MR_truncated.dcm",
]
# Appended to each node.toml: the roster gives every address, so the demo does not
# announce itself on the LAN; replication rounds every half second keep the story brisk.
FEDERATION_SETTINGS = (
    "\n# Demo: addresses come from the roster (peers add); replicate every half second.\n"
    "[federation]\ndiscovery = false\nreplicate_interval = 0.5\n"
)
# Hospital C is the federation's archive: it mirrors every log; A and B mirror those of
# the members they deal with (the default).
ARCHIVE_SETTING = 'mirror = "all"\n'
QIDO_ACCEPT = "application/dicom+json"
# What the wallet, the auditor and this script trust for https:// (the lab CA, once made).
CA_FILE_ENV = "IMAGESHARE_CA_FILE"
STEP_DEADLINE = 60.0  # seconds any one wait may take before the demo gives up
COMMAND_TIMEOUT = 180.0  # seconds any one `imageshare` command may take
T = TypeVar("T")


class StepFailed(Exception):
    """A step of the story did not have the expected outcome."""


@dataclass
class Hospital:
    """One demo node: its data directory, addresses and, while running, its daemon."""

    name: str
    data_dir: Path
    http_port: int
    dimse_port: int
    vkey: str = ""
    admin_token: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"{self.name}.example/imageshare"

    @property
    def config(self) -> Path:
        return self.data_dir / "node.toml"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def ca_file(self) -> Path:
        """The lab CA this node's certificate chains to, as `init --tls-self-signed` keeps it."""
        return self.data_dir / "tls" / "ca.pem"

    @property
    def log(self) -> Path:
        return self.data_dir / "daemon.log"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# -- output ----------------------------------------------------------------------------------

_step_number = 0


def step(title: str, *explanation: str) -> None:
    """Print the heading of the next numbered step and what it does, in plain words."""
    global _step_number
    _step_number += 1
    heading = f"== Step {_step_number}: {title}"
    if sys.stdout.isatty():
        heading = f"\033[1m{heading}\033[0m"
    print(f"\n{heading}", flush=True)
    for line in explanation:
        say(line)


def say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def outcome(text: str) -> None:
    """The result of a step, one line: what the tests and the reader look for."""
    say(f"-> {text}")


def shown(path: Path) -> str:
    """A path as the reader would type it: relative to the current directory if inside."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- the imageshare command ------------------------------------------------------------------


def imageshare_command() -> list[str]:
    """The `imageshare` console script of this environment (the module if it is missing)."""
    script = Path(sys.executable).with_name("imageshare")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.edges.cli"]


def imageshare(
    *args: str | Path, expect: int | None = 0, show: int | None = 20, echo: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `imageshare ARGS` as a user would, echoing it and up to ``show`` output lines.

    Raises StepFailed unless it exits with ``expect`` (None: any exit status will do).
    """
    words = [shown(a) if isinstance(a, Path) else a for a in args]
    if echo:
        # A token is hundreds of characters: its start is enough to follow the story.
        brief = [w if len(w) <= 80 else w[:48] + "…" for w in words]
        print(f"   $ imageshare {shlex.join(brief)}", flush=True)
    try:
        # No terminal for the command: the wallet must not stop the demo to ask a passphrase.
        result = subprocess.run(
            [*imageshare_command(), *(str(a) for a in args)],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise StepFailed(
            f"`imageshare {words[0]}` did not finish in {COMMAND_TIMEOUT:.0f} s"
        ) from exc
    if show:
        lines = (result.stdout + result.stderr).splitlines()
        for line in lines[:show]:
            say(f"  {line}")
        if len(lines) > show:
            say(f"  ... ({len(lines) - show} more lines)")
    if expect is not None and result.returncode != expect:
        raise StepFailed(
            f"`imageshare {words[0]}` exited {result.returncode}, not {expect}: "
            f"{result.stderr.strip() or result.stdout.strip()[-500:]}"
        )
    return result


def imageshare_json(*args: str | Path) -> Any:
    """`imageshare ARGS --json`, echoed, its document parsed (output shown by the caller)."""
    return json.loads(imageshare(*args, "--json", show=None).stdout)


# -- HTTP and polling ------------------------------------------------------------------------


def http_get(
    url: str, token: str | None = None, accept: str = "application/json", body: Any = None
) -> Any:
    """GET ``url`` (POST ``body`` as JSON when one is given)."""
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/fhir+json"
    request = urllib.request.Request(url, data=data, headers=headers)
    trusted = ssl.create_default_context(cafile=os.environ.get(CA_FILE_ENV) or None)
    with urllib.request.urlopen(request, timeout=30, context=trusted) as r:
        body = r.read()
    if accept == "application/msgpack":
        return msgpack.unpackb(body)
    return json.loads(body) if body else []


def poll(probe: Callable[[], T | None], what: str, deadline: float = STEP_DEADLINE) -> T:
    """Call ``probe`` until it returns something not None; StepFailed after ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > end:
            raise StepFailed(f"gave up after {deadline:.0f} s waiting for {what}")
        time.sleep(0.25)


def log_size(holder: Hospital, origin: str) -> int:
    """How many entries of ``origin``'s log ``holder`` serves (its own log or its copy)."""
    wanted = log_id(origin)
    logs = http_get(holder.url + "/ledger/logs")
    return next((int(log["size"]) for log in logs if log["log_id"] == wanted), 0)


def log_size_beyond(holder: Hospital, origin: str, index: int) -> int | None:
    """The size of ``holder``'s copy of ``origin``'s log once it holds entry ``index``."""
    size = log_size(holder, origin)
    return size if size > index else None


def entry_index(holder: Hospital, kind: str, token_id: str) -> int | None:
    """Index of the first ``kind`` entry of ``token_id`` in ``holder``'s own log, if any."""
    size = log_size(holder, holder.origin)
    path = f"/ledger/logs/{log_id(holder.origin)}/entries"
    start = 0
    while start < size:
        batch = http_get(
            f"{holder.url}{path}?start={start}&end={size}", accept="application/msgpack"
        )
        if not batch:
            break
        for offset, raw in enumerate(batch):
            entry = decode_entry(raw)
            token = entry.fields.get("token_id")
            if entry.kind == kind and isinstance(token, bytes) and token.hex() == token_id:
                return start + offset
        start += len(batch)
    return None


# -- ports and samples -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(base_port: int | None) -> list[int]:
    """Two ports (HTTP, DIMSE) per hospital: base_port onwards, else any free ones."""
    count = 2 * len(HOSPITALS)
    if base_port is None:
        ports: set[int] = set()
        while len(ports) < count:
            ports.add(free_port())
        return sorted(ports)
    ports_wanted = list(range(base_port, base_port + count))
    busy = [p for p in ports_wanted if not port_is_free(p)]
    if busy:
        raise StepFailed(f"--base-port {base_port}: port(s) {busy} are in use; choose another")
    return ports_wanted


def gather_samples(samples: Path) -> tuple[str, str]:
    """Copy pydicom's samples and generate the patient's two CT studies; their Study UIDs."""
    bundled = Path(pydicom.__file__).parent / "data" / "test_files"
    (samples / "pydicom").mkdir(parents=True)
    for name in PYDICOM_SAMPLES:
        shutil.copy(bundled / name, samples / "pydicom" / name)
    say(f"{len(PYDICOM_SAMPLES)} files from pydicom's bundled test data (other patients)")
    recent = make_ct_study(
        samples / "ct-2026",
        series=2,
        slices=12,
        rows=256,
        columns=256,
        patient_id=PATIENT_ID,
        patient_name="Demo^Patient",
        study_date="20260101",
        accession="DEMO-ACC-2",
        phantom=True,
    )
    older = make_ct_study(
        samples / "ct-2025",
        series=1,
        slices=4,
        rows=128,
        columns=128,
        patient_id=PATIENT_ID,
        patient_name="Demo^Patient",
        study_date="20250612",
        accession="DEMO-ACC-1",
        phantom=True,
    )
    say(f"two generated CT studies (anatomical phantoms) of the demo patient, MRN {PATIENT_ID}:")
    say("  2026-01-01: 2 series x 12 slices of 256x256;  2025-06-12: 1 series x 4 slices")
    return recent.study_uid, older.study_uid


def tag_text(item: dict[str, Any], tag: str) -> str:
    """A DICOM JSON attribute's values as text (person names by their alphabetic form)."""
    values = item.get(tag, {}).get("Value") or []
    return "/".join(str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v) for v in values)


def show_studies(studies: list[dict[str, Any]]) -> None:
    say(f"  {'patient':<22} {'date':<10} {'modalities':<11} {'instances':>9}  study")
    for item in studies:
        say(
            f"  {tag_text(item, '00100010'):<22.22} {tag_text(item, '00080020'):<10} "
            f"{tag_text(item, '00080061'):<11.11} {tag_text(item, '00201208'):>9}  "
            f"{tag_text(item, '00081030')}"
        )


def qido(hospital: Hospital, query: str) -> list[dict[str, Any]]:
    """A QIDO-RS study search at ``hospital``, echoed as the curl a viewer's admin would type."""
    url = f"{hospital.url}/dicomweb/studies{query}"
    ca = shown(hospital.ca_file)
    print(f"   $ curl --cacert {ca} -H 'Authorization: Bearer …' '{url}'", flush=True)
    try:
        found: list[dict[str, Any]] = http_get(url, hospital.admin_token, QIDO_ACCEPT)
    except (OSError, ValueError) as exc:
        raise StepFailed(f"the DICOMweb search at {hospital.name} failed: {exc}") from exc
    show_studies(found)
    return found


# -- the nodes -------------------------------------------------------------------------------


def start(hospital: Hospital) -> None:
    """`imageshare run` in its own session: Ctrl-C reaches the demo, which stops it in order."""
    print(f"   $ imageshare run -c {shown(hospital.config)}   (log: {shown(hospital.log)})")
    with open(hospital.log, "ab") as log_file:
        hospital.process = subprocess.Popen(
            [*imageshare_command(), "run", "-v", "-c", str(hospital.config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def serving(hospital: Hospital) -> bool | None:
    """True once ``hospital`` answers /healthz; StepFailed if its daemon has exited."""
    assert hospital.process is not None
    if hospital.process.poll() is not None:
        raise StepFailed(f"{hospital.name}'s daemon exited with {hospital.process.returncode}")
    try:
        http_get(hospital.url + "/healthz")
        return True
    except (OSError, ValueError):
        return None


def stop_all(hospitals: list[Hospital]) -> None:
    """SIGTERM every running daemon, wait for each (kill after 30 s), and say how it ended."""
    running = [h for h in hospitals if h.process is not None]
    if not running:
        return
    step("Stop the nodes", "Each node gets SIGTERM, finishes what it was writing, and exits.")
    already_ended = {h.name for h in running if h.process and h.process.poll() is not None}
    for h in running:
        assert h.process is not None
        if h.name not in already_ended:
            h.process.send_signal(signal.SIGTERM)
    for h in running:
        assert h.process is not None
        if h.name in already_ended:
            say(f"{h.name} had already ended on its own (exit {h.process.returncode})")
            h.process = None
            continue
        try:
            h.process.wait(30)
        except subprocess.TimeoutExpired:
            h.process.kill()
            h.process.wait()
            say(f"{h.name} did not stop within 30 s and was killed")
        state = "stopped cleanly" if h.process.returncode == 0 else "stopped"
        say(f"{h.name} {state} (exit {h.process.returncode})")
        h.process = None


def serve_until_interrupted(hospitals: list[Hospital]) -> None:
    """Wait for Ctrl-C (or SIGTERM); StepFailed if a node exits on its own meanwhile."""
    try:
        while True:
            for h in hospitals:
                if h.process is not None and h.process.poll() is not None:
                    raise StepFailed(f"{h.name}'s daemon exited with {h.process.returncode}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM to the demo (e.g. from a supervisor) stops the nodes like Ctrl-C does.
    raise KeyboardInterrupt


# -- the story -------------------------------------------------------------------------------


def set_up(demo_dir: Path, base_port: int | None) -> list[Hospital]:
    """Steps 1-3: a clean directory, three initialised nodes that know each other."""
    step("Start from a clean slate")
    if demo_dir.exists() and any(demo_dir.iterdir()):
        # --data-dir may be mistyped: only ever delete what an earlier demo made.
        if not (demo_dir / DEMO_MARKER).exists() and not (demo_dir / "hospital-a").exists():
            raise StepFailed(f"{demo_dir} holds something else than a demo; not replacing it")
        shutil.rmtree(demo_dir)
        say(f"removed the previous demo in {shown(demo_dir)}")
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / DEMO_MARKER).write_text("made by scripts/demo.py; replaced on each run\n")
    say(f"the demo lives in {shown(demo_dir)}")
    ports = pick_ports(base_port)
    hospitals = [
        Hospital(name, demo_dir / name, ports[2 * i], ports[2 * i + 1])
        for i, name in enumerate(HOSPITALS)
    ]

    step(
        "Each hospital creates its node: a signing key, an admin token, a configuration",
        "A node's origin is its name in the federation; its verifier key lets anyone check",
        "what the node signs. Each also gets an HTTPS certificate: hospital A makes a small",
        "lab CA (--tls-self-signed), B and C have theirs signed by the same CA (--tls-ca).",
    )
    lab_ca = hospitals[0].data_dir / "tls"
    for h in hospitals:
        tls = ["--tls-self-signed"]
        if h is not hospitals[0]:
            tls += ["--tls-ca", str(lab_ca / "ca.pem"), "--tls-ca-key", str(lab_ca / "ca-key.pem")]
        created = imageshare_json(
            "init", h.data_dir, "--origin", h.origin,
            "--http", f"127.0.0.1:{h.http_port}", "--dimse-port", str(h.dimse_port), *tls,
        )  # fmt: skip
        h.vkey, h.admin_token = created["vkey"], created["admin_token"]
        say(f"  {h.origin} at {h.url}, verifier key {h.vkey}")
        with open(h.config, "a") as config:
            config.write(FEDERATION_SETTINGS)
            if h is hospitals[-1]:
                config.write(ARCHIVE_SETTING)
    # The patient's wallet and the auditor pin the lab CA too (like `--ca-file`).
    os.environ[CA_FILE_ENV] = str(hospitals[0].ca_file)
    say(f"  wallets and auditors trust the lab CA: {CA_FILE_ENV}={shown(hospitals[0].ca_file)}")

    step(
        "The hospitals form a federation: each adds the other two to its roster",
        "Only roster members may talk to a node, and each member is pinned by its key: every",
        "node verifies and vouches for every other node's consent log, and keeps a copy of",
        "those of the nodes it deals with (C, the archive, keeps a copy of every log).",
    )
    for h in hospitals:
        for other in hospitals:
            if other is not h:
                imageshare("peers", "add", "-c", h.config, other.origin, other.url, other.vkey)
    outcome(f"federation of {len(hospitals)}: every node knows every other")
    return hospitals


def import_at_a(a: Hospital, demo_dir: Path) -> str:
    """Steps 4-5: samples gathered and imported at A; the Study UID the patient will grant."""
    step(
        "Hospital A's archive: sample studies",
        "A node stores its hospital's own studies, as its PACS sends them (or by import).",
    )
    recent_uid, _older_uid = gather_samples(demo_dir / "samples")
    step(
        "Hospital A imports them",
        "MR_truncated.dcm is damaged on purpose: it is refused with a reason, nothing else is.",
    )
    imageshare("import", "-c", a.config, demo_dir / "samples")
    return recent_uid


def start_nodes(hospitals: list[Hospital]) -> None:
    step(
        "Start the three nodes",
        "Each serves DICOMweb to its viewers, the patient API to wallets, and its log to the",
        "other members, which start copying and cosigning it.",
    )
    for h in hospitals:
        start(h)
    for h in hospitals:
        poll(partial(serving, h), f"{h.name} to answer /healthz")
        say(f"  {h.name} serving on {h.url}")
    say("hospital A's studies, as a viewer lists them (QIDO-RS):")
    qido(hospitals[0], "")
    outcome("three nodes up")


def patient_story(hospitals: list[Hospital], wallet: Path, study_uid: str) -> None:
    """Steps from the patient's wallet to the audit; StepFailed at the first surprise."""
    a, b, c = hospitals
    step(
        "The patient creates a wallet",
        "The wallet holds the patient's secret; from it comes a different key for each",
        "hospital, so no two hospitals see the same key for the same person. (No passphrase",
        "in the demo; a real wallet is sealed with one.)",
    )
    imageshare("patient", "keygen", "--wallet", wallet)

    step(
        "The patient shows their key for hospital A",
        "At the registration desk the patient shows this key (also as a QR code).",
    )
    key = imageshare_json("patient", "pubkey", "--custodian", a.url, "--wallet", wallet)["pubkey"]
    say(f"  key for {a.origin}: {key}")

    step(
        "Hospital A's staff enroll the key for the patient's record",
        "Staff check the patient's identity and bind the key to the medical record number;",
        "the enrollment is written to A's log (no name or number in it, only a pseudonym).",
    )
    imageshare("enroll", "-c", a.config, "--patient-id", PATIENT_ID, f"--key={key}")
    outcome("enrolled")

    step(
        "The patient lists their studies at hospital A",
        "Signed with their key, the wallet asks A which studies are theirs.",
    )
    studies = imageshare_json("patient", "studies", "--custodian", a.url, "--wallet", wallet)[
        "studies"
    ]
    for s in studies:
        say(f"  {s['ref']}  {s['date']}  {','.join(s['modalities'])}  {s['instances']} images")
    if len(studies) != 2:
        raise StepFailed(f"expected the patient's 2 studies at A, the wallet lists {len(studies)}")
    newest = max(studies, key=lambda s: str(s["date"]))

    step(
        "Hospital A's RIS sends the radiologist's report",
        "A FHIR DiagnosticReport for the study; A keeps it as a DICOM Encapsulated PDF in the",
        "study's series for reports, so it travels wherever the study goes.",
    )
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "identifier": [{"system": "urn:demo:ris", "value": "RPT-2026-0001"}],
        "code": {"text": "CT chest report"},
        "subject": {"identifier": {"value": PATIENT_ID}},
        "imagingStudy": [
            {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}
        ],
        "conclusion": "No acute cardiopulmonary findings.",
    }
    stored = http_get(f"{a.url}/admin/api/reports", a.admin_token, body=report)
    outcome(f"report kept as instance {stored['sop_instance_uid']}")

    step(
        "The patient grants hospital B their latest study, for one day",
        "The grant is signed by the patient's key and recorded in A's log; the wallet checks",
        "the proof that it is there. The token (or its QR code) goes to hospital B.",
    )
    grant = imageshare_json(
        "patient", "grant", "--custodian", a.url, "--to", b.origin,
        f"--study={newest['ref']}", "--expires", "1d", "--wallet", wallet,
    )  # fmt: skip
    token_id, token_url = grant["token_id"], grant["url"]
    say(f"  token id: {token_id}")
    say(f"  token:    {token_url[:60]}…")
    outcome("granted")

    step(
        "Hospital B fetches the study with the token",
        "B asks A; A checks the patient's signature, the grantee, the scope, the expiry and",
        "that it is not revoked, records the access in its log and streams the study to B,",
        "encrypted end to end. B records a receipt in its own log.",
    )
    imageshare("fetch", "-c", b.config, token_url)
    fetched_at = time.monotonic()
    say("the study in B's DICOMweb, as B's viewer finds it (QIDO-RS):")
    found = qido(b, f"?PatientID={PATIENT_ID}")
    if [tag_text(s, "0020000D") for s in found] != [study_uid]:
        raise StepFailed("B's DICOMweb does not list exactly the granted study")
    outcome(f"fetched: {b.origin} holds the granted study, and only that one")
    reports = http_get(f"{b.url}/admin/api/reports?study={study_uid}", b.admin_token)["reports"]
    if [r["title"] for r in reports] != ["CT chest report"]:
        raise StepFailed("the report did not travel with the study to B")
    say(f"  and its report: {reports[0]['title']} ({reports[0]['status']})")

    step(
        "Every hospital holds A's record of the access",
        "B copies A's log since it fetches from A, and C, the archive, copies every log: both",
        "now hold A's access entry, so A could not quietly remove it; its checkpoints are",
        "cosigned by B and C.",
    )
    access = poll(lambda: entry_index(a, "access", token_id), "A's access entry")
    say(f"  A's access entry is #{access} of its log")
    for other in (b, c):
        size = poll(
            partial(log_size_beyond, other, a.origin, access),
            f"{other.name}'s copy of A's log to hold entry #{access}",
        )
        ca = shown(other.ca_file)
        say(f"  $ curl --cacert {ca} {other.url}/ledger/logs   -> A's log there: {size} entries")
    outcome(
        f"replicated: B and C held it at most {time.monotonic() - fetched_at:.2f} s after the fetch"
    )

    step(
        "The patient revokes the grant",
        "Signed by the patient and recorded in A's log; from now on the token opens nothing.",
    )
    imageshare("patient", "revoke", token_id, "--custodian", a.url, "--wallet", wallet)
    outcome("revoked")

    step(
        "Hospital B tries to fetch again, and is refused",
        "Expected: A refuses the revoked token and records the denial in its log.",
        "The command exits 1, its answer to a refusal.",
    )
    refused = imageshare("fetch", "-c", b.config, token_url, expect=1)
    if "(revoked)" not in refused.stderr:
        raise StepFailed(f"the refusal does not name the rule revoked: {refused.stderr.strip()}")
    outcome("refused: revoked (exit 1), as expected")

    step(
        "The patient shares the study with a second-opinion radiologist by a link",
        "A SMART Health Link: a grant to the link itself, recorded in A's log like any grant,",
        "with a passcode. Its files are encrypted in the wallet under a key that only the",
        "link (its QR code, its URL's fragment) carries; A keeps only their ciphertext.",
    )
    link = imageshare_json(
        "patient", "share", "--custodian", a.url, f"--study={newest['ref']}", "--expires", "7d",
        "--passcode", "2468", "--label", "second opinion", "--wallet", wallet,
    )  # fmt: skip
    say(f"  open in a browser: {link['url'][:72]}…")
    outcome("shared by a link")

    step(
        "Hospital C takes the link into its own store",
        "C requests the link's manifest with the passcode, decrypts it, and reads the study",
        "through the link's own DICOMweb root; A records the access, naming the link.",
    )
    imageshare("fetch", "-c", c.config, link["shlink"], "--passcode", "2468")
    if [tag_text(s, "0020000D") for s in qido(c, f"?PatientID={PATIENT_ID}")] != [study_uid]:
        raise StepFailed("C's DICOMweb does not list the study the link shares")
    outcome(f"second opinion: {c.origin} holds the shared study")

    step(
        "The patient reads their access log from the three hospitals",
        "Every access, revocation and denial of the patient's tokens, each proven to be in",
        "A's log under a checkpoint that the other hospitals cosigned.",
    )
    urls = [h.url for h in hospitals]
    say("  (waiting until the hospitals have cosigned A's latest checkpoint)")
    poll(
        lambda: succeeds("patient", "log", *urls, "--wallet", wallet, "--json"),
        "every event of the patient log to be proven",
    )  # fmt: skip
    log = imageshare("patient", "log", *urls, "--wallet", wallet).stdout
    expected = ("received", "you revoked", "was refused (revoked)", "by the link 'second opinion'")
    for kind in expected:
        if kind not in log:
            raise StepFailed(f"the patient log does not show '{kind}'")
    outcome("patient log proven: the access, the revocation, the denial and the link's reads")

    step(
        "An auditor checks the whole federation",
        "Anyone may: every log's signatures, hash chain and checkpoints, that all nodes saw",
        "the same history, and that every access was allowed by a live grant.",
    )
    poll(
        lambda: succeeds("audit", *urls, "--json"),
        "a clean audit",
    )
    imageshare("audit", *urls)
    outcome("audit clean: exit 0")


def succeeds(*args: str | Path) -> bool | None:
    """True if `imageshare ARGS` (run silently) exits 0, else None: a probe for poll()."""
    return True if imageshare(*args, expect=None, show=None, echo=False).returncode == 0 else None


def your_turn(hospitals: list[Hospital], wallet: Path) -> None:
    step("Your turn: the federation keeps running")
    for h in hospitals:
        say(f"{h.name} ({h.origin})")
        say(f"  DICOMweb:    {h.url}/dicomweb   (QIDO-RS, WADO-RS, STOW-RS)")
        say(f"  admin token: {h.admin_token}")
        say(f"  dashboard:   {h.url}/admin      patient wallet (web): {h.url}/wallet/")
    a = hospitals[0]
    say("try:")
    ca = shown(a.ca_file)
    token = a.admin_token
    say(f"  curl --cacert {ca} -H 'Authorization: Bearer {token}' {a.url}/dicomweb/studies")
    command = shlex.join(shown(Path(w)) if os.sep in w else w for w in imageshare_command())
    say(f"  {command} patient tokens --wallet {shown(wallet)} --ca-file {ca}")
    say(f"  {command} audit {' '.join(h.url for h in hospitals)} --ca-file {ca}")


def main() -> int:
    parser = argparse.ArgumentParser(description="ImageShare demo: three hospitals, one patient")
    parser.add_argument("--no-wait", action="store_true", help="stop the nodes after the story")
    parser.add_argument(
        "--base-port",
        type=int,
        default=None,
        metavar="N",
        help="use ports N..N+5 (HTTP and DIMSE of A, B, C); default: any free ports",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DEMO_DIR, help="where the demo lives (replaced)"
    )
    args = parser.parse_args()
    demo_dir: Path = args.data_dir.resolve()
    # Ctrl-C (also when started in the background) and SIGTERM end the demo in order.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)

    hospitals: list[Hospital] = []
    try:
        hospitals = set_up(demo_dir, args.base_port)
        recent_uid = import_at_a(hospitals[0], demo_dir)
        start_nodes(hospitals)
        wallet = demo_dir / "wallet"
        patient_story(hospitals, wallet, recent_uid)
        print("\nThe story ran end to end: fetched, refused (revoked), audit clean.", flush=True)
        your_turn(hospitals, wallet)
        if not args.no_wait:
            say("")
            say("The nodes keep running; press Ctrl-C to stop them.")
            serve_until_interrupted(hospitals)
        return 0
    except (StepFailed, OSError) as exc:  # OSError: a node stopped answering HTTP
        print(f"\ndemo: FAILED at step {_step_number}: {exc}", file=sys.stderr, flush=True)
        for h in hospitals:
            if h.process is not None and h.process.poll() is not None:
                print(f"{h.name}'s daemon has ended (exit {h.process.returncode})", file=sys.stderr)
            if h.log.exists():
                print(f"--- last lines of {shown(h.log)}:\n{h.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        stop_all(hospitals)
        if hospitals:
            say(f"the nodes' data stays in {shown(demo_dir)}")


if __name__ == "__main__":
    sys.exit(main())
