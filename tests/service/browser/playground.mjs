// Drives the playground page in headless Chromium (Debian's /usr/bin/chromium, never a downloaded
// browser) against a running tooncrafter server. Run by tests/test_playground.py:
//   node playground.mjs SCENARIO BASE_URL ARTIFACTS_DIR INPUT_JSON
// Prints one line `RESULT {json}` with what it saw; the Python test makes the assertions.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [scenario, base, artifacts, inputPath] = process.argv.slice(2);
const input = inputPath ? JSON.parse(readFileSync(inputPath, "utf8")) : {};
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];
const LONG = 180_000;

async function open(page) {
  await page.goto(`${base}/`);
  await page.waitForSelector("body[data-ready=true]");
}

async function upload(page, files, expected) {
  await page.setInputFiles("#keyframe-files", files);
  await page.waitForFunction((n) => document.querySelectorAll(".keyframe[data-state=ready]").length === n, expected);
}

const names = (page) => page.$$eval(".keyframe .kf-name", (els) => els.map((e) => e.textContent));
const history = (page) => page.evaluate(() => JSON.parse(localStorage.getItem("tooncrafter.playground.history") || "[]"));
const text = (page, sel) => page.textContent(sel);

// Records every value the progress bar takes (and the status texts) from now on.
async function watchProgress(page) {
  await page.evaluate(() => {
    window.__seen = { progress: [], status: [] };
    const bar = document.getElementById("run-progress");
    const status = document.getElementById("run-status");
    new MutationObserver(() => window.__seen.progress.push([bar.value, bar.max])).observe(bar, { attributes: true });
    new MutationObserver(() => window.__seen.status.push(status.dataset.status + ": " + status.textContent))
      .observe(status, { attributes: true, childList: true, characterData: true, subtree: true });
  });
}

async function waitStatus(page, status, timeout = LONG) {
  await page.waitForSelector(`#run-status[data-status=${status}]`, { timeout });
}

// Drop a file on the drop zone the way a desktop drag does (a DataTransfer holding a File).
async function dropFile(page, path, name) {
  const bytes = [...readFileSync(path)];
  await page.evaluate(({ bytes, name }) => {
    const dt = new DataTransfer();
    dt.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
    const zone = document.getElementById("dropzone");
    zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: dt, bubbles: true, cancelable: true }));
    zone.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, { bytes, name });
}

