// The ToonCrafter playground: a plain script over the public API (no build step, no framework).
// Uploads: POST storage/upload/initiate + PUT upload_url (what fal.storage.upload does).
// Runs: POST queue/{endpoint}, then the status SSE stream read with fetch() (EventSource cannot send
// an Authorization header), then the result; PUT cancel_url to stop.
"use strict";

const BASE = new URL(".", location.href).href.replace(/\/$/, ""); // works under a path prefix too
const KEY_STORAGE = "tooncrafter.playground.apiKey";
const HISTORY_STORAGE = "tooncrafter.playground.history";
const HISTORY_MAX = 30;
const FIELDS = ["prompt", "steps", "cfg_scale", "eta", "motion_steps", "fps", "seed", "keyframe_lengths", "keep_all_frames"];
// The endpoint's defaults come from the server (/playground/config: the schema, written once there).
let DEFAULTS = {};
const NUMBER_FIELDS = { steps: "int", cfg_scale: "float", eta: "float", motion_steps: "int", fps: "int", seed: "int" };

const $ = (id) => document.getElementById(id);
const config = { auth_required: false, num_frames: 16, endpoint_id: "fal-ai/toon-crafter", max_keyframes: 16 };
let keyframes = []; // {id, url, thumb, name, state: "uploading" | "ready" | "error", error}
let nextKeyframeId = 1;
let current = null; // the run shown in the Result pane: {request_id, status_url, response_url, cancel_url, abort}
let codeLang = "js";

// ---- API helpers ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.message || (typeof body.detail === "string" && body.detail))) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function authHeaders(extra = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

async function api(method, url, body) {
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

async function uploadFile(file) {
  const contentType = file.type || "application/octet-stream";
  const { upload_url, file_url } = await api("POST", `${BASE}/storage/upload/initiate`, {
    content_type: contentType,
    file_name: file.name,
  });
  // the one-time token in upload_url is the permission: no Authorization header on the PUT
  const res = await fetch(upload_url, { method: "PUT", body: file, headers: { "Content-Type": contentType } });
  if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
  return file_url;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- keyframes --------------------------------------------------------------------------------

function addFiles(files) {
  clearError("keyframe_image_urls");
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError("keyframe_image_urls", `${file.name} is not an image`);
      continue;
    }
    if (keyframes.length >= config.max_keyframes) {
      showError("keyframe_image_urls", `at most ${config.max_keyframes} keyframes`);
      break;
    }
    const item = { id: nextKeyframeId++, url: "", thumb: URL.createObjectURL(file), name: file.name, state: "uploading" };
    keyframes.push(item);
    uploadFile(file).then(
      (url) => { item.url = url; item.state = "ready"; renderKeyframes(); },
      (err) => {
        item.state = "error";
        item.error = err.message;
        if (err.status === 401) showError("api_key", err.message);
        renderKeyframes();
      },
    );
  }
  renderKeyframes();
}

function addUrl(url) {
  clearError("keyframe_image_urls");
  if (keyframes.length >= config.max_keyframes) return showError("keyframe_image_urls", `at most ${config.max_keyframes} keyframes`);
  keyframes.push({ id: nextKeyframeId++, url, thumb: url, name: url.split("/").pop() || url, state: "ready" });
  renderKeyframes();
}

function moveKeyframe(from, to) {
  if (to < 0 || to >= keyframes.length || from === to) return;
  const [item] = keyframes.splice(from, 1);
  keyframes.splice(to, 0, item);
  renderKeyframes();
}

