// The light viewer: any DICOMweb root with rendered frames (this node's /dicomweb for
// staff, a link's root for its holder). ?root=<DICOMweb root URL>&study=<StudyInstanceUID>
"use strict";

const TOKEN_KEY = "imageshare.admin-token"; // the dashboard's key: one sign-in per tab
const PRESETS = [
  { name: "Default", window: null }, // the instance's own window
  { name: "Soft tissue", window: "40,400" },
  { name: "Lung", window: "-600,1500" },
  { name: "Bone", window: "400,1800" },
  { name: "Brain", window: "40,80" },
];
const UID = /^[0-9.]{1,64}$/;
const params = new URLSearchParams(location.search);
const root = new URL(params.get("root") || "/dicomweb", location.href);
const study = params.get("study") || "";
const $ = (id) => document.getElementById(id);
const state = { frames: [], index: 0, preset: PRESETS[0], drawn: 0, series: [] };

// Only this node's own /dicomweb needs the admin token; a link's root carries its own.
function needsToken() {
  return root.origin === location.origin && root.pathname.replace(/\/$/, "") === "/dicomweb";
}

async function get(path, accept) {
  const headers = { Accept: accept };
  if (needsToken()) {
    let token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      token = (window.prompt("Admin token of this node") || "").trim();
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
    }
    if (token) headers.Authorization = `Bearer ${token}`;
  }
  const response = await fetch(root.href.replace(/\/$/, "") + path, { headers, credentials: "omit" });
  if (response.status === 401 && needsToken()) sessionStorage.removeItem(TOKEN_KEY);
  if (!response.ok) {
    let reason = response.statusText;
    try { reason = (await response.json()).error || reason; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${reason}`);
  }
  return response;
}

const json = async (path) => (await get(path, "application/dicom+json")).json();
const value = (dataset, tag) => (dataset[tag] && dataset[tag].Value ? dataset[tag].Value[0] : undefined);

function status(text) { $("status").textContent = text; }

async function loadStudy() {
  if (!UID.test(study)) throw new Error("no study named in the address (?study=...)");
  const series = await json(`/studies/${study}/series`);
  series.sort((a, b) => (value(a, "00200011") || 0) - (value(b, "00200011") || 0));
  state.series = series.map((s) => ({
    uid: value(s, "0020000E"),
    modality: value(s, "00080060") || "",
    description: value(s, "0008103E") || "",
    count: value(s, "00201209") || 0,
  }));
  const nav = $("series");
  nav.replaceChildren();
  for (const [position, s] of state.series.entries()) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.series = s.uid;
    button.setAttribute("aria-pressed", "false");
    const image = document.createElement("img");
    image.alt = "";
    button.append(image, `${s.modality} ${s.description}`.trim() || `Series ${position + 1}`);
    button.addEventListener("click", () => openSeries(position));
    nav.append(button);
    get(`/studies/${study}/series/${s.uid}/thumbnail`, "image/jpeg")
      .then((r) => r.blob())
      .then((blob) => { image.src = URL.createObjectURL(blob); })
      .catch(() => { image.alt = "no preview"; });
  }
  if (!state.series.length) throw new Error("the study has no series");
  await openSeries(0);
}

async function openSeries(position) {
  const s = state.series[position];
  for (const button of $("series").children) {
    button.setAttribute("aria-pressed", String(button.dataset.series === s.uid));
  }
  status("Loading series…");
  const instances = await json(`/studies/${study}/series/${s.uid}/instances`);
  instances.sort((a, b) => (value(a, "00200013") || 0) - (value(b, "00200013") || 0));
  state.frames = [];
  for (const instance of instances) {
    if (!value(instance, "00280010")) continue; // no Rows: not an image
    const frames = Number(value(instance, "00280008") || 1);
    for (let f = 1; f <= frames; f += 1) {
      state.frames.push({ path: `/studies/${study}/series/${s.uid}/instances/${value(instance, "00080018")}`, frame: f });
    }
  }
  $("slider").max = String(Math.max(state.frames.length, 1));
  await show(0);
}

async function show(index) {
  if (!state.frames.length) { status("This series holds no images."); return; }
  state.index = Math.max(0, Math.min(index, state.frames.length - 1));
  const wanted = state.index;
  const { path, frame } = state.frames[wanted];
  const query = state.preset.window ? `?window=${encodeURIComponent(state.preset.window)}` : "";
  $("slider").value = String(wanted + 1);
  $("position").textContent = `${wanted + 1} / ${state.frames.length}`;
  try {
    const blob = await (await get(`${path}/frames/${frame}/rendered${query}`, "image/jpeg")).blob();
    const bitmap = await createImageBitmap(blob);
    if (wanted !== state.index) return; // the user moved on while it loaded
    const canvas = $("image");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    state.drawn += 1;
    canvas.dataset.index = String(wanted);
    canvas.dataset.window = state.preset.window || "";
    canvas.dataset.drawn = String(state.drawn);
    status(`${state.preset.name} window`);
  } catch (error) {
    status(`This image cannot be shown (${error.message}).`);
  }
}

function presets() {
  const group = $("presets");
  for (const preset of PRESETS) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = preset.name;
    button.setAttribute("aria-pressed", String(preset === state.preset));
    button.addEventListener("click", () => {
      state.preset = preset;
      for (const b of group.children) b.setAttribute("aria-pressed", String(b === button));
      show(state.index);
    });
    group.append(button);
  }
}

function scrolling() {
  const stage = $("stage");
  stage.addEventListener("wheel", (event) => {
    event.preventDefault();
    show(state.index + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", (event) => {
    const step = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 }[event.key];
    if (step) { event.preventDefault(); show(state.index + step); }
    if (event.key === "Home") show(0);
    if (event.key === "End") show(state.frames.length - 1);
  });
  let touchY = null;
  stage.addEventListener("touchstart", (event) => { touchY = event.touches[0].clientY; }, { passive: true });
  stage.addEventListener("touchmove", (event) => {
    if (touchY === null) return;
    const moved = event.touches[0].clientY - touchY;
    if (Math.abs(moved) >= 24) { // one image per 24 px of swipe
      show(state.index + (moved < 0 ? 1 : -1));
      touchY = event.touches[0].clientY;
    }
  }, { passive: true });
  $("slider").addEventListener("input", (event) => show(Number(event.target.value) - 1));
}

presets();
scrolling();
loadStudy().catch((error) => status(`The study cannot be opened (${error.message}).`));
