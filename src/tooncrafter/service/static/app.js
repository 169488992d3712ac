// The ToonCrafter playground: plain ES modules over the public API (no build step, no framework).
//   api.js        JSON calls with the stored key, uploads through the storage flow
//   state.js      what the modules share (config, images, the run on show) and two DOM helpers
//   form.js       the fields, the input they describe, errors at their field
//   keyframes.js  the keyframe list        sketches.js  sketch guidance (an extension input)
//   run.js        submit, follow (SSE, polling), cancel        history.js  past requests
//   code.js       the Code tab's snippets                      tabs.js     the output tabs
// This file wires them to the page and starts it.
import { BASE, KEY_STORAGE, api } from "./api.js";
import { renderCode } from "./code.js";
import { clearError, clearErrors, setFormValues } from "./form.js";
import { renderHistory } from "./history.js";
import { loadHistory, onHistoryChange, saveHistory, updateHistory } from "./history_store.js";
import { addFiles, addUrl, renderKeyframes, setKeyframes } from "./keyframes.js";
import { cancel, follow, submit } from "./run.js";
import { addSketchFile, renderClipFrames, setSketches } from "./sketches.js";
import { $, state } from "./state.js";
import { TABS, onTabShown, selectTab } from "./tabs.js";

async function loadConfig() {
  try {
    Object.assign(state.config, await api("GET", `${BASE}/playground/config`));
  } catch { /* an older server: keep the defaults */ }
  state.config.defaults = state.config.defaults || {};
  for (const span of document.querySelectorAll("[data-default]")) {
    const value = state.config.defaults[span.dataset.default];
    span.textContent = value === "" ? "empty" : value === false ? "off" : value === true ? "on" : String(value);
  }
  $("endpoint-id").textContent = state.config.endpoint_id;
  $("max-keyframes").textContent = state.config.max_keyframes;
  for (const span of document.querySelectorAll(".num-frames")) span.textContent = state.config.num_frames;
  $("api-key-row").hidden = !state.config.auth_required;
}

// A server whose workers are all gone still queues requests: say so before anyone waits on one.
async function checkWorkers() {
  let message = "";
  try {
    const health = await api("GET", `${BASE}/health/live`);
    if (!health.workers) message = "No worker is running: requests are queued, and start once a worker is up (`tooncrafter worker`).";
  } catch {
    message = "The server cannot be reached.";
  }
  $("worker-banner").textContent = message;
  $("worker-banner").hidden = !message;
}

// Requests still running when the page was left: follow the newest, refresh the others once.
async function resumeHistory() {
  const pending = loadHistory().filter((e) => e.status === "IN_QUEUE" || e.status === "IN_PROGRESS" || e.status === "CANCELLING");
  pending.slice(1).forEach(async (entry) => {
    try {
      const status = await api("GET", entry.status_url);
      if (status.status !== "COMPLETED") return updateHistory(entry.request_id, { status: status.status });
      if (status.error_type === "request_cancelled") return updateHistory(entry.request_id, { status: "CANCELLED" });
      const output = await api("GET", entry.response_url);
      updateHistory(entry.request_id, { status: "COMPLETED", video: output.video, seed: output.seed });
    } catch (err) {
      updateHistory(entry.request_id, { status: err.status === 404 ? "EXPIRED" : "FAILED", error: err.message });
    }
  });
  if (pending.length) follow(pending[0]);
}

function wireKeyframes() {
  $("keyframe-files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("add-url").addEventListener("click", () => {
    const url = $("keyframe-url").value.trim();
    if (url) { addUrl(url); $("keyframe-url").value = ""; }
  });
  const zone = $("dropzone");
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("keyframe-files").click(); } });
  zone.addEventListener("click", (e) => { if (e.target === zone || e.target.tagName === "P") $("keyframe-files").click(); });
  for (const target of [zone, $("keyframe-list")]) {
    target.addEventListener("dragover", (e) => {
      if (e.dataTransfer.types.includes("Files")) { e.preventDefault(); zone.classList.add("over"); }
    });
    target.addEventListener("dragleave", () => zone.classList.remove("over"));
    target.addEventListener("drop", (e) => {
      zone.classList.remove("over");
      if (!e.dataTransfer.files.length) return;
      e.preventDefault();
      addFiles([...e.dataTransfer.files]);
    });
  }
  $("sketch-files").addEventListener("change", (e) => { addSketchFile(e.target.files[0]); e.target.value = ""; });
}

function wire() {
  state.changed = () => { renderClipFrames(); renderCode(); };
  onHistoryChange(renderHistory);
  onTabShown("code", renderCode);
  onTabShown("history", renderHistory);
  $("input-form").addEventListener("submit", submit);
  $("input-form").addEventListener("input", (e) => { if (e.target.id) clearError(e.target.id); state.changed(); });
  $("reset").addEventListener("click", () => { clearErrors(); setFormValues({}); setKeyframes([]); setSketches([]); });
  wireKeyframes();
  const key = $("api_key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) localStorage.setItem(KEY_STORAGE, key.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
  });
  $("cancel").addEventListener("click", cancel);
  $("reuse-seed").addEventListener("click", () => { $("seed").value = $("result-seed").textContent; clearError("seed"); renderCode(); });
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  for (const b of document.querySelectorAll(".code-tabs [role=tab]")) b.addEventListener("click", () => { state.codeLang = b.dataset.lang; renderCode(); });
  $("copy-code").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("code").textContent); $("copy-code").textContent = "Copied"; }
    catch { $("copy-code").textContent = "Select and copy"; }
    setTimeout(() => { $("copy-code").textContent = "Copy"; }, 1500);
  });
  $("clear-history").addEventListener("click", () => saveHistory([]));
  for (const code of document.querySelectorAll("code.origin")) code.textContent = BASE;
}

async function main() {
  wire();
  await loadConfig();
  setFormValues({});
  renderKeyframes();
  renderHistory();
  renderCode();
  await checkWorkers();
  setInterval(checkWorkers, 10000);
  document.body.dataset.ready = "true";
  resumeHistory();
}

main();