function removeKeyframe(index) {
  const [item] = keyframes.splice(index, 1);
  if (item && item.thumb.startsWith("blob:")) URL.revokeObjectURL(item.thumb);
  renderKeyframes();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function renderKeyframes() {
  const list = $("keyframe-list");
  list.replaceChildren();
  keyframes.forEach((item, i) => {
    const label = `keyframe ${i + 1}`;
    const li = el(
      "li",
      { class: `keyframe ${item.state}`, draggable: "true", "data-index": i, "data-state": item.state },
      el("img", { src: item.thumb, alt: `${label}: ${item.name}` }),
      el("div", { class: "kf-meta" },
        el("span", { class: "kf-index" }, `#${i + 1}`),
        el("span", { class: "kf-name", title: item.url || item.name }, item.name),
        el("span", { class: "kf-state" }, item.state === "uploading" ? "uploading…" : item.state === "error" ? item.error : ""),
        el("span", { class: "error", id: `keyframe-${i}-error`, role: "alert" }),
      ),
      el("div", { class: "kf-buttons" },
        el("button", { type: "button", class: "icon", "aria-label": `Move ${label} up`, disabled: i === 0, onclick: () => moveKeyframe(i, i - 1) }, "↑"),
        el("button", { type: "button", class: "icon", "aria-label": `Move ${label} down`, disabled: i === keyframes.length - 1, onclick: () => moveKeyframe(i, i + 1) }, "↓"),
        el("button", { type: "button", class: "icon", "aria-label": `Remove ${label}`, onclick: () => removeKeyframe(i) }, "✕"),
      ),
    );
    li.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData("text/x-keyframe-index", String(i));
      e.dataTransfer.effectAllowed = "move";
    });
    li.addEventListener("dragover", (e) => {
      if (e.dataTransfer.types.includes("text/x-keyframe-index")) e.preventDefault();
    });
    li.addEventListener("drop", (e) => {
      const from = e.dataTransfer.getData("text/x-keyframe-index");
      if (from === "") return;
      e.preventDefault();
      e.stopPropagation();
      moveKeyframe(Number(from), i);
    });
    list.append(li);
  });
  renderCode();
}

// ---- the form ---------------------------------------------------------------------------------

function setFormValues(input) {
  for (const name of FIELDS) {
    const field = $(name);
    const value = input[name] ?? DEFAULTS[name];
    if (field.type === "checkbox") field.checked = Boolean(value);
    else if (Array.isArray(value)) field.value = value.join(",");
    else field.value = value ?? "";
  }
  renderCode();
}

// The input the form describes: fields left at their default are omitted (the server fills them in).
// Returns {input, errors}; errors are local parse problems, keyed by field.
function collectInput() {
  const input = { keyframe_image_urls: keyframes.map((k) => k.url || k.thumb) };
  const errors = {};
  for (const name of FIELDS) {
    const field = $(name);
    if (field.type === "checkbox") {
      if (field.checked !== DEFAULTS[name]) input[name] = field.checked;
      continue;
    }
    const raw = field.value.trim();
    if (field.validity && field.validity.badInput) { errors[name] = "not a number"; continue; }
    if (raw === "") continue;
    if (name === "keyframe_lengths") {
      const parts = raw.split(/[\s,]+/).filter(Boolean).map(Number);
      if (parts.some((n) => !Number.isInteger(n))) errors[name] = "whole numbers separated by commas, e.g. 6,5,5";
      else input[name] = parts;
    } else if (NUMBER_FIELDS[name]) {
      const n = Number(raw);
      if (!Number.isFinite(n)) errors[name] = "not a number";
      else if (n !== DEFAULTS[name]) input[name] = n;
    } else if (raw !== DEFAULTS[name]) {
      input[name] = field.value;
    }
  }
  return { input, errors };
}

function showError(field, message) {
  const box = $(`${field}-error`) || $("form-error");
  box.textContent = box.id === "form-error" && field ? `${field}: ${message}` : message;
  const control = $(field);
  if (control && control.setAttribute) control.setAttribute("aria-invalid", "true");
}

function clearError(field) {
  const box = $(`${field}-error`);
  if (box) box.textContent = "";
  const control = $(field);
  if (control && control.removeAttribute) control.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const box of document.querySelectorAll(".error")) box.textContent = "";
  for (const control of document.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  for (const li of document.querySelectorAll(".keyframe.invalid")) li.classList.remove("invalid");
}

