// The node's admin dashboard. Plain JavaScript module, no framework, no other origin.
// Every API call carries the admin token as "Authorization: Bearer"; no cookies are used.
// Every value from the node is put into the page as text (never as HTML): study fields
// come from DICOM files and may hold anything.

const TOKEN_KEY = "imageshare.admin-token";
const POLL_MS = 1000;
const STUDIES_EVERY_MS = 5000;

class AuthRequired extends Error {}

const $ = (id) => document.getElementById(id);

// -- the API -------------------------------------------------------------------------------

export async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    showLogin("");
    throw new AuthRequired();
  }
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` },
    credentials: "omit",
    cache: "no-store",
  });
  if (response.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The node refused this token.");
    throw new AuthRequired();
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

// -- small helpers -------------------------------------------------------------------------

// el("td", {class: "x"}, "text", child...): children are text or elements, never HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fill(section, ...children) {
  $(section).querySelector(".body").replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let value = n;
  while (value >= 1000 && i < units.length - 1) {
    value /= 1000;
    i += 1;
  }
  return `${value.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function utc(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function until(seconds) {
  const s = seconds - Date.now() / 1000;
  return s <= 1 ? "now" : `in ${duration(s)}`;
}

function duration(seconds) {
  const s = Math.round(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

/** The staff's own local time, to the second. */
function local(seconds) {
  if (!seconds) return "–";
  return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

function hhmm(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
}

/** A DICOM date (DA, YYYYMMDD) as a local date; anything else as it is. */
function dicomDate(da) {
  if (!/^\d{8}$/.test(da || "")) return da || "–";
  const date = new Date(Number(da.slice(0, 4)), Number(da.slice(4, 6)) - 1, Number(da.slice(6, 8)));
  return date.toLocaleDateString(undefined, { dateStyle: "medium" });
}

/** A DICOM person name (PN, Family^Given^Middle^Prefix^Suffix) as "Family, Given Middle". */
function personName(pn) {
  if (!pn) return "–";
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = pn.split("=")[0].split("^");
  const first = [prefix, given, middle].filter(Boolean).join(" ");
  const name = [family, first].filter(Boolean).join(", ");
  return [name, suffix].filter(Boolean).join(" ") || "–";
}

const short = (hex, n = 16) => (hex ? `${hex.slice(0, n)}…` : "–");

/** A long id shown short; a click copies the whole of it. */
function copyable(hex, n = 8) {
  if (!hex) return "–";
  return el("button", { type: "button", class: "copy", "data-copy": hex, title: `${hex} (click to copy)`, "aria-label": `copy ${hex}` }, hex.slice(0, n));
}
const badge = (text, kind) => el("span", { class: `badge ${kind}` }, text);
const time = (seconds) => el("time", { title: utc(seconds) }, ago(seconds));

function table(headers, rows, empty) {
  if (!rows.length) return el("p", { class: "muted" }, empty);
  return el(
    "table",
    {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows),
  );
}

function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// -- sections ------------------------------------------------------------------------------

function renderNode(node) {
  $("title-origin").textContent = node.origin;
  document.title = `ImageShare · ${node.origin}`;
  const { storage, held } = node;
  fill(
    "node",
    facts([
      ["Origin", node.origin],
      ["Key fingerprint", el("code", {}, node.fingerprint)],
      ["Key ID", el("code", {}, node.key_id)],
      ["Version", node.version],
      ["Uptime", duration(node.uptime_seconds)],
      ["URL", node.public_url],
      ["Storage used", bytes(storage.used_bytes)],
      ["Disk free", `${bytes(storage.free_bytes)} of ${bytes(storage.disk_bytes)}`],
      ["Held", `${held.studies} studies · ${held.series} series · ${held.instances} instances`],
    ]),
  );
}

function renderPeers(peers) {
  const rows = peers.members.map((p) => {
    const state = !p.trusted
      ? badge("equivocated", "bad")
      : p.reachable === null
        ? badge("not yet contacted", "muted")
        : p.reachable
          ? badge("reachable", "good")
          : badge("unreachable", "bad");
    const error = p.reachable === false && p.problem ? el("div", { class: "small", title: p.last_error }, p.problem) : null;
    const remove = el("button", { type: "button", class: "danger remove-peer", "data-origin": p.origin }, "Remove");
    return el(
      "tr",
      { dataset: { origin: p.origin, reachable: String(p.reachable), trusted: String(p.trusted) } },
      el("td", {}, el("strong", {}, p.origin), el("div", { class: "small muted" }, p.urls.join(" "))),
      el("td", { class: "state" }, state, error),
      el("td", {}, remove),
      el("td", {}, time(p.last_success)),
      el(
        "td",
        { class: "num", dataset: { mirrored: String(p.mirrored) } },
        p.size_here ?? "–",
        " / ",
        p.size_there ?? "–",
        el("div", { class: "small muted" }, p.mirrored ? "entries mirrored" : "checkpoints only"),
      ),
      el(
        "td",
        {},
        p.cosigned_our_log_at ? ["cosigned ours ", time(p.cosigned_our_log_at)] : "has not cosigned ours",
        el(
          "div",
          { class: "small muted" },
          p.we_cosigned_size !== null ? `we cosigned theirs at size ${p.we_cosigned_size}` : "we have not cosigned theirs",
        ),
      ),
    );
  });
  const proofs = peers.equivocations.map((e) =>
    el(
      "div",
      { class: "proof", role: "alert", dataset: { origin: e.origin } },
      el("strong", {}, `Equivocation by ${e.origin}`),
      el("p", {}, e.reason, " — detected ", time(e.detected_at), ". Its new entries are refused."),
      el(
        "details",
        {},
        el("summary", {}, "The two signed checkpoints (the proof)"),
        e.notes.map((n) => el("pre", {}, n)),
      ),
    ),
  );
  fill(
    "peers",
    proofs,
    table(
      ["Member", "State", "Actions", "Last replication", "Log size here / there", "Cosignatures"],
      rows,
      "No peers in the roster.",
    ),
  );
}

function renderLog(log) {
  // While staff page back through older entries, the poll does not move them.
  if (logBefore !== null) return;
  renderLogEntries(log, log.recent, "Newest entries");
}

function renderLogEntries(log, entries, heading) {
  const cp = log.checkpoint;
  const cosigners = cp && cp.cosigners.length
    ? cp.cosigners.map((c) => el("span", { class: "chip" }, c.origin, " ", time(c.time)))
    : "none yet";
  const rows = entries.map((e) =>
    el(
      "tr",
      { dataset: { kind: e.kind, index: e.index } },
      el("td", { class: "num" }, e.index),
      el("td", {}, e.time ? el("time", { title: utc(e.time) }, local(e.time)) : "–"),
      el("td", {}, badge(e.kind, e.kind === "denial" ? "bad" : "kind")),
      el("td", {}, copyable(e.token_id)),
      el("td", {}, e.party || "–"),
      el("td", {}, e.text),
    ),
  );
  fill(
    "log",
    facts([
      ["Entries", log.size],
      ["Latest checkpoint", cp ? `size ${cp.size}, root ${short(cp.root, 24)}` : "none signed yet"],
      ["Cosigned by", cosigners],
    ]),
    el("h3", {}, heading),
    table(["#", "Time", "Kind", "Token", "Other party", "What happened"], rows, "The log is empty."),
  );
}

function fetchRow(job) {
  const seconds = job.seconds || 0;
  const size = job.bytes_total ? bytes(job.bytes_total) : "–";
  const outcome =
    job.state === "refused"
      ? [badge("refused", "bad"), " ", el("strong", { class: "rule" }, job.rule), el("div", { class: "small" }, job.error)]
      : job.state === "failed"
        ? [badge("failed", "bad"), el("div", { class: "small" }, job.error)]
        : job.state === "done" && job.instances_received === 0
          ? [badge("done", "good"), el("div", { class: "small" }, "already held, nothing transferred")]
          : job.state === "done"
            ? badge("done", "good")
            : badge(job.state, "kind");
  return el(
    "tr",
    { dataset: { id: job.id, state: job.state } },
    el("td", {}, outcome),
    el("td", {}, job.custodian),
    el("td", {}, copyable(job.token_id)),
    el("td", { class: "num" }, `${job.instances_done}/${job.instances_total || "?"}`, " · ", size),
    el("td", {}, local(job.started), el("div", { class: "small muted" }, `${seconds.toFixed(1)} s`)),
    el("td", { class: "num" }, job.state === "done" && job.instances_received > 0 ? `${job.mb_per_s} MB/s` : "–"),
    el("td", {}, ["failed", "refused", "cancelled"].includes(job.state)
      ? el("button", { type: "button", class: "quiet fetch-retry", "data-id": job.id }, "Retry")
      : ""),
  );
}

function progressOf(total, done) {
  const fraction = total ? Math.min(1, done / total) : 0;
  return el(
    "div",
    { class: "progress" },
    el("progress", { max: "100", value: (fraction * 100).toFixed(1) }),
    el("span", { class: "num" }, `${Math.floor(fraction * 100)} %`),
  );
}

function renderTransfers(transfers) {
  const running = transfers.fetches.filter((j) => j.state === "running");
  const finished = transfers.fetches.filter((j) => j.state !== "running");
  const live = running.map((job) =>
    el(
      "div",
      { class: "running", dataset: { id: job.id } },
      el("div", {}, el("strong", {}, `Fetching from ${job.custodian}`), " under token ", copyable(job.token_id)),
      progressOf(job.bytes_total, job.bytes_received),
      el(
        "div",
        { class: "small muted" },
        `${job.instances_done} of ${job.instances_total || "?"} instances stored · `,
        `${bytes(job.bytes_received)} of ${bytes(job.bytes_total)} · ${job.mb_per_s} MB/s`,
        job.attempts > 1 ? ` · attempt ${job.attempts}` : "",
      ),
      el("button", { type: "button", class: "danger fetch-cancel", "data-id": job.id }, "Cancel"),
    ),
  );
  const sending = transfers.sent.filter((s) => s.state === "running");
  const sent = transfers.sent.map((s) =>
    el(
      "tr",
      { dataset: { state: s.state } },
      el("td", {}, badge(s.state, s.state === "cut" ? "bad" : s.state === "done" ? "good" : "kind")),
      el("td", {}, s.grantee),
      el("td", {}, copyable(s.token_id)),
      el("td", { class: "num" }, `${s.instances_sent}/${s.instances_total}`, " · ", bytes(s.bytes_sent)),
      el("td", {}, local(s.started), el("div", { class: "small muted" }, `${s.seconds.toFixed(1)} s`)),
      el("td", { class: "num" }, `${s.mb_per_s} MB/s`),
    ),
  );
  fill(
    "transfers",
    el("h3", {}, "In progress"),
    live.length || sending.length
      ? [
          live,
          sending.map((s) =>
            el(
              "div",
              { class: "running" },
              el("div", {}, el("strong", {}, `Sending to ${s.grantee}`)),
              progressOf(s.bytes_total, s.bytes_sent),
            ),
          ),
        ]
      : el("p", { class: "muted" }, "Nothing is moving."),
    el("h3", {}, "Fetched by this node"),
    table(["Outcome", "Custodian", "Token", "Instances · size", "Started · time", "Speed", "Actions"], finished.map(fetchRow), "No fetch yet."),
    el("h3", {}, "Sent by this node"),
    table(["State", "Grantee", "Token", "Instances · size", "Started · time", "Speed"], sent, "Nothing sent yet."),
  );
}

function renderForwarding(f) {
  if (!f.enabled) {
    fill("forwarding", el("p", { class: "muted" }, "Forwarding is off (no [forward] PACS in node.toml)."));
    return;
  }
  const SHOWN = 5;
  const problems = f.problems.slice(0, SHOWN).map((p) =>
    el(
      "tr",
      {},
      el("td", {}, badge(p.state, p.state === "failed" ? "bad" : "kind")),
      el("td", { class: "num" }, p.attempts),
      el("td", {}, p.state === "failed" ? "gave up" : p.next_try ? until(p.next_try) : "–"),
      el("td", {}, p.last_error || ""),
      el(
        "td",
        {},
        el("button", { type: "button", class: "quiet forward-retry", "data-id": p.sop_instance_uid }, "Retry now"),
        " ",
        el("button", { type: "button", class: "danger forward-cancel", "data-id": p.sop_instance_uid }, "Cancel"),
      ),
    ),
  );
  fill(
    "forwarding",
    facts([
      ["Destination", `${f.destination.ae_title} at ${f.destination.host}:${f.destination.port}`],
      ["Running", f.running ? "yes" : "no"],
      ["Forwarded", f.forwarded],
      ["Queued", f.pending],
      ["Failed for good", f.failed],
      ["Cancelled", f.cancelled],
      ["Last success", time(f.last_success_at)],
      ["Last error", f.last_error ? [f.last_error, " ", time(f.last_error_at)] : "none"],
    ]),
    f.problems.length
      ? [
          el("h3", {}, "Retrying or failed"),
          table(["State", "Attempts", "Next try", "Error", "Actions"], problems, ""),
          f.problems.length > SHOWN
            ? el("p", { class: "small muted" }, `…and more: see the Queued and Failed counts above.`)
            : null,
        ]
      : null,
  );
}

function renderAudit(report) {
  if (!report) {
    fill("audit", el("p", { class: "muted" }, "No audit run from this page yet."));
    return;
  }
  const verdict = report.clean
    ? el("p", { class: "verdict good" }, "Clean: every log verified and every access consented.")
    : el("p", { class: "verdict bad" }, `Problems found: ${report.violations.length} violation(s), ${report.unreachable.length} unreachable.`);
  const logs = report.logs.map((l) =>
    el(
      "tr",
      {},
      el("td", {}, l.origin),
      el("td", { class: "num" }, l.size),
      el("td", {}, l.verified ? badge("verified", "good") : badge("not verified", "bad")),
      el("td", {}, l.cosignatures.map((c) => `${c.name} (${c.status})`).join(", ") || "nobody"),
    ),
  );
  const violations = report.violations.map((v) =>
    el(
      "li",
      { class: "violation" },
      el("strong", {}, v.rule),
      ` in ${v.log}`,
      v.index !== null && v.index !== undefined ? ` #${v.index}` : "",
      v.detail ? `: ${v.detail}` : "",
    ),
  );
  fill(
    "audit",
    verdict,
    el("p", { class: "small muted" }, `Checked ${report.urls.join(", ")} at ${utc(report.checked_at)} in ${report.seconds} s.`),
    table(["Log", "Size", "State", "Cosigned by"], logs, "No log was served."),
    violations.length ? el("ul", { class: "violations" }, violations) : null,
    report.unreachable.map((u) => el("p", { class: "error" }, `Unreachable: ${u}`)),
  );
}

function renderStudies(found) {
  const rows = found.studies.map((s) =>
    el(
      "tr",
      { dataset: { study: s.study_instance_uid } },
      el("td", {}, el("strong", { title: s.patient_name || "" }, personName(s.patient_name)), el("div", { class: "small muted" }, s.patient_id || "")),
      el("td", {}, dicomDate(s.patient_birth_date)),
      el("td", {}, dicomDate(s.study_date)),
      el("td", {}, s.study_description || "–", el("div", { class: "small muted" }, s.accession_number || "")),
      el("td", {}, s.modalities || "–"),
      el("td", { class: "num" }, `${s.instances} · ${bytes(s.bytes)}`),
      el("td", { class: "source" }, s.source || "–"),
      el("td", {}, s.viewer_url ? el("a", { href: s.viewer_url, target: "_blank", rel: "noopener noreferrer" }, "Open") : "–"),
    ),
  );
  fill(
    "studies",
    el(
      "p",
      { class: "small muted" },
      found.studies.length
        ? `${found.total} matching; ${studiesOffset + 1} to ${studiesOffset + found.studies.length} shown.`
        : `${found.total} matching.`,
    ),
    table(["Patient", "Born", "Study date", "Description", "Modality", "Instances · size", "Came from", "Viewer"], rows, "No study matches."),
  );
}

// -- the loop ------------------------------------------------------------------------------

let polling = false;
let studiesAt = 0;
// The log page shown: null for the newest entries (from the summary), else the index
// the page shown ends before.
let logBefore = null;
let logPages = [];
// The fetch started from the form, followed until it has an outcome.
let watchedFetch = null;
let lastUpdated = null;
let auditRunning = false;
let searchTimer = null;

/** A short outcome of the staff's last action (copy, remove), kept until the next one. */
function notice(text) {
  $("notice").textContent = text;
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

const STUDIES_PAGE = 50;
let studiesOffset = 0;

async function refreshStudies() {
  studiesAt = Date.now();
  const asked = new URLSearchParams({
    q: $("study-search").value.trim(),
    limit: String(STUDIES_PAGE),
    offset: String(studiesOffset),
    from: $("study-from").value,
    to: $("study-to").value,
    modality: $("study-modality").value.trim(),
    order: $("study-order").value,
  });
  const found = await api(`/admin/api/studies?${asked}`);
  renderStudies(found);
  $("studies-previous").disabled = studiesOffset === 0;
  $("studies-next").disabled = studiesOffset + found.studies.length >= found.total;
}

/** The list from its first page again, after the search or a filter changed. */
function searchStudies() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    studiesOffset = 0;
    refreshStudies().catch((error) => notice(`Studies: ${error.message}`));
  }, 250);
}
function renderPacs(p) {
  if (!p.enabled) {
    fill("pacs", el("p", { class: "muted" }, "No PACS source (no [pacs] in node.toml): only studies sent to this node are shared."));
    return;
  }
  const link = p.link === "up" ? badge("up", "good") : p.link === "down" ? badge("down", "bad") : badge("not yet asked", "muted");
  fill(
    "pacs",
    facts([
      ["PACS", `${p.pacs} (${p.via === "dimse" ? "C-FIND, C-GET" : "QIDO-RS, WADO-RS"})`],
      ["Link", [link, " ", time(p.checked_at)]],
      ["Last error", p.last_error || "none"],
      ["Cache", `${bytes(p.cache.bytes)} of ${bytes(p.cache.limit_bytes)} · ${p.cache.complete} whole ${p.cache.complete === 1 ? "study" : "studies"}`],
      ["Held for transfers", p.cache.held_for_transfers],
      ["Retrieved", p.retrieves],
      ["Retrieving", p.retrieving.length ? p.retrieving.map((r) => `${r.instances_held} of ${r.instances_listed ?? "?"} instances`).join(" · ") : "none"],
      ["Prefetch on grant", p.prefetch ? "on" : "off"],
    ]),
  );
}

const KIND_WORDS = {
  peer_down: "peer down",
  equivocation: "equivocation",
  disk_low: "disk low",
  forwarding_failed: "forwarding failures",
  certificate_expiry: "certificate expiry",
  break_glass: "break-glass access",
};

const capital = (text) => text.charAt(0).toUpperCase() + text.slice(1);

/** The status strip: "All good", or one line per kind of open incident. */
function renderHealth(health) {
  const byKind = new Map();
  for (const incident of health.incidents) {
    if (!byKind.has(incident.kind)) byKind.set(incident.kind, []);
    byKind.get(incident.kind).push(incident);
  }
  const items = [];
  for (const [kind, incidents] of byKind) {
    const since = Math.min(...incidents.map((i) => i.opened_at));
    const text =
      kind === "peer_down"
        ? `${incidents.length} ${incidents.length === 1 ? "peer" : "peers"} down since ${hhmm(since)}: ${incidents.map((i) => i.subject).join(", ")}`
        : incidents.map((i) => capital(i.text)).join("; ");
    items.push(el("li", { class: "bad", dataset: { kind }, title: `${KIND_WORDS[kind] || kind} since ${local(since)}` }, text));
  }
  if (!items.length) items.push(el("li", { class: "good", dataset: { kind: "ok" } }, "All good"));
  $("health-items").replaceChildren(...items);
}

function markLive(ok) {
  const badge = $("live");
  if (ok) {
    lastUpdated = Date.now() / 1000;
    badge.classList.remove("stale");
    badge.textContent = "live";
  } else {
    badge.classList.add("stale");
    badge.textContent = lastUpdated ? `last updated ${local(lastUpdated)}` : "not updated";
  }
}

/** The fetch form's line follows the job it started: refused, held, running, done. */
function followFetch(fetches) {
  if (!watchedFetch) return;
  const job = fetches.find((j) => j.id === watchedFetch);
  if (!job) return;
  const result = $("fetch-result");
  if (job.state === "refused") {
    result.className = "small error";
    result.textContent = `Refused by ${job.custodian}: ${job.rule}${job.error ? ` (${job.error})` : ""}.`;
  } else if (job.state === "cancelled") {
    result.className = "small muted";
    result.textContent = "Cancelled.";
  } else if (job.state === "failed") {
    result.className = "small error";
    result.textContent = `Failed: ${job.error || "no reason given"}.`;
  } else if (job.state === "done") {
    result.className = "small";
    result.textContent =
      job.instances_received === 0
        ? `Already held, nothing transferred (${job.instances_done} instances).`
        : `Done: ${job.instances_received} instances, ${bytes(job.bytes_received)} from ${job.custodian}.`;
  } else {
    result.className = "small muted";
    result.textContent = `Fetching from ${job.custodian}…`;
    return;
  }
  watchedFetch = null;
}

async function showLogPage(before) {
  const page = await api(`/admin/api/log?limit=50${before === null ? "" : `&before=${before}`}`);
  const summary = { checkpoint: currentLog ? currentLog.checkpoint : null, size: page.size };
  const first = page.entries.length ? page.entries[page.entries.length - 1].index : 0;
  const last = page.entries.length ? page.entries[0].index : 0;
  renderLogEntries(currentLog || summary, page.entries, `Entries ${first} to ${last} of ${page.size}`);
  $("log-older").disabled = page.next_before === null;
  $("log-newer").disabled = logBefore === null;
}

let currentLog = null;

async function exportLog() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch("/admin/api/log.csv", {
    headers: { Authorization: `Bearer ${token}` },
    credentials: "omit",
    cache: "no-store",
  });
  if (!response.ok) throw new Error(`the node answered ${response.status}`);
  const link = el("a", { download: "imageshare-log.csv" });
  link.href = URL.createObjectURL(await response.blob());
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

/** Retry a finished fetch (a new job) or cancel a running one. */
async function fetchAction(id, what, done) {
  try {
    const job = await api(`/admin/api/transfers/${encodeURIComponent(id)}/${what}`, { method: "POST" });
    if (what === "retry") {
      watchedFetch = job.id;
      $("fetch-result").className = "small muted";
      $("fetch-result").textContent = `Asking ${job.custodian}…`;
    }
    notice(`${done}: ${job.custodian}.`);
  } catch (error) {
    if (!(error instanceof AuthRequired)) notice(`Could not ${what}: ${error.message}`);
  }
}

/** Forward a retrying or failed instance now, or never (cancel: it is kept as cancelled). */
async function forwardAction(uid, what) {
  if (what === "cancel" && !window.confirm("Never send this instance to the PACS?")) return;
  try {
    await api(`/admin/api/forwards/${encodeURIComponent(uid)}/${what}`, { method: "POST" });
    notice(what === "retry" ? "Sending it to the PACS now." : "Cancelled: it will not be sent.");
  } catch (error) {
    if (!(error instanceof AuthRequired)) notice(`Could not ${what}: ${error.message}`);
  }
}

async function removePeer(origin) {
  if (!window.confirm(`Remove ${origin} from this node's federation? This node stops replicating its log and sharing with it.`)) return;
  try {
    await api("/admin/api/peers/remove", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ origin }),
    });
    notice(`Removed ${origin}.`);
  } catch (error) {
    if (!(error instanceof AuthRequired)) notice(`Not removed: ${error.message}`);
  }
}

