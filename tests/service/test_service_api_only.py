"""An API-only process (`tooncrafter serve --no-worker`) never imports torch, even while it takes a job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from helpers.service import two_keyframes

# Runs `tooncrafter serve --no-worker` (the CLI's own code path) in a thread of a fresh interpreter,
# submits a data-URI job with httpx, then reports which heavy modules that process loaded.
SCRIPT = textwrap.dedent(
    """
    import json, socket, sys, threading, time
    import httpx
    from tooncrafter.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threading.Thread(target=main, args=(["serve", "--no-worker", "--port", str(port)],), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/health/live").raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    body = {"keyframe_image_urls": json.loads(sys.argv[1]), "steps": 2}
    submitted = httpx.post(url + "/queue/fal-ai/toon-crafter", json=body)
    status = httpx.get(submitted.json()["status_url"])
    print("RESULT " + json.dumps({
        "submit": submitted.status_code, "status": status.json()["status"],
        "loaded": sorted(name for name in ("torch", "av") if name in sys.modules),
    }))
    """
)


def test_serve_no_worker_never_imports_torch(tmp_path):
    env = {**os.environ, "TOONCRAFTER_DATA_DIR": str(tmp_path / "data")}
    env.pop("TOONCRAFTER_API_KEYS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(two_keyframes())],
        env=env, capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"stdout:{proc.stdout}\nstderr:{proc.stderr[-3000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    assert out == {"submit": 200, "status": "IN_QUEUE", "loaded": []}