// A 422 body -> messages next to the fields it names (detail[].loc = ["body", field, index?]).
function showApiError(err) {
  const detail = err.body && err.body.detail;
  if (Array.isArray(detail)) {
    for (const entry of detail) {
      const loc = (entry.loc || []).filter((p) => p !== "body" && p !== "query");
      const [field, index] = loc;
      if (field === "keyframe_image_urls" && typeof index === "number") {
        const li = document.querySelector(`.keyframe[data-index="${index}"]`);
        if (li) li.classList.add("invalid");
        const box = $(`keyframe-${index}-error`);
        if (box) box.textContent = entry.msg;
      }
      if (field && $(`${field}-error`)) showError(field, entry.msg);
      else showError(field || "", entry.msg);
    }
    return;
  }
  if (err.status === 401 || err.status === 403) {
    $("api-key-row").hidden = false;
    showError("api_key", err.message);
    return;
  }
  showError("", err.message);
}

// ---- running a request ------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (keyframes.some((k) => k.state === "uploading")) return showError("keyframe_image_urls", "wait for the uploads to finish");
  if (keyframes.some((k) => k.state === "error")) return showError("keyframe_image_urls", "remove the keyframes that failed to upload");
  const { input, errors } = collectInput();
  for (const [field, message] of Object.entries(errors)) showError(field, message);
  if (Object.keys(errors).length) return;

  $("submit").disabled = true;
  try {
    const queued = await api("POST", `${BASE}/queue/${config.endpoint_id}`, input);
    const entry = {
      request_id: queued.request_id,
      created_at: new Date().toISOString(),
      input,
      status: queued.status || "IN_QUEUE",
      status_url: queued.status_url,
      response_url: queued.response_url,
      cancel_url: queued.cancel_url,
    };
    saveHistory([entry, ...loadHistory()]);
    selectTab("result");
    follow(entry, queued.queue_position);
  } catch (err) {
    showApiError(err);
  } finally {
    $("submit").disabled = false;
  }
}

function setStatus(state, text) {
  const box = $("run-status");
  box.dataset.status = state;
  box.textContent = text;
}

function resetResultPane(entry) {
  if (current && current.abort) current.abort.abort();
  current = { ...entry, abort: new AbortController() };
  $("result").hidden = true;
  $("result-video").removeAttribute("src");
  $("logs").textContent = "";
  $("run-progress").value = 0;
  $("run-progress").max = 1;
  $("result-request").textContent = `Request ${entry.request_id}`;
  return current;
}

// Follow a request live: queue position, then step logs, then the result.
async function follow(entry, queuePosition) {
  const run = resetResultPane(entry);
  $("run-progress-row").hidden = false;
  $("cancel").disabled = false;
  setStatus("IN_QUEUE", queueText(queuePosition ?? 0));
  let final = null;
  try {
    final = await streamStatus(run);
  } catch (err) {
    if (run.abort.signal.aborted) return;
    final = null; // the stream broke (proxy, network): fall back to polling
  }
  if (!final) final = await pollStatus(run);
  if (!final || run !== current) return;
  await finish(run, final);
}

function queueText(position) {
  return position > 0 ? `In queue: position ${position + 1} (${position} ahead)` : "In queue: next up";
}

function onStatus(run, status, { replaceLogs = false } = {}) {
  if (run !== current) return;
  if (status.logs) {
    const lines = status.logs.map((l) => l.message);
    const logs = $("logs");
    logs.textContent = replaceLogs ? lines.join("\n") : logs.textContent + (logs.textContent && lines.length ? "\n" : "") + lines.join("\n");
    logs.scrollTop = logs.scrollHeight;
  }
  if (status.status === "IN_QUEUE") {
    setStatus("IN_QUEUE", queueText(status.queue_position ?? 0));
  } else if (status.status === "IN_PROGRESS") {
    const steps = [...$("logs").textContent.matchAll(/step (\d+)\/(\d+)/g)].pop();
    if (steps) {
      $("run-progress").max = Number(steps[2]);
      $("run-progress").value = Number(steps[1]);
      setStatus("IN_PROGRESS", `Running: step ${steps[1]} of ${steps[2]}`);
    } else {
      setStatus("IN_PROGRESS", "Running: preparing…");
    }
  }
  updateHistory(run.request_id, { status: status.status });
}

