// Drives the official @fal-ai/client against a local tooncrafter server.
// Usage: node client.mjs <scenario> <input.json>; env TOONCRAFTER_URL (http://127.0.0.1:PORT), FAL_KEY.
// Prints one line "RESULT <json>" for the pytest side (tests/test_service_js_client.py) to check.
//
// The client has no host setting: requestMiddleware rewrites fal's hosts to our server
// (https://queue.fal.run/ -> {server}/queue/, https://fal.run/ -> {server}/, https://rest.fal.ai/ -> {server}/).
import { readFileSync } from "node:fs";
import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

const APP = "fal-ai/toon-crafter";
const [scenario, inputPath] = process.argv.slice(2);
const input = JSON.parse(readFileSync(inputPath, "utf8"));
const server = process.env.TOONCRAFTER_URL.replace(/\/$/, "");

function rewrite(url) {
  return url
    .replace(/^https:\/\/queue\.fal\.run\//, `${server}/queue/`)
    .replace(/^https:\/\/fal\.run\//, `${server}/`)
    .replace(/^https:\/\/rest\.fal\.ai\//, `${server}/`);
}

const fal = createFalClient({
  credentials: process.env.FAL_KEY || undefined,
  requestMiddleware: async (request) => ({ ...request, url: rewrite(request.url) }),
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function describeError(error) {
  return {
    name: error?.constructor?.name,
    isApiError: error instanceof ApiError,
    isValidationError: error instanceof ValidationError,
    status: error?.status,
    body: error?.body,
    message: error?.message,
    fieldErrors: error instanceof ValidationError ? error.fieldErrors : undefined,
    requestId: error?.requestId,
  };
}

async function waitFor(requestId, wanted) {
  for (;;) {
    const status = await fal.queue.status(APP, { requestId, logs: false });
    if (status.status === wanted) return status;
    await sleep(50);
  }
}

const scenarios = {
  // subscribe (polling or streaming) with logs and onQueueUpdate
  async subscribe() {
    const updates = [];
    let lastLogs = [];
    const result = await fal.subscribe(APP, {
      input: { keyframe_image_urls: input.keyframes, steps: 5, seed: 11 },
      logs: true,
      mode: input.mode ?? "polling",
      onQueueUpdate: (update) => {
        updates.push(update.status);
        if (Array.isArray(update.logs)) lastLogs = update.logs.map((l) => l.message);
      },
    });
    return { data: result.data, requestId: result.requestId, updates, logs: lastLogs };
  },

  // queue.submit with a webhook, then status (with logs), streamStatus and result
  async submit() {
    const { request_id: requestId } = await fal.queue.submit(APP, {
      input: { keyframe_image_urls: input.keyframes, steps: 3 },
      webhookUrl: input.hook_url,
    });
    const stream = await fal.queue.streamStatus(APP, { requestId, logs: true });
    const events = [];
    stream.on("data", (event) => events.push(event));
    const done = await stream.done();
    const status = await fal.queue.status(APP, { requestId, logs: true });
    const result = await fal.queue.result(APP, { requestId });
    return {
      requestId,
      events,
      done,
      statusLogs: status.logs.map((l) => l.message),
      status,
      data: result.data,
      resultRequestId: result.requestId,
    };
  },

  // cancel while running and while queued; result before completion
  async cancel() {
    const { request_id: running } = await fal.queue.submit(APP, {
      input: { keyframe_image_urls: input.keyframes, steps: 3 },
    });
    await waitFor(running, "IN_PROGRESS");
    const { request_id: queued } = await fal.queue.submit(APP, {
      input: { keyframe_image_urls: input.keyframes, steps: 3 },
    });
    const queuedStatus = await fal.queue.status(APP, { requestId: queued });
    const out = { queuePosition: queuedStatus.queue_position };
    try {
      await fal.queue.result(APP, { requestId: running });
      out.early = "no error";
    } catch (error) {
      out.early = describeError(error);
    }
    await fal.queue.cancel(APP, { requestId: queued });
    await fal.queue.cancel(APP, { requestId: running });
    out.queuedFinal = await waitFor(queued, "COMPLETED");
    out.runningFinal = await waitFor(running, "COMPLETED");
    try {
      await fal.queue.result(APP, { requestId: running });
      out.result = "no error";
    } catch (error) {
      out.result = describeError(error);
    }
    return out;
  },

  // sync run, 422 at submit, unknown id
  async run() {
    const out = {};
    const result = await fal.run(APP, { input: { keyframe_image_urls: input.keyframes, steps: 2, seed: 5 } });
    out.run = { data: result.data, requestId: result.requestId };
    for (const [name, bad] of Object.entries(input.bad)) {
      try {
        await fal.queue.submit(APP, { input: bad });
        out[name] = "no error";
      } catch (error) {
        out[name] = describeError(error);
      }
    }
    try {
      await fal.queue.status(APP, { requestId: "00000000-0000-0000-0000-000000000000" });
      out.unknown = "no error";
    } catch (error) {
      out.unknown = describeError(error);
    }
    return out;
  },

  // storage.upload through the rewritten rest host, then the uploaded URL as a keyframe
  async upload() {
    const bytes = Buffer.from(input.png_base64, "base64");
    const urls = [];
    for (let i = 0; i < 2; i++) {
      urls.push(await fal.storage.upload(new Blob([bytes], { type: "image/png" })));
    }
    const result = await fal.subscribe(APP, { input: { keyframe_image_urls: urls, steps: 2 } });
    return { urls, data: result.data };
  },
};

try {
  const out = await scenarios[scenario]();
  console.log("RESULT " + JSON.stringify(out));
} catch (error) {
  console.log("RESULT " + JSON.stringify({ uncaught: describeError(error), stack: String(error?.stack) }));
  process.exitCode = 1;
}
