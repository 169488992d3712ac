"""The embedded server's connection limits, against a real uvicorn on loopback (bounded in count and time).

A slowloris flood of idle, half-open connections must not stop /health from answering promptly on
another connection; past the connection cap a connection gets a 503 and is closed; a request whose
headers or body never finish is disconnected at its deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from helpers.service import fake_factory, free_port, make_settings, wait_until

from tooncrafter.service.app import create_app
from tooncrafter.service.http_limits import guarded_protocol, raise_open_file_limit

FLOOD = 2000


@contextlib.contextmanager
def guarded_server(tmp_path, *, max_connections: int, header_timeout_s: float, body_timeout_s: float = 30.0) -> Iterator[str]:
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory())
    protocol = guarded_protocol(max_connections=max_connections, header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="warning", backlog=4096))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout_s=20)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def _half_open(port: int, count: int) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers that never finish
        sockets.append(s)
    return sockets


def _closed_by_server(s: socket.socket, within_s: float) -> bool:
    s.settimeout(within_s)
    try:
        return s.recv(1) == b""
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True


def test_health_answers_while_a_slowloris_flood_is_held(tmp_path) -> None:
    raise_open_file_limit(FLOOD * 2 + 512)
    with guarded_server(tmp_path, max_connections=FLOOD + 100, header_timeout_s=30.0) as url:
        port = int(url.rsplit(":", 1)[1])
        flood = _half_open(port, FLOOD)
        try:
            started = time.monotonic()
            response = httpx.get(f"{url}/health/live", timeout=10)
            assert response.status_code == 200
            assert time.monotonic() - started < 5
        finally:
            for s in flood:
                s.close()


def test_past_the_cap_a_connection_gets_503_and_is_closed(tmp_path) -> None:
    with guarded_server(tmp_path, max_connections=20, header_timeout_s=30.0) as url:
        port = int(url.rsplit(":", 1)[1])
        held = _half_open(port, 20)
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=5)
            extra.settimeout(5)
            answer = extra.recv(4096)
            assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections" in answer
            assert extra.recv(1) == b""  # and closed
            extra.close()
        finally:
            for s in held:
                s.close()
        # once the flood is gone the server answers normally again
        assert wait_until(lambda: httpx.get(f"{url}/health/live", timeout=5).status_code == 200, timeout_s=10)


@pytest.mark.parametrize("kind", ["headers", "body", "silent"])
def test_requests_that_never_finish_are_cut_at_their_deadline(tmp_path, kind: str) -> None:
    with guarded_server(tmp_path, max_connections=100, header_timeout_s=0.5, body_timeout_s=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if kind == "headers":
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        elif kind == "body":
            s.sendall(b"POST /queue/fal-ai/toon-crafter HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n{")
        # "silent": connect and send nothing
        assert _closed_by_server(s, within_s=5)
        s.close()
        # a normal request on a kept-alive connection is not cut: each request gets its own deadline
        with httpx.Client(base_url=url, timeout=5) as client:
            for _ in range(3):
                assert client.get("/health/live").status_code == 200
                time.sleep(0.7)  # longer than the header deadline: idle keep-alive is not a slow request