async function testAlert() {
  const result = $("alert-test-result");
  result.textContent = "Sending…";
  try {
    const { channels } = await api("/admin/api/alerts/test", { method: "POST" });
    const outcome = Object.entries(channels).map(([channel, what]) => `${channel}: ${what}`);
    result.textContent = outcome.length ? outcome.join(" · ") : "No webhook or e-mail is set in [alerts].";
  } catch (error) {
    if (!(error instanceof AuthRequired)) result.textContent = `Not sent: ${error.message}`;
  }
}

async function refresh() {
  const summary = await api("/admin/api/status");
  markLive(true);
  showBanner("");
  renderHealth(summary.health);
  currentLog = summary.log;
  followFetch(summary.transfers.fetches);
  renderNode(summary.node);
  renderPeers(summary.peers);
  renderLog(summary.log);
  renderTransfers(summary.transfers);
  renderForwarding(summary.forwarding);
  renderPacs(summary.pacs);
  if (!auditRunning) renderAudit(summary.last_audit);
  if (Date.now() - studiesAt > STUDIES_EVERY_MS) await refreshStudies();
}

async function poll() {
  if (!polling) return;
  try {
    await refresh();
  } catch (error) {
    if (error instanceof AuthRequired) return;
    markLive(false);
    const words = error instanceof TypeError ? "no answer (the node is stopped, or the network is down)" : error.message;
    showBanner(`Cannot reach the node: ${words}. Retrying…`);
  }
  setTimeout(poll, POLL_MS);
}

