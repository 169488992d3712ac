"""Hostile input against a real server on loopback: limits before work, 4xx naming the field, never a 5xx."""

from __future__ import annotations

import socket
import time

import pytest
from helpers.service import (
    ENDPOINT,
    TINY_CHECKPOINT,
    needs_tiny_checkpoint,
    fake_factory,
    make_settings,
    png_data_uri,
    running_server,
    two_keyframes,
)

from tooncrafter.service.app import create_app

Q = f"/queue/{ENDPOINT}"


@pytest.fixture
def server(tmp_path):
    app = create_app(make_settings(tmp_path, api_keys=["k1"], max_request_bytes=1024 * 1024), generator_factory=fake_factory())
    with running_server(app) as running:
        yield running


def _raw_post(server, path: str, headers: dict[str, str], body_size: int, send_body: bool) -> tuple[int, float]:
    """POST with a declared body; returns (status, seconds to answer) reading only the status line."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {body_size}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        started = time.monotonic()
        s.sendall(head.encode())
        if send_body:
            s.sendall(b"x" * body_size)
        status = int(s.recv(64).split(b" ", 2)[1])
        return status, time.monotonic() - started


def test_no_key_is_refused_before_the_body_is_read(server) -> None:
    # 100 MB declared, not a byte sent: the 401 comes without waiting for the body
    status, seconds = _raw_post(server, Q, {}, 100 * 1024 * 1024, send_body=False)
    assert status == 401 and seconds < 5


def test_an_oversized_body_is_a_413_before_it_is_read(server) -> None:
    status, _ = _raw_post(server, Q, {"Authorization": "Key k1"}, 100 * 1024 * 1024, send_body=False)
    assert status == 413
    with server.client(headers={"Authorization": "Key k1"}) as client:
        chunked = client.post(Q, content=iter([b'{"keyframe_image_urls": ["', b"a" * (2 * 1024 * 1024), b'"]}']))
    assert chunked.status_code == 413 and "limit" in chunked.json()["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_a_422_naming_the_field(server, value: str) -> None:
    body = '{"keyframe_image_urls": %s, "cfg_scale": %s}' % (str(two_keyframes()).replace("'", '"'), value)
    with server.client(headers={"Authorization": "Key k1", "Content-Type": "application/json"}) as client:
        response = client.post(Q, content=body)
    assert response.status_code == 422 and response.json()["message"].startswith("cfg_scale:")


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/", "http://[v1.x]/", "http://[::1", "ftp://x/", "http:///nohost"])
def test_malformed_webhook_urls_are_a_422_naming_fal_webhook(server, url: str) -> None:
    with server.client(headers={"Authorization": "Key k1"}) as client:
        response = client.post(Q, params={"fal_webhook": url}, json={"keyframe_image_urls": two_keyframes()})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", "fal_webhook"]


@needs_tiny_checkpoint
def test_more_keyframes_than_the_model_can_place_is_a_422_at_submit(tmp_path) -> None:
    from tooncrafter.service.runtime import served_num_frames

    from tooncrafter.schema import MAX_KEYFRAMES

    frames = served_num_frames(str(TINY_CHECKPOINT))  # the fixture's own frame count, whatever the set
    if frames + 1 > MAX_KEYFRAMES:
        pytest.skip(f"a {frames}-frame model: the schema's maximum of {MAX_KEYFRAMES} keyframes decides first")
    settings = make_settings(tmp_path, checkpoint=str(TINY_CHECKPOINT))
    with running_server(create_app(settings, generator_factory=fake_factory())) as running, running.client() as client:
        keyframes = [png_data_uri((i, i, i)) for i in range(frames + 1)]
        response = client.post(Q, json={"keyframe_image_urls": keyframes})
        assert response.status_code == 422
        assert response.json()["message"].startswith(f"keyframe_image_urls: this model makes {frames}-frame clips")
        assert client.post(Q, json={"keyframe_image_urls": keyframes[:frames]}).status_code == 200


@pytest.mark.parametrize("target", ["data:image/png;base64,iVBORw0KGgo=", "mailto:a@b.c", "javascript:alert(1)", "about:blank", "urn:x:y", "http:x"])
def test_a_redirect_to_a_non_http_url_is_an_input_error(target: str) -> None:
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from tooncrafter.service.inputs import FetchLimits, InputError, fetch_input

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InputError, match="not an http"):
            asyncio.run(fetch_input(f"http://127.0.0.1:{httpd.server_port}/a.png", limits=FetchLimits(allow_private=True, timeout_s=5),
                                    storage=None, own_base_urls=[]))
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_an_absurd_range_header_is_a_416(server) -> None:
    with server.client(headers={"Authorization": "Key k1"}) as client:
        initiated = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}).json()
        assert client.put(initiated["upload_url"], content=b"\x89PNG\r\n\x1a\n" + b"0" * 100).status_code == 200
        path = initiated["file_url"].replace(server.base_url, "")
        assert client.get(path, headers={"Range": "bytes=" + "9" * 4301 + "-"}).status_code == 416
        assert client.get(path, headers={"Range": "bytes=0-" + "9" * 4301}).status_code == 416
        assert client.get(path, headers={"Range": "bytes=0-3"}).status_code == 206


def test_a_spoofed_host_is_a_400_unless_public_url_decides(tmp_path) -> None:
    with running_server(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as running:
        with running.client(headers={"Host": "evil.example"}) as client:
            spoofed = client.post(Q, json={"keyframe_image_urls": two_keyframes()})
        assert spoofed.status_code == 400 and "TOONCRAFTER_PUBLIC_URL" in spoofed.json()["message"]
        with running.client(headers={"Host": "10.1.2.3:8000"}) as probe:  # a kubelet probe: the pod's address
            assert probe.get("/health/live").status_code == 200
            assert probe.get("/health").status_code in (200, 503)  # answered, whatever the Host
        with running.client() as client:
            assert client.post(Q, json={"keyframe_image_urls": two_keyframes()}).json()["status_url"].startswith(running.base_url)
    settings = make_settings(tmp_path, public_url="https://toons.example.com")
    with running_server(create_app(settings, generator_factory=fake_factory())) as running:
        with running.client(headers={"Host": "evil.example"}) as client:
            urls = client.post(Q, json={"keyframe_image_urls": two_keyframes()}).json()
        assert urls["status_url"].startswith("https://toons.example.com/queue/") and "evil" not in str(urls)


def test_the_pixel_budget_covers_all_keyframes_of_a_request(tmp_path) -> None:
    """Each image under the per-image cap, together over the request's budget: a 422, nothing decoded."""
    import base64
    import io

    from PIL import Image

    def big_png(size: tuple[int, int]) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", size, (9, 9, 9)).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    settings = make_settings(tmp_path, request_max_pixels=500_000)
    with running_server(create_app(settings, generator_factory=fake_factory())) as running, running.client() as client:
        over = client.post(Q, json={"keyframe_image_urls": [big_png((600, 500)), big_png((600, 500))], "steps": 1}).json()
        under = client.post(Q, json={"keyframe_image_urls": [big_png((400, 500)), big_png((400, 500))], "steps": 1}).json()
        from helpers.service import wait_until

        wait_until(lambda: all(running.store.get(r["request_id"]).status == "COMPLETED" for r in (over, under)), timeout_s=30)
        refused = client.get(over["response_url"].replace(running.base_url, ""))
        assert refused.status_code == 422 and "TOONCRAFTER_REQUEST_MAX_PIXELS" in refused.json()["detail"][0]["msg"]
        assert client.get(under["response_url"].replace(running.base_url, "")).status_code == 200
