// The keyframe list: upload (file picker, drop), add by URL, reorder (drag, arrows), remove.
import { uploadFile } from "./api.js";
import { clearError, showError } from "./form.js";
import { $, el, state } from "./state.js";

export function addFiles(files) {
  clearError("keyframe_image_urls");
  const max = state.config.max_keyframes;
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError("keyframe_image_urls", `${file.name} is not an image`);
      continue;
    }
    if (state.keyframes.length >= max) {
      showError("keyframe_image_urls", `at most ${max} keyframes`);
      break;
    }
    const item = { id: state.nextId++, url: "", thumb: URL.createObjectURL(file), name: file.name, state: "uploading" };
    state.keyframes.push(item);
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

export function addUrl(url) {
  clearError("keyframe_image_urls");
  const max = state.config.max_keyframes;
  if (state.keyframes.length >= max) return showError("keyframe_image_urls", `at most ${max} keyframes`);
  state.keyframes.push({ id: state.nextId++, url, thumb: url, name: url.split("/").pop() || url, state: "ready" });
  renderKeyframes();
}

export function setKeyframes(urls) {
  state.keyframes = urls.map((url) => ({ id: state.nextId++, url, thumb: url, name: url.split("/").pop(), state: "ready" }));
  renderKeyframes();
}

function moveKeyframe(from, to) {
  const keyframes = state.keyframes;
  if (to < 0 || to >= keyframes.length || from === to) return;
  const [item] = keyframes.splice(from, 1);
  keyframes.splice(to, 0, item);
  renderKeyframes();
}

function removeKeyframe(index) {
  const [item] = state.keyframes.splice(index, 1);
  if (item && item.thumb.startsWith("blob:")) URL.revokeObjectURL(item.thumb);
  renderKeyframes();
}

export function renderKeyframes() {
  const list = $("keyframe-list");
  const keyframes = state.keyframes;
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
  state.changed();
}
