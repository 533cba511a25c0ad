#!/usr/bin/env python3
"""The ImageShare demo, step by step, the way a hospital's IT would do it by hand.

1. start from a clean ./demo-data;
2. create a hospital's node with `imageshare init`;
3. gather sample studies: pydicom's bundled test files and a small generated CT study;
4. import them with `imageshare import` (a damaged file shows how bad input is refused);
5. start the daemon with `imageshare run`;
6. list the studies over DICOMweb (QIDO-RS) and retrieve one whole (WADO-RS), as a
   viewer would;
7. print the URL, the admin token and example commands, and serve until Ctrl-C, which
   stops the node cleanly.

Usage: ./scripts/demo [--no-wait] [--http-port N] [--dimse-port N]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `tests.support` importable
    sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from tests.support.studies import make_ct_study  # noqa: E402

DEMO_DIR = ROOT / "demo-data"
HOSPITAL_ORIGIN = "hospital-a.example/imageshare"
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
QIDO_ACCEPT = "application/dicom+json"
WADO_ACCEPT = 'multipart/related; type="application/dicom"'

_step_number = 0


def step(title: str) -> None:
    """Print the heading of the next numbered step."""
    global _step_number
    _step_number += 1
    heading = f"== Step {_step_number}: {title}"
    if sys.stdout.isatty():
        heading = f"\033[1m{heading}\033[0m"
    print(f"\n{heading}", flush=True)


def say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def imageshare_command() -> list[str]:
    """The `imageshare` console script of this environment (the module if it is missing)."""
    script = Path(sys.executable).with_name("imageshare")
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.edges.cli"]


def imageshare(*args: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `imageshare ARGS` as a user would, echoing the command; exits on failure."""
    print(f"   $ imageshare {shlex.join(args)}", flush=True)
    result = subprocess.run([*imageshare_command(), *args], capture_output=True, text=True)
    output = result.stdout if not quiet else ""
    for line in (output + result.stderr).splitlines():
        say(f"  {line}")
    if result.returncode != 0:
        sys.exit(f"demo: `imageshare {args[0]}` failed (exit {result.returncode})")
    return result


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    if port_is_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, token: str | None = None, accept: str = "application/json") -> Any:
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else []


def http_get_bytes(url: str, token: str, accept: str) -> int:
    """GET ``url`` streaming; returns how many body bytes arrived."""
    headers = {"Accept": accept, "Authorization": f"Bearer {token}"}
    total = 0
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        while chunk := r.read(1 << 20):
            total += len(chunk)
    return total


