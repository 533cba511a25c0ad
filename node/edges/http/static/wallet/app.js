// The wallet's screens. Every call to /patient is signed with my key for this hospital
// (signed.js); the log's answers are checked in the browser (ledger.js).

import { fromB64url, fromHex, randomBytes, toB64url, toHex, utf8 } from "./bytes.js";
import { makeGrant, makeRevocation, tokenId, tokenUrl } from "./consent.js";
import { createWallet, keyFor, loadWallet, restoreWallet, store } from "./keys.js";
import { describeNode, myEvents, verifyRecorded } from "./ledger.js";
import { mountProofScreen } from "./proof.js";
import { qrSvg } from "./qr.js";
import {
  ACCESS_CREDENTIAL,
  FHIR_JSON,
  accessCredential,
  encodeShlink,
  encryptFile,
  linkGrantee,
  secretDigest,
  withEndpoint,
} from "./shlink.js";
import { RequestFailed, signedFetch, signedJson } from "./signed.js";

const $ = (id) => document.getElementById(id);

/** This address now names another custodian than the one this wallet pinned. */
class PinMismatch extends Error {}
const app = { node: null, vkey: null, wallet: null, key: null, studies: [], previewUrls: [] };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function say(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = kind === "info" ? "info" : "";
  box.hidden = !text;
}

function when(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function studyDate(text) {
  return /^\d{8}$/.test(text)
    ? `${text.slice(0, 4)}-${text.slice(4, 6)}-${text.slice(6)}`
    : text || "undated";
}

function images(count) {
  return `${count} ${count === 1 ? "image" : "images"}`;
}

function studyName(ref) {
  const study = app.studies.find((s) => s.ref === ref);
  return study ? `${study.description || "Study"} (${studyDate(study.date)})` : "a study";
}

/** Run a button's action with the button disabled and errors shown to the patient. */
function action(button, work) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    say("");
    try {
      await work();
    } catch (error) {
      say(error.message || String(error));
    } finally {
      button.disabled = false;
    }
  });
}

async function show(screen) {
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.id !== "screen-" + screen;
  }
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.classList.toggle("current", tab.dataset.screen === screen);
  }
  document.body.dataset.screen = screen;
  const loaders = {
    key: loadKey,
    studies: loadStudies,
    tokens: loadTokens,
    activity: loadActivity,
  };
  document.body.dataset.ready = "false";
  try {
    if (loaders[screen]) await loaders[screen]();
  } catch (error) {
    say(error.message || String(error));
  } finally {
    document.body.dataset.ready = "true";
  }
}

// -- the node and its log key ----------------------------------------------------------

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
  $("custodian").textContent = app.node.origin;
  // Pinned on first contact, like the command-line wallet: a changed log key is refused.
  const pinName = "pin:" + app.node.origin;
  const pinned = await store.get(pinName);
  if (pinned && pinned !== app.node.own.vkey) {
    throw new Error(`the log key of ${app.node.origin} changed since this wallet first saw it`);
  }
  if (!pinned) await store.put(pinName, app.node.own.vkey);
  app.vkey = app.node.own.vkey;
}

async function openWallet(wallet) {
  app.wallet = wallet;
  app.key = await keyFor(wallet, app.node.origin);
  $("tabs").hidden = false;
}

// -- key -------------------------------------------------------------------------------

async function loadKey() {
  $("pubkey").textContent = app.key.publicText;
  $("pubkey-qr").replaceChildren(qrSvg(app.key.publicText, "my key as a QR code"));
  try {
    const { studies } = await signedJson(app.key, "GET", "/patient/studies");
    $("enrollment").textContent =
      `Enrolled here: ${studies.length} ${studies.length === 1 ? "study" : "studies"}.`;
  } catch (error) {
    if (!(error instanceof RequestFailed)) {
      $("enrollment").textContent = "Could not reach the hospital to check enrollment.";
    } else if (error.status === 401) {
      $("enrollment").textContent = "Not enrolled here yet.";
    } else {
      throw error;
    }
  }
}