const scenarios = {
  // upload, reorder, remove, generate with the real (tiny) pipeline, play the video, reload
  async generate(page) {
    await open(page);
    await upload(page, [input.red, input.blue], 2);
    await dropFile(page, input.green, "green.png");
    await page.waitForFunction(() => document.querySelectorAll(".keyframe[data-state=ready]").length === 3);
    const afterAdd = await names(page);
    const thumbs = await page.$$eval(".keyframe img", (imgs) => imgs.map((i) => i.complete && i.naturalWidth > 0));
    await page.click("[aria-label='Move keyframe 1 down']");
    const afterMove = await names(page);
    await page.click("[aria-label='Remove keyframe 3']");
    const afterRemove = await names(page);
    await page.locator(".keyframe").nth(1).dragTo(page.locator(".keyframe").nth(0));
    const afterDrag = await names(page);
    await page.fill("#prompt", "a test");
    await page.fill("#steps", String(input.steps));
    await watchProgress(page);
    await page.click("#submit");
    await waitStatus(page, "COMPLETED");
    await page.waitForFunction(() => {
      const v = document.getElementById("result-video");
      return v.readyState >= 1 && v.duration > 0;
    }, null, { timeout: 30_000 });
    const video = await page.$eval("#result-video", (v) => ({ src: v.src, duration: v.duration, width: v.videoWidth }));
    const seen = await page.evaluate(() => window.__seen);
    const logs = await text(page, "#logs");
    const seed = await text(page, "#result-seed");
    const download = await page.getAttribute("#download", "href");
    await page.click("#reuse-seed");
    const seedField = await page.inputValue("#seed");
    await page.screenshot({ path: join(artifacts, "playground-result.png"), fullPage: true });

    const code = {};
    await page.click("#tab-code");
    for (const lang of ["js", "python", "curl"]) {
      await page.click(`.code-tabs [data-lang=${lang}]`);
      code[lang] = await text(page, "#code");
    }
    await page.screenshot({ path: join(artifacts, "playground-code.png"), fullPage: true });

    await page.reload();
    await page.waitForSelector("body[data-ready=true]");
    await page.click("#tab-history");
    const items = await page.$$eval(".history-item", (els) => els.map((e) => ({
      id: e.dataset.requestId,
      status: e.querySelector(".badge").textContent,
      video: e.querySelector(".video-link")?.href ?? null,
    })));
    await page.screenshot({ path: join(artifacts, "playground-history.png"), fullPage: true });
    await page.click(`.history-item[data-request-id="${items[0].id}"] >> text=Show`);
    await page.waitForFunction(() => document.getElementById("result-video").duration > 0);
    const reshown = await page.$eval("#result-video", (v) => v.src);
    return { afterAdd, thumbs, afterMove, afterRemove, afterDrag, seen, logs, video, seed, seedField, download, code, history: await history(page), items, reshown };
  },

  // a slow request A runs; B waits in the queue and is cancelled there; A is reopened from the
  // history and cancelled while it runs
  async cancel(page) {
    await open(page);
    await upload(page, [input.red, input.blue], 2);
    await watchProgress(page);
    await page.click("#submit");
    await page.waitForFunction(() => document.getElementById("run-progress").value >= 2, null, { timeout: 60_000 });
    await page.click("#submit");
    await page.waitForFunction(() => window.__seen.status.some((s) => s.startsWith("IN_QUEUE")) &&
      document.getElementById("run-status").dataset.status === "IN_QUEUE");
    const queued = await text(page, "#run-status");
    await page.click("#cancel");
    await waitStatus(page, "CANCELLED", 60_000);
    await page.click("#tab-history");
    const running = await page.$$eval(".history-item", (els) => els.map((e) => e.dataset.requestId));
    await page.click(`.history-item[data-request-id="${running[1]}"] >> text=Show`);
    await page.waitForSelector("#run-status[data-status=IN_PROGRESS]");
    await page.waitForFunction(() => document.getElementById("run-progress").value >= 2, null, { timeout: 60_000 });
    await page.click("#cancel");
    await waitStatus(page, "CANCELLED", 60_000);
    await page.screenshot({ path: join(artifacts, "playground-cancelled.png"), fullPage: true });
    return {
      queued,
      seen: await page.evaluate(() => window.__seen),
      status: await text(page, "#run-status"),
      progressHidden: await page.$eval("#run-progress-row", (e) => e.hidden),
      history: await history(page),
    };
  },

  // the extension inputs: loop, frame multiplier, sketch scale, a sketch attached to an output frame (and one
  // whose lines are extracted), a sketch frame past the clip refused at its field, then a run with the real model
  async extensions(page) {
    await open(page);
    await upload(page, [input.red, input.blue], 2);
    const framesPlain = await text(page, "#clip-frames");
    await page.check("#loop");
    await page.selectOption("#frame_multiplier", "2");
    const framesLoop2 = await text(page, "#clip-frames");
    await page.click("#sketch-box summary");
    await page.fill("#sketch_scale", "0.8");
    await page.fill("#steps", String(input.steps));
    await page.fill("#sketch-frame", "999");
    await page.setInputFiles("#sketch-files", [input.lines]);
    await page.waitForSelector(".sketch[data-state=ready]");
    await page.click("#submit");
    await page.waitForSelector("#sketch_image_urls-error:not(:empty)");
    const tooFar = await text(page, "#sketch_image_urls-error");
    await page.click("[aria-label='Remove sketch for frame 999']");
    await page.fill("#sketch-frame", "3");
    await page.setInputFiles("#sketch-files", [input.lines]);
    await page.fill("#sketch-frame", "3");
    await page.setInputFiles("#sketch-files", [input.green]);
    const duplicate = await text(page, "#sketch_image_urls-error");
    await page.fill("#sketch-frame", String(input.lastFrame));
    await page.check("#sketch-extract");
    await page.setInputFiles("#sketch-files", [input.green]);
    await page.waitForFunction(() => document.querySelectorAll(".sketch[data-state=ready]").length === 2);
    const sketches = await page.$$eval(".sketch", (els) => els.map((e) => ({ frame: e.dataset.frame, name: e.querySelector(".kf-name").textContent })));
    await page.screenshot({ path: join(artifacts, "playground-sketches.png"), fullPage: true });
    await watchProgress(page);
    await page.click("#submit");
    await waitStatus(page, "COMPLETED");
    await page.waitForFunction(() => document.getElementById("result-video").duration > 0, null, { timeout: 30_000 });
    await page.click("#tab-code");
    const code = await text(page, "#code");
    await page.click("#tab-history");
    const historyText = await text(page, "#history");
    return {
      framesPlain, framesLoop2, tooFar, duplicate, sketches, code, historyText,
      seen: await page.evaluate(() => window.__seen), history: await history(page),
    };
  },

  // bad inputs: each 422 shows its message at the field it names
  async invalid(page) {
    await open(page);
    await upload(page, [input.red, input.blue], 2);
    const out = {};
    await page.fill("#steps", "500");
    await page.click("#submit");
    await page.waitForSelector("#steps-error:not(:empty)");
    out.steps = { error: await text(page, "#steps-error"), invalid: await page.getAttribute("#steps", "aria-invalid") };
    await page.screenshot({ path: join(artifacts, "playground-invalid.png"), fullPage: true });
    await page.fill("#steps", "5");
    out.stepsCleared = await text(page, "#steps-error");
    await page.fill("#keyframe_lengths", "3,3");
    await page.click("#submit");
    await page.waitForSelector("#keyframe_lengths-error:not(:empty)");
    out.lengths = await text(page, "#keyframe_lengths-error");
    await page.fill("#keyframe_lengths", "");
    await page.fill("#keyframe-url", "ftp://example.com/three.png");
    await page.click("#add-url");
    await page.click("#submit");
    await page.waitForSelector("#keyframe-2-error:not(:empty)");
    out.keyframe = {
      error: await text(page, "#keyframe-2-error"),
      marked: await page.$$eval(".keyframe.invalid", (els) => els.map((e) => e.dataset.index)),
    };
    out.history = await history(page);
    return out;
  },

  // a server with API keys: the key field appears, a missing key is reported there, the key persists
  async auth(page) {
    await open(page);
    const visible = await page.isVisible("#api_key");
    await page.setInputFiles("#keyframe-files", [input.red]);
    await page.waitForSelector(".keyframe[data-state=error]");
    const noKey = await text(page, "#api_key-error");
    await page.click("[aria-label='Remove keyframe 1']");
    await page.fill("#api_key", input.key);
    await page.dispatchEvent("#api_key", "change");
    await upload(page, [input.red, input.blue], 2);
    await page.click("#submit");
    await waitStatus(page, "COMPLETED", 60_000);
    await page.waitForFunction(() => document.getElementById("result-video").duration > 0);
    await page.click("#tab-code");
    const code = {};
    for (const lang of ["js", "curl"]) {
      await page.click(`.code-tabs [data-lang=${lang}]`);
      code[lang] = await text(page, "#code");
    }
    await page.reload();
    await page.waitForSelector("body[data-ready=true]");
    return { visible, noKey, code, keyAfterReload: await page.inputValue("#api_key"), history: await history(page) };
  },

  // The banner that says no worker is running (and that it goes away once one is)
  async banner(page) {
    await open(page);
    const shown = {
      hidden: await page.isHidden("#worker-banner"),
      text: await text(page, "#worker-banner"),
      stepsHelp: await text(page, "#steps-help"),
      steps: await page.inputValue("#steps"),
    };
    await page.screenshot({ path: join(artifacts, "banner.png") });
    return shown;
  },

  // /docs (Swagger UI from the installed package, no CDN) shows the endpoint's example; any request
  // that leaves this server is refused and reported, so a page that needs the internet fails here.
  async docs(page) {
    const outside = [];
    await page.route("**/*", (route) => {
      const url = route.request().url();
      if (url.startsWith(base) || url.startsWith("data:")) return route.continue();
      outside.push(url);
      return route.abort();
    });
    await page.goto(`${base}/docs`);
    const op = page.locator(".opblock-post", { has: page.locator(".opblock-summary-path", { hasText: /^\/queue\/\{owner\}\/\{alias\}$/ }) });
    await op.locator(".opblock-summary").click();
    await op.locator(".body-param__example, .highlight-code").first().waitFor();
    const example = await op.locator(".opblock-section-request-body").innerText();
    await op.screenshot({ path: join(artifacts, "docs-submit.png") });
    return { example, outside };
  },
};

const profile = mkdtempSync(join(tmpdir(), "tooncrafter-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ARGS,
  viewport: { width: 1280, height: 900 },
});
const page = context.pages()[0] ?? (await context.newPage());
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
page.on("pageerror", (e) => consoleErrors.push(String(e)));
page.on("response", (r) => { if (r.status() >= 400) consoleErrors.push(`HTTP ${r.status()} ${r.request().method()} ${r.url()}`); });
page.setDefaultTimeout(30_000);
let result;
let code = 0;
try {
  result = { ok: true, ...(await scenarios[scenario](page)), consoleErrors };
} catch (err) {
  code = 1;
  await page.screenshot({ path: join(artifacts, `${scenario}-failure.png`), fullPage: true }).catch(() => {});
  result = { ok: false, error: String(err && err.stack || err), consoleErrors, status: await page.textContent("#run-status").catch(() => null) };
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log("RESULT " + JSON.stringify(result));
process.exit(code);
