"""Nothing secret reaches the logs of a running `tooncrafter serve` (issue 13, finding 9): not the
userinfo or query string of a fetched keyframe URL, not a signed query on an access-log line, not an
API key. The real command (its logging configuration, uvicorn's access log, httpx's request lines)
in a subprocess, with a fake generator."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from helpers.service import ENDPOINT, free_port, png_bytes, wait_until

TESTS_DIR = Path(__file__).resolve().parents[1]
SRC_DIR = TESTS_DIR.parent / "src"
SECRETS = ["hunter2", "s3cr3tsig", "t0k3nvalue", "failsig", "accesstoken", "sekrit-key-123"]


def keyframe_server() -> ThreadingHTTPServer:
    """Answers a PNG on any path but /missing.png (a 404)."""
    image = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            found = not self.path.startswith("/missing.png")
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(image)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_serve_logs_no_credentials_query_strings_or_keys(tmp_path) -> None:
    images = keyframe_server()
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), str(TESTS_DIR)]),
        "TOONCRAFTER_TEST_GENERATOR": "helpers.service:fake_generator",
        "TOONCRAFTER_DATA_DIR": str(tmp_path / "data"),
        "TOONCRAFTER_API_KEYS": "sekrit-key-123",
        "TOONCRAFTER_ALLOW_PRIVATE_URLS": "true",
        "TOONCRAFTER_WORKER_POLL_S": "0.05",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tooncrafter.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    images_base = f"127.0.0.1:{images.server_port}"
    try:
        with httpx.Client(base_url=base, headers={"Authorization": "Key sekrit-key-123"}, timeout=30, trust_env=False) as client:
            wait_until(lambda: _answers(client), timeout_s=60)
            urls = [f"http://user:hunter2@{images_base}/a.png?X-Amz-Signature=s3cr3tsig", f"http://{images_base}/b.png?token=t0k3nvalue"]
            ok = client.post(f"/queue/{ENDPOINT}", json={"keyframe_image_urls": urls, "steps": 1}).json()
            failing = client.post(f"/queue/{ENDPOINT}", json={"keyframe_image_urls": [urls[0], f"http://{images_base}/missing.png?sig=failsig"], "steps": 1}).json()
            for job in (ok, failing):
                wait_until(lambda job=job: client.get(job["status_url"].replace(base, "")).status_code == 200, timeout_s=60)
            assert client.get(ok["response_url"].replace(base, "")).status_code == 200
            assert client.get(failing["response_url"].replace(base, "")).status_code == 422
            assert client.get("/files/nothing/x.png?token=accesstoken").status_code == 404
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
            images.shutdown()
            images.server_close()
    assert f"HTTP Request: GET http://***@{images_base}/a.png?***" in output, output[-3000:]  # the fetch was logged
    assert '"GET /files/nothing/x.png?*** HTTP/1.1" 404' in output, output[-3000:]
    leaked = [secret for secret in SECRETS if secret in output]
    assert leaked == [], [line for line in output.splitlines() if any(s in line for s in leaked)]


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False