function setupScreen() {
  action($("create-button"), async () => {
    const passphrase = $("create-passphrase").value;
    if (passphrase !== $("create-passphrase2").value) throw new Error("the passphrases differ");
    await openWallet(await createWallet(passphrase));
    say("Your key is ready. Download the backup and keep it safe.", "info");
    await show("key");
  });
  action($("restore-button"), async () => {
    const file = $("restore-file").files[0];
    if (!file) throw new Error("choose the backup file first");
    await openWallet(await restoreWallet(await file.text(), $("restore-passphrase").value));
    say("Wallet restored.", "info");
    await show("key");
  });
  action($("backup-button"), async () => {
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
  });
}

// -- studies and grants ----------------------------------------------------------------

async function loadStudies() {
  const list = $("studies-list");
  app.previewUrls.forEach((url) => URL.revokeObjectURL(url));
  app.previewUrls = [];
  let answer;
  try {
    answer = await signedJson(app.key, "GET", "/patient/studies");
  } catch (error) {
    if (error instanceof RequestFailed && error.status === 401) {
      list.replaceChildren(el("li", "muted", "Not enrolled here yet: show your key at the desk."));
      return;
    }
    throw error;
  }
  app.studies = answer.studies;
  if (!app.studies.length) list.replaceChildren(el("li", "muted", "No studies here."));
  else list.replaceChildren(...app.studies.map(studyCard));
  const { members } = await signedJson(app.key, "GET", "/patient/roster");
  $("grantee").replaceChildren(
    ...members.map((origin) => {
      const option = el("option", "", origin);
      option.value = origin;
      return option;
    }),
  );
  await Promise.all(app.studies.map(loadPreviews));
}

function studyCard(study) {
  const item = el("li", "study");
  item.dataset.ref = study.ref;
  const head = el("label", "study-head");
  const box = el("input");
  box.type = "checkbox";
  box.value = study.ref;
  box.className = "choose";
  const text = el("div");
  const modalities = study.modalities.join(", ") || "?";
  text.append(
    el("div", "study-title", study.description || "Study"),
    el("div", "muted", [studyDate(study.date), modalities, images(study.instances)].join(" · ")),
  );
  head.append(box, text);
  item.append(head, el("div", "previews"));
  return item;
}

async function loadPreviews(study) {
  const base = `/patient/studies/${study.ref}/series`;
  const { series } = await signedJson(app.key, "GET", base);
  const strip = document.querySelector(`li[data-ref="${study.ref}"] .previews`);
  for (const s of series) {
    const response = await signedFetch(app.key, "GET", `${base}/${s.position}/preview`);
    const url = URL.createObjectURL(await response.blob());
    app.previewUrls.push(url);
    const figure = el("figure");
    const image = el("img", "preview");
    image.alt = `${s.modality} ${s.description}`;
    image.src = url;
    figure.append(image, el("figcaption", "", `${s.description || s.modality} · ${s.instances}`));
    strip.append(figure);
  }
}

function chosenStudies() {
  const scope = [...document.querySelectorAll("#studies-list input.choose:checked")].map(
    (b) => b.value,
  );
  if (!scope.length) throw new Error("choose at least one study to share");
  return scope;
}

function sortedRefs(scope) {
  return scope.map(fromB64url).sort((a, b) => toHex(a).localeCompare(toHex(b)));
}

async function keepToken(record) {
  const local = (await store.get("tokens")) || [];
  await store.put("tokens", [...local, record]);
}

