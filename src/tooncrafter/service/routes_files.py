"""HTTP routes for files: fal-style uploads and downloads of stored files.

Uploads follow what `@fal-ai/client`'s `fal.storage.upload` does (fal-protocol.md section 10):
1. `POST /storage/upload/initiate?storage_type=...` with `{"content_type", "file_name"}` (sent through
   the client's middleware, with its Authorization header) -> `{"upload_url", "file_url"}`;
2. a bare `PUT upload_url` with the bytes and no Authorization header: the one-time, unguessable
   token in `upload_url` is the permission;
3. the client hands out `file_url`, which is `GET /files/{key}` here.
Files over 90 MiB use the multipart variant: `initiate-multipart`, `PUT {upload_url}/{n}` per 10 MiB
part answering `{"partNumber", "etag"}`, then `POST {upload_url}/complete` with the part list.

Upload tokens. In the full service (an app with a job store) tokens are signed, not stored: an
HMAC of (key, content type, expiry, single/multipart) with a secret every API process shares
(`UPLOAD_SECRET`, else one kept in the database), so the PUT may reach any API process behind a
load balancer. A token works once because a stored key is never overwritten; multipart parts
are kept in the storage itself (`upload-parts-*/part-NNNNN`, deleted on completion), so parts may
arrive at different processes too. A bare router (no job store, the unit tests) keeps the tokens
in this process's memory (`PendingUploads`).

Downloads answer GET and HEAD with single byte ranges (video players seek with them), streamed from
the storage in chunks so a big file is never read whole into memory.

The app provides `app.state.storage` (a `Storage`) and `app.state.settings` (`public_url`, optional
`max_upload_bytes`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tooncrafter.service.storage import (
    DEFAULT_CONTENT_TYPE,
    Storage,
    StorageError,
    StoredFile,
    normalize_content_type,
    public_file_url,
    safe_file_name,
)

MiB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 100 * MiB
UPLOAD_TOKEN_TTL_S = 3600.0
MAX_PENDING_UPLOADS = 10_000
MAX_PARTS = 10_000

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Accept-Ranges, ETag, x-fal-request-id",
}
_PREFLIGHT_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, OPTIONS",
    "Access-Control-Allow-Headers": "authorization, content-type, accept, range, x-fal-object-lifecycle, "
    "x-fal-object-lifecycle-preference, x-fal-file-name",
    "Access-Control-Max-Age": "600",
}
# Types a browser shows inline without running anything; everything else is sandboxed and downloaded,
# so an uploaded HTML or SVG file cannot script this server's origin.
_PASSIVE_TYPE_PREFIXES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "video/",
    "audio/",
)


# -- one-time upload tokens ------------------------------------------------------------------------


@dataclass
class PendingUpload:
    """An upload that `initiate` promised: the key its file will get and what the client declared."""

    key: str
    content_type: str | None
    file_name: str
    expires_at: float
    parts_dir: Path | None = None  # multipart only: one file per received part
    part_etags: dict[int, str] = field(default_factory=dict)
    part_sizes: dict[int, int] = field(default_factory=dict)


class TooManyPendingUploads(Exception):
    """The table of pending uploads is full (answered 503: a client may retry later)."""


class PendingUploads:
    """Upload tokens issued by `initiate` and spent by the PUT (or `complete` for multipart).

    Held in this process's memory, so the PUT must reach the process that issued the token: the
    table of a bare router (tests, one process). The full service uses `SignedUploads`.
    """

    def __init__(
        self,
        *,
        ttl_s: float = UPLOAD_TOKEN_TTL_S,
        max_pending: int = MAX_PENDING_UPLOADS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self._clock = clock
        self._pending: dict[str, PendingUpload] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def issue(self, key: str, content_type: str | None, file_name: str, *, multipart: bool = False) -> str:
        self.purge_expired()
        if len(self._pending) >= self.max_pending:
            raise TooManyPendingUploads(f"{len(self._pending)} uploads are already in progress")
        token = secrets.token_urlsafe(32)
        parts_dir = Path(tempfile.mkdtemp(prefix="tooncrafter-upload-")) if multipart else None
        self._pending[token] = PendingUpload(
            key=key,
            content_type=content_type,
            file_name=file_name,
            expires_at=self._clock() + self.ttl_s,
            parts_dir=parts_dir,
        )
        return token

    def get(self, token: str, *, multipart: bool) -> PendingUpload | None:
        pending = self._pending.get(token)
        if pending is None or (pending.parts_dir is not None) != multipart:
            return None
        if pending.expires_at <= self._clock():
            self.discard(token)
            return None
        return pending

    def take(self, token: str, *, multipart: bool) -> PendingUpload | None:
        """The pending upload for `token`, removed so the token cannot be used again."""
        pending = self.get(token, multipart=multipart)
        if pending is not None:
            del self._pending[token]
        return pending

    def discard(self, token: str) -> None:
        pending = self._pending.pop(token, None)
        if pending is not None:
            cleanup_parts(pending)

    def purge_expired(self) -> None:
        now = self._clock()
        for token in [t for t, p in self._pending.items() if p.expires_at <= now]:
            self.discard(token)

    # multipart parts: one file per part in this process's temp dir

    def save_part(self, storage: Storage, pending: PendingUpload, number: int, data: bytes) -> str:
        assert pending.parts_dir is not None
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        (pending.parts_dir / f"{number:05d}").write_bytes(data)
        pending.part_etags[number] = etag
        pending.part_sizes[number] = len(data)
        return etag

    def other_parts_bytes(self, pending: PendingUpload, number: int) -> int:
        return sum(size for n, size in pending.part_sizes.items() if n != number)

    def join_parts(self, storage: Storage, pending: PendingUpload, parts: list[tuple[int, str]]) -> bytes:
        """The listed parts' bytes in order; `ValueError` naming a part that is missing or has another etag."""
        assert pending.parts_dir is not None
        for number, etag in parts:
            if pending.part_etags.get(number) != etag:
                raise ValueError(f"part {number} was not uploaded or its etag differs")
        return b"".join((pending.parts_dir / f"{number:05d}").read_bytes() for number, _ in parts)

    def cleanup(self, storage: Storage, pending: PendingUpload, numbers: list[int] | None = None) -> None:
        cleanup_parts(pending)


