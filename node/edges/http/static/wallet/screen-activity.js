// The Activity screen: every access, refusal and revocation of my grants in this
// hospital's log, and every opinion a doctor returned through one of my links, each
// proven in the browser (ledger.js).

import { toB64url, toHex } from "./bytes.js";
import { myEvents } from "./ledger.js";
import { reportCard } from "./reports.js";
import { federationWitnesses } from "./roster.js";
import { loadRoster } from "./screen-studies.js";
import {
  $,
  app,
  el,
  hospitalName,
  images,
  localTime,
  registerScreen,
  studyName,
} from "./shell.js";
import { signedJson } from "./signed.js";

async function load() {
  const { tokens } = await signedJson(app.key, "GET", "/patient/tokens");
  if (!app.studies.length) {
    try {
      app.studies = (await signedJson(app.key, "GET", "/patient/studies")).studies;
    } catch {
      // names of studies are a nicety here
    }
  }
  await loadRoster().catch(() => []);
  const ids = new Set(tokens.map((t) => t.token_id));
  const roster = await federationWitnesses(app.node, app.federation);
  const { events, checkpoint, cosigners } = await myEvents(
    app.node,
    app.vkey,
    ids,
    null,
    roster.vkeys,
  );
  const witnessed = cosigners.length
    ? `witnessed by ${cosigners.map(hospitalName).join(", ")}`
    : "not yet witnessed by another hospital";
  $("activity-summary").textContent =
    `Checked on this phone against ${hospitalName(app.node.origin)}'s log of ${checkpoint.size} entries ` +
    `(signature verified, ${witnessed}).` + roster.note;
  const list = $("activity-list");
  if (!events.length) {
    list.replaceChildren(el("li", "note", "Nobody has used your shares yet."));
    return;
  }
  const opinions = await returnedOpinions(events);
  list.replaceChildren(...events.slice().reverse().map((event) => eventCard(event, opinions)));
}

/**
 * The opinions the contribution entries among ``events`` name, by the SHA-256 of the
 * stored instance (what an entry records): {digest hex: {study, report}} from the
 * reports of each study concerned (GET /patient/studies/{ref}/reports).
 */
async function returnedOpinions(events) {
  const refs = new Set(
    events.filter((e) => e.entry.kind === "contribution").map((e) => toB64url(e.entry.study)),
  );
  const found = new Map();
  for (const ref of refs) {
    const { reports } = await signedJson(app.key, "GET", `/patient/studies/${ref}/reports`);
    for (const report of reports) {
      if (report.contribution) found.set(report.digest, { study: { ref }, report });
    }
  }
  return found;
}

// A link's grantee is a hash of its credential: the patient knows it as "a link".
function who(grantee) {
  return grantee.startsWith("link:") ? "Someone with your link" : hospitalName(grantee);
}

function eventCard(event, opinions) {
  const { entry } = event;
  const item = el("li", "event");
  item.dataset.kind = entry.kind;
  item.dataset.index = String(event.index);
  let title;
  if (entry.kind === "access") {
    const study = studyName(toB64url(entry.study));
    title = `${who(entry.grantee)} received ${study}: ${images(entry.instances)}`;
  } else if (entry.kind === "denial") {
    // A refusal may name no study (the token was refused before any study was asked).
    const what = entry.study ? " " + studyName(toB64url(entry.study)) : "";
    title = `${who(entry.requester)} was refused${what}: ${entry.rule.replace(/_/g, " ")}`;
  } else if (entry.kind === "contribution") {
    title = `A doctor returned an opinion on ${studyName(toB64url(entry.study))} through your link`;
  } else {
    title = "You revoked a share";
  }
  const label = { access: "access", denial: "refused", revoke: "revoked", contribution: "opinion" }[
    entry.kind
  ];
  const proven = event.included && event.cosigners.length > 0;
  const proof = event.included
    ? `Proven: entry ${event.index} is in the signed log` +
      (event.cosigners.length
        ? `, witnessed by ${event.cosigners.map(hospitalName).join(", ")}`
        : " (not yet witnessed)")
    : "NOT PROVEN: the inclusion proof does not verify";
  item.append(
    el("span", `status ${entry.kind === "revoke" ? "revoked" : entry.kind}`, label),
    el("div", "study-title", title),
    el("div", "note", localTime(entry.time)),
    el("p", `proof ${event.included ? "ok" : "bad"}`, proof),
  );
  item.dataset.proven = String(proven);
  item.dataset.included = String(event.included);
  if (entry.kind === "contribution") {
    // The opinion itself, the one whose stored file has the digest the entry records:
    // flagged new until I open it, readable here and one tap from its PDF.
    const opinion = opinions.get(toHex(entry.digest));
    item.dataset.new = String(Boolean(opinion && opinion.report.new));
    if (opinion) {
      item.append(reportCard(app.key, opinion.study, opinion.report, app.previewUrls));
    } else {
      item.append(el("p", "note", "The opinion is not among this hospital's reports of the study."));
    }
  }
  return item;
}

registerScreen("activity", { load, needsKey: true });