function grantScreen() {
  action($("grant-button"), async () => {
    const scope = chosenStudies();
    const grantee = $("grantee").value;
    if (!grantee) throw new Error("choose the hospital to share with");
    const now = Math.floor(Date.now() / 1000);
    const lifetime = Number($("lifetime").value);
    const refs = sortedRefs(scope);
    const token = await makeGrant(app.key, app.node.origin, grantee, refs, now, now + lifetime);
    const answer = await signedJson(app.key, "POST", "/patient/grants", token);
    await verifyRecorded(answer, app.vkey, "grant", "token", token);
    const id = toHex(await tokenId(token));
    const record = { token_id: id, url: tokenUrl(token), grantee, expires: now + lifetime, scope };
    await keepToken(record);
    showShare(record);
  });
  action($("link-button"), makeLink);
  action($("copy-button"), async () => {
    await navigator.clipboard.writeText($("share-url").textContent);
    say("Link copied.", "info");
  });
}

/** "Share with a doctor": a SMART Health Link made here; the custodian sees no key. */
async function makeLink() {
  const scope = chosenStudies();
  const label = $("link-label").value.trim();
  const passcode = $("link-passcode").value || null;
  const now = Math.floor(Date.now() / 1000);
  const lifetime = Number($("link-lifetime").value);
  const linkKey = randomBytes(32);
  const accessToken = toB64url(randomBytes(32));
  const manifestId = toB64url(randomBytes(32));
  const base = location.origin;
  const root = `${base}/links/${accessToken}/dicomweb`;
  const files = [];
  for (const ref of scope) {
    const study = await signedJson(app.key, "GET", `/patient/studies/${ref}/description`);
    files.push({ contentType: FHIR_JSON, embedded: await encryptFile(linkKey, FHIR_JSON, withEndpoint(study, root)) });
  }
  const credential = accessCredential(accessToken, root, lifetime);
  files.push({
    contentType: ACCESS_CREDENTIAL,
    embedded: await encryptFile(linkKey, ACCESS_CREDENTIAL, credential),
  });
  const grantee = await linkGrantee(accessToken);
  const token = await makeGrant(app.key, app.node.origin, grantee, sortedRefs(scope), now, now + lifetime);
  const body = {
    grant: toB64url(token),
    manifest: await secretDigest(manifestId),
    passcode,
    files,
  };
  const answer = await signedJson(app.key, "POST", "/patient/links", utf8(JSON.stringify(body)));
  await verifyRecorded(answer, app.vkey, "grant", "token", token);
  const shlink = encodeShlink({
    url: `${base}/shl/${manifestId}`,
    key: linkKey,
    exp: now + lifetime,
    passcode,
    label,
  });
  const record = {
    token_id: toHex(await tokenId(token)),
    url: `${base}/share/#${shlink}`,
    grantee: label ? `the link '${label}'` : "a link",
    expires: now + lifetime,
    scope,
  };
  await keepToken(record);
  showShare(record);
}

async function showShare(record) {
  await show("share");
  const names = record.scope.map(studyName).join(", ");
  $("share-summary").textContent =
    `${names} with ${record.grantee} until ${when(record.expires)}. ` +
    "Give them this code or link.";
  $("share-qr").replaceChildren(qrSvg(record.url, "the share as a QR code"));
  $("share-url").textContent = record.url;
  $("share-token-id").textContent = record.token_id;
}

// -- tokens ----------------------------------------------------------------------------

