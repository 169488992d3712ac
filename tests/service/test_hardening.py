"""Hostile input against a real server on loopback: limits before work, 4xx naming the field, never a 5xx."""

from __future__ import annotations

import socket
import time

import pytest
from helpers.service import (
    ENDPOINT,
    TINY_CHECKPOINT,
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
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {body_size}\r\n"
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


def test_more_keyframes_than_the_model_can_place_is_a_422_at_submit(tmp_path) -> None:
    settings = make_settings(tmp_path, checkpoint=str(TINY_CHECKPOINT))  # an 8-frame model
    with running_server(create_app(settings, generator_factory=fake_factory())) as running, running.client() as client:
        keyframes = [png_data_uri((i, i, i)) for i in range(9)]
        response = client.post(Q, json={"keyframe_image_urls": keyframes})
        assert response.status_code == 422
        assert response.json()["message"].startswith("keyframe_image_urls: this model makes 8-frame clips")
        assert client.post(Q, json={"keyframe_image_urls": keyframes[:8]}).status_code == 200
