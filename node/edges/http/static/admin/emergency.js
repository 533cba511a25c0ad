// The dashboard's emergency access (break-glass) card, apart from app.js: a clinician's
// emergency fetch (POST /admin/api/emergency), and every break-glass this node served or
// made (GET /admin/api/emergency), raised in red. Values go into the page as text only.

const TOKEN_KEY = "imageshare.admin-token";
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return null;
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` },
    credentials: "omit",
    cache: "no-store",
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function row(...cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    td.textContent = cell === null || cell === undefined ? "–" : String(cell);
    tr.append(td);
  }
  return tr;
}

function when(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ");
}

async function refresh() {
  const section = $("emergency");
  if (!section || section.closest("[hidden]")) return;
  const answer = await api("/admin/api/emergency").catch(() => null);
  if (!answer) return;
  const table = section.querySelector("tbody");
  table.replaceChildren(
    ...answer.served.map((s) =>
      row(when(s.time), "served", s.requester, s.reason, s.policy, `${s.studies} studies`),
    ),
    ...answer.fetched.map((f) =>
      row(when(f.started), f.state === "done" ? "fetched" : f.state, f.custodian, f.reason, f.rule, `${f.instances_total} images`),
    ),
  );
  const count = answer.served.length + answer.fetched.length;
  const alarm = $("emergency-alarm");
  alarm.hidden = count === 0;
  alarm.textContent = `${count} emergency access event${count === 1 ? "" : "s"}: review each one.`;
}

function start() {
  const form = $("emergency-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = $("emergency-result");
    result.textContent = "asking…";
    const body = {
      patient_id: $("emergency-patient").value.trim(),
      reason: $("emergency-reason").value,
      note: $("emergency-note").value,
    };
    const custodian = $("emergency-custodian").value.trim();
    if (custodian) body.custodian = custodian;
    try {
      const answer = await api("/admin/api/emergency", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      result.textContent = `${answer.jobs.length} emergency request(s) sent`;
    } catch (error) {
      result.textContent = error.message;
    }
    refresh();
  });
  refresh();
  setInterval(refresh, POLL_MS);
}

start();
