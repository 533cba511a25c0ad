// The Shared screen, the hand-over: a short instruction, the phone's share sheet (Web
// Share API) where there is one, copy, a printable sheet, and the QR code.

import { qrSvg } from "./qr.js";
import { $, action, hospitalName, localTime, registerScreen, say, show, studyName } from "./shell.js";

let current = null;

function whom(record) {
  return record.link ? record.grantee : hospitalName(record.grantee);
}

/** Show the share ``record`` ({token_id, url, grantee, expires, scope, link}). */
export async function showShare(record) {
  current = record;
  await show("share");
  const names = record.scope.map(studyName).join(", ");
  $("share-summary").textContent =
    `${names}, shared with ${whom(record)} until ${localTime(record.expires)}.`;
  $("share-how").textContent = record.link
    ? "Send the link to the doctor, or let them scan the code with their phone's camera. With a passcode, tell it to them separately (by phone, not in the same message)."
    : "At the other hospital, show this code to the staff and let them scan it, or send them the link.";
  $("share-qr").replaceChildren(qrSvg(record.url, "the share as a QR code"));
  $("share-url").textContent = record.url;
  $("share-token-id").textContent = record.token_id;
  $("send-button").hidden = typeof navigator.share !== "function";
}

function setup() {
  action($("send-button"), async () => {
    try {
      await navigator.share({ title: "My images", text: $("share-summary").textContent, url: current.url });
    } catch (error) {
      if (error.name !== "AbortError") throw error;
    }
  });
  action($("copy-button"), async () => {
    await navigator.clipboard.writeText(current.url);
    say("Link copied: paste it into a message.", "info");
  });
  $("print-button").addEventListener("click", () => window.print());
}

registerScreen("share", { setup, needsKey: true });