async function streamStatus(run) {
  const res = await fetch(`${run.status_url}/stream?logs=1`, {
    headers: authHeaders({ Accept: "text/event-stream" }),
    signal: run.abort.signal,
  });
  if (!res.ok || !res.body) throw new ApiError(res.status, null);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return null;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue; // ": ping" keep-alive
      const status = JSON.parse(data);
      onStatus(run, status);
      if (status.status === "COMPLETED") {
        reader.cancel().catch(() => {});
        return status;
      }
    }
  }
}

async function pollStatus(run) {
  while (run === current && !run.abort.signal.aborted) {
    try {
      const status = await api("GET", `${run.status_url}?logs=1`);
      onStatus(run, status, { replaceLogs: true });
      if (status.status === "COMPLETED") return status;
    } catch (err) {
      if (err.status === 404) {
        setStatus("ERROR", "This request no longer exists on the server (results expire).");
        updateHistory(run.request_id, { status: "EXPIRED" });
        $("run-progress-row").hidden = true;
        return null;
      }
    }
    await sleep(1000);
  }
  return null;
}

async function finish(run, status) {
  $("run-progress-row").hidden = true;
  if (status.error_type === "request_cancelled") {
    setStatus("CANCELLED", "Cancelled.");
    updateHistory(run.request_id, { status: "CANCELLED", error: status.error });
    return;
  }
  try {
    const output = await api("GET", run.response_url);
    updateHistory(run.request_id, { status: "COMPLETED", video: output.video, seed: output.seed });
    showOutput(output);
    const time = status.metrics && status.metrics.inference_time;
    setStatus("COMPLETED", time ? `Done in ${time.toFixed(1)} s.` : "Done.");
  } catch (err) {
    updateHistory(run.request_id, { status: "FAILED", error: err.message });
    setStatus("FAILED", `Failed: ${err.message}`);
    showApiError(err);
  }
}

function showOutput(output) {
  $("result").hidden = false;
  $("result-video").src = output.video.url;
  $("download").href = output.video.url;
  $("download").setAttribute("download", output.video.file_name || "tooncrafter.mp4");
  $("result-seed").textContent = String(output.seed);
}

async function cancel() {
  if (!current) return;
  $("cancel").disabled = true;
  setStatus("CANCELLING", "Cancelling…");
  try {
    await api("PUT", current.cancel_url);
  } catch (err) {
    if (err.body && err.body.status === "ALREADY_COMPLETED") return; // the stream reports the outcome
    setStatus("ERROR", `Cancel failed: ${err.message}`);
  }
}

// ---- history ----------------------------------------------------------------------------------

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORAGE)) || []; } catch { return []; }
}

function saveHistory(entries) {
  localStorage.setItem(HISTORY_STORAGE, JSON.stringify(entries.slice(0, HISTORY_MAX)));
  renderHistory();
}

function updateHistory(requestId, patch) {
  const entries = loadHistory();
  const entry = entries.find((e) => e.request_id === requestId);
  if (!entry) return;
  if (Object.entries(patch).every(([k, v]) => entry[k] === v)) return;
  Object.assign(entry, patch);
  saveHistory(entries);
}