class InvalidUploadToken(Exception):
    """Not a token this deployment signed (or expired, or the wrong kind)."""


class SignedUploads:
    """Upload tokens that any API process sharing `secret` accepts; nothing is held in memory.

    token = base64url(JSON {k: key, t: content type, e: expiry (epoch s), m: multipart}) "." HMAC-SHA256.
    Spent once: the PUT (or `complete`) stores under the token's key, which storage never overwrites.
    """

    PART_TOKEN_PREFIX = "upload-parts-"  # a bucket lifecycle rule on this prefix reaps abandoned parts

    def __init__(self, secret: bytes, *, ttl_s: float = UPLOAD_TOKEN_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _sign(self, payload: bytes) -> str:
        digest = hmac.new(self._secret, payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, key: str, content_type: str | None, file_name: str, *, multipart: bool = False) -> str:
        payload = json.dumps(
            {"k": key, "t": content_type, "e": round(self._clock() + self.ttl_s), "m": int(multipart)}, separators=(",", ":")
        ).encode()
        return f"{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}.{self._sign(payload)}"

    def get(self, token: str, *, multipart: bool) -> PendingUpload | None:
        try:
            encoded, _, signature = token.partition(".")
            payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            if not hmac.compare_digest(signature, self._sign(payload)):
                raise InvalidUploadToken
            fields = json.loads(payload)
            key, content_type, expires_at, is_multipart = fields["k"], fields["t"], float(fields["e"]), bool(fields["m"])
        except (ValueError, KeyError, TypeError, InvalidUploadToken):
            return None
        if is_multipart != multipart or expires_at <= self._clock():
            return None
        return PendingUpload(key=key, content_type=content_type, file_name=key.split("/", 1)[-1], expires_at=expires_at)

    def take(self, token: str, *, multipart: bool) -> PendingUpload | None:
        return self.get(token, multipart=multipart)

    def discard(self, token: str) -> None:
        """Nothing to forget: a signed token simply expires."""

    def purge_expired(self) -> None:
        """Nothing to purge (see `discard`)."""

    # multipart parts: objects in the storage itself, so any process can receive any part

    def _part_key(self, pending: PendingUpload, number: int) -> str:
        token = self._sign(b"parts:" + pending.key.encode())[:32]
        return f"{self.PART_TOKEN_PREFIX}{token}/part-{number:05d}"

    def save_part(self, storage: Storage, pending: PendingUpload, number: int, data: bytes) -> str:
        if storage.exists(pending.key):
            raise FileExistsError(pending.key)  # already completed
        key = self._part_key(pending, number)
        storage.delete(key)  # a retried part replaces the earlier attempt
        storage.put(data, content_type=DEFAULT_CONTENT_TYPE, file_name="part", key=key)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()

    def other_parts_bytes(self, pending: PendingUpload, number: int) -> int:
        return 0  # not known without listing; the total is checked again at `complete`

    def join_parts(self, storage: Storage, pending: PendingUpload, parts: list[tuple[int, str]]) -> bytes:
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

    def cleanup(self, storage: Storage, pending: PendingUpload, numbers: list[int] | None = None) -> None:
        for number in numbers or []:
            storage.delete(self._part_key(pending, number))


def cleanup_parts(pending: PendingUpload) -> None:
    if pending.parts_dir is not None:
        shutil.rmtree(pending.parts_dir, ignore_errors=True)


# -- request bodies ------------------------------------------------------------------------------


class InitiateUploadRequest(BaseModel):
    """What `fal.storage.upload` sends to initiate (both clients; `content_type` may be null)."""

    model_config = ConfigDict(extra="ignore")
    content_type: str | None = Field(None, max_length=200)
    file_name: str | None = Field(None, max_length=1000)


class InitiateUploadResponse(BaseModel):
    upload_url: str
    file_url: str


class UploadedPart(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    part_number: int = Field(..., alias="partNumber", ge=1, le=MAX_PARTS)
    etag: str


class CompleteMultipartRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    parts: list[UploadedPart] = Field(..., min_length=1, max_length=MAX_PARTS)


# -- byte ranges ---------------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    """A syntactically valid Range that selects no byte of the file (answer 416)."""


def parse_byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (start, end) a `Range` header selects in a file of `size` bytes.

    None means "send the whole file" (no header, another unit, a malformed or multi-range value:
    RFC 9110 lets a server ignore those). Raises `RangeNotSatisfiable` when the range starts past
    the end, or is a zero-length suffix.
    """
    if not header:
        return None
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last):
        return None
    if not first:  # bytes=-n: the last n bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)


# -- the router ----------------------------------------------------------------------------------


def files_router(
    auth_dependency: Callable[..., Any] | None = None,
    uploads: PendingUploads | None = None,
) -> APIRouter:
    """Routes for uploads (`/storage/upload/...`) and downloads (`/files/{key}`).

    `auth_dependency` (a FastAPI dependency) guards the initiate calls, the only ones a client
    sends with credentials; the PUTs are authorised by their one-time token, downloads by the
    unguessable key. `uploads` holds the pending tokens; by default signed tokens when the app has
    a job store (shared by all API processes, see the module docstring), else an in-memory table.
    """
    local_uploads = PendingUploads()

    def uploads_for(request: Request) -> PendingUploads | SignedUploads:
        if uploads is not None:
            return uploads
        return _signed_uploads(request) or local_uploads

    guarded = [Depends(auth_dependency)] if auth_dependency is not None else []
    router = APIRouter(tags=["files"])

    async def initiate(request: Request, body: InitiateUploadRequest | None, *, multipart: bool) -> JSONResponse:
        storage = _storage(request)
        body = body or InitiateUploadRequest()
        content_type = normalize_content_type(body.content_type) if body.content_type else None
        key = storage.new_key(safe_file_name(body.file_name, default="upload.bin"))
        pending_uploads = await run_in_threadpool(uploads_for, request)
        try:
            token = pending_uploads.issue(key, content_type, body.file_name or "", multipart=multipart)
        except TooManyPendingUploads:
            raise HTTPException(503, "too many uploads in progress; try again later", headers=CORS_HEADERS) from None
        base = _base_url(request)
        path = "multipart" if multipart else "put"
        result = InitiateUploadResponse(
            upload_url=f"{base}/storage/upload/{path}/{token}", file_url=public_file_url(base, key)
        )
        return JSONResponse(result.model_dump(), headers=CORS_HEADERS)

    @router.post("/storage/upload/initiate", response_model=InitiateUploadResponse, dependencies=guarded)
    async def initiate_upload(
        request: Request, body: InitiateUploadRequest | None = None, storage_type: str | None = None
    ):
        """Start a single-request upload: PUT the bytes to `upload_url`, then use `file_url`."""
        return await initiate(request, body, multipart=False)

    @router.post(
        "/storage/upload/initiate-multipart", response_model=InitiateUploadResponse, dependencies=guarded
    )
    async def initiate_multipart_upload(
        request: Request, body: InitiateUploadRequest | None = None, storage_type: str | None = None
    ):
        """Start a multipart upload: PUT `{upload_url}/{n}` per part, then POST `{upload_url}/complete`."""
        return await initiate(request, body, multipart=True)

    @router.put("/storage/upload/put/{token}")
    async def put_upload(request: Request, token: str):
        """Receive the bytes of a single-request upload; the token works once."""
        storage = _storage(request)
        pending_uploads = await run_in_threadpool(uploads_for, request)
        pending = pending_uploads.take(token, multipart=False)
        if pending is None:
            raise HTTPException(404, "unknown or expired upload token", headers=CORS_HEADERS)
        data = await _read_body(request, _max_upload_bytes(request))
        content_type = pending.content_type or normalize_content_type(request.headers.get("content-type"))
        stored = await _store(storage, data, content_type, pending)
        return _upload_done(request, stored)

    @router.put("/storage/upload/multipart/{token}/{part_number}")
    async def put_part(request: Request, token: str, part_number: int):
        """Receive one part; answers `{"partNumber", "etag"}` (and the ETag header)."""
        pending_uploads = await run_in_threadpool(uploads_for, request)
        pending = pending_uploads.get(token, multipart=True)
        if pending is None:
            raise HTTPException(404, "unknown or expired upload token", headers=CORS_HEADERS)
        if not 1 <= part_number <= MAX_PARTS:
            raise HTTPException(400, f"part number must be 1..{MAX_PARTS}", headers=CORS_HEADERS)
        already = pending_uploads.other_parts_bytes(pending, part_number)
        data = await _read_body(request, _max_upload_bytes(request) - already)
        try:
            etag = await run_in_threadpool(pending_uploads.save_part, _storage(request), pending, part_number, data)
        except FileExistsError:
            raise HTTPException(404, "unknown or expired upload token", headers=CORS_HEADERS) from None
        return JSONResponse(
            {"partNumber": part_number, "etag": etag}, headers={**CORS_HEADERS, "ETag": f'"{etag}"'}
        )

    @router.post("/storage/upload/multipart/{token}/complete")
    async def complete_multipart(request: Request, token: str, body: CompleteMultipartRequest):
        """Join the listed parts in part order into the file promised by `file_url`."""
        storage = _storage(request)
        pending_uploads = await run_in_threadpool(uploads_for, request)
        pending = pending_uploads.get(token, multipart=True)
        if pending is None or await run_in_threadpool(storage.exists, pending.key):
            raise HTTPException(404, "unknown or expired upload token", headers=CORS_HEADERS)
        parts = [(p.part_number, p.etag.strip('"')) for p in sorted(body.parts, key=lambda p: p.part_number)]
        if len({number for number, _ in parts}) != len(parts):
            raise HTTPException(400, "a part is listed twice")
        try:
            data = await run_in_threadpool(pending_uploads.join_parts, storage, pending, parts)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if len(data) > _max_upload_bytes(request):
            raise HTTPException(413, f"upload is larger than the limit of {_max_upload_bytes(request)} bytes")
        pending_uploads.take(token, multipart=True)
        try:
            content_type = pending.content_type or DEFAULT_CONTENT_TYPE
            stored = await _store(storage, data, content_type, pending)
        finally:
            await run_in_threadpool(pending_uploads.cleanup, storage, pending, [n for n, _ in parts])
        return _upload_done(request, stored)

    @router.get("/files/{key:path}")
    @router.head("/files/{key:path}", include_in_schema=False)
    async def get_file(request: Request, key: str):
        """A stored file; honours a single `Range: bytes=...` (206, or 416 when unsatisfiable)."""
        storage = _storage(request)
        stored = await run_in_threadpool(storage.stat, key)
        if stored is None:
            raise HTTPException(404, "file not found", headers=CORS_HEADERS)
        return await _file_response(request, storage, stored)

    @router.options("/files/{key:path}", include_in_schema=False)
    @router.options("/storage/upload/{rest:path}", include_in_schema=False)
    async def preflight() -> Response:
        # Only reached when the app has no CORS middleware of its own (that one answers first).
        return Response(status_code=204, headers=_PREFLIGHT_HEADERS)

    return router


# -- helpers ------------------------------------------------------------------------------------


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _settings(request: Request) -> Any:
    return getattr(request.app.state, "settings", None)


def _base_url(request: Request) -> str:
    """The settings' `public_url`, else the base URL the request came in on (no trailing slash)."""
    public_url = getattr(_settings(request), "public_url", None)
    return str(public_url or request.base_url).rstrip("/")


def _max_upload_bytes(request: Request) -> int:
    value = getattr(_settings(request), "max_upload_bytes", None)
    return int(value) if value else DEFAULT_MAX_UPLOAD_BYTES


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes`."""
    too_big = HTTPException(413, f"upload is larger than the limit of {max_bytes} bytes", headers=CORS_HEADERS)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


def _signed_uploads(request: Request) -> SignedUploads | None:
    """The app's signed-token table: when it has a job store, whose database shares the secret
    (unless `UPLOAD_SECRET` is set). Built once per app."""
    state = request.app.state
    signed = getattr(state, "signed_uploads", None)
    if signed is not None:
        return signed
    store = getattr(state, "job_store", None)
    configured = getattr(_settings(request), "upload_secret", None)
    if configured is not None:
        secret = configured.get_secret_value()
    elif store is not None and hasattr(store, "shared_secret"):
        secret = store.shared_secret("upload-tokens")
    else:
        return None
    state.signed_uploads = SignedUploads(secret.encode("utf-8"))
    return state.signed_uploads


async def _store(storage: Storage, data: bytes, content_type: str, pending: PendingUpload) -> StoredFile:
    """Store the upload under its promised key; a key that already exists means the token was spent (404)."""
    try:
        return await run_in_threadpool(
            lambda: storage.put(data, content_type=content_type, file_name=pending.file_name, key=pending.key)
        )
    except StorageError:
        if await run_in_threadpool(storage.exists, pending.key):
            raise HTTPException(404, "unknown or expired upload token", headers=CORS_HEADERS) from None
        raise


def _upload_done(request: Request, stored: StoredFile) -> JSONResponse:
    body = {
        "file_url": public_file_url(_base_url(request), stored.key),
        "content_type": stored.content_type,
        "file_name": stored.file_name,
        "file_size": stored.size,
    }
    return JSONResponse(body, headers=CORS_HEADERS)


async def _file_response(request: Request, storage: Storage, stored: StoredFile) -> Response:
    size = stored.size
    etag = f'"{stored.key.split("/", 1)[0]}-{size}"'  # files are immutable: the key names the content
    headers = {
        **CORS_HEADERS,
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
    }
    if stored.content_type.lower().startswith(_PASSIVE_TYPE_PREFIXES):
        headers["Content-Disposition"] = f'inline; filename="{stored.file_name}"'
    else:
        headers["Content-Disposition"] = f'attachment; filename="{stored.file_name}"'
        headers["Content-Security-Policy"] = "default-src 'none'; sandbox"

    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client's copy is stale: send it all
    try:
        byte_range = parse_byte_range(range_header, size)
    except RangeNotSatisfiable:
        raise HTTPException(
            416, "requested range not satisfiable", headers={**CORS_HEADERS, "Content-Range": f"bytes */{size}"}
        ) from None

    if byte_range is None:
        status, (start, end) = 200, (0, size - 1)
    else:
        status, (start, end) = 206, byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)

    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=stored.content_type)
    # Opening the range is I/O (a GET on S3, a metadata read on disk): not on the event loop.
    chunks = await run_in_threadpool(storage.iter_range, stored.key, start, end)
    return StreamingResponse(chunks, status_code=status, headers=headers, media_type=stored.content_type)
