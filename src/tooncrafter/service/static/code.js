// The Code tab: the request the form describes, as @fal-ai/client, fal_client and curl code against this server.
import { BASE } from "./api.js";
import { collectInput } from "./form.js";
import { $, state } from "./state.js";

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

export function snippets() {
  const { input } = collectInput();
  if (!input.keyframe_image_urls.length) input.keyframe_image_urls = ["https://example.com/first.png", "https://example.com/last.png"];
  const origin = BASE;
  const host = origin.replace(/^https?:\/\//, "");
  const endpoint = state.config.endpoint_id;
  const json = JSON.stringify(input, null, 2);
  const js = [
    'import { createFalClient } from "@fal-ai/client";',
    "",
    `const server = ${JSON.stringify(origin)};`,
    "const fal = createFalClient({",
    `  credentials: process.env.FAL_KEY,${state.config.auth_required ? "" : " // this server needs no key"}`,
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
    `#   export FAL_KEY=${state.config.auth_required ? "your-key" : "anything   # this server needs no key, but fal_client wants one"}`,
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
  const auth = state.config.auth_required ? ' \\\n  -H "Authorization: Key $FAL_KEY"' : "";
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

export function renderCode() {
  if ($("pane-code").hidden) return;
  $("code").textContent = snippets()[state.codeLang];
  for (const b of document.querySelectorAll(".code-tabs [role=tab]")) b.setAttribute("aria-selected", String(b.dataset.lang === state.codeLang));
}
