// First use and the lock: create or restore a wallet, the guided backup, unlocking, and
// the "lost your phone?" page.

import { createWallet, markBackupSaved, restoreWallet, unlockWallet, unlockWithPasskey } from "./keys.js";
import {
  $,
  action,
  app,
  confirmAction,
  currentScreen,
  el,
  registerScreen,
  say,
  show,
  showBackupReminder,
} from "./shell.js";
import { openWallet } from "./session.js";

/** Download the sealed backup (the patient's passphrase is asked first). */
export async function downloadBackup() {
  await confirmAction("Download your backup file? Enter your passphrase to go on.", {
    confirmLabel: "Download",
  });
  const blob = new Blob([JSON.stringify(app.wallet.backup, null, 2) + "\n"], {
    type: "application/json",
  });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = "imageshare-wallet-backup.json";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

let lostFrom = "setup";

function setup() {
  action($("create-button"), async () => {
    const passphrase = $("create-passphrase").value;
    if (passphrase !== $("create-passphrase2").value) {
      throw new Error("the two passphrases are not the same: type them again");
    }
    await openWallet(await createWallet(passphrase));
    $("create-passphrase").value = $("create-passphrase2").value = "";
    say("Your key is ready. Now save your backup.", "info");
    await show("backup");
  });
  action($("restore-button"), async () => {
    const file = $("restore-file").files[0];
    if (!file) throw new Error("choose the backup file first");
    const wallet = await restoreWallet(await file.text(), $("restore-passphrase").value);
    // A restored backup already exists somewhere: no reminder.
    await openWallet(await markBackupSaved(wallet));
    $("restore-passphrase").value = "";
    say("Wallet restored.", "info");
    await show("key");
  });
  $("restore-hint").addEventListener("click", (event) => {
    event.preventDefault();
    $("restore").focus();
    $("restore").scrollIntoView();
  });
  action($("backup-button"), async () => {
    await downloadBackup();
    $("backup-done").disabled = false;
  });
  action($("backup-done"), async () => {
    app.wallet = await markBackupSaved(app.wallet);
    showBackupReminder();
    say("Thank you: your backup is saved.", "info");
    await show("key");
  });
  $("backup-later").addEventListener("click", () => show("key"));
  $("backup-reminder-button").addEventListener("click", () => show("backup"));
  $("unlock-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("unlock-button");
    button.disabled = true;
    say("");
    try {
      await openWallet(await unlockWallet(app.wallet, $("unlock-passphrase").value));
      $("unlock-passphrase").value = "";
      await show(app.afterUnlock || "key");
    } catch (error) {
      say(`${error.message}. Type your passphrase again.`);
    } finally {
      button.disabled = false;
    }
  });
  action($("passkey-unlock-button"), async () => {
    await openWallet(await unlockWithPasskey(app.wallet));
    await show(app.afterUnlock || "key");
  });
  for (const link of document.querySelectorAll("a.lost-link")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      lostFrom = currentScreen() || "setup";
      show("lost");
    });
  }
  $("lost-back").addEventListener("click", () => show(lostFrom));
}

registerScreen("setup", { setup });
registerScreen("backup", {
  load: async () => {
    $("backup-done").disabled = true;
  },
});
registerScreen("lock", {
  load: async () => {
    $("passkey-unlock-button").hidden = !(app.wallet && app.wallet.passkey);
    $("unlock-passphrase").focus();
  },
});
registerScreen("lost");
