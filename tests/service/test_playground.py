"""The playground page (`GET /`): its routes, and the page itself driven in headless Chromium.

The browser tests run tests/service/browser/playground.mjs (playwright-core, pinned in package.json) with
Debian's `/usr/bin/chromium` against a real uvicorn server on loopback: uploads through the storage
flow, a run on the tiny checkpoint whose video must play, cancel, field errors, API keys, history
across reloads, and /docs showing the endpoint's example. Screenshots go to test-artifacts/playground.
Skipped without node or chromium, except in CI (env CI set), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers.service import (
    ENDPOINT,
    JS_DIR,
    TINY_CHECKPOINT,
    needs_tiny_checkpoint,
    FakeGenerator,
    fake_factory,
    make_settings,
    npm_project_dir,
    png_bytes,
    running_server,
    tiny_pipeline_factory,
    unavailable,
    wait_until,
)

from tooncrafter.schema import contract_defaults
from tooncrafter.service.app import create_app
from tooncrafter.service.runtime import served_num_frames

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "playground"
EXAMPLE_PROMPT = "A army general swings his arm"


# --- routes (no browser) ----------------------------------------------------------------------


def test_page_and_assets_are_served(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for field in ("prompt", "steps", "cfg_scale", "eta", "motion_steps", "fps", "seed", "keyframe_lengths", "keep_all_frames",
                      "loop", "frame_multiplier", "sketch_scale"):
            assert f'<label for="{field}"' in page.text, field
        assert "lower = more motion" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = client.get("/playground/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        # app.js is an ES module: every module it (or they) import is served from the same fixed list
        imported = set(re.findall(r'from "\./([\w-]+\.js)"', script.text))
        for name in sorted(imported):
            module = client.get(f"/playground/{name}")
            assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript"), name
            imported |= set(re.findall(r'from "\./([\w-]+\.js)"', module.text))
        assert {"sketches.js", "form.js", "run.js"} <= imported
        assert all(client.get(f"/playground/{name}").status_code == 200 for name in imported)
        assert client.get("/playground/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/playground/index.html").status_code == 404
        assert client.get("/playground/..%2Fapp.py").status_code != 200  # no directory walking


@needs_tiny_checkpoint
def test_config_tells_whether_a_key_is_needed(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
        assert client.get("/playground/config").json() == {
            "auth_required": False, "num_frames": 16, "endpoint_id": ENDPOINT, "max_keyframes": 16,
            "defaults": contract_defaults(),  # the form starts from the schema's defaults, written once there
        }
    settings = make_settings(tmp_path, api_keys=["k1"], checkpoint=str(TINY_CHECKPOINT), endpoint_id="me/toons")
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        body = client.get("/playground/config").json()  # public: the page asks before it has a key
    assert body["auth_required"] is True and body["endpoint_id"] == "me/toons"
    assert body["num_frames"] == served_num_frames(str(TINY_CHECKPOINT))


def test_openapi_submit_route_carries_the_example(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
        spec = client.get("/openapi.json").json()
    body = spec["paths"]["/queue/{owner}/{alias}"]["post"]["requestBody"]["content"]["application/json"]
    schema = spec["components"]["schemas"][body["schema"]["$ref"].rsplit("/", 1)[-1]]
    (example,) = schema["examples"]
    assert example["prompt"] == EXAMPLE_PROMPT and len(example["keyframe_image_urls"]) == 3
    assert "/" not in spec["paths"] and "/playground/config" not in spec["paths"]  # the page is not the API


# --- the page in Chromium ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_dir() -> Path:
    """tests/service/browser with playwright-core installed, and a system Chromium."""
    if not CHROMIUM.is_file():
        unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    directory = npm_project_dir(BROWSER_DIR, "playwright-core")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def pngs(tmp_path) -> dict[str, str]:
    files = {}
    for name, color in (("red", (220, 40, 40)), ("blue", (40, 60, 220)), ("green", (40, 180, 80))):
        path = tmp_path / f"{name}.png"
        path.write_bytes(png_bytes(color, size=(96, 64)))
        files[name] = str(path)
    return files


def run_browser(browser_dir: Path, scenario: str, server, data: dict, tmp_path: Path) -> dict:
    input_path = tmp_path / f"{scenario}-input.json"
    input_path.write_text(json.dumps(data))
    env = {**os.environ, "CHROMIUM_PATH": str(CHROMIUM)}
    proc = subprocess.run(
        ["node", "playground.mjs", scenario, server.base_url, str(ARTIFACTS), str(input_path)],
        cwd=browser_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"stdout:{proc.stdout[-3000:]}\nstderr:{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["ok"] and proc.returncode == 0, out
    return out


def page_errors(out: dict) -> list[str]:
    """What the page logged as errors, and every HTTP error it met (the browser logs those too)."""
    return out["consoleErrors"]


@needs_tiny_checkpoint
def test_generate_with_the_tiny_model(browser_dir, tmp_path, pngs):
    app = create_app(make_settings(tmp_path, checkpoint=str(TINY_CHECKPOINT)), generator_factory=tiny_pipeline_factory)
    with running_server(app) as server:
        out = run_browser(browser_dir, "generate", server, {**pngs, "steps": 4}, tmp_path)
        (entry,) = out["history"]
        job = server.store.get(entry["request_id"], with_input=True)

    assert page_errors(out) == []
    # keyframes: file picker + drop, thumbnails, move down, remove, drag back
    assert out["afterAdd"] == ["red.png", "blue.png", "green.png"] and all(out["thumbs"])
    assert out["afterMove"] == ["blue.png", "red.png", "green.png"]
    assert out["afterRemove"] == ["blue.png", "red.png"]
    assert out["afterDrag"] == ["red.png", "blue.png"]
    # the request went through the storage flow: the keyframes are this server's file URLs, in order
    urls = job.input["keyframe_image_urls"]
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["red.png", "blue.png"]
    assert all(u.startswith(f"{server.base_url}/files/") for u in urls)
    assert job.input["steps"] == 4 and job.input["prompt"] == "a test"
    # progress advanced step by step, logs streamed, the video plays
    values = [value for value, maximum in out["seen"]["progress"] if maximum == 4]
    assert values == sorted(values) and len(set(values)) >= 2 and values[-1] == 4, out["seen"]
    assert all(f"step {i}/4" in out["logs"] for i in range(1, 5))
    assert out["video"]["duration"] > 0 and out["video"]["width"] > 0
    assert out["download"] == out["video"]["src"] and out["seed"] == str(json.loads(job.result_json)["seed"])
    assert out["seedField"] == out["seed"]
    # code tab: the same request, configured for this server
    assert f'const server = "{server.base_url}"' in out["code"]["js"] and "requestMiddleware" in out["code"]["js"]
    assert urls[0] in out["code"]["js"] and '"steps": 4' in out["code"]["js"]
    assert f"FAL_QUEUE_RUN_HOST={server.host}:{server.port}/queue" in out["code"]["python"]
    assert '"prompt": "a test"' in out["code"]["python"] and "fal_client.subscribe" in out["code"]["python"]
    assert f"SERVER={server.base_url}" in out["code"]["curl"] and f"/queue/{ENDPOINT}" in out["code"]["curl"]
    # history survived the reload
    assert out["items"] == [{"id": entry["request_id"], "status": "COMPLETED", "video": out["video"]["src"]}]
    assert entry["seed"] == int(out["seed"]) and out["reshown"] == out["video"]["src"]


@needs_tiny_checkpoint
def test_loop_multiplier_and_sketches_from_the_page(browser_dir, tmp_path, pngs):
    """The extension controls drive a real run on the tiny checkpoints (the worker's own factory, with the
    sketch encoder from TOONCRAFTER_SKETCH_CHECKPOINT); a sketch frame past the clip is refused at its field."""
    from helpers.sketch import write_tiny_sketch_checkpoint

    from tooncrafter.model.config import load_config
    from tooncrafter.service.worker import default_generator_factory

    config = load_config(TINY_CHECKPOINT / "config.yaml")
    sketch_checkpoint = write_tiny_sketch_checkpoint(tmp_path / "weights" / "sketch_encoder.ckpt", config.unet)
    lines = tmp_path / "lines.png"
    lines.write_bytes(png_bytes((255, 255, 255), size=(96, 64)))
    settings = make_settings(
        tmp_path, checkpoint=str(TINY_CHECKPOINT), device="cpu", dtype="float32", sketch_checkpoint=str(sketch_checkpoint)
    )
    clip = 2 * config.num_frames  # a loop of T frames at multiplier 2
    with running_server(create_app(settings, generator_factory=default_generator_factory)) as server:
        data = {**pngs, "lines": str(lines), "steps": 1, "lastFrame": clip - 1}
        out = run_browser(browser_dir, "extensions", server, data, tmp_path)
        (entry,) = out["history"]
        job = server.store.get(entry["request_id"], with_input=True)
    assert [e for e in page_errors(out) if "422" not in e] == []  # only the refused frame 999
    assert out["framesPlain"] == str(config.num_frames) and out["framesLoop2"] == str(clip)
    assert "past the clip" in out["tooFar"] and "frame 3 already has a sketch" in out["duplicate"]
    assert [s["frame"] for s in out["sketches"]] == ["3", str(clip - 1)] and "lines extracted" in out["sketches"][1]["name"]
    sent = job.input
    assert sent["loop"] is True and sent["frame_multiplier"] == 2 and sent["sketch_scale"] == 0.8
    assert [(s["frame"], s.get("extract_lines", False)) for s in sent["sketch_image_urls"]] == [(3, False), (clip - 1, True)]
    assert all(s["url"].startswith(f"{server.base_url}/files/") for s in sent["sketch_image_urls"])
    assert json.loads(job.result_json)["video"]["url"]
    # progress spans both passes; the code tab and the history carry the sketches
    totals = {maximum for _, maximum in out["seen"]["progress"] if maximum > 1}
    assert totals and max(totals) > 1
    assert '"sketch_image_urls"' in out["code"] and '"frame_multiplier": 2' in out["code"]
    assert "2 sketches" in out["historyText"]


def test_queue_position_and_cancel(browser_dir, tmp_path, pngs):
    generator = FakeGenerator(step_sleep_s=0.2)
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(generator))
    with running_server(app) as server:
        out = run_browser(browser_dir, "cancel", server, pngs, tmp_path)
        jobs = [server.store.get(entry["request_id"]) for entry in out["history"]]
    assert page_errors(out) == []
    assert out["queued"] == "In queue: next up", out["queued"]  # B waited behind the running A
    assert out["status"] == "Cancelled." and out["progressHidden"]
    assert [entry["status"] for entry in out["history"]] == ["CANCELLED", "CANCELLED"]
    assert [job.error_type for job in jobs] == ["request_cancelled", "request_cancelled"]
    assert len(generator.requests) == 1  # B was removed from the queue before it started
    assert any(value >= 2 for value, _ in out["seen"]["progress"])


def test_invalid_inputs_show_at_their_field(browser_dir, tmp_path, pngs):
    generator = FakeGenerator()
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(generator))
    with running_server(app) as server:
        out = run_browser(browser_dir, "invalid", server, pngs, tmp_path)
    assert generator.requests == []
    # the 422s themselves, and Chromium refusing to load the ftp:// thumbnail
    unexpected = [e for e in page_errors(out) if "422" not in e and "ftp://" not in e]
    assert unexpected == [], page_errors(out)
    assert "100" in out["steps"]["error"] and out["steps"]["invalid"] == "true"
    assert out["stepsCleared"] == ""  # editing the field clears its message
    assert "sum to the model's frame count 16" in out["lengths"]
    assert "http(s) URL" in out["keyframe"]["error"] and out["keyframe"]["marked"] == ["2"]
    assert out["history"] == []  # nothing was queued (422 at submit)


def test_api_key_field_when_the_server_needs_keys(browser_dir, tmp_path, pngs):
    app = create_app(make_settings(tmp_path, api_keys=["s3cret"]), generator_factory=fake_factory())
    with running_server(app) as server:
        out = run_browser(browser_dir, "auth", server, {**pngs, "key": "s3cret"}, tmp_path)
        assert out["visible"] and "Missing credentials" in out["noKey"]
        assert [e for e in page_errors(out) if "401" not in e] == []  # only the upload tried without a key
        assert out["keyAfterReload"] == "s3cret"
        assert [e["status"] for e in out["history"]] == ["COMPLETED"]
        # the code tab's snippets run as shown, with the key from the environment
        assert "s3cret" not in out["code"]["curl"] + out["code"]["js"]
        env = {**os.environ, "FAL_KEY": "s3cret"}
        if shutil.which("curl"):
            proc = subprocess.run(["bash", "-c", out["code"]["curl"]], env=env, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout.strip().splitlines()[-1])["video"]["url"].startswith(server.base_url)
        if (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
            script = JS_DIR / f"playground-snippet-{os.getpid()}.mjs"  # beside its node_modules; removed below
            script.write_text(out["code"]["js"])
            try:
                proc = subprocess.run(["node", script.name], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=60)
            finally:
                script.unlink()
            assert proc.returncode == 0, proc.stderr
            assert f"{server.base_url}/files/" in proc.stdout.splitlines()[-1]


def test_banner_when_no_worker_is_alive(browser_dir, tmp_path):
    with running_server(create_app(make_settings(tmp_path), with_worker=False)) as server:
        out = run_browser(browser_dir, "banner", server, {}, tmp_path)
    assert out["hidden"] is False and "No worker is running" in out["text"]
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    with running_server(app) as server:
        wait_until(lambda: server.store.live_workers(60) == 1)
        out = run_browser(browser_dir, "banner", server, {}, tmp_path)
    assert out["hidden"] is True and page_errors(out) == []
    # the form's defaults come from the server's schema
    assert out["steps"] == str(contract_defaults()["steps"]) and f"Default {contract_defaults()['steps']}." in out["stepsHelp"]


def test_docs_page_shows_the_example(browser_dir, tmp_path):
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    with running_server(app) as server:
        out = run_browser(browser_dir, "docs", server, {}, tmp_path)
    assert EXAMPLE_PROMPT in out["example"] and "image-3.png" in out["example"]
    assert out["outside"] == []  # rendered from the installed assets alone, as on a machine without internet
