"""Webhooks under the one outbound-URL policy (issue 13, finding 4), against a real server on loopback:
addresses that only look public and names that do not resolve are refused at delivery, recorded as
the attempt's error, and never retried past the limit; a delivery connects to the address that was
checked (a DNS answer that changes in between cannot move it)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers.service import (
    ENDPOINT,
    fake_factory,
    make_settings,
    running_server,
    two_keyframes,
    wait_until,
)

from tooncrafter.service import outbound
from tooncrafter.service.app import create_app

Q = f"/queue/{ENDPOINT}"


class Receiver:
    """A loopback webhook receiver that records the Host header of each delivery."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.hosts.append(self.headers["Host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    running = Receiver()
    yield running
    running.close()


def test_disguised_loopback_and_unresolvable_webhooks_fail_closed(tmp_path, receiver) -> None:
    port = receiver.port
    urls = {
        f"http://[64:ff9b::7f00:1]:{port}/hook": "loopback",  # NAT64 of 127.0.0.1
        f"http://[2002:7f00:1::]:{port}/hook": "loopback",  # 6to4 of 127.0.0.1
        f"http://[::127.0.0.1]:{port}/hook": "reserved",  # IPv4-compatible
        f"http://192.0.0.8:{port}/hook": "reserved",  # IETF protocol assignments
        "http://nothing-here.invalid/hook": "cannot resolve",  # a failed lookup is not "public"
    }
    settings = make_settings(tmp_path, allow_private_urls=False, webhook_max_attempts=2, webhook_base_delay_s=0.05)
    with running_server(create_app(settings, generator_factory=fake_factory())) as server, server.client() as client:
        ids = {}
        for url in urls:
            submitted = client.post(Q, params={"fal_webhook": url}, json={"keyframe_image_urls": two_keyframes(), "steps": 1})
            assert submitted.status_code == 200, submitted.text  # well-formed: where it leads is checked at delivery
            ids[url] = submitted.json()["request_id"]
        for url, reason in urls.items():
            wait_until(lambda url=url: [s for s, *_ in server.store.webhook_states(ids[url])] == ["failed"], timeout_s=30)
            ((_, attempts, error),) = server.store.webhook_states(ids[url])
            assert attempts == 2 and reason in error, (url, error)  # every failure recorded, counted, then given up
    assert receiver.hosts == []


def test_a_delivery_connects_to_the_address_that_was_checked(receiver, monkeypatch) -> None:
    """The name resolves to a "public" address when checked and to a private one afterwards (DNS
    rebinding): the POST still goes to the checked address, with the name in its Host header."""
    checked, rebound = "127.0.0.1", "10.0.0.1"
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def rebinding_dns(host, port, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            lookups.append(host)
            address = checked if len(lookups) == 1 else rebound
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(outbound, "address_refusal_reason", lambda address: None if str(address) == checked else "private")
    with httpx.Client(timeout=3, trust_env=False) as client:
        response = outbound.pinned_post(
            client, f"http://hooks.example:{receiver.port}/hook", b"{}", {"Content-Type": "application/json"}, allow_private=False
        )
    assert response.status_code == 204
    assert receiver.hosts == [f"hooks.example:{receiver.port}"] and lookups == ["hooks.example"]
