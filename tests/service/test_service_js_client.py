"""The official JS client `@fal-ai/client` (tests/js, pinned in package.json) against a real server.

Needs node and `npm install` in tests/js (done once by the fixture when node_modules is missing and
npm can reach its registry); skipped when node is absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from helpers.service import (
    JS_DIR,
    FakeGenerator,
    cancel_requested,
    fake_factory,
    js_client_dir,
    make_settings,
    png_bytes,
    running_server,
    two_keyframes,
    wait_until,
)

from tooncrafter.service.app import create_app


@pytest.fixture(scope="module")
def node() -> str:
    js_client_dir()
    return shutil.which("node")


def run_js(node: str, scenario: str, server, data: dict, tmp_path: Path, *, key: str | None = None) -> dict:
    input_path = tmp_path / f"{scenario}.json"
    input_path.write_text(json.dumps(data))
    env = {**os.environ, "TOONCRAFTER_URL": server.base_url}
    env.pop("FAL_KEY", None)
    if key:
        env["FAL_KEY"] = key
    proc = subprocess.run(
        [node, "client.mjs", scenario, str(input_path)], cwd=JS_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"stdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT ") :])
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("mode", ["polling", "streaming"])
def test_subscribe_with_logs(node, tmp_path, mode):
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    with running_server(app) as server:
        out = run_js(node, "subscribe", server, {"keyframes": two_keyframes(), "mode": mode}, tmp_path)
    assert out["data"]["seed"] == 11 and out["data"]["video"]["file_size"] > 0
    assert out["requestId"]  # from x-fal-request-id
    assert out["updates"][-1] == "COMPLETED"
    steps = [m for m in out["logs"] if m.startswith("step ")]
    assert steps == [f"step {i}/5" for i in range(1, 6)]  # each line once: SSE sends deltas


def test_submit_webhook_stream_status_result(node, tmp_path):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook_server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    try:
        with running_server(app) as server:
            data = {"keyframes": two_keyframes(), "hook_url": f"http://127.0.0.1:{hook_server.server_port}/hook"}
            out = run_js(node, "submit", server, data, tmp_path)
            wait_until(lambda: received)
    finally:
        hook_server.shutdown()
    assert out["done"]["status"] == "COMPLETED"
    assert out["events"][-1]["status"] == "COMPLETED"
    streamed = [log["message"] for event in out["events"] for log in (event.get("logs") or [])]
    assert streamed.count("step 3/3") == 1
    assert "step 3/3" in out["statusLogs"]
    assert out["resultRequestId"] == out["requestId"]
    assert received[0]["request_id"] == out["requestId"] and received[0]["payload"] == out["data"]


def test_cancel_and_early_result(node, tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(gen))
    with running_server(app) as server:
        gen.release = cancel_requested(server.store)
        out = run_js(node, "cancel", server, {"keyframes": two_keyframes()}, tmp_path)
    assert out["queuePosition"] == 0
    assert out["early"]["isApiError"] and out["early"]["status"] == 400
    assert out["queuedFinal"]["error_type"] == "request_cancelled"
    assert out["runningFinal"]["error_type"] == "request_cancelled"
    assert out["result"]["status"] == 400


def test_run_validation_and_unknown(node, tmp_path):
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    bad = {
        "steps": {"keyframe_image_urls": two_keyframes(), "steps": 101},
        "eta": {"keyframe_image_urls": two_keyframes(), "eta": 2},
        "urls": {"keyframe_image_urls": ["ftp://x/y.png", "ftp://x/z.png"]},
    }
    with running_server(app) as server:
        out = run_js(node, "run", server, {"keyframes": two_keyframes(), "bad": bad}, tmp_path)
    assert out["run"]["data"]["seed"] == 5 and out["run"]["requestId"]
    for name, loc in {"steps": ["body", "steps"], "eta": ["body", "eta"], "urls": ["body", "keyframe_image_urls", 0]}.items():
        err = out[name]
        assert err["isValidationError"] and err["status"] == 422, err
        assert err["fieldErrors"][0]["loc"] == loc
    assert out["unknown"]["status"] == 404


def test_storage_upload_then_generate(node, tmp_path):
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    with running_server(app) as server:
        out = run_js(node, "upload", server, {"png_base64": base64.b64encode(png_bytes()).decode()}, tmp_path)
    assert all(url.startswith(server.base_url + "/files/") for url in out["urls"])
    assert out["data"]["video"]["file_size"] > 0
