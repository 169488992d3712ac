// The form: its fields (the endpoint's inputs), what request it describes, and errors shown at their field.
import { $, state } from "./state.js";

export const FIELDS = [
  "prompt", "steps", "cfg_scale", "eta", "motion_steps", "fps", "seed", "keyframe_lengths", "keep_all_frames",
  "loop", "frame_multiplier", "sketch_scale",
];
const NUMBER_FIELDS = {
  steps: "int", cfg_scale: "float", eta: "float", motion_steps: "int", fps: "int", seed: "int",
  frame_multiplier: "int", sketch_scale: "float",
};

export function setFormValues(input) {
  const defaults = state.config.defaults;
  for (const name of FIELDS) {
    const field = $(name);
    const value = input[name] ?? defaults[name];
    if (field.type === "checkbox") field.checked = Boolean(value);
    else if (Array.isArray(value)) field.value = value.join(",");
    else field.value = value ?? "";
  }
  state.changed();
}

// The frames of the clip the form describes (keyframes.plan_clip's count), for the sketch frame picker.
export function clipFrames() {
  const t = state.config.num_frames;
  const n = Math.max(state.keyframes.length, 2);
  const loop = $("loop").checked;
  const multiplier = Number($("frame_multiplier").value) || 1;
  const windows = loop ? n : n - 1;
  const first = $("keep_all_frames").checked ? windows * (t - 1) + (loop ? 0 : 1) : t;
  return loop ? first * multiplier : (first - 1) * multiplier + 1;
}

// The input the form describes: fields left at their default are omitted (the server fills them in).
// Returns {input, errors}; errors are local parse problems, keyed by field.
export function collectInput() {
  const defaults = state.config.defaults;
  const input = { keyframe_image_urls: state.keyframes.map((k) => k.url || k.thumb) };
  const errors = {};
  for (const name of FIELDS) {
    const field = $(name);
    if (field.type === "checkbox") {
      if (field.checked !== defaults[name]) input[name] = field.checked;
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
      else if (n !== defaults[name]) input[name] = n;
    } else if (raw !== defaults[name]) {
      input[name] = field.value;
    }
  }
  if (state.sketches.length) {
    input.sketch_image_urls = state.sketches.map((s) => ({
      frame: s.frame, url: s.url || s.thumb, ...(s.extract_lines ? { extract_lines: true } : {}),
    }));
  }
  return { input, errors };
}

export function showError(field, message) {
  const box = $(`${field}-error`) || $("form-error");
  box.textContent = box.id === "form-error" && field ? `${field}: ${message}` : message;
  const control = $(field);
  if (control && control.setAttribute) control.setAttribute("aria-invalid", "true");
}

export function clearError(field) {
  const box = $(`${field}-error`);
  if (box) box.textContent = "";
  const control = $(field);
  if (control && control.removeAttribute) control.removeAttribute("aria-invalid");
}

export function clearErrors() {
  for (const box of document.querySelectorAll(".error")) box.textContent = "";
  for (const control of document.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
  for (const li of document.querySelectorAll(".keyframe.invalid, .sketch.invalid")) li.classList.remove("invalid");
}

// The list entries a 422 can name by index: [field, item class, per-item error box prefix]
const ITEM_FIELDS = { keyframe_image_urls: ["keyframe", "keyframe"], sketch_image_urls: ["sketch", "sketch"] };

// A 422 body -> messages next to the fields it names (detail[].loc = ["body", field, index?, ...]).
export function showApiError(err) {
  const detail = err.body && err.body.detail;
  if (Array.isArray(detail)) {
    for (const entry of detail) {
      const loc = (entry.loc || []).filter((p) => p !== "body" && p !== "query");
      const [field, index] = loc;
      if (ITEM_FIELDS[field] && typeof index === "number") {
        const [cls, prefix] = ITEM_FIELDS[field];
        const li = document.querySelector(`.${cls}[data-index="${index}"]`);
        if (li) li.classList.add("invalid");
        const box = $(`${prefix}-${index}-error`);
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
