// The wallet's shell: shared state, the screen registry, plain-word errors, dates and
// names as a patient reads them, and the confirmation dialog. A screen is a module that
// calls registerScreen(name, {load, setup}) and a <section id="screen-NAME"> in
// index.html; app.js imports the module (one line) and, for a tab, index.html has a
// <button data-screen="NAME"> in #tabs.

import { RequestFailed } from "./signed.js";

export const $ = (id) => document.getElementById(id);

/** What the open page knows: the node, its pinned log key, the wallet (locked: no
 * seedKey), my key here (null while locked), studies, the roster's display names. */
export const app = {
  federation: null, // the pinned federation key (roster.js), if the desk gave one
  node: null,
  vkey: null,
  wallet: null,
  key: null,
  publicText: null,
  studies: [],
  names: {},
  previewUrls: [],
};

const screens = new Map();

/** Add a screen: ``load`` runs each time it is shown, ``setup`` once at start;
 * ``needsKey`` screens show the lock screen instead while the wallet is locked. */
export function registerScreen(name, { load = null, setup = null, needsKey = false } = {}) {
  screens.set(name, { load, setup, needsKey });
}

export function setupScreens() {
  for (const screen of screens.values()) if (screen.setup) screen.setup();
}

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** A sentence: the first letter capitalised, ending with a full stop. */
export function sentence(text) {
  const trimmed = String(text).trim();
  if (!trimmed) return "";
  const capital = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?…]$/.test(capital) ? capital : capital + ".";
}

export function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text ? sentence(text) : "";
  box.className = kind === "info" ? "info" : "";
  box.hidden = !text;
}

/** An error in plain words with the next step: never a signer id or a browser's own
 * "Failed to fetch". */
export function plain(error) {
  if (error instanceof TypeError && /fetch|network|load failed/i.test(error.message)) {
    return "You seem to be offline. Check your connection (Wi-Fi or mobile data) and try again.";
  }
  if (error instanceof RequestFailed) {
    const detail = String(error.message || "");
    if (error.status === 401 && /unknown signer|not enrolled/i.test(detail)) {
      return "This hospital does not know your key yet. Show your key (the Key tab) at the enrollment desk.";
    }
    if (error.status === 401) {
      return "The hospital did not accept this phone's request. Check that the phone's clock is right, then try again.";
    }
    if (error.status === 403) return "This hospital says that is not yours to share.";
    if (error.status === 404) return "The hospital no longer has that. Go back and try again.";
    if (error.status === 429) return "Too many tries in a short time. Wait a minute, then try again.";
    if (error.status >= 500) {
      return "The hospital's system had a problem. Try again in a few minutes, or ask at the desk.";
    }
    return sentence(detail || "The hospital refused this request");
  }
  return sentence((error && error.message) || String(error));
}

/** A moment in the phone's own time zone and language, e.g. "8 Dec 2026, 18:42". */
export function localTime(seconds) {
  return new Date(seconds * 1000).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
  });
}

export function studyDate(text) {
  if (!/^\d{8}$/.test(text || "")) return text || "no date";
  const date = new Date(Number(text.slice(0, 4)), Number(text.slice(4, 6)) - 1, Number(text.slice(6)));
  return date.toLocaleDateString(undefined, { dateStyle: "medium" });
}

export function images(count) {
  return `${count} ${count === 1 ? "image" : "images"}`;
}

export function studyName(ref) {
  const study = app.studies.find((s) => s.ref === ref);
  return study ? `${study.description || "a study"} of ${studyDate(study.date)}` : "a study";
}

/** A hospital as people name it: the roster's display name where the node gives one,
 * else the origin's host (without the path that only machines read). */
export function hospitalName(origin) {
  if (app.names[origin]) return app.names[origin];
  return String(origin).split("/")[0];
}

/** Run a button's action with the button disabled and errors shown in plain words. */
export function action(button, work) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    say("");
    try {
      await work();
    } catch (error) {
      if (!(error instanceof Cancelled)) say(plain(error));
    } finally {
      button.disabled = false;
    }
  });
}

/** The patient said no in a confirmation: nothing to report. */
export class Cancelled extends Error {}

let unlockCheck = null;

/** How the confirmation dialog checks a passphrase (keys.js, set by app.js). */
export function setUnlockCheck(check) {
  unlockCheck = check;
}

/** Ask the patient to confirm ``text``; with ``passphrase``, the wallet's passphrase is
 * asked again and checked. Resolves when confirmed, rejects with Cancelled. */
export function confirmAction(text, { confirmLabel = "Yes", destructive = false, passphrase = true } = {}) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  const ok = $("confirm-ok");
  ok.textContent = confirmLabel;
  ok.className = destructive ? "danger" : "primary";
  $("confirm-passphrase-row").hidden = !passphrase;
  $("confirm-passphrase").value = "";
  $("confirm-error").hidden = true;
  dialog.showModal();
  (passphrase ? $("confirm-passphrase") : ok).focus();
  return new Promise((resolve, reject) => {
    const finish = () => {
      ok.removeEventListener("click", onOk);
      $("confirm-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
    };
    const onOk = async (event) => {
      event.preventDefault();
      if (passphrase) {
        ok.disabled = true;
        try {
          await unlockCheck($("confirm-passphrase").value);
        } catch (error) {
          $("confirm-error").textContent = plain(error);
          $("confirm-error").hidden = false;
          ok.disabled = false;
          return;
        }
        ok.disabled = false;
      }
      // The checked passphrase, for an action that needs the seed (a passkey lock).
      const typed = $("confirm-passphrase").value;
      $("confirm-passphrase").value = "";
      finish();
      dialog.close();
      resolve(passphrase ? typed : undefined);
    };
    const onCancel = (event) => {
      event.preventDefault();
      finish();
      dialog.close();
      reject(new Cancelled("cancelled"));
    };
    ok.addEventListener("click", onOk);
    $("confirm-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
  });
}

let shown = null;

/** Show one screen: its section, its tab marked aria-current, focus on its heading. */
export async function show(name) {
  const screen = screens.get(name);
  const target = screen && screen.needsKey && !app.key ? "lock" : name;
  // Unlocking goes on to the screen that asked for the key (the Key screen when the
  // lock screen was asked for itself).
  if (target === "lock") app.afterUnlock = name === "lock" ? "key" : name;
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== "screen-" + target;
  }
  for (const tab of document.querySelectorAll("#tabs button")) {
    if (tab.dataset.screen === target) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  document.body.dataset.screen = target;
  const heading = document.querySelector(`#screen-${target} h2`);
  if (heading && shown !== target) {
    heading.tabIndex = -1;
    heading.focus();
  }
  shown = target;
  document.body.dataset.ready = "false";
  try {
    const current = screens.get(target);
    if (current && current.load) await current.load();
  } catch (error) {
    say(plain(error));
  } finally {
    document.body.dataset.ready = "true";
  }
}

export function currentScreen() {
  return shown;
}

/** The lasting "backup not saved" reminder, shown until the patient says it is kept. */
export function showBackupReminder() {
  $("backup-reminder").hidden = !(app.wallet && !app.wallet.backupSaved);
}