async function loadTokens() {
  const { tokens } = await signedJson(app.key, "GET", "/patient/tokens");
  const local = new Map(((await store.get("tokens")) || []).map((t) => [t.token_id, t]));
  const list = $("tokens-list");
  if (!tokens.length) {
    list.replaceChildren(el("li", "muted", "You have not shared anything here."));
    return;
  }
  list.replaceChildren(
    ...tokens
      .slice()
      .reverse()
      .map((token) => {
        const item = el("li", "token");
        item.dataset.tokenId = token.token_id;
        item.dataset.status = token.status;
        const mine = local.get(token.token_id);
        item.append(
          el("span", `status ${token.status}`, token.status),
          el("div", "study-title", `To ${token.grantee}`),
          el(
            "div",
            "muted",
            `until ${when(token.expires)} · token ${token.token_id.slice(0, 12)}…`,
          ),
        );
        if (mine) {
          item.append(el("div", "muted", mine.scope.map(studyName).join(", ")));
          const open = el("button", "", "Show code");
          open.addEventListener("click", () => showShare(mine));
          item.append(open);
        }
        if (token.status === "active") {
          const revoke = el("button", "revoke", "Revoke");
          action(revoke, async () => {
            const revocation = await makeRevocation(
              app.key,
              fromHex(token.token_id),
              Math.floor(Date.now() / 1000),
            );
            const answer = await signedJson(app.key, "POST", "/patient/revocations", revocation);
            await verifyRecorded(answer, app.vkey, "revoke", "revocation", revocation);
            say("Revoked: that hospital can no longer fetch with it.", "info");
            await show("tokens");
          });
          item.append(revoke);
        }
        return item;
      }),
  );
}

// -- activity --------------------------------------------------------------------------

async function loadActivity() {
  const { tokens } = await signedJson(app.key, "GET", "/patient/tokens");
  if (!app.studies.length) {
    try {
      app.studies = (await signedJson(app.key, "GET", "/patient/studies")).studies;
    } catch {
      // names of studies are a nicety here
    }
  }
  const ids = new Set(tokens.map((t) => t.token_id));
  const { events, checkpoint, cosigners } = await myEvents(app.node, app.vkey, ids);
  const witnessed = cosigners.length
    ? `witnessed by ${cosigners.join(", ")}`
    : "not yet witnessed by another hospital";
  $("activity-summary").textContent =
    `Checked in the browser against ${app.node.origin}'s log of ${checkpoint.size} entries ` +
    `(signature verified, ${witnessed}).`;
  const list = $("activity-list");
  if (!events.length) {
    list.replaceChildren(el("li", "muted", "Nobody has used your shares yet."));
    return;
  }
  list.replaceChildren(...events.slice().reverse().map(eventCard));
}

function eventCard(event) {
  const { entry } = event;
  const item = el("li", "event");
  item.dataset.kind = entry.kind;
  item.dataset.index = String(event.index);
  let title;
  if (entry.kind === "access") {
    const study = studyName(toB64url(entry.study));
    title = `${entry.grantee} received ${study}: ${images(entry.instances)}`;
  } else if (entry.kind === "denial") {
    // A refusal may name no study (the token was refused before any study was asked).
    const what = entry.study ? " " + studyName(toB64url(entry.study)) : "";
    title = `${entry.requester} was refused${what}: ${entry.rule.replace(/_/g, " ")}`;
  } else {
    title = "You revoked a share";
  }
  const label = { access: "access", denial: "refused", revoke: "revoked" }[entry.kind];
  const proven = event.included && event.cosigners.length > 0;
  const proof = event.included
    ? `Proven: entry ${event.index} is in the signed log` +
      (event.cosigners.length
        ? `, witnessed by ${event.cosigners.join(", ")}`
        : " (not yet witnessed)")
    : "NOT PROVEN: the inclusion proof does not verify";
  item.append(
    el("span", `status ${entry.kind === "revoke" ? "revoked" : entry.kind}`, label),
    el("div", "study-title", title),
    el("div", "muted", `${when(entry.time)} · token ${event.tokenId.slice(0, 12)}…`),
    el("p", `proof ${event.included ? "ok" : "bad"}`, proof),
  );
  item.dataset.proven = String(proven);
  item.dataset.included = String(event.included);
  return item;
}

// -- start -----------------------------------------------------------------------------

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
  setupScreen();
  grantScreen();
  mountProofScreen($("screen-proof"), async () => ({
    vkey: app.vkey,
    witnessVkeys: app.node.logs.filter((l) => l.origin !== app.node.origin).map((l) => l.vkey),
  }));
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
    say(error.message || String(error));
    document.body.dataset.ready = "true";
  }
}

start();
