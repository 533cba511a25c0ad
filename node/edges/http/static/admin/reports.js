// The dashboard's reports: choose a study in the study list and its reports are listed,
// each as it stands (an amendment over the versions it superseded), from
// GET /admin/api/reports (docs/reports.md). Below them the opinions returned through
// share links (GET /admin/api/opinions), each held from the PACS until staff accept it.
// Values are put into the page as text only.

import { api } from "./app.js";

function cell(tag, text, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.textContent = text;
  return node;
}

function when(date, time) {
  if (!/^\d{8}$/.test(date || "")) return "–";
  const day = `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6, 8)}`;
  return /^\d{4}/.test(time || "") ? `${day} ${time.slice(0, 2)}:${time.slice(2, 4)}` : day;
}

function reportRow(report) {
  const row = document.createElement("tr");
  row.dataset.sop = report.sop_instance_uid;
  row.dataset.status = report.status;
  const older = report.superseded.map((v) => `${v.status} ${when(v.date, v.time)}`).join(", ");
  row.append(
    cell("td", report.title),
    cell("td", report.status, `report-status ${report.status}`),
    cell("td", when(report.date, report.time)),
    cell("td", report.identifier, "small"),
    cell("td", older || "–", "small muted"),
  );
  return row;
}

async function showReports(studyUid) {
  const body = document.querySelector("#reports .body");
  const { reports } = await api(`/admin/api/reports?study=${encodeURIComponent(studyUid)}`);
  body.dataset.study = studyUid;
  if (!reports.length) {
    body.replaceChildren(cell("p", "This study has no report.", "muted"));
    return;
  }
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const name of ["Report", "Status", "Date", "Identifier", "Supersedes"]) head.append(cell("th", name));
  table.append(head, ...reports.map(reportRow));
  body.replaceChildren(table);
}

// A click on a study's row (its cells, not its viewer link) lists that study's reports.
document.getElementById("studies").addEventListener("click", (event) => {
  if (event.target.closest("a")) return;
  const row = event.target.closest("tr[data-study]");
  if (row) showReports(row.dataset.study).catch((error) => console.error(error));
});

// -- returned opinions -----------------------------------------------------------------------

function opinionRow(opinion) {
  const row = document.createElement("tr");
  row.dataset.sop = opinion.sop_instance_uid;
  row.dataset.state = opinion.accepted === null ? "held" : "accepted";
  const action = document.createElement("td");
  if (opinion.accepted === null) {
    const accept = cell("button", "Accept for PACS", "accept");
    accept.type = "button";
    accept.addEventListener("click", async () => {
      accept.disabled = true;
      const path = `/admin/api/opinions/${encodeURIComponent(opinion.sop_instance_uid)}/accept`;
      await api(path, { method: "POST" }).catch((error) => console.error(error));
      await showOpinions();
    });
    action.append(accept);
  } else {
    action.append(cell("span", "Accepted", "muted"));
  }
  row.append(
    cell("td", opinion.title),
    cell("td", `${opinion.author} (as stated)`),
    cell("td", when(opinion.date, opinion.time)),
    cell("td", opinion.study_uid, "small"),
    action,
  );
  return row;
}

async function showOpinions() {
  const body = document.querySelector("#opinions .body");
  const { opinions } = await api("/admin/api/opinions");
  if (!opinions.length) {
    body.replaceChildren(cell("p", "No opinion has been returned.", "muted"));
    return;
  }
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const name of ["Opinion", "From", "Date", "Study", "PACS"]) head.append(cell("th", name));
  table.append(head, ...opinions.map(opinionRow));
  body.replaceChildren(table);
}

// Listed every 15 s while the dashboard is shown (signed in), and at once when it is.
const refreshOpinions = () => {
  if (document.getElementById("dashboard").hidden) return;
  showOpinions().catch((error) => console.error(error));
};
new MutationObserver(refreshOpinions).observe(document.getElementById("dashboard"), {
  attributes: true,
  attributeFilter: ["hidden"],
});
refreshOpinions();
setInterval(refreshOpinions, 15_000);