function renderHistory() {
  const list = $("history");
  const entries = loadHistory();
  list.replaceChildren();
  if (!entries.length) list.append(el("li", { class: "muted" }, "No requests yet."));
  for (const entry of entries) {
    const urls = entry.input.keyframe_image_urls || [];
    list.append(el("li", { class: "history-item", "data-request-id": entry.request_id },
      el("div", { class: "thumbs" }, ...urls.slice(0, 4).map((u, i) => el("img", { src: u, alt: `keyframe ${i + 1}` }))),
      el("div", { class: "history-meta" },
        el("div", {},
          el("span", { class: `badge status-${entry.status.toLowerCase()}` }, entry.status),
          " ", el("code", { class: "request-id" }, entry.request_id)),
        el("div", { class: "muted small" }, `${new Date(entry.created_at).toLocaleString()} · ${urls.length} keyframes`
          + (entry.input.prompt ? ` · “${entry.input.prompt}”` : "") + (entry.seed !== undefined ? ` · seed ${entry.seed}` : "")),
        el("div", { class: "history-actions" },
          entry.video ? el("a", { href: entry.video.url, class: "video-link" }, "video") : null,
          el("button", { type: "button", class: "secondary small", onclick: () => openHistory(entry) }, "Show"),
          el("button", { type: "button", class: "secondary small", onclick: () => reuseInputs(entry) }, "Use inputs"),
        ),
      ),
    ));
  }
}

function openHistory(entry) {
  selectTab("result");
  if (entry.status === "IN_QUEUE" || entry.status === "IN_PROGRESS") return follow(entry);
  resetResultPane(entry);
  $("run-progress-row").hidden = true;
  if (entry.video) {
    showOutput({ video: entry.video, seed: entry.seed });
    setStatus("COMPLETED", "Done.");
  } else {
    setStatus(entry.status, entry.error ? `${entry.status}: ${entry.error}` : entry.status);
  }
}

function reuseInputs(entry) {
  keyframes = (entry.input.keyframe_image_urls || []).map((url) => ({
    id: nextKeyframeId++, url, thumb: url, name: url.split("/").pop(), state: "ready",
  }));
  setFormValues(entry.input);
  renderKeyframes();
}

// ---- code snippets ----------------------------------------------------------------------------

function pyRepr(value, indent = "") {
  const inner = indent + "    ";
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "string" || typeof value === "number") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + pyRepr(v, inner)).join(",\n")},\n${indent}]`;
  }
  const items = Object.entries(value).map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyRepr(v, inner)}`);
  return items.length ? `{\n${items.join(",\n")},\n${indent}}` : "{}";
}

function indentLines(text, prefix) {
  return text.split("\n").map((l, i) => (i ? prefix + l : l)).join("\n");
}

