// The Activity screen: every access, refusal and revocation of my grants in this
// hospital's log, each proven in the browser (ledger.js).

import { toB64url } from "./bytes.js";
import { myEvents } from "./ledger.js";
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
    title = `${hospitalName(entry.grantee)} received ${study}: ${images(entry.instances)}`;
  } else if (entry.kind === "denial") {
    // A refusal may name no study (the token was refused before any study was asked).
    const what = entry.study ? " " + studyName(toB64url(entry.study)) : "";
    title = `${hospitalName(entry.requester)} was refused${what}: ${entry.rule.replace(/_/g, " ")}`;
  } else {
    title = "You revoked a share";
  }
  const label = { access: "access", denial: "refused", revoke: "revoked" }[entry.kind];
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
  return item;
}

registerScreen("activity", { load, needsKey: true });
