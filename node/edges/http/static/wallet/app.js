// The wallet's start: connect to the node (pinning its origin and log key), open the
// wallet locked or set it up, and wire the tabs. Each screen is its own module; a new
// screen is one import line below plus its section in index.html (see shell.js).

import { loadWallet, store, unlockWallet } from "./keys.js";
import { describeNode } from "./ledger.js";
import { mountProofScreen } from "./proof.js";
import { pinFederation } from "./roster.js";
import { openWallet } from "./session.js";
import {
  $,
  app,
  hospitalName,
  plain,
  registerScreen,
  say,
  setUnlockCheck,
  setupScreens,
  show,
} from "./shell.js";

import "./screen-setup.js";
import "./screen-key.js";
import "./screen-studies.js";
import "./screen-share.js";
import "./screen-tokens.js";
import "./screen-activity.js";
import "./safety.js";

// Checking a proof file needs no key: it is offline, against this hospital's pinned log key.
registerScreen("proof", {
  setup: () =>
    mountProofScreen($("screen-proof"), async () => ({
      vkey: app.vkey,
      witnessVkeys: app.node.logs.filter((l) => l.origin !== app.node.origin).map((l) => l.vkey),
    })),
});

/** This address now names another custodian than the one this wallet pinned. */
class PinMismatch extends Error {}

async function connect() {
  try {
    const described = await describeNode();
    // Requests are addressed to (and my key derived for) the origin this address first
    // answered with: an address that now claims another origin gets none of them.
    const known = await store.get("node");
    if (known && known.origin !== described.origin) {
      throw new PinMismatch(
        `this address was ${known.origin} when this wallet first saw it, now ${described.origin}`,
      );
    }
    app.node = described;
    await store.put("node", app.node);
  } catch (error) {
    if (error instanceof PinMismatch) throw error;
    // Offline (or the node is down): what this phone last knew is enough to show my key.
    app.node = await store.get("node");
    if (!app.node) throw error;
    say("No connection to the hospital: showing what this phone knows.", "info");
  }
  $("custodian").textContent = hospitalName(app.node.origin);
  app.federation = await pinFederation(app.node);
  // Pinned on first contact, like the command-line wallet: a changed log key is refused.
  const pinName = "pin:" + app.node.origin;
  const pinned = await store.get(pinName);
  if (pinned && pinned !== app.node.own.vkey) {
    throw new Error(
      `the log key of ${app.node.origin} changed since this wallet first saw it. ` +
        "Do not use this wallet here; tell the hospital",
    );
  }
  if (!pinned) await store.put(pinName, app.node.own.vkey);
  app.vkey = app.node.own.vkey;
}

async function start() {
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js", { scope: "./" }).catch(() => {});
  }
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.addEventListener("click", () => {
      say("");
      show(tab.dataset.screen);
    });
  }
  setUnlockCheck((passphrase) => unlockWallet(app.wallet, passphrase));
  setupScreens();
  try {
    await connect();
    const wallet = await loadWallet();
    if (wallet) {
      await openWallet(wallet);
      await show("key");
    } else {
      await show("setup");
    }
  } catch (error) {
    say(plain(error));
    document.body.dataset.ready = "true";
  }
}

start();
