"""The official Python `fal_client` against a real server (uvicorn, https with a trustme CA, loopback).

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST at import time, so each scenario runs in a fresh
interpreter (`run_python_client`) and prints one JSON line that the test checks.
"""

from __future__ import annotations

import json
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("fal_client")
pytest.importorskip("trustme")

from helpers.service import (  # noqa: E402
    FakeGenerator,
    cancel_requested,
    fake_factory,
    make_settings,
    make_tls,
    run_python_client,
    running_server,
    wait_until,
)

from tooncrafter.service.app import create_app  # noqa: E402

PRELUDE = textwrap.dedent(
    """
    import json, sys, time, base64, io
    import fal_client, httpx
    from PIL import Image
    APP = "fal-ai/toon-crafter"
    def keyframes():
        out = []
        for color in ((200, 30, 30), (30, 30, 200)):
            img = Image.new("RGB", (40, 24), color)
            out.append(fal_client.encode_image(img, format="png"))
        return out
    def emit(obj):
        print("RESULT " + json.dumps(obj))
    """
)


def _result(proc) -> dict:
    assert proc.returncode == 0, f"client failed:\nstdout:{proc.stdout}\nstderr:{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture
def tls(tmp_path):
    return make_tls(tmp_path)


def test_subscribe_with_logs_and_result(tmp_path, tls):
    # steps slow enough (6 x 80 ms) that the client's 100 ms polls see IN_PROGRESS
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(FakeGenerator(step_sleep_s=0.08)))
    with running_server(app, tls=tls) as server:
        script = PRELUDE + textwrap.dedent(
            """
            updates, logs = [], []
            def on_update(update):
                updates.append(type(update).__name__)
                if getattr(update, "logs", None):  # polling returns the whole log so far
                    logs[:] = [l["message"] for l in update.logs]
            result = fal_client.subscribe(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 6, "seed": 7},
                                          with_logs=True, on_queue_update=on_update)
            video = httpx.get(result["video"]["url"])
            emit({"result": result, "updates": updates, "logs": logs, "video_status": video.status_code,
                  "video_head": base64.b64encode(video.content[:12]).decode(), "video_len": len(video.content)})
            """
        )
        out = _result(run_python_client(script, server))
    assert out["result"]["seed"] == 7
    assert out["result"]["video"]["content_type"] == "video/mp4"
    assert out["result"]["video"]["url"].startswith(server.base_url + "/files/")
    assert "InProgress" in out["updates"]
    assert "step 6/6" in out["logs"]
    assert out["video_status"] == 200 and out["video_len"] == out["result"]["video"]["file_size"]
    import base64

    assert base64.b64decode(out["video_head"])[4:8] == b"ftyp"


def test_submit_status_result_and_webhook(tmp_path, tls):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    hook_server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{hook_server.server_port}/hook"
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    try:
        with running_server(app, tls=tls) as server:
            script = PRELUDE + textwrap.dedent(
                f"""
                handle = fal_client.submit(APP, arguments={{"keyframe_image_urls": keyframes(), "steps": 3}},
                                           webhook_url={hook_url!r})
                while not isinstance(handle.status(), fal_client.Completed):
                    time.sleep(0.05)
                status = handle.status(with_logs=True)
                again = fal_client.status(APP, handle.request_id, with_logs=False)
                result = fal_client.result(APP, handle.request_id)
                emit({{"id": handle.request_id, "logs": [l["message"] for l in status.logs],
                      "metrics": status.metrics, "again_logs": again.logs, "result": result, "get": handle.get()}})
                """
            )
            out = _result(run_python_client(script, server))
            wait_until(lambda: received)
    finally:
        hook_server.shutdown()
    assert "step 3/3" in out["logs"]
    assert out["again_logs"] is None
    assert out["metrics"]["inference_time"] > 0
    assert out["result"] == out["get"]
    hook = received[0]
    assert hook["request_id"] == out["id"] and hook["status"] == "OK" and hook["error"] is None
    assert hook["payload"] == out["result"]


def test_cancel_queued_and_running(tmp_path, tls):
    gen = FakeGenerator(gate=threading.Event())  # never set: the first job's held step ends on its cancel
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(gen))
    with running_server(app, tls=tls) as server:
        gen.release = cancel_requested(server.store)
        script = PRELUDE + textwrap.dedent(
            """
            running = fal_client.submit(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 3})
            while not isinstance(running.status(), fal_client.InProgress):
                time.sleep(0.05)
            queued = fal_client.submit(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 3})
            position = queued.status().position
            queued.cancel()
            queued_status = queued.status()
            running.cancel()
            while not isinstance(running.status(), fal_client.Completed):
                time.sleep(0.05)
            out = {"position": position, "queued_error": queued_status.error, "running_error": running.status().error}
            try:
                running.get()
            except fal_client.client.FalClientHTTPError as exc:
                out["get_code"] = exc.status_code
                out["get_error_type"] = exc.error_type
            try:
                queued.cancel()
            except fal_client.client.FalClientHTTPError as exc:
                out["cancel_again_code"] = exc.status_code
            emit(out)
            """
        )
        out = _result(run_python_client(script, server))
    assert out["position"] == 0
    assert out["queued_error"] and out["running_error"]
    assert out["get_code"] == 400 and out["get_error_type"] == "request_cancelled"
    assert out["cancel_again_code"] == 400


