// The reports of a study in the wallet: each report as it stands (an amendment shown over
// what it superseded), its text readable at phone size, and its PDF one tap away. The
// node lists them at GET /patient/studies/{ref}/reports (docs/reports.md); every value
// is inserted as text, never as HTML. An opinion returned through a share link is flagged
// "New opinion" until the patient opens it.

import { signedFetch, signedJson } from "./signed.js";

// Series of documents, not images: listed as reports, never previewed.
export const REPORT_MODALITIES = ["DOC", "SR"];
const STATUS_WORDS = {
  preliminary: "Preliminary",
  final: "Final",
  amended: "Amended",
  corrected: "Corrected",
};

function node(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function reportDate(date, time) {
  if (!/^\d{8}$/.test(date || "")) return "";
  const day = `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6, 8)}`;
  return /^\d{4}/.test(time || "") ? `${day} ${time.slice(0, 2)}:${time.slice(2, 4)}` : day;
}

export function reportCard(key, study, report, urls) {
  const card = node("article", "report");
  card.dataset.sop = report.sop_instance_uid;
  card.dataset.status = report.status;
  const head = node("div", "report-head");
  head.append(
    node("span", `report-status report-${report.status}`, STATUS_WORDS[report.status] || report.status),
    node("span", "report-title", report.title),
  );
  card.append(head, node("div", "muted", reportDate(report.date, report.time)));
  if (report.contribution) {
    // Returned through one of the patient's links: the name is as its author stated it.
    card.dataset.contribution = "true";
    if (report.new) head.prepend(node("span", "report-new", "New opinion"));
    card.append(node("div", "muted report-author", `From ${report.author} (as they stated it)`));
  }
  if (report.superseded.length) {
    const older = report.superseded.map((v) => `${STATUS_WORDS[v.status] || v.status} ${reportDate(v.date, v.time)}`);
    card.append(node("div", "muted report-history", `Replaces: ${older.join(", ")}`));
  }
  if (report.text) card.append(node("div", "report-text", report.text));
  if (report.media_type === "application/pdf") {
    const open = node("button", "report-open", "Open the PDF");
    open.type = "button";
    open.addEventListener("click", async () => {
      const path = `/patient/studies/${study.ref}/reports/${report.sop_instance_uid}.pdf`;
      const response = await signedFetch(key, "GET", path);
      card.querySelector(".report-new")?.remove(); // opened: the node marks it seen
      const url = URL.createObjectURL(await response.blob());
      urls.push(url);
      window.open(url, "_blank", "noopener");
    });
    card.append(open);
  }
  return card;
}

// Fill the study card's reports section (the element with class "reports" inside
// li[data-ref=...]); ``urls`` collects the object URLs made, for the app to revoke.
export async function loadReports(key, study, urls) {
  const section = document.querySelector(`li[data-ref="${study.ref}"] .reports`);
  if (!section) return;
  const { reports } = await signedJson(key, "GET", `/patient/studies/${study.ref}/reports`);
  section.replaceChildren(...reports.map((report) => reportCard(key, study, report, urls)));
}
