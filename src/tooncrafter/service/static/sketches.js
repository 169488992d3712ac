// Sketch guidance (an extension input): attach line art, or a picture whose lines are extracted, to an
// output frame of the clip. Each sketch is uploaded like a keyframe; one sketch per frame.
import { uploadFile } from "./api.js";
import { clearError, clipFrames, showError } from "./form.js";
import { $, el, state } from "./state.js";

export function addSketchFile(file) {
  clearError("sketch_image_urls");
  const frame = Number($("sketch-frame").value);
  if (!file || !file.type.startsWith("image/")) return showError("sketch_image_urls", `${file ? file.name : "that"} is not an image`);
  if (!Number.isInteger(frame) || frame < 0) return showError("sketch_image_urls", "choose the output frame first (a whole number from 0)");
  if (state.sketches.some((s) => s.frame === frame)) return showError("sketch_image_urls", `frame ${frame} already has a sketch`);
  const item = {
    id: state.nextId++, frame, url: "", thumb: URL.createObjectURL(file), name: file.name,
    extract_lines: $("sketch-extract").checked, state: "uploading",
  };
  state.sketches.push(item);
  state.sketches.sort((a, b) => a.frame - b.frame);
  uploadFile(file).then(
    (url) => { item.url = url; item.state = "ready"; renderSketches(); },
    (err) => { item.state = "error"; item.error = err.message; renderSketches(); },
  );
  renderSketches();
}

export function setSketches(entries) {
  state.sketches = (entries || []).map((s) => ({
    id: state.nextId++, frame: s.frame, url: s.url, thumb: s.url, name: s.url.split("/").pop(),
    extract_lines: Boolean(s.extract_lines), state: "ready",
  }));
  renderSketches();
}

function removeSketch(index) {
  const [item] = state.sketches.splice(index, 1);
  if (item && item.thumb.startsWith("blob:")) URL.revokeObjectURL(item.thumb);
  renderSketches();
}

export function renderSketches() {
  const list = $("sketch-list");
  list.replaceChildren();
  state.sketches.forEach((item, i) => {
    const label = `sketch for frame ${item.frame}`;
    list.append(el(
      "li",
      { class: `sketch ${item.state}`, "data-index": i, "data-state": item.state, "data-frame": item.frame },
      el("img", { src: item.thumb, alt: `${label}: ${item.name}` }),
      el("div", { class: "kf-meta" },
        el("span", { class: "kf-index" }, `frame ${item.frame}`),
        el("span", { class: "kf-name", title: item.url || item.name }, item.name + (item.extract_lines ? " (lines extracted)" : "")),
        el("span", { class: "kf-state" }, item.state === "uploading" ? "uploading…" : item.state === "error" ? item.error : ""),
        el("span", { class: "error", id: `sketch-${i}-error`, role: "alert" }),
      ),
      el("div", { class: "kf-buttons" },
        el("button", { type: "button", class: "icon", "aria-label": `Remove ${label}`, onclick: () => removeSketch(i) }, "✕"),
      ),
    ));
  });
  renderClipFrames();
  state.changed();
}

// The sketch frame picker follows the clip the form describes (loop, frame multiplier, keyframes).
export function renderClipFrames() {
  const frames = clipFrames();
  $("sketch-frame").max = String(frames - 1);
  $("clip-frames").textContent = String(frames);
}