def test_run_sync_and_validation_errors(tmp_path, tls):
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    with running_server(app, tls=tls) as server:
        script = PRELUDE + textwrap.dedent(
            """
            out = {"run": fal_client.run(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 2, "seed": 3})}
            for name, args in {"submit": {"keyframe_image_urls": keyframes(), "steps": 0},
                               "missing": {"prompt": "x"}}.items():
                try:
                    fal_client.submit(APP, arguments=args)
                except fal_client.client.FalClientHTTPError as exc:
                    out[name] = [exc.status_code, exc.message]
            try:
                fal_client.run(APP, arguments={"keyframe_image_urls": keyframes(), "cfg_scale": 0.5})
            except fal_client.client.FalClientHTTPError as exc:
                out["run_422"] = [exc.status_code, exc.message]
            try:
                fal_client.status(APP, "00000000-0000-0000-0000-000000000000")
            except fal_client.client.FalClientHTTPError as exc:
                out["unknown"] = exc.status_code
            emit(out)
            """
        )
        out = _result(run_python_client(script, server))
    assert out["run"]["seed"] == 3 and out["run"]["video"]["file_size"] > 0
    assert out["submit"][0] == 422 and out["submit"][1][0]["loc"] == ["body", "steps"]
    assert out["missing"][0] == 422 and out["missing"][1][0]["loc"] == ["body", "keyframe_image_urls"]
    assert out["run_422"][0] == 422 and out["run_422"][1][0]["loc"] == ["body", "cfg_scale"]
    assert out["unknown"] == 404


def test_auth_isolation_with_python_client(tmp_path, tls):
    settings = make_settings(tmp_path, api_keys=["alice", "bob-id:bob-secret"])
    app = create_app(settings, generator_factory=fake_factory())
    with running_server(app, tls=tls) as server:
        submit = PRELUDE + 'emit({"id": fal_client.submit(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 1}).request_id})'
        request_id = _result(run_python_client(submit, server, key="alice"))["id"]
        wait_until(lambda: server.store.get(request_id).status == "COMPLETED")
        probe = PRELUDE + textwrap.dedent(
            f"""
            out = {{}}
            try:
                out["status"] = type(fal_client.status(APP, {request_id!r})).__name__
            except fal_client.client.FalClientHTTPError as exc:
                out["status"] = exc.status_code
            try:
                fal_client.result(APP, {request_id!r})
                out["result"] = 200
            except fal_client.client.FalClientHTTPError as exc:
                out["result"] = exc.status_code
            emit(out)
            """
        )
        assert _result(run_python_client(probe, server, key="alice")) == {"status": "Completed", "result": 200}
        assert _result(run_python_client(probe, server, key="bob-id:bob-secret")) == {"status": 404, "result": 404}
        assert _result(run_python_client(probe, server, key="mallory")) == {"status": 401, "result": 401}


def test_stream_gives_progress_then_the_output(tmp_path, tls):
    """`fal_client.stream` (the sync SSE run): status events with step logs, then the output last."""
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(FakeGenerator(step_sleep_s=0.02)))
    with running_server(app, tls=tls) as server:
        script = PRELUDE + textwrap.dedent(
            """
            events = list(fal_client.stream(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 4, "seed": 3}))
            try:  # a bad field is a plain 422 before any event (fal_client then fails parsing it as SSE)
                list(fal_client.stream(APP, arguments={"keyframe_image_urls": keyframes(), "steps": 0}))
                raised = None
            except Exception as exc:
                raised = type(exc).__name__
            import os
            reply = httpx.post(f"https://{os.environ['FAL_RUN_HOST']}/{APP}/stream", headers={"Authorization": "Key test-key"},
                               json={"keyframe_image_urls": keyframes(), "steps": 0})
            emit({"events": events, "raised": raised, "bad": {"status": reply.status_code, "body": reply.json()}})
            """
        )
        out = _result(run_python_client(script, server))
    events = out["events"]
    progress, final = events[:-1], events[-1]
    assert final["seed"] == 3 and final["video"]["content_type"] == "video/mp4"
    messages = [log["message"] for event in progress for log in (event.get("logs") or [])]
    assert [m for m in messages if m.startswith("step ")] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert progress[-1]["status"] == "COMPLETED"
    assert out["raised"] is not None
    assert out["bad"]["status"] == 422 and out["bad"]["body"]["detail"][0]["loc"][-1] == "steps"
