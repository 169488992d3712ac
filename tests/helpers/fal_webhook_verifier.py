"""A webhook receiver's check written from fal's documented algorithm (not from our signing code).

fal: verify the ED25519 signature (hex, `X-Fal-Webhook-Signature`) over
`request_id \\n user_id \\n timestamp \\n sha256_hex(body)` with any key of the JWKS, and refuse
timestamps more than 5 minutes away. A receiver written for fal changes only the JWKS URL.
"""

from __future__ import annotations

import base64
import hashlib
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def fal_verify(jwks: dict, headers: dict[str, str], body: bytes, *, now: float | None = None, leeway_s: int = 300) -> bool:
    h = {k.lower(): v for k, v in headers.items()}
    try:
        request_id = h["x-fal-webhook-request-id"]
        user_id = h["x-fal-webhook-user-id"]
        timestamp = h["x-fal-webhook-timestamp"]
        signature = bytes.fromhex(h["x-fal-webhook-signature"])
        if abs(int(time.time() if now is None else now) - int(timestamp)) > leeway_s:
            return False
    except (KeyError, ValueError):
        return False
    message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode("utf-8")
    for key in jwks.get("keys", []):
        if key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
            continue
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except InvalidSignature:
            continue
    return False
