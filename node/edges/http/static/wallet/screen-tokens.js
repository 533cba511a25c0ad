// The Shares screen: every grant of mine recorded here, active, expired or revoked;
// Revoke, destructive, set apart, confirmed with the passphrase.

import { fromHex } from "./bytes.js";
import { makeRevocation } from "./consent.js";
import { store } from "./keys.js";
import { verifyRecorded } from "./ledger.js";
import { showShare } from "./screen-share.js";
import { loadRoster } from "./screen-studies.js";
import {
  $,
  action,
  app,
  confirmAction,
  el,
  hospitalName,
  localTime,
  registerScreen,
  say,
  show,
  studyName,
} from "./shell.js";
import { signedJson } from "./signed.js";

const STATUS_WORDS = {
  active: "active",
  expired: "expired: it no longer works",
  revoked: "revoked: it no longer works",
};

async function load() {
  const { tokens } = await signedJson(app.key, "GET", "/patient/tokens");
  const local = new Map(((await store.get("tokens")) || []).map((t) => [t.token_id, t]));
  await loadRoster().catch(() => []);
  const list = $("tokens-list");
  if (!tokens.length) {
    list.replaceChildren(el("li", "note", "You have not shared anything here."));
    return;
  }
  list.replaceChildren(...tokens.slice().reverse().map((token) => tokenCard(token, local.get(token.token_id))));
}

function tokenCard(token, mine) {
  const item = el("li", "token");
  item.dataset.tokenId = token.token_id;
  item.dataset.status = token.status;
  const to = mine && mine.link ? mine.grantee : hospitalName(token.grantee);
  item.append(
    el("span", `status ${token.status}`, STATUS_WORDS[token.status] || token.status),
    el("div", "study-title", `To ${to}`),
    el("div", "note", token.status === "active" ? `until ${localTime(token.expires)}` : `was until ${localTime(token.expires)}`),
  );
  if (mine) item.append(el("div", "note", mine.scope.map(studyName).join(", ")));
  if (token.status !== "active") {
    item.append(el("p", "gone", "This share no longer works: nobody can use it to see your images."));
    return item;
  }
  if (mine) {
    const open = el("button", "show", "Show the code again");
    open.addEventListener("click", () => showShare(mine));
    item.append(open);
  }
  const zone = el("div", "danger-zone");
  const revoke = el("button", "danger revoke", "Revoke this share");
  action(revoke, async () => {
    await confirmAction(`Revoke the share with ${to}? It stops working at once, for good.`, {
      confirmLabel: "Revoke",
      destructive: true,
    });
    const revocation = await makeRevocation(app.key, fromHex(token.token_id), Math.floor(Date.now() / 1000));
    const answer = await signedJson(app.key, "POST", "/patient/revocations", revocation);
    await verifyRecorded(answer, app.vkey, "revoke", "revocation", revocation);
    say(`Revoked: ${to} can no longer use it.`, "info");
    await show("tokens");
  });
  zone.append(revoke);
  item.append(zone);
  return item;
}

registerScreen("tokens", { load, needsKey: true });
