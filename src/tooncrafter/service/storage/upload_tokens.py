"""One-time upload tokens that any API process accepts: signed, not stored.

`initiate` issues a token naming the key the upload will get; the bare `PUT` (or the multipart
`complete`) that presents it stores the bytes under that key. A token is an HMAC of (key, content
type, expiry, single/multipart) with a secret every API process shares (`UPLOAD_SECRET`, else one
kept in the database), so the PUT may reach any process behind a load balancer. A token works
once because a stored key is never overwritten. Multipart parts are objects in the storage itself
(`upload-parts-*-NNNNN/part`, deleted on completion), so parts may arrive at different processes too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from tooncrafter.service.storage.base import DEFAULT_CONTENT_TYPE, Storage

UPLOAD_TOKEN_TTL_S = 3600.0


@dataclass(frozen=True)
class PendingUpload:
    """An upload that `initiate` promised: the key its file will get and what the client declared."""

    key: str
    content_type: str | None
    file_name: str
    expires_at: float


class SignedUploads:
    """Issues and checks upload tokens; nothing is held in memory.

    token = base64url(JSON {k: key, t: content type, e: expiry (epoch s), m: multipart}) "." HMAC-SHA256.
    """

    PART_TOKEN_PREFIX = "upload-parts-"  # a bucket lifecycle rule on this prefix reaps abandoned parts

    def __init__(self, secret: bytes, *, ttl_s: float = UPLOAD_TOKEN_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _sign(self, payload: bytes) -> str:
        digest = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, key: str, content_type: str | None, *, multipart: bool = False) -> str:
        payload = json.dumps(
            {"k": key, "t": content_type, "e": round(self._clock() + self.ttl_s), "m": int(multipart)}, separators=(",", ":")
        ).encode()
        return f"{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}.{self._sign(payload)}"

    def get(self, token: str, *, multipart: bool) -> PendingUpload | None:
        """The upload `token` promises; None when it is not ours, expired, or of the other kind."""
        try:
            encoded, _, signature = token.partition(".")
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if not hmac.compare_digest(signature, self._sign(payload)):
                return None
            fields = json.loads(payload)
            key, content_type, expires_at, is_multipart = fields["k"], fields["t"], float(fields["e"]), bool(fields["m"])
        except (ValueError, KeyError, TypeError):
            return None
        if is_multipart != multipart or expires_at <= self._clock():
            return None
        return PendingUpload(key=key, content_type=content_type, file_name=key.split("/", 1)[-1], expires_at=expires_at)

    # multipart parts: objects in the storage itself, so any process can receive any part

    def _part_key(self, pending: PendingUpload, number: int) -> str:
        # one key token per part: a backend keeps one file per token (LocalFileStorage's directory)
        upload = self._sign(b"parts:" + pending.key.encode())[:32]
        return f"{self.PART_TOKEN_PREFIX}{upload}-{number:05d}/part"

    def save_part(self, storage: Storage, pending: PendingUpload, number: int, data: bytes) -> str:
        """Store one part (a retry replaces the earlier attempt); its etag. `FileExistsError` once completed."""
        if storage.exists(pending.key):
            raise FileExistsError(pending.key)
        key = self._part_key(pending, number)
        storage.delete(key)
        storage.put(data, content_type=DEFAULT_CONTENT_TYPE, file_name="part", key=key)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def join_parts(self, storage: Storage, pending: PendingUpload, parts: list[tuple[int, str]]) -> bytes:
        """The listed parts' bytes in order; `ValueError` naming a part that is missing or has another etag."""
        chunks = []
        for number, etag in parts:
            try:
                data = storage.read(self._part_key(pending, number))
            except FileNotFoundError:
                raise ValueError(f"part {number} was not uploaded or its etag differs") from None
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
                raise ValueError(f"part {number} was not uploaded or its etag differs")
            chunks.append(data)
        return b"".join(chunks)

    def delete_parts(self, storage: Storage, pending: PendingUpload, numbers: list[int]) -> None:
        for number in numbers:
            storage.delete(self._part_key(pending, number))
