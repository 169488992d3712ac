// What the page's modules share: the server's config, the form's images, the run on show, and one
// `changed` hook (set by app.js) that re-renders whatever depends on the form.

export const state = {
  // /playground/config overrides these; `defaults` are the endpoint's (the schema, written once there)
  config: { auth_required: false, num_frames: 16, endpoint_id: "fal-ai/toon-crafter", max_keyframes: 16, defaults: {} },
  keyframes: [], // {id, url, thumb, name, state: "uploading" | "ready" | "error", error}
  sketches: [], // {id, frame, url, thumb, name, extract_lines, state, error}
  nextId: 1,
  current: null, // the run shown in the Result pane: {request_id, status_url, response_url, cancel_url, abort}
  codeLang: "js",
  changed: () => {},
};

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
