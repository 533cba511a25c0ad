// The share page: opens a SMART Health Link carried in this page's fragment.
//
// The link (and its key) is read from location.hash, which browsers never send to a
// server. The manifest is requested from the link's url; each file is a compact JWE
// (alg dir, enc A256GCM) decrypted here with WebCrypto under the link key. Only the
// link's own credential (inside the decrypted files) is ever sent, to open the images.

const $ = (id) => document.getElementById(id);

function b64urlBytes(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  const binary = atob(b64);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function show(message) {
  $("message").textContent = message;
  $("message").hidden = false;
}

export function decodeLink(fragment) {
  const at = fragment.indexOf("shlink:/");
  if (at < 0) throw new Error("This page opens a shared link; none was given.");
  const payload = JSON.parse(new TextDecoder().decode(b64urlBytes(fragment.slice(at + 8))));
  if (typeof payload.url !== "string" || typeof payload.key !== "string") {
    throw new Error("The shared link is damaged.");
  }
  if (payload.exp && payload.exp * 1000 < Date.now()) {
    throw new Error("The shared link has expired.");
  }
  return payload;
}

export async function decryptFile(keyBytes, compact) {
  const [header, encryptedKey, iv, ciphertext, tag] = compact.split(".");
  const protectedHeader = JSON.parse(new TextDecoder().decode(b64urlBytes(header)));
  if (protectedHeader.alg !== "dir" || protectedHeader.enc !== "A256GCM" || encryptedKey) {
    throw new Error("A shared file is not encrypted as expected.");
  }
  const key = await crypto.subtle.importKey("raw", keyBytes, "AES-GCM", false, ["decrypt"]);
  const sealed = new Uint8Array([...b64urlBytes(ciphertext), ...b64urlBytes(tag)]);
  const plain = await crypto.subtle.decrypt(
    { name: "AES-GCM", iv: b64urlBytes(iv), additionalData: new TextEncoder().encode(header), tagLength: 128 },
    key,
    sealed,
  );
  return JSON.parse(new TextDecoder().decode(plain));
}

// OHIF's viewer mode with its dicomwebproxy data source (/viewer/dicomwebproxy alone is
// OHIF's study list); that source reads the studies from `studyInstanceUIDs` only.
const OHIF_PROXY_VIEWER = "/viewer/viewer/dicomwebproxy";

async function viewerAvailable() {
  try {
    // Without OHIF the node redirects /viewer/ to the light viewer: not followed here.
    const answer = await fetch("/viewer/", { method: "HEAD", cache: "no-store", redirect: "manual" });
    return answer.ok;
  } catch {
    return false;
  }
}

function studyUid(study) {
  const id = (study.identifier || []).find((i) => i.system === "urn:dicom:uid");
  return id ? id.value.replace(/^urn:oid:/, "") : "";
}

function describe(study) {
  const modalities = (study.modality || []).map((m) => m.code).join(", ");
  const parts = [study.started || "", modalities, study.description || ""].filter(Boolean);
  return `${parts.join(" · ") || "Study"} (${study.numberOfInstances} images)`;
}

async function showStudies(studies, credential) {
  const root = credential.aud;
  const ohif = await viewerAvailable();
  const list = $("study-list");
  list.replaceChildren();
  for (const study of studies) {
    const uid = studyUid(study);
    const item = document.createElement("li");
    const title = document.createElement("p");
    title.className = "title";
    title.textContent = describe(study);
    const open = document.createElement("a");
    open.className = "button primary";
    open.textContent = "View images";
    open.rel = "noreferrer";
    open.href = ohif
      ? `${OHIF_PROXY_VIEWER}?url=${encodeURIComponent(root + ".json")}&studyInstanceUIDs=${encodeURIComponent(uid)}`
      : `/viewer-lite/?root=${encodeURIComponent(root)}&study=${encodeURIComponent(uid)}`;
    item.append(title, open);
    list.append(item);
  }
  const download = $("download");
  download.href = root.replace(/\/dicomweb$/, "/download");
  download.rel = "noreferrer";
  download.hidden = false;
  $("studies").hidden = false;
  showOpinionForm(studies, root.replace(/\/dicomweb$/, "/opinions"));
}

function toBase64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// The holder's opinion, to POST /links/{token}/opinions (docs/reports.md § Second
// opinions); the custodian refuses it (403) for a link made without the permission.
function showOpinionForm(studies, target) {
  const select = $("opinion-study");
  select.replaceChildren(
    ...studies.map((study) => {
      const option = document.createElement("option");
      option.value = studyUid(study);
      option.textContent = describe(study);
      return option;
    }),
  );
  const form = $("opinion-form");
  form.hidden = false;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const result = $("opinion-result");
    const body = {
      study_uid: select.value,
      author: $("opinion-author").value,
      role: $("opinion-role").value,
    };
    const file = $("opinion-pdf").files[0];
    if (file) body.pdf = toBase64(new Uint8Array(await file.arrayBuffer()));
    else body.text = $("opinion-text").value;
    const answer = await fetch(target, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
    const reply = await answer.json().catch(() => ({}));
    result.dataset.status = String(answer.status);
    result.textContent = answer.ok
      ? "Sent: the patient and their hospital have your opinion."
      : `Not sent: ${reply.error || answer.status}`;
    result.hidden = false;
  });
}

async function openManifest(link, passcode) {
  const body = { recipient: "ImageShare share page" };
  if (passcode) body.passcode = passcode;
  const answer = await fetch(link.url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    cache: "no-store",
    referrerPolicy: "no-referrer",
  });
  const manifest = await answer.json();
  if (answer.status === 401) {
    $("attempts").textContent = `Wrong passcode: ${manifest.remainingAttempts} attempts left.`;
    $("attempts").hidden = false;
    return;
  }
  if (!answer.ok) throw new Error(`The link cannot be opened: ${manifest.error || answer.status}`);
  const keyBytes = b64urlBytes(link.key);
  const studies = [];
  let credential = null;
  for (const file of manifest.files) {
    const content = await decryptFile(keyBytes, file.embedded);
    if (file.contentType === "application/smart-api-access") credential = content;
    else if (content.resourceType === "ImagingStudy") studies.push(content);
  }
  if (!credential) throw new Error("The link carries no access to images.");
  $("passcode-form").hidden = true;
  await showStudies(studies, credential);
}

async function main() {
  let link;
  try {
    link = decodeLink(location.hash);
  } catch (error) {
    show(error.message);
    return;
  }
  if (link.label) $("label").textContent = `Shared: ${link.label}`;
  const flags = link.flag || "";
  if (flags.includes("P")) {
    $("passcode-form").hidden = false;
    $("passcode-form").addEventListener("submit", (event) => {
      event.preventDefault();
      openManifest(link, $("passcode").value).catch((error) => show(error.message));
    });
    return;
  }
  await openManifest(link, null).catch((error) => show(error.message));
}

main();
