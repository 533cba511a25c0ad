// The Key screen: my key for this hospital as text and QR code for the enrollment desk;
// it notices enrollment by itself (polling while shown). Lock, backup again, forget.

import { addPasskey, passkeyAvailable } from "./keys.js";
import { qrSvg } from "./qr.js";
import { forgetWallet, lockWallet } from "./session.js";
import { downloadBackup } from "./screen-setup.js";
import { $, action, app, confirmAction, currentScreen, registerScreen, say, show } from "./shell.js";
import { RequestFailed, signedJson } from "./signed.js";

const ENROLLMENT_POLL_MS = 3000;
let pollTimer = null;

async function checkEnrollment() {
  clearTimeout(pollTimer);
  if (!app.key) {
    $("enrollment").textContent = "The wallet is locked: unlock it to see whether you are enrolled here.";
    return;
  }
  let enrolled = false;
  try {
    const { studies } = await signedJson(app.key, "GET", "/patient/studies");
    enrolled = true;
    $("enrollment").textContent =
      `You are enrolled here: ${studies.length} ${studies.length === 1 ? "study" : "studies"}.`;
  } catch (error) {
    if (error instanceof RequestFailed && error.status === 401) {
      $("enrollment").textContent = "Not enrolled here yet. This screen updates by itself once the desk has done it.";
    } else if (!(error instanceof RequestFailed)) {
      $("enrollment").textContent = "You seem to be offline, so enrollment cannot be checked now.";
    } else {
      throw error;
    }
  }
  if (!enrolled) {
    pollTimer = setTimeout(() => {
      if (currentScreen() === "key") checkEnrollment().catch(() => {});
    }, ENROLLMENT_POLL_MS);
  }
}

async function load() {
  if (!app.publicText) {
    await show("lock");
    return;
  }
  $("pubkey").textContent = app.publicText;
  $("pubkey-qr").replaceChildren(qrSvg(app.publicText, "my key as a QR code"));
  $("lock-button").textContent = app.key ? "Lock the wallet now" : "Unlock";
  $("passkey-button").hidden = !app.key || Boolean(app.wallet.passkey) || !(await passkeyAvailable());
  await checkEnrollment();
}

function setup() {
  action($("lock-button"), async () => {
    if (app.key) await lockWallet();
    else await show("lock");
  });
  action($("backup-again-button"), downloadBackup);
  action($("passkey-button"), async () => {
    const passphrase = await confirmAction(
      "Unlock with your fingerprint or face from now on? Your passphrase keeps working too. Enter it to go on.",
      { confirmLabel: "Set up the passkey" },
    );
    app.wallet = await addPasskey(app.wallet, passphrase);
    $("passkey-button").hidden = true;
    say("Done: next time, unlock with your passkey.", "info");
  });
  action($("forget-button"), async () => {
    const warning = app.wallet && app.wallet.backupSaved
      ? "Forget this wallet on this phone? You can restore it later from your backup file."
      : "Forget this wallet on this phone? You have not saved a backup: your key will be gone for good.";
    await confirmAction(warning, { confirmLabel: "Forget it", destructive: true, passphrase: false });
    await forgetWallet();
  });
}

registerScreen("key", { load, setup });
