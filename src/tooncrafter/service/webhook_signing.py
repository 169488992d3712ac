"""Webhook signatures in fal's scheme, so a receiver written for fal verifies ours by its JWKS URL alone.

fal signs every delivery with ED25519 and publishes the public keys as a JWKS (OKP / Ed25519):
    message   = request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256_hex(raw body)
    headers   X-Fal-Webhook-Request-Id, X-Fal-Webhook-User-Id, X-Fal-Webhook-Timestamp (unix seconds),
              X-Fal-Webhook-Signature (hex of the 64-byte signature)
Receivers refuse timestamps more than 5 minutes from their clock. Keys are kept in the job store's
shared secrets (every API and worker process of a deployment signs with the same key); rotating adds
a new key that signs from then on while the previous one stays published, so deliveries signed just
before a rollover still verify against a receiver's cached JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

if TYPE_CHECKING:
    from tooncrafter.service.jobs import JobStore

REQUEST_ID_HEADER = "X-Fal-Webhook-Request-Id"
USER_ID_HEADER = "X-Fal-Webhook-User-Id"
TIMESTAMP_HEADER = "X-Fal-Webhook-Timestamp"
SIGNATURE_HEADER = "X-Fal-Webhook-Signature"
KEY_PREFIX = "webhook-signing-key/"
PUBLISHED_KEYS = 2  # the signing key and the one before it, during a rollover


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    """One ED25519 key: `kid` names it in the JWKS, `private` is its 32-byte seed."""

    kid: str
    private: bytes

    @classmethod
    def generate(cls, kid: str) -> SigningKey:
        seed = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(kid=kid, private=seed)

    def serialize(self) -> str:
        return _b64url(self.private)

    @classmethod
    def deserialize(cls, kid: str, text: str) -> SigningKey:
        return cls(kid=kid, private=_b64url_decode(text))

    def public_jwk(self) -> dict[str, str]:
        public = Ed25519PrivateKey.from_private_bytes(self.private).public_key()
        raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw), "kid": self.kid, "use": "sig", "alg": "EdDSA"}


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """What is signed: the three header values and the body's SHA-256, one per line."""
    return "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()


def signature_headers(key: SigningKey, request_id: str, user_id: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The four headers of one delivery of `body` (the exact bytes that are POSTed)."""
    timestamp = str(int(time.time() if now is None else now))
    private = Ed25519PrivateKey.from_private_bytes(key.private)
    signature = private.sign(signed_message(request_id, user_id, timestamp, body))
    return {
        REQUEST_ID_HEADER: request_id,
        USER_ID_HEADER: user_id,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature.hex(),
    }


def jwks(keys: list[SigningKey]) -> dict[str, list[dict[str, str]]]:
    """The JWKS document served at /.well-known/jwks.json."""
    return {"keys": [key.public_jwk() for key in keys]}


class Keyring:
    """The deployment's signing keys, kept in the job store so every process signs alike.

    The first key is made on first use (under a fixed name, so processes racing to make it agree);
    `rotate` adds one that signs from then on. Keys are re-read at most every `refresh_s`, so a
    rotation done by any process reaches all of them within that time.
    """

    def __init__(self, store: JobStore, *, refresh_s: float = 30.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._keys: list[SigningKey] = []
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def _load(self) -> list[SigningKey]:
        with self._lock:
            if time.monotonic() - self._read_at > self.refresh_s or not self._keys:
                rows = self.store.secrets_named(KEY_PREFIX)
                if not rows:
                    first = SigningKey.generate("initial")
                    self.store.add_secret(KEY_PREFIX + first.kid, first.serialize())
                    rows = self.store.secrets_named(KEY_PREFIX)
                self._keys = [SigningKey.deserialize(name[len(KEY_PREFIX):], value) for name, value in rows]
                self._read_at = time.monotonic()
            return self._keys

    def signing_key(self) -> SigningKey:
        """The newest key: every delivery is signed with it."""
        return self._load()[0]

    def published(self) -> list[SigningKey]:
        """The keys in the JWKS: the signing key and the one before it."""
        return self._load()[:PUBLISHED_KEYS]

    def rotate(self) -> SigningKey:
        """Add a new signing key (the previous one stays published until the next rotation)."""
        key = SigningKey.generate(f"{int(time.time())}-{secrets.token_hex(4)}")
        self.store.add_secret(KEY_PREFIX + key.kid, key.serialize())
        with self._lock:
            self._read_at = float("-inf")
        return key