function showLogin(message) {
  polling = false;
  $("dashboard").hidden = true;
  $("live").hidden = true;
  $("logout").hidden = true;
  $("title-origin").textContent = "";
  // Nothing of the node stays on the page once the token is gone.
  for (const body of document.querySelectorAll("#dashboard .body")) body.replaceChildren();
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("token").focus();
}

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("live").hidden = false;
  $("logout").hidden = false;
  if (!polling) {
    polling = true;
    studiesAt = 0;
    poll();
  }
}

async function runAudit() {
  const button = $("audit-run");
  auditRunning = true;
  button.disabled = true;
  button.textContent = "Auditing…";
  fill("audit", el("p", { class: "muted" }, "Mirroring and verifying every log…"));
  try {
    renderAudit(await api("/admin/api/audit", { method: "POST" }));
  } catch (error) {
    if (!(error instanceof AuthRequired)) fill("audit", el("p", { class: "error" }, `Audit failed: ${error.message}`));
  } finally {
    auditRunning = false;
    button.disabled = false;
    button.textContent = "Audit the federation";
  }
}

async function startFetch(event) {
  event.preventDefault();
  const result = $("fetch-result");
  const token = $("fetch-token").value.trim();
  if (!token) return;
  try {
    const job = await api("/admin/api/fetch", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token }),
    });
    $("fetch-token").value = "";
    watchedFetch = job.id;
    result.className = "small muted";
    result.textContent = `Asking ${job.custodian}…`;
    followFetch([job]);
  } catch (error) {
    if (error instanceof AuthRequired) return;
    result.className = "small error";
    result.textContent = `Not started: ${error.message}`;
  }
}

