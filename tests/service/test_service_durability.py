"""Restarts, leases, retention, webhooks and auth: what must survive or be refused."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from fastapi.testclient import TestClient
from helpers.service import (
    FakeGenerator,
    fake_factory,
    free_port,
    make_settings,
    runtime_of,
    two_keyframes,
    wait_until,
)

from tooncrafter.service.app import create_app
from tooncrafter.service.auth import credential_from_header
from tooncrafter.service.jobs import JobStore
from tooncrafter.service.webhooks import retry_delay_s
from tooncrafter.settings import Settings

Q = "/queue/fal-ai/toon-crafter"
BODY = {"keyframe_image_urls": two_keyframes(), "steps": 2}


def _status(client, rid, headers=None):
    return client.get(f"{Q}/requests/{rid}/status", headers=headers)


class Receiver:
    """A loopback webhook receiver that fails the first `fail_first` deliveries with HTTP 500."""

    def __init__(self, fail_first: int = 0, port: int | None = None) -> None:
        self.received: list[dict] = []
        self.attempts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.attempts += 1
                if outer.attempts <= fail_first:
                    self.send_response(500)
                else:
                    outer.received.append(body)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", port or 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_queued_jobs_survive_a_restart(tmp_path):
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, with_worker=False)) as api_only:
        ids = [api_only.post(Q, json=BODY).json()["request_id"] for _ in range(3)]
        assert [_status(api_only, rid).json()["queue_position"] for rid in ids] == [0, 1, 2]
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        for rid in ids:
            wait_until(lambda: _status(client, rid).json()["status"] == "COMPLETED")
            assert client.get(f"{Q}/requests/{rid}").status_code == 200
    with TestClient(create_app(settings, with_worker=False)) as again:  # results stay fetchable
        assert again.get(f"{Q}/requests/{ids[0]}").json()["video"]["file_size"] > 0


def test_expired_lease_is_requeued_and_completed(tmp_path):
    settings = make_settings(tmp_path, lease_s=0.2)
    with TestClient(create_app(settings, with_worker=False)) as api_only:
        rid = api_only.post(Q, json=BODY).json()["request_id"]
    store = JobStore(settings.resolved_database_url)
    assert store.claim("crashed-worker", lease_s=0.05).id == rid  # a worker that then dies
    store.close()
    time.sleep(0.1)
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        wait_until(lambda: _status(client, rid).json()["status"] == "COMPLETED")
        job = runtime_of(client).store.get(rid)
        assert job.attempts == 2 and job.result_status_code == 200
        logs = _status(client, rid, None).json()
        messages = [log["message"] for log in client.get(f"{Q}/requests/{rid}/status?logs=1").json()["logs"]]
        assert any("requeued" in m for m in messages) and logs["status"] == "COMPLETED"


def test_a_job_that_keeps_killing_workers_fails(tmp_path):
    settings = make_settings(tmp_path, max_attempts=1)
    store = JobStore(settings.resolved_database_url)
    job = store.submit(endpoint="fal-ai/toon-crafter", owner="", input=BODY, base_url="http://x")
    store.claim("dead", lease_s=0.01)
    time.sleep(0.05)
    store.requeue_expired(max_attempts=1)
    done = store.get(job.id)
    assert done.status == "COMPLETED" and done.result_status_code == 503 and done.error_type == "runner_disconnected"
    store.close()


def test_heartbeat_keeps_a_slow_job_leased(tmp_path):
    gen = FakeGenerator(step_sleep_s=0.15)
    settings = make_settings(tmp_path, lease_s=0.3, heartbeat_s=0.05)
    with TestClient(create_app(settings, generator_factory=fake_factory(gen))) as client:
        rid = client.post(Q, json={**BODY, "steps": 6}).json()["request_id"]  # ~0.9 s > lease
        wait_until(lambda: _status(client, rid).json()["status"] == "COMPLETED")
        assert runtime_of(client).store.get(rid).attempts == 1


def test_results_and_files_expire(tmp_path):
    settings = make_settings(tmp_path, result_retention_s=2.0, purge_interval_s=0.05)  # reads within 2 s, even loaded
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        rid = client.post(Q, json=BODY).json()["request_id"]
        wait_until(lambda: _status(client, rid).json()["status"] == "COMPLETED")
        url = client.get(f"{Q}/requests/{rid}").json()["video"]["url"].replace("http://testserver", "")
        assert client.get(url).status_code == 200
        client.post(Q, json=BODY)  # keep the worker loop turning
        wait_until(lambda: _status(client, rid).status_code == 404, timeout_s=10)
        assert client.get(url).status_code == 404


def test_webhook_is_retried_with_backoff(tmp_path):
    receiver = Receiver(fail_first=2)
    settings = make_settings(tmp_path, webhook_base_delay_s=0.05)
    try:
        with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
            rid = client.post(Q, params={"fal_webhook": receiver.url}, json=BODY).json()["request_id"]
            wait_until(lambda: receiver.received)
            store = runtime_of(client).store
            wait_until(lambda: store.webhook_states(rid)[0][0] == "delivered")
            assert store.webhook_states(rid) == [("delivered", 3, None)]
    finally:
        receiver.close()
    assert receiver.attempts == 3 and len(receiver.received) == 1
    envelope = receiver.received[0]
    assert set(envelope) == {"request_id", "gateway_request_id", "status", "payload", "error"}
    assert envelope["status"] == "OK" and envelope["payload"]["video"]["content_type"] == "video/mp4"


def test_webhook_gives_up_after_max_attempts(tmp_path):
    receiver = Receiver(fail_first=100)
    settings = make_settings(tmp_path, webhook_base_delay_s=0.02, webhook_max_attempts=3)
    try:
        with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
            rid = client.post(Q, params={"fal_webhook": receiver.url}, json=BODY).json()["request_id"]
            store = runtime_of(client).store
            wait_until(lambda: store.webhook_states(rid) and store.webhook_states(rid)[0][0] == "failed")
            assert store.webhook_states(rid) == [("failed", 3, "HTTP 500")]
    finally:
        receiver.close()


def test_pending_webhook_survives_restart_and_is_sent_once(tmp_path):
    port = free_port()
    settings = make_settings(tmp_path, webhook_base_delay_s=0.05, webhook_max_delay_s=0.1)
    url = f"http://127.0.0.1:{port}/hook"  # nobody listens yet: connection refused
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        rid = client.post(Q, params={"fal_webhook": url}, json=BODY).json()["request_id"]
        store = runtime_of(client).store
        wait_until(lambda: store.webhook_states(rid) and store.webhook_states(rid)[0][1] >= 1)
        assert store.webhook_states(rid)[0][0] == "pending"
    receiver = Receiver(port=port)
    try:
        for _ in range(2):  # two more restarts: delivered by the first, never repeated by the second
            with TestClient(create_app(settings, with_worker=False)) as client:
                wait_until(lambda: receiver.received)
                time.sleep(0.3)
        assert len(receiver.received) == 1 and receiver.received[0]["request_id"] == rid
    finally:
        receiver.close()


def test_error_webhook_envelope(tmp_path):
    receiver = Receiver()
    try:
        with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
            body = {**BODY, "keyframe_image_urls": [two_keyframes()[0], "data:image/png;base64,aGVsbG8="]}
            client.post(Q, params={"fal_webhook": receiver.url}, json=body)
            wait_until(lambda: receiver.received)
    finally:
        receiver.close()
    envelope = receiver.received[0]
    assert envelope["status"] == "ERROR" and envelope["error"] == "Invalid status code: 422"
    assert envelope["payload"]["detail"][0]["loc"] == ["body", "keyframe_image_urls", 1]


def test_private_webhook_refused_unless_allowed(tmp_path):
    receiver = Receiver()
    try:
        settings = make_settings(tmp_path, allow_private_urls=False)
        with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
            # keyframes are data URIs, so only the webhook touches the network
            rid = client.post(Q, params={"fal_webhook": receiver.url}, json=BODY).json()["request_id"]
            store = runtime_of(client).store
            wait_until(lambda: store.webhook_states(rid) and store.webhook_states(rid)[0][0] == "failed")
            assert "only public addresses are allowed" in store.webhook_states(rid)[0][2]
    finally:
        receiver.close()
    assert receiver.received == []


def test_retry_schedule_spans_about_two_hours(tmp_path):
    settings = Settings(data_dir=tmp_path)  # the defaults
    total = sum(retry_delay_s(n, settings) for n in range(1, settings.webhook_max_attempts))
    assert settings.webhook_max_attempts == 10 and 1.5 * 3600 < total < 2.5 * 3600


@pytest.mark.parametrize(
    "header,expected",
    [
        ("Key abc", "abc"),
        ("key id:secret", "id:secret"),
        ("Bearer tok", "tok"),
        ("Basic abc", None),
        ("Key", None),
        (None, None),
    ],
)
def test_credential_forms(header, expected):
    assert credential_from_header(header) == expected


def test_auth_isolation_and_401(tmp_path):
    settings = make_settings(tmp_path, api_keys=["alice", "bob-id:bob-secret", "carol"])
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        alice = {"Authorization": "Key alice"}
        bob = {"Authorization": "Key bob-id:bob-secret"}
        carol = {"Authorization": "Bearer carol"}
        assert client.post(Q, json=BODY).status_code == 401
        assert client.post(Q, json=BODY, headers={"Authorization": "Key nope"}).status_code == 401
        assert client.post("/fal-ai/toon-crafter", json=BODY).status_code == 401
        rid = client.post(Q, json=BODY, headers=alice).json()["request_id"]
        wait_until(lambda: _status(client, rid, alice).json()["status"] == "COMPLETED")
        for other in (bob, carol):
            assert _status(client, rid, other).status_code == 404
            assert client.get(f"{Q}/requests/{rid}", headers=other).status_code == 404
            assert client.put(f"{Q}/requests/{rid}/cancel", headers=other).status_code == 404
            assert client.get(f"{Q}/requests/{rid}/status/stream", headers=other).status_code == 404
        assert client.get(f"{Q}/requests/{rid}", headers=alice).status_code == 200
        assert client.post(Q, json=BODY, headers=bob).status_code == 200
        assert client.post(Q, json=BODY, headers=carol).status_code == 200
        # uploads need a key too; downloads are by unguessable URL
        upload = {"content_type": "image/png", "file_name": "a.png"}
        assert client.post("/storage/upload/initiate", json=upload).status_code == 401
        assert client.post("/storage/upload/initiate", json=upload, headers=alice).status_code == 200
        # a CORS preflight never needs credentials
        preflight = client.options(Q, headers={"Origin": "https://x.test", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200


def test_open_mode_needs_no_key(tmp_path):
    with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
        rid = client.post(Q, json=BODY, headers={"Authorization": "Key whatever"}).json()["request_id"]
        assert _status(client, rid).status_code in (200, 202)  # no key, same (open) owner
