"""Webhooks signed in fal's scheme, verified by a receiver that fetches our JWKS like it fetches fal's.

The receiver is a real HTTP server on loopback using the verifier written from fal's documented
algorithm (helpers/fal_webhook_verifier.py); only the JWKS URL differs from a receiver made for fal.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
from helpers.fal_webhook_verifier import fal_verify
from helpers.service import ENDPOINT, fake_factory, make_settings, running_server, two_keyframes, wait_until

from tooncrafter.service.app import create_app


class VerifyingReceiver:
    """Accepts a delivery only when its signature verifies against the JWKS at `jwks_url`."""

    def __init__(self, jwks_url: str) -> None:
        self.verified: list[bytes] = []
        self.refused = 0
        self.raw: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = dict(self.headers.items())
                outer.raw.append((headers, body))
                keys = httpx.get(jwks_url, timeout=5).json()
                if fal_verify(keys, headers, body):
                    outer.verified.append(body)
                    self.send_response(200)
                else:
                    outer.refused += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_deliveries_verify_from_the_jwks_and_forgeries_are_refused(tmp_path) -> None:
    app = create_app(make_settings(tmp_path, api_keys=["k1"]), generator_factory=fake_factory())
    with running_server(app) as server:
        receiver = VerifyingReceiver(f"{server.base_url}/.well-known/jwks.json")
        try:
            with server.client(headers={"Authorization": "Key k1"}) as client:
                rid = client.post(f"/queue/{ENDPOINT}", params={"fal_webhook": receiver.url},
                                  json={"keyframe_image_urls": two_keyframes(), "steps": 2}).json()["request_id"]
                wait_until(lambda: receiver.verified, timeout_s=30)
            headers, body = receiver.raw[0]
            assert headers["X-Fal-Webhook-Request-Id"] == rid and headers["X-Fal-Webhook-User-Id"]
            # a forged delivery (tampered body, same headers) is refused by the same receiver
            signed = {k: v for k, v in headers.items() if k.lower().startswith("x-fal-webhook-")}
            forged = httpx.post(receiver.url, content=body.replace(b'"OK"', b'"ERROR"'), headers=signed, timeout=5)
            assert forged.status_code == 401 and receiver.refused == 1
            keys = httpx.get(f"{server.base_url}/.well-known/jwks.json").json()["keys"]
            assert keys and all(k["kty"] == "OKP" and "d" not in k for k in keys)
        finally:
            receiver.close()