function start() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    try {
      await api("/admin/api/status");
      showDashboard();
    } catch (error) {
      if (!(error instanceof AuthRequired)) $("login-error").textContent = `Cannot reach the node: ${error.message}`;
    }
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("Signed out.");
  });
  $("audit-run").addEventListener("click", runAudit);
  $("alert-test").addEventListener("click", testAlert);
  $("log-older").addEventListener("click", () => {
    logPages.push(logBefore);
    const shown = [...document.querySelectorAll("#log tr[data-index]")].map((r) => Number(r.dataset.index));
    logBefore = shown.length ? Math.min(...shown) : 0;
    showLogPage(logBefore).catch((error) => showBanner(error.message));
  });
  $("log-newer").addEventListener("click", () => {
    logBefore = logPages.pop() ?? null;
    if (logBefore === null) {
      $("log-newer").disabled = true;
      $("log-older").disabled = false;
      if (currentLog) renderLog(currentLog);
    } else {
      showLogPage(logBefore).catch((error) => showBanner(error.message));
    }
  });
  $("log-csv").addEventListener("click", () => exportLog().catch((error) => showBanner(`Export failed: ${error.message}`)));
  document.addEventListener("click", (event) => {
    const target = event.target instanceof Element ? event.target : null;
    const copy = target && target.closest("button.copy");
    if (copy) {
      navigator.clipboard.writeText(copy.dataset.copy).then(
        () => notice(`Copied ${copy.dataset.copy}.`),
        () => notice(`Copy by hand: ${copy.dataset.copy}`),
      );
    }
    const remove = target && target.closest("button.remove-peer");
    if (remove) removePeer(remove.dataset.origin);
    const retry = target && target.closest("button.fetch-retry");
    if (retry) fetchAction(retry.dataset.id, "retry", "Fetching again");
    const cancel = target && target.closest("button.fetch-cancel");
    if (cancel) fetchAction(cancel.dataset.id, "cancel", "Cancelled");
    const forward = target && target.closest("button.forward-retry, button.forward-cancel");
    if (forward) forwardAction(forward.dataset.id, forward.classList.contains("forward-retry") ? "retry" : "cancel");
  });
  $("fetch-form").addEventListener("submit", startFetch);
  $("study-search").addEventListener("input", searchStudies);
  for (const id of ["study-from", "study-to", "study-modality", "study-order"]) {
    $(id).addEventListener("change", searchStudies);
  }
  $("study-modality").addEventListener("input", searchStudies);
  $("studies-previous").addEventListener("click", () => {
    studiesOffset = Math.max(0, studiesOffset - STUDIES_PAGE);
    refreshStudies().catch((error) => notice(`Studies: ${error.message}`));
  });
  $("studies-next").addEventListener("click", () => {
    studiesOffset += STUDIES_PAGE;
    refreshStudies().catch((error) => notice(`Studies: ${error.message}`));
  });
  if (sessionStorage.getItem(TOKEN_KEY)) showDashboard();
  else showLogin("");
}

start();
