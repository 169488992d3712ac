"""One-time upload tokens that any API process accepts: signed, not stored.

`initiate` issues a token naming the key the upload will get; the bare `PUT` (or the multipart
`complete`) that presents it stores the bytes under that key. A token is an HMAC of (key, content
type, expiry, single/multipart) with a secret every API process shares (`UPLOAD_SECRET`, else one
kept in the database), so the PUT may reach any process behind a load balancer. A token works
once because a stored key is never overwritten. Multipart parts are objects in the storage itself,
so parts may arrive at different processes too. A part's key names its upload, its number and its
content (`upload-parts-{upload}-{NNNNN}-{md5 prefix}/part`): a PUT never overwrites another, so
concurrent or retried PUTs of one part cannot collide (the same bytes are the same file), and
`complete` joins the parts the client lists by their etags, then deletes them. Parts never completed
expire with the uploads (`UPLOAD_KEY_PREFIX`, the workers' retention loop).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from tooncrafter.service.storage.base import (
    DEFAULT_CONTENT_TYPE,
    UPLOAD_KEY_PREFIX,
    KeyExistsError,
    Storage,
)

UPLOAD_TOKEN_TTL_S = 3600.0
_ETAG = re.compile(r"[0-9a-f]{32}")  # what `save_part` answers: the part's MD5, hex


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

    PART_TOKEN_PREFIX = UPLOAD_KEY_PREFIX + "parts-"  # expire like uploads

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

    def _part_key(self, pending: PendingUpload, number: int, etag: str) -> str:
        # one key token per part and content: 13 + 16 + 1 + 5 + 1 + 24 = 60 characters (at most 64)
        upload = self._sign(b"parts:" + pending.key.encode())[:16]
        return f"{self.PART_TOKEN_PREFIX}{upload}-{number:05d}-{etag[:24]}/part"

    def save_part(self, storage: Storage, pending: PendingUpload, number: int, data: bytes) -> str:
        """Store one part; its etag (MD5, hex). `FileExistsError` once the upload was completed."""
        if storage.exists(pending.key):
            raise FileExistsError(pending.key)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            storage.put(data, content_type=DEFAULT_CONTENT_TYPE, file_name="part", key=self._part_key(pending, number, etag))
        except KeyExistsError:
            pass  # these very bytes, sent before or at the same time: the part is (being) stored
        return etag

    def join_parts(self, storage: Storage, pending: PendingUpload, parts: list[tuple[int, str]]) -> bytes:
        """The listed parts' bytes in order; `ValueError` naming a part that is missing or has another etag."""
        chunks = []
        for number, etag in parts:
            missing = ValueError(f"part {number} was not uploaded or its etag differs")
            if not _ETAG.fullmatch(etag):
                raise missing
            try:
                data = storage.read(self._part_key(pending, number, etag))
            except FileNotFoundError:
                raise missing from None
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != etag:
                raise missing
            chunks.append(data)
        return b"".join(chunks)

    def delete_parts(self, storage: Storage, pending: PendingUpload, parts: list[tuple[int, str]]) -> None:
        for number, etag in parts:
            if _ETAG.fullmatch(etag):
                storage.delete(self._part_key(pending, number, etag))
