"""fal's wire contract, checked with plain HTTP (TestClient: app + lifespan in-process, fake generator)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from helpers.service import (
    FakeGenerator,
    cancel_requested,
    fake_factory,
    make_settings,
    png_data_uri,
    runtime_of,
    two_keyframes,
    wait_until,
)

from tooncrafter.service.app import create_app

Q = "/queue/fal-ai/toon-crafter"


def _client(tmp_path, gen: FakeGenerator | None = None, **overrides) -> TestClient:
    return TestClient(create_app(make_settings(tmp_path, **overrides), generator_factory=fake_factory(gen)))


def _submit(client: TestClient, **fields) -> str:
    body = {"keyframe_image_urls": two_keyframes(), "steps": 2, **fields}
    response = client.post(Q, json=body)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _wait_completed(client: TestClient, request_id: str, headers=None) -> dict:
    def done():
        r = client.get(f"{Q}/requests/{request_id}/status", headers=headers)
        return r.json() if r.json()["status"] == "COMPLETED" else None

    return wait_until(done)


def test_submit_response_and_status_codes(tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    with _client(tmp_path, gen) as client:
        response = client.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 2})
        body = response.json()
        rid = body["request_id"]
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-fal-request-id"] == rid
        assert body["status"] == "IN_QUEUE" and body["queue_position"] == 0
        base = f"http://testserver{Q}/requests/{rid}"
        assert (body["response_url"], body["status_url"], body["cancel_url"]) == (base, base + "/status", base + "/cancel")

        assert gen.started.wait(10)
        second = _submit(client)
        third = _submit(client)
        status = client.get(f"{Q}/requests/{third}/status")
        assert status.status_code == 202 and status.json()["queue_position"] == 1
        assert status.json()["logs"] is None
        running = client.get(f"{Q}/requests/{rid}/status", params={"logs": "1"})
        assert running.status_code == 202 and running.json()["status"] == "IN_PROGRESS"
        assert isinstance(running.json()["logs"], list)
        assert client.get(f"{Q}/requests/{rid}/status", params={"logs": "false"}).json()["logs"] is None

        early = client.get(f"{Q}/requests/{rid}")
        assert early.status_code == 400 and "progress" in early.json()["detail"]
        assert client.get(f"{Q}/requests/{second}").status_code == 400

        gen.gate.set()
        for request_id in (rid, second, third):
            done = _wait_completed(client, request_id)
            assert done["metrics"]["inference_time"] > 0 and "error" not in done
        final = client.get(f"{Q}/requests/{rid}/status/")  # the fal SDK's trailing slash
        assert final.status_code == 200 and final.json()["status"] == "COMPLETED"
        result = client.get(f"{Q}/requests/{rid}/")
        assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
        assert result.json()["video"]["content_type"] == "video/mp4"


def test_logs_have_fal_fields_and_iso_timestamps(tmp_path):
    with _client(tmp_path) as client:
        rid = _submit(client, steps=4)
        _wait_completed(client, rid)
        logs = client.get(f"{Q}/requests/{rid}/status", params={"logs": "true"}).json()["logs"]
    steps = [log for log in logs if log["message"].startswith("step ")]
    assert [log["message"] for log in steps] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    for log in logs:
        assert set(log) == {"message", "level", "source", "timestamp"} and log["source"] == "USER"
        assert log["timestamp"].endswith("Z") and "T" in log["timestamp"]


@pytest.mark.parametrize(
    "field,value,loc",
    [
        ("keyframe_image_urls", ["only-one"], ["body", "keyframe_image_urls"]),
        ("keyframe_image_urls", ["data:image/png;base64,AAAA"] * 17, ["body", "keyframe_image_urls"]),
        ("keyframe_image_urls", ["", "x"], ["body", "keyframe_image_urls"]),
        ("keyframe_image_urls", ["file:///etc/passwd", "http://a/b.png"], ["body", "keyframe_image_urls", 0]),
        ("keyframe_image_urls", ["http://a/b.png", "data:image/png;base64,@@@"], ["body", "keyframe_image_urls", 1]),
        ("steps", 0, ["body", "steps"]),
        ("steps", 101, ["body", "steps"]),
        ("cfg_scale", 0.5, ["body", "cfg_scale"]),
        ("eta", 1.5, ["body", "eta"]),
        ("motion_steps", 0, ["body", "motion_steps"]),
        ("fps", 61, ["body", "fps"]),
        ("seed", -1, ["body", "seed"]),
        ("seed", 2**32, ["body", "seed"]),
        ("keyframe_lengths", [8, 7], ["body"]),
        ("keyframe_lengths", [16], ["body"]),
        ("prompt", "x" * 2001, ["body", "prompt"]),
    ],
)
def test_422_names_the_field(tmp_path, field, value, loc):
    with _client(tmp_path) as client:
        body = {"keyframe_image_urls": two_keyframes(), field: value}
        for path in (Q, "/fal-ai/toon-crafter"):
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            assert response.headers["content-type"] == "application/json"
            detail = response.json()["detail"]
            assert detail[0]["loc"][: len(loc)] == loc
            assert field in json.dumps(detail) or field in response.json()["message"]
        assert runtime_of(client).store.claim("nobody", 1) is None  # nothing was queued


def test_missing_body_and_bad_webhook_are_422(tmp_path):
    with _client(tmp_path) as client:
        assert client.post(Q).status_code == 422
        bad = client.post(Q, params={"fal_webhook": "ftp://x"}, json={"keyframe_image_urls": two_keyframes()})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


def test_unknown_ids_endpoints_and_paths_are_404(tmp_path):
    with _client(tmp_path) as client:
        unknown = "00000000-0000-0000-0000-000000000000"
        for method, path in [
            ("GET", f"{Q}/requests/{unknown}/status"),
            ("GET", f"{Q}/requests/{unknown}/status/stream"),
            ("GET", f"{Q}/requests/{unknown}"),
            ("PUT", f"{Q}/requests/{unknown}/cancel"),
            ("POST", "/queue/fal-ai/flux"),
            ("POST", f"{Q}/not-a-path"),
            ("POST", "/fal-ai/toon-crafter/not-a-path"),
            ("GET", "/nothing"),
        ]:
            kwargs = {"json": {"keyframe_image_urls": two_keyframes()}} if method == "POST" else {}
            response = client.request(method, path, **kwargs)
            assert response.status_code == 404, (method, path, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-fal-request-id"]
        assert client.put(f"{Q}/requests/{unknown}/cancel").json() == {"status": "NOT_FOUND", "detail": "Request not found"}
        assert client.get(f"{Q}/requests/{unknown}/status").json() == {"detail": "Request not found"}
        assert client.get(f"{Q}/requests/{unknown}").headers["x-fal-request-id"] == unknown


def test_cancel_codes(tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    with _client(tmp_path, gen) as client:
        gen.release = cancel_requested(runtime_of(client).store)
        running = _submit(client)
        assert gen.started.wait(10)
        queued = _submit(client)
        # JS sends Content-Type: application/json with an empty body
        r = client.put(f"{Q}/requests/{queued}/cancel", headers={"Content-Type": "application/json"})
        assert r.status_code == 202 and r.json() == {"status": "CANCELLATION_REQUESTED"}
        assert client.get(f"{Q}/requests/{queued}/status").json()["error_type"] == "request_cancelled"
        r = client.put(f"{Q}/requests/{queued}/cancel/")
        assert r.status_code == 400 and r.json()["status"] == "ALREADY_COMPLETED"
        assert client.put(f"{Q}/requests/{running}/cancel").status_code == 202
        done = _wait_completed(client, running)
        assert done["error_type"] == "request_cancelled"
        result = client.get(f"{Q}/requests/{running}")
        assert result.status_code == 400 and result.headers["x-fal-error-type"] == "request_cancelled"
        assert all(code not in (409, 429) and code < 500 for code in (r.status_code, result.status_code))


def test_bad_keyframe_is_a_replayed_422(tmp_path):
    with _client(tmp_path) as client:
        rid = _submit(client, keyframe_image_urls=[png_data_uri(), "data:image/png;base64,aGVsbG8="])
        status = _wait_completed(client, rid)
        assert status["error"]
        result = client.get(f"{Q}/requests/{rid}")
        assert result.status_code == 422
        assert result.json()["detail"][0]["loc"] == ["body", "keyframe_image_urls", 1]


def test_generator_crash_is_a_500_result_and_the_worker_survives(tmp_path):
    class Boom(FakeGenerator):
        def __call__(self, request, **kwargs):
            if request.prompt == "boom":
                raise RuntimeError("kaput")
            return super().__call__(request, **kwargs)

    with _client(tmp_path, Boom()) as client:
        bad = _submit(client, prompt="boom")
        good = _submit(client)
        assert _wait_completed(client, bad)["error"] == "Internal Server Error"
        result = client.get(f"{Q}/requests/{bad}")
        assert result.status_code == 500 and result.headers["x-fal-request-id"] == bad
        assert "error" not in _wait_completed(client, good)


def test_sse_stream_sends_deltas_and_closes_after_completed(tmp_path):
    with _client(tmp_path, FakeGenerator(step_sleep_s=0.03)) as client:
        rid = _submit(client, steps=5)
        events = []
        with client.stream("GET", f"{Q}/requests/{rid}/status/stream", params={"logs": "1"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-fal-request-id"] == rid
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "COMPLETED"
        messages = [log["message"] for e in events for log in e["logs"]]
        assert [m for m in messages if m.startswith("step")] == [f"step {i}/5" for i in range(1, 6)]
        # an already completed request: one event, then the stream ends
        with client.stream("GET", f"{Q}/requests/{rid}/status/stream/") as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert len(lines) == 1 and json.loads(lines[0][6:])["logs"] is None


def test_sse_keepalive_is_a_comment(tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    with _client(tmp_path, gen, sse_keepalive_s=0.1) as client:
        rid = _submit(client)
        assert gen.started.wait(10)
        seen = []
        with client.stream("GET", f"{Q}/requests/{rid}/status/stream") as response:
            for line in response.iter_lines():
                seen.append(line)
                if line.startswith(":"):
                    gen.gate.set()
        assert ": ping" in seen
        assert json.loads([s for s in seen if s.startswith("data: ")][-1][6:])["status"] == "COMPLETED"


def test_queue_host_header_routes_to_queue(tmp_path):
    with _client(tmp_path, allowed_hosts=["*.example.test"]) as client:
        response = client.post(
            "/fal-ai/toon-crafter",
            json={"keyframe_image_urls": two_keyframes(), "steps": 1},
            headers={"Host": "queue.example.test"},
        )
        assert response.status_code == 200
        body = response.json()
        assert body["status_url"] == f"http://queue.example.test/fal-ai/toon-crafter/requests/{body['request_id']}/status"
        status = client.get(body["status_url"].replace("http://queue.example.test", ""), headers={"Host": "queue.example.test"})
        assert status.json()["request_id"] == body["request_id"]


def test_public_url_is_used_for_returned_urls(tmp_path):
    with _client(tmp_path, public_url="https://api.example.test/") as client:
        response = client.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 1})
        rid = response.json()["request_id"]
        assert response.json()["status_url"] == f"https://api.example.test/queue/fal-ai/toon-crafter/requests/{rid}/status"
        _wait_completed(client, rid)
        assert client.get(f"{Q}/requests/{rid}").json()["video"]["url"].startswith("https://api.example.test/files/")


def test_cors_preflight_and_exposed_request_id(tmp_path):
    with _client(tmp_path) as client:
        preflight = client.options(
            Q,
            headers={
                "Origin": "https://app.example.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-fal-queue-priority",
            },
        )
        assert preflight.status_code == 200
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "x-fal-queue-priority" in preflight.headers["access-control-allow-headers"].lower()
        response = client.post(
            Q, json={"keyframe_image_urls": two_keyframes()}, headers={"Origin": "https://app.example.test"}
        )
        assert "x-fal-request-id" in response.headers["access-control-expose-headers"].lower()


def test_start_timeout_expires_queued_request(tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    with _client(tmp_path, gen) as client:
        _submit(client)
        assert gen.started.wait(10)
        response = client.post(
            Q, json={"keyframe_image_urls": two_keyframes()}, headers={"X-Fal-Request-Timeout": "0.2"}
        )
        rid = response.json()["request_id"]
        time.sleep(0.3)
        gen.gate.set()
        status = _wait_completed(client, rid)
        assert status["error_type"] == "request_timeout"
        assert client.get(f"{Q}/requests/{rid}").status_code == 504