function snippets() {
  const { input } = collectInput();
  if (!input.keyframe_image_urls.length) input.keyframe_image_urls = ["https://example.com/first.png", "https://example.com/last.png"];
  const origin = BASE;
  const host = origin.replace(/^https?:\/\//, "");
  const endpoint = config.endpoint_id;
  const json = JSON.stringify(input, null, 2);
  const js = [
    'import { createFalClient } from "@fal-ai/client";',
    "",
    `const server = ${JSON.stringify(origin)};`,
    "const fal = createFalClient({",
    `  credentials: process.env.FAL_KEY,${config.auth_required ? "" : " // this server needs no key"}`,
    "  // fal's hosts -> this server",
    "  requestMiddleware: async (req) => ({",
    "    ...req,",
    "    url: req.url",
    "      .replace(/^https:\\/\\/queue\\.fal\\.run\\//, `${server}/queue/`)",
    "      .replace(/^https:\\/\\/fal\\.run\\//, `${server}/`)",
    "      .replace(/^https:\\/\\/rest\\.fal\\.ai\\//, `${server}/`),",
    "  }),",
    "});",
    "",
    `const { data, requestId } = await fal.subscribe(${JSON.stringify(endpoint)}, {`,
    `  input: ${indentLines(json, "  ")},`,
    "  logs: true,",
    '  mode: "streaming",',
    "  onQueueUpdate: (update) => update.logs?.forEach((log) => console.log(log.message)),",
    "});",
    "console.log(requestId, data.video.url, data.seed);",
  ].join("\n");
  const python = [
    "# fal_client speaks https only and reads its hosts at import time:",
    "# serve this server over TLS (see the README), then",
    `#   export FAL_KEY=${config.auth_required ? "your-key" : "anything   # this server needs no key, but fal_client wants one"}`,
    `#   export FAL_RUN_HOST=${host}`,
    `#   export FAL_QUEUE_RUN_HOST=${host}/queue`,
    "#   export SSL_CERT_FILE=/path/to/ca.pem   # if your CA is not a public one",
    "# Local images: fal_client.encode_file(\"a.png\") makes a data URI (fal_client.upload goes to fal's storage).",
    "import fal_client",
    "",
    "result = fal_client.subscribe(",
    `    ${JSON.stringify(endpoint)},`,
    `    arguments=${pyRepr(input, "    ")},`,
    "    with_logs=True,",
    "    on_queue_update=print,",
    ")",
    'print(result["video"]["url"], result["seed"])',
  ].join("\n");
  const auth = config.auth_required ? ' \\\n  -H "Authorization: Key $FAL_KEY"' : "";
  const quoted = json.replace(/'/g, "'\\''");
  const curl = [
    `SERVER=${origin}`,
    "# submit to the queue",
    `REQUEST_ID=$(curl -sS -X POST "$SERVER/queue/${endpoint}"${auth} \\`,
    '  -H "Content-Type: application/json" \\',
    `  -d '${quoted}' \\`,
    "  | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"request_id\"])')",
    "# follow the status (server-sent events with the step logs; ends when COMPLETED)",
    `curl -sSN "$SERVER/queue/${endpoint}/requests/$REQUEST_ID/status/stream?logs=1"${auth}`,
    "# the result: {\"video\": {\"url\": ...}, \"seed\": ...}",
    `curl -sS "$SERVER/queue/${endpoint}/requests/$REQUEST_ID"${auth}`,
  ].join("\n");
  return { js, python, curl };
}

function renderCode() {
  if ($("pane-code").hidden) return;
  $("code").textContent = snippets()[codeLang];
  for (const b of document.querySelectorAll(".code-tabs [role=tab]")) b.setAttribute("aria-selected", String(b.dataset.lang === codeLang));
}

// ---- tabs and start-up --------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of ["result", "code", "history"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`pane-${tab}`).hidden = tab !== name;
  }
  if (name === "code") renderCode();
  if (name === "history") renderHistory();
}

async function loadConfig() {
  try {
    Object.assign(config, await api("GET", `${BASE}/playground/config`));
  } catch { /* an older server: keep the defaults */ }
  DEFAULTS = config.defaults || {};
  for (const span of document.querySelectorAll("[data-default]")) {
    const value = DEFAULTS[span.dataset.default];
    span.textContent = value === "" ? "empty" : value === false ? "off" : value === true ? "on" : String(value);
  }
  $("endpoint-id").textContent = config.endpoint_id;
  $("max-keyframes").textContent = config.max_keyframes;
  for (const span of document.querySelectorAll(".num-frames")) span.textContent = config.num_frames;
  $("api-key-row").hidden = !config.auth_required;
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

function wire() {
  $("input-form").addEventListener("submit", submit);
  $("input-form").addEventListener("input", (e) => { if (e.target.id) clearError(e.target.id); renderCode(); });
  $("reset").addEventListener("click", () => { clearErrors(); keyframes = []; setFormValues({}); renderKeyframes(); });
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
  const key = $("api_key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) localStorage.setItem(KEY_STORAGE, key.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
  });
  $("cancel").addEventListener("click", cancel);
  $("reuse-seed").addEventListener("click", () => { $("seed").value = $("result-seed").textContent; clearError("seed"); renderCode(); });
  for (const tab of ["result", "code", "history"]) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  for (const b of document.querySelectorAll(".code-tabs [role=tab]")) b.addEventListener("click", () => { codeLang = b.dataset.lang; renderCode(); });
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