def wait_until_serving(url: str, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            sys.exit(f"demo: the node exited with {daemon.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(url + "/healthz")
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("demo: the node did not answer /healthz within 60 s")


def tag_text(item: dict[str, Any], tag: str) -> str:
    """A DICOM JSON attribute's values as text (person names by their alphabetic form)."""
    values = item.get(tag, {}).get("Value") or []
    return "/".join(str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v) for v in values)


def show_studies(studies: list[dict[str, Any]]) -> None:
    say(f"{'patient':<22} {'date':<10} {'modalities':<11} {'instances':>9}  study")
    for item in studies:
        say(
            f"{tag_text(item, '00100010'):<22.22} {tag_text(item, '00080020'):<10} "
            f"{tag_text(item, '00080061'):<11.11} {tag_text(item, '00201208'):>9}  "
            f"{tag_text(item, '00081030')}"
        )


def gather_samples(samples: Path) -> str:
    """Copy pydicom's samples and generate a CT study under ``samples``; its Study UID."""
    bundled = Path(pydicom.__file__).parent / "data" / "test_files"
    (samples / "pydicom").mkdir(parents=True)
    for name in PYDICOM_SAMPLES:
        shutil.copy(bundled / name, samples / "pydicom" / name)
    say(f"{len(PYDICOM_SAMPLES)} files from pydicom's bundled test data -> {samples / 'pydicom'}")
    study = make_ct_study(
        samples / "ct",
        series=2,
        slices=12,
        rows=256,
        columns=256,
        patient_id="DEMO-0001",
        patient_name="Demo^Patient",
        accession="DEMO-ACC-1",
    )
    say(f"a generated CT study, 2 series x 12 slices of 256x256 -> {samples / 'ct'}")
    say(f"  Study Instance UID {study.study_uid}")
    return study.study_uid


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM to the demo (e.g. from a supervisor) stops the node like Ctrl-C does.
    raise KeyboardInterrupt


def serve_until_interrupted(daemon: subprocess.Popen[bytes], log: Path) -> None:
    # Also when started in the background, where SIGINT would be ignored by default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while daemon.poll() is None:
            time.sleep(0.5)
        sys.exit(f"demo: the node exited with {daemon.returncode}:\n{log.read_text()[-3000:]}")
    except KeyboardInterrupt:
        print()


def stop_node(daemon: subprocess.Popen[bytes]) -> None:
    step("Stop the node")
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    say(f"the node stopped (exit {daemon.returncode}); its data stays in {DEMO_DIR}")


def main() -> int:
    parser = argparse.ArgumentParser(description="ImageShare demo: one node with sample studies")
    parser.add_argument("--no-wait", action="store_true", help="stop after the walkthrough")
    parser.add_argument("--http-port", type=int, default=8600)
    parser.add_argument("--dimse-port", type=int, default=11112)
    args = parser.parse_args()

    step("Start from a clean slate")
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
        say(f"removed the previous demo in {DEMO_DIR}")
    DEMO_DIR.mkdir()
    say(f"the demo lives in {DEMO_DIR}")
    node_dir = DEMO_DIR / "hospital-a"
    config = node_dir / "node.toml"
    http_port, dimse_port = pick_port(args.http_port), pick_port(args.dimse_port)

    step("Create the hospital's node: its key, admin token and configuration")
    created = json.loads(
        imageshare(
            "init",
            str(node_dir),
            "--origin",
            HOSPITAL_ORIGIN,
            "--http",
            f"127.0.0.1:{http_port}",
            "--dimse-port",
            str(dimse_port),
            "--json",
            quiet=True,
        ).stdout
    )
    token = created["admin_token"]
    url = f"http://127.0.0.1:{http_port}"
    say(f"origin {created['origin']}, verifier key {created['vkey']}")

    step("Gather sample studies")
    ct_study_uid = gather_samples(DEMO_DIR / "samples")

    step("Import them (MR_truncated.dcm is damaged on purpose: it is refused, nothing else is)")
    imageshare("import", "-c", str(config), str(DEMO_DIR / "samples"))

    step("Start the node daemon")
    log = node_dir / "daemon.log"
    print(f"   $ imageshare run -c {config}   (log: {log})", flush=True)
    with open(log, "ab") as log_file:
        # Its own session: Ctrl-C reaches the demo, which then stops the node in order.
        daemon = subprocess.Popen(
            [*imageshare_command(), "run", "-v", "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(url, daemon, log)
        say(f"serving on {url}")

        step("Browse the studies over DICOMweb, as a viewer would (QIDO-RS)")
        qido = f"{url}/dicomweb/studies"
        print(f"   $ curl -H 'Authorization: Bearer …' {qido}", flush=True)
        try:
            show_studies(http_get(qido, token, QIDO_ACCEPT))
        except urllib.error.HTTPError as exc:
            say(f"DICOMweb answered HTTP {exc.code}: this build does not serve QIDO-RS yet")

        step("Retrieve the generated CT study whole, as a viewer would (WADO-RS)")
        wado = f"{url}/dicomweb/studies/{ct_study_uid}"
        print(f"   $ curl -H 'Authorization: Bearer …' -H 'Accept: {WADO_ACCEPT}' {wado}")
        try:
            started = time.perf_counter()
            received = http_get_bytes(wado, token, WADO_ACCEPT)
            seconds = time.perf_counter() - started
            say(f"{received / 1e6:.1f} MB of multipart/related DICOM in {seconds:.2f} s")
        except urllib.error.HTTPError as exc:
            say(f"DICOMweb answered HTTP {exc.code}: this build does not serve WADO-RS yet")

        step("Your turn")
        say(f"DICOMweb root:  {url}/dicomweb   (QIDO-RS, WADO-RS, STOW-RS)")
        say(f"admin token:    {token}")
        say("list studies:")
        say(f"  curl -H 'Authorization: Bearer {token}' {qido}")
        say("send more images by DIMSE C-STORE (dcmtk):")
        say(f"  storescu -aec IMAGESHARE +sd +r 127.0.0.1 {dimse_port} /path/to/dicom")
        say("import more files:")
        say(f"  .venv/bin/imageshare import -c {config} /path/to/dicom")
        if not args.no_wait:
            say("")
            say("The node keeps running; press Ctrl-C to stop it.")
            serve_until_interrupted(daemon, log)
    finally:
        stop_node(daemon)
    return 0


if __name__ == "__main__":
    sys.exit(main())
