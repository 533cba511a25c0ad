// The unlocked session: my key here in memory while unlocked, dropped on lock, after
// five idle minutes, and with the page.

import { keyFor, publicKeyText, store } from "./keys.js";
import { $, app, show, showBackupReminder } from "./shell.js";

const IDLE_LOCK_MS = 5 * 60 * 1000;
let idleTimer = null;

/** Use ``wallet`` (unlocked, or locked: then only the public key is known). */
export async function openWallet(wallet) {
  app.wallet = wallet;
  if (wallet.seedKey) {
    app.key = await keyFor(wallet, app.node.origin);
    app.publicText = app.key.publicText;
    restartIdleTimer();
  } else {
    app.key = null;
    app.publicText = (await publicKeyText(app.node.origin)) || null;
  }
  $("tabs").hidden = false;
  showBackupReminder();
}

/** Lock: forget the seed key and my signing key (the sealed backup stays). */
export async function lockWallet() {
  if (!app.wallet) return;
  const { seedKey: _dropped, ...locked } = app.wallet;
  app.wallet = locked;
  app.key = null;
  clearTimeout(idleTimer);
  await show("key");
}

/** "Forget this wallet on this device": every key and token of it, from this browser. */
export async function forgetWallet() {
  await store.forgetWallet();
  app.wallet = null;
  app.key = null;
  app.publicText = null;
  $("tabs").hidden = true;
  showBackupReminder();
  await show("setup");
}

function restartIdleTimer() {
  clearTimeout(idleTimer);
  if (app.key) idleTimer = setTimeout(lockWallet, IDLE_LOCK_MS);
}

for (const type of ["pointerdown", "keydown"]) {
  document.addEventListener(type, restartIdleTimer, { passive: true });
}
