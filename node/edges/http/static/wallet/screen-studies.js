// The Studies screen: my studies at this hospital with previews; share the chosen ones
// with a hospital (a grant) or a doctor (a SMART Health Link), each after a confirmation
// sentence and the passphrase.

import { fromB64url, randomBytes, toB64url, toHex, utf8 } from "./bytes.js";
import { OPINIONS, makeGrant, tokenId, tokenUrl } from "./consent.js";
import { store } from "./keys.js";
import { verifyRecorded } from "./ledger.js";
import { REPORT_MODALITIES, loadReports } from "./reports.js";
import { showShare } from "./screen-share.js";
import {
  $,
  action,
  app,
  confirmAction,
  el,
  hospitalName,
  images,
  localTime,
  registerScreen,
  studyDate,
  studyName,
} from "./shell.js";
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

/** The roster's members and display names (a `names` map where the node gives one). */
export async function loadRoster() {
  const roster = await signedJson(app.key, "GET", "/patient/roster");
  app.names = roster.names || {};
  return roster.members;
}

async function load() {
  const list = $("studies-list");
  app.previewUrls.forEach((url) => URL.revokeObjectURL(url));
  app.previewUrls = [];
  let answer;
  try {
    answer = await signedJson(app.key, "GET", "/patient/studies");
  } catch (error) {
    if (error instanceof RequestFailed && error.status === 401) {
      list.replaceChildren(el("li", "note", "Not enrolled here yet: show your key at the desk (the Key tab)."));
      return;
    }
    throw error;
  }
  app.studies = answer.studies;
  if (!app.studies.length) list.replaceChildren(el("li", "note", "No studies here yet."));
  else list.replaceChildren(...app.studies.map(studyCard));
  const members = await loadRoster();
  $("grantee").replaceChildren(
    ...members.map((origin) => {
      const option = el("option", "", hospitalName(origin));
      option.value = origin;
      return option;
    }),
  );
  await Promise.all(app.studies.map(loadPreviews));
  await Promise.all(app.studies.map((study) => loadReports(app.key, study, app.previewUrls)));
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
  const modalities = study.modalities.join(", ") || "images";
  text.append(
    el("div", "study-title", study.description || "Study"),
    el("div", "note", [studyDate(study.date), modalities, images(study.instances)].join(" · ")),
  );
  head.append(box, text);
  item.append(head, el("div", "previews"), el("div", "reports"));
  return item;
}

async function loadPreviews(study) {
  const base = `/patient/studies/${study.ref}/series`;
  const { series } = await signedJson(app.key, "GET", base);
  const strip = document.querySelector(`li[data-ref="${study.ref}"] .previews`);
  for (const s of series.filter((one) => !REPORT_MODALITIES.includes(one.modality))) {
    const response = await signedFetch(app.key, "GET", `${base}/${s.position}/preview`);
    const url = URL.createObjectURL(await response.blob());
    app.previewUrls.push(url);
    const figure = el("figure");
    const image = el("img", "preview");
    image.alt = `${s.modality} ${s.description}`;
    image.src = url;
    figure.append(image, el("figcaption", "", `${s.description || s.modality} · ${images(s.instances)}`));
    strip.append(figure);
  }
}

function chosenStudies() {
  const scope = [...document.querySelectorAll("#studies-list input.choose:checked")].map(
    (b) => b.value,
  );
  if (!scope.length) throw new Error("choose at least one study to share (tick its box)");
  return scope;
}

function sortedRefs(scope) {
  return scope.map(fromB64url).sort((a, b) => toHex(a).localeCompare(toHex(b)));
}

async function keepToken(record) {
  const local = (await store.get("tokens")) || [];
  await store.put("tokens", [...local, record]);
}

/** The sentence the patient confirms: what, with whom, until when. */
export function shareSentence(scope, whom, expires) {
  return `You are about to let ${whom} see ${scope.map(studyName).join(", ")} until ${localTime(expires)}. Share?`;
}

async function grant() {
  const scope = chosenStudies();
  const grantee = $("grantee").value;
  if (!grantee) throw new Error("choose the hospital to share with");
  const lifetime = Number($("lifetime").value);
  const expiresIfNow = Math.floor(Date.now() / 1000) + lifetime;
  await confirmAction(shareSentence(scope, hospitalName(grantee), expiresIfNow), { confirmLabel: "Share" });
  const now = Math.floor(Date.now() / 1000);
  const refs = sortedRefs(scope);
  const token = await makeGrant(app.key, app.node.origin, grantee, refs, now, now + lifetime);
  const answer = await signedJson(app.key, "POST", "/patient/grants", token);
  await verifyRecorded(answer, app.vkey, "grant", "token", token);
  const id = toHex(await tokenId(token));
  const record = { token_id: id, url: tokenUrl(token), grantee, expires: now + lifetime, scope };
  await keepToken(record);
  await showShare(record);
}

/** "Share with a doctor": a SMART Health Link made here; the custodian sees no key. */
async function makeLink() {
  const scope = chosenStudies();
  const label = $("link-label").value.trim();
  const passcode = $("link-passcode").value || null;
  const opinions = $("link-opinions").checked; // the holder may return an opinion
  const lifetime = Number($("link-lifetime").value);
  const whom = label ? `anyone with the link "${label}"` : "anyone with the link";
  await confirmAction(shareSentence(scope, whom, Math.floor(Date.now() / 1000) + lifetime), {
    confirmLabel: "Make the link",
  });
  const now = Math.floor(Date.now() / 1000);
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
  // The opinions permission is in the grant I sign, so an auditor can check each opinion.
  const permissions = opinions ? [OPINIONS] : [];
  const token = await makeGrant(app.key, app.node.origin, grantee, sortedRefs(scope), now, now + lifetime, permissions);
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
    link: true,
    expires: now + lifetime,
    scope,
  };
  await keepToken(record);
  await showShare(record);
}

function setup() {
  action($("grant-button"), grant);
  action($("link-button"), makeLink);
}

registerScreen("studies", { load, setup, needsKey: true });
