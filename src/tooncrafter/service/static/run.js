// Running a request: POST queue/{endpoint}, then the status SSE stream read with fetch() (EventSource cannot
// send an Authorization header; polling when the stream breaks), then the result; PUT cancel_url to stop.
import { ApiError, BASE, api, authHeaders, sleep } from "./api.js";
import { clearErrors, collectInput, showApiError, showError } from "./form.js";
import { loadHistory, saveHistory, updateHistory } from "./history_store.js";
import { $, state } from "./state.js";
import { selectTab } from "./tabs.js";

export async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (state.keyframes.some((k) => k.state === "uploading")) return showError("keyframe_image_urls", "wait for the uploads to finish");
  if (state.keyframes.some((k) => k.state === "error")) return showError("keyframe_image_urls", "remove the keyframes that failed to upload");
  if (state.sketches.some((s) => s.state === "uploading")) return showError("sketch_image_urls", "wait for the uploads to finish");
  if (state.sketches.some((s) => s.state === "error")) return showError("sketch_image_urls", "remove the sketches that failed to upload");
  const { input, errors } = collectInput();
  for (const [field, message] of Object.entries(errors)) showError(field, message);
  if (Object.keys(errors).length) return;

  $("submit").disabled = true;
  try {
    const queued = await api("POST", `${BASE}/queue/${state.config.endpoint_id}`, input);
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

export function setStatus(status, text) {
  const box = $("run-status");
  box.dataset.status = status;
  box.textContent = text;
}

export function resetResultPane(entry) {
  if (state.current && state.current.abort) state.current.abort.abort();
  state.current = { ...entry, abort: new AbortController() };
  $("result").hidden = true;
  $("result-video").removeAttribute("src");
  $("logs").textContent = "";
  $("run-progress").value = 0;
  $("run-progress").max = 1;
  $("result-request").textContent = `Request ${entry.request_id}`;
  return state.current;
}

// Follow a request live: queue position, then step logs, then the result.
export async function follow(entry, queuePosition) {
  const run = resetResultPane(entry);
  $("run-progress-row").hidden = false;
  $("cancel").disabled = false;
  setStatus("IN_QUEUE", queueText(queuePosition ?? 0));
  let final = null;
  try {
    final = await streamStatus(run);
  } catch {
    if (run.abort.signal.aborted) return;
    final = null; // the stream broke (proxy, network): fall back to polling
  }
  if (!final) final = await pollStatus(run);
  if (!final || run !== state.current) return;
  await finish(run, final);
}

function queueText(position) {
  return position > 0 ? `In queue: position ${position + 1} (${position} ahead)` : "In queue: next up";
}

function onStatus(run, status, { replaceLogs = false } = {}) {
  if (run !== state.current) return;
  if (status.logs) {
    const lines = status.logs.map((l) => l.message);
    const logs = $("logs");
    logs.textContent = replaceLogs ? lines.join("\n") : logs.textContent + (logs.textContent && lines.length ? "\n" : "") + lines.join("\n");
    logs.scrollTop = logs.scrollHeight;
  }
  if (status.status === "IN_QUEUE") {
    setStatus("IN_QUEUE", queueText(status.queue_position ?? 0));
  } else if (status.status === "IN_PROGRESS") {
    // the step count spans every pass of the request (a frame multiplier adds passes)
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
  while (run === state.current && !run.abort.signal.aborted) {
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

export function showOutput(output) {
  $("result").hidden = false;
  $("result-video").src = output.video.url;
  $("download").href = output.video.url;
  $("download").setAttribute("download", output.video.file_name || "tooncrafter.mp4");
  $("result-seed").textContent = String(output.seed);
}

export async function cancel() {
  if (!state.current) return;
  $("cancel").disabled = true;
  setStatus("CANCELLING", "Cancelling…");
  try {
    await api("PUT", state.current.cancel_url);
  } catch (err) {
    if (err.body && err.body.status === "ALREADY_COMPLETED") return; // the stream reports the outcome
    setStatus("ERROR", `Cancel failed: ${err.message}`);
  }
}
