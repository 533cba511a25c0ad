// The "Safety" screen: who may break the glass for me, whom I let act for me, and the
// flagged events (emergency accesses) in this hospital's log, each proven here.
//
// Formats, byte for byte as node/core/emergency.py and node/core/consent.py make them:
//   emergency policy = ["emergency-policy", 1, patient_key, custodian, choice,
//                       members, issued_at, signature]
//                      signed over "imageshare/emergency-policy/v1\n" + fields
//   delegation       = ["delegation", 1, patient_key, custodian, delegate_key, scope|nil,
//                       powers, not_before, expires, nonce(16), signature]
//                      signed over "imageshare/delegation/v1\n" + fields
// A delegation ends by revoking its id (SHA-256 of its bytes), like a grant.

import { concat, fromB64url, fromHex, randomBytes, utf8 } from "./bytes.js";
import { makeRevocation } from "./consent.js";
import { sign } from "./keys.js";
import { myEvents, verifyRecorded } from "./ledger.js";
import { encode } from "./msgpack.js";
import { app, registerScreen } from "./shell.js";
import { signedJson } from "./signed.js";

const POLICY_DOMAIN = utf8("imageshare/emergency-policy/v1\n");
const DELEGATION_DOMAIN = utf8("imageshare/delegation/v1\n");
const CHOICES = {
  any_member: "Any hospital of the network",
  named_members: "Only the hospitals I choose",
  never: "No one",
};
const POWERS = { grant: "share", revoke: "revoke", view_log: "see my activity", download: "download" };

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function when(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

async function signed(key, domain, fields) {
  return encode([...fields, await sign(key, concat(domain, encode(fields)))]);
}

/** Fill the Safety screen for the wallet ``app`` (its key, node and pinned log key). */
export async function loadSafety(app) {
  const { key, node, vkey } = app;
  const [policy, delegations, roster, log] = await Promise.all([
    signedJson(key, "GET", "/patient/emergency-policy"),
    signedJson(key, "GET", "/patient/delegations"),
    signedJson(key, "GET", "/patient/roster"),
    myEvents(node, vkey, new Set(), key.publicKey),
  ]);
  showFlagged(log);
  showPolicy(app, policy, roster.members || roster.peers || []);
  showDelegations(app, delegations.delegations);
}

function showFlagged({ events, cosigners }) {
  const list = $("flagged-list");
  list.replaceChildren();
  const flagged = events.filter((e) => e.entry.kind === "break_glass");
  for (const event of flagged) {
    const item = el("li", "card flagged");
    const entry = event.entry;
    item.append(el("p", "who", `Emergency access by ${entry.requester}`));
    const studies = entry.studies.length / 32;
    item.append(el("p", "", `${entry.reason} · ${studies} ${studies === 1 ? "study" : "studies"}`));
    item.append(el("p", "muted", when(entry.time)));
    const proven = event.included && cosigners.length > 0;
    item.append(el("p", proven ? "proof ok" : "proof bad", proven ? "proven" : "NOT PROVEN"));
    list.append(item);
  }
  $("flagged-summary").textContent = flagged.length
    ? `${flagged.length} emergency ${flagged.length === 1 ? "access" : "accesses"} without your consent`
    : "No emergency access to your studies here.";
}

function showPolicy(app, policy, roster) {
  $("policy-current").textContent =
    CHOICES[policy.choice] +
    (policy.members.length ? `: ${policy.members.join(", ")}` : "") +
    (policy.default ? " (the network's default: you have not chosen)" : "");
  for (const input of document.querySelectorAll('input[name="policy-choice"]')) {
    input.checked = input.value === policy.choice;
  }
  const members = $("policy-members");
  members.replaceChildren();
  for (const origin of roster.map((m) => m.origin || m).filter((o) => o !== app.node.origin)) {
    const label = el("label", "check");
    const box = el("input");
    box.type = "checkbox";
    box.value = origin;
    box.checked = policy.members.includes(origin);
    label.append(box, document.createTextNode(" " + origin));
    members.append(label);
  }
  const button = $("policy-button");
  button.onclick = () => guarded(button, () => savePolicy(app));
}

async function savePolicy(app) {
  const choice = document.querySelector('input[name="policy-choice"]:checked')?.value;
  if (!choice) throw new Error("choose who may access your studies in an emergency");
  const members =
    choice === "named_members"
      ? [...document.querySelectorAll("#policy-members input:checked")].map((b) => b.value)
      : [];
  if (choice === "named_members" && !members.length) {
    throw new Error("choose at least one hospital");
  }
  const fields = [
    "emergency-policy",
    1,
    app.key.publicKey,
    app.node.origin,
    choice,
    members,
    Math.floor(Date.now() / 1000),
  ];
  const policy = await signed(app.key, POLICY_DOMAIN, fields);
  const answer = await signedJson(app.key, "POST", "/patient/emergency-policy", policy);
  await verifyRecorded(answer, app.vkey, "emergency_policy", "policy", policy);
  await loadSafety(app);
}

function showDelegations(app, delegations) {
  const list = $("delegations-list");
  list.replaceChildren();
  for (const d of delegations) {
    const item = el("li", "card");
    item.append(el("p", "who", `Key ${d.delegate.slice(0, 12)}…`));
    item.append(el("p", "", `may ${d.powers.map((p) => POWERS[p] || p).join(", ")}`));
    const scope = d.scope === "all" ? "all my studies" : `${d.scope.length} studies`;
    item.append(el("p", "muted", `${scope} · until ${when(d.expires)}`));
    item.append(el("p", "status " + d.status, d.status));
    if (d.status === "active") {
      const revoke = el("button", "", "End");
      revoke.onclick = () => guarded(revoke, () => endDelegation(app, d.delegation_id));
      item.append(revoke);
    }
    list.append(item);
  }
  if (!delegations.length) list.append(el("li", "muted", "No one acts for you here."));
  const button = $("delegate-button");
  button.onclick = () => guarded(button, () => delegate(app));
}

async function delegate(app) {
  const delegateKey = fromB64url($("delegate-key").value.trim());
  if (delegateKey.length !== 32) throw new Error("the other person's key is 43 characters");
  const powers = [...document.querySelectorAll("#delegate-powers input:checked")].map(
    (b) => b.value,
  );
  if (!powers.length) throw new Error("choose what they may do");
  const now = Math.floor(Date.now() / 1000);
  const lifetime = Number($("delegate-lifetime").value);
  const fields = [
    "delegation",
    1,
    app.key.publicKey,
    app.node.origin,
    delegateKey,
    null,
    powers,
    now,
    now + lifetime,
    randomBytes(16),
  ];
  const delegation = await signed(app.key, DELEGATION_DOMAIN, fields);
  const answer = await signedJson(app.key, "POST", "/patient/delegations", delegation);
  await verifyRecorded(answer, app.vkey, "delegation", "delegation", delegation);
  $("delegate-key").value = "";
  await loadSafety(app);
}

async function endDelegation(app, delegationId) {
  const revocation = await makeRevocation(
    app.key,
    fromHex(delegationId),
    Math.floor(Date.now() / 1000),
  );
  const answer = await signedJson(app.key, "POST", "/patient/revocations", revocation);
  await verifyRecorded(answer, app.vkey, "revoke", "revocation", revocation);
  await loadSafety(app);
}

async function guarded(button, work) {
  button.disabled = true;
  const box = $("message");
  box.hidden = true;
  try {
    await work();
  } catch (error) {
    box.textContent = error.message || String(error);
    box.className = "";
    box.hidden = false;
  } finally {
    button.disabled = false;
  }
}

// The tab: shown once the wallet is unlocked, like the other screens of my studies.
registerScreen("safety", { load: () => loadSafety(app), needsKey: true });
