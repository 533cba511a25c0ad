"""Driving the web wallet (/wallet/) in a browser page, as a patient on a phone would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What the restored seed is sealed with in the browser.
PASSPHRASE = "correct horse battery"


def wait_for_screen(page: Any, screen: str) -> None:
    """Wait until the wallet shows ``screen`` and has finished loading it."""
    page.wait_for_selector(f'body[data-screen="{screen}"][data-ready="true"]')


def confirm(page: Any, passphrase: str = PASSPHRASE) -> None:
    """Answer the wallet's confirmation dialog (Share, Revoke, Backup) with ``passphrase``."""
    page.wait_for_selector("#confirm[open]")
    if page.is_visible("#confirm-passphrase"):
        page.fill("#confirm-passphrase", passphrase)
    page.click("#confirm-ok")
    page.wait_for_selector("#confirm:not([open])", state="attached")


def unlock(page: Any, passphrase: str = PASSPHRASE) -> None:
    """Unlock the wallet from its lock screen (after a reload it holds no key)."""
    wait_for_screen(page, "lock")
    page.fill("#unlock-passphrase", passphrase)
    page.click("#unlock-button")


def restore_wallet(page: Any, node_url: str, backup: Path, passphrase: str) -> str:
    """Restore the wallet at ``node_url`` from ``backup`` (a backup file or a command-line
    wallet's seed.json): the patient's public key there, as the key screen shows it."""
    page.goto(node_url + "/wallet/")
    wait_for_screen(page, "setup")
    page.set_input_files("#restore-file", str(backup))
    page.fill("#restore-passphrase", passphrase)
    page.click("#restore-button")
    wait_for_screen(page, "key")
    return str(page.text_content("#pubkey")).strip()


def share_in_web_wallet(
    page: Any,
    node_url: str,
    seed: Path,
    study_ref: str,
    label: str,
    passcode: str,
    opinions: bool = False,
) -> tuple[str, str]:
    """Restore the wallet from ``seed`` at ``node_url`` and share one study with a doctor
    ("Share with a doctor", letting them send an opinion back if ``opinions``): (the
    link's viewer URL, its token id). The page is left on the share screen."""
    restore_wallet(page, node_url, seed, PASSPHRASE)
    page.click('#tabs button[data-screen="studies"]')
    wait_for_screen(page, "studies")
    page.check(f'#studies-list input.choose[value="{study_ref}"]')
    page.fill("#link-label", label)
    page.fill("#link-passcode", passcode)
    if opinions:
        page.check("#link-opinions")
    page.click("#link-button")
    confirm(page)
    wait_for_screen(page, "share")
    url = str(page.text_content("#share-url")).strip()
    token_id = str(page.text_content("#share-token-id")).strip()
    return url, token_id
