// The History tab: requests made from this browser (history_store.js) shown, reopened, their inputs reused.
import { setFormValues } from "./form.js";
import { setKeyframes } from "./keyframes.js";
import { loadHistory } from "./history_store.js";
import { follow, resetResultPane, setStatus, showOutput } from "./run.js";
import { setSketches } from "./sketches.js";
import { $, el } from "./state.js";
import { selectTab } from "./tabs.js";

export function renderHistory() {
  const list = $("history");
  const entries = loadHistory();
  list.replaceChildren();
  if (!entries.length) list.append(el("li", { class: "muted" }, "No requests yet."));
  for (const entry of entries) {
    const urls = entry.input.keyframe_image_urls || [];
    const sketches = (entry.input.sketch_image_urls || []).length;
    list.append(el("li", { class: "history-item", "data-request-id": entry.request_id },
      el("div", { class: "thumbs" }, ...urls.slice(0, 4).map((u, i) => el("img", { src: u, alt: `keyframe ${i + 1}` }))),
      el("div", { class: "history-meta" },
        el("div", {},
          el("span", { class: `badge status-${entry.status.toLowerCase()}` }, entry.status),
          " ", el("code", { class: "request-id" }, entry.request_id)),
        el("div", { class: "muted small" }, `${new Date(entry.created_at).toLocaleString()} · ${urls.length} keyframes`
          + (sketches ? ` · ${sketches} sketches` : "")
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
  setFormValues(entry.input);
  setKeyframes(entry.input.keyframe_image_urls || []);
  setSketches(entry.input.sketch_image_urls);
}
