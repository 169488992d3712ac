"""HTTP routes for files: fal-style uploads and downloads of stored files.

Uploads follow what `@fal-ai/client`'s `fal.storage.upload` does (fal-protocol.md section 10):
1. `POST /storage/upload/initiate?storage_type=...` with `{"content_type", "file_name"}` (sent through
   the client's middleware, with its Authorization header) -> `{"upload_url", "file_url"}`;
2. a bare `PUT upload_url` with the bytes and no Authorization header: the one-time, unguessable
   token in `upload_url` is the permission;
3. the client hands out `file_url`, which is `GET /files/{key}` here.
Files over 90 MiB use the multipart variant: `initiate-multipart`, `PUT {upload_url}/{n}` per 10 MiB
part answering `{"partNumber", "etag"}`, then `POST {upload_url}/complete` with the part list.

Upload tokens are signed, not stored (`storage.upload_tokens.SignedUploads`, built once by the
runtime), so the PUT and every multipart part may reach any API process behind a load balancer.

Downloads answer GET and HEAD with single byte ranges (video players seek with them), streamed from
the storage in chunks so a big file is never read whole into memory.

The routes take the storage, the token signer and the settings (`public_url`, `max_upload_bytes`)
as dependencies (`api.deps`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from tooncrafter.service.api.deps import get_settings, get_storage, get_upload_tokens
from tooncrafter.service.api.protocol import server_base_url
from tooncrafter.service.storage.base import (
    DEFAULT_CONTENT_TYPE,
    UPLOAD_KEY_PREFIX,
    Storage,
    StorageError,
    StoredFile,
    normalize_content_type,
    public_file_url,
    safe_file_name,
)
from tooncrafter.service.storage.upload_tokens import PendingUpload, SignedUploads
from tooncrafter.settings import Settings

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
_UNKNOWN_TOKEN = "unknown or expired upload token"


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
    if len(first) > 20 or len(last) > 20:  # past any file size (and past int()'s digit limit)
        raise RangeNotSatisfiable
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


@dataclass(frozen=True)
class FileRoutesDeps:
    """What the upload routes use: the storage, the token signer, and the settings (limits, PUBLIC_URL)."""

    storage: Storage
    tokens: SignedUploads
    settings: Settings


def file_routes_deps(
    storage: Storage = Depends(get_storage),
    tokens: SignedUploads = Depends(get_upload_tokens),
    settings: Settings = Depends(get_settings),
) -> FileRoutesDeps:
    return FileRoutesDeps(storage, tokens, settings)


def files_router(auth_dependency: Callable[..., Any] | None = None) -> APIRouter:
    """Routes for uploads (`/storage/upload/...`) and downloads (`/files/{key}`).

    `auth_dependency` (a FastAPI dependency) guards the initiate calls, the only ones a client
    sends with credentials; the PUTs are authorised by their one-time token, downloads by the
    unguessable key.
    """
    guarded = [Depends(auth_dependency)] if auth_dependency is not None else []
    router = APIRouter(tags=["files"])

    def initiate(request: Request, body: InitiateUploadRequest | None, files: FileRoutesDeps, *, multipart: bool) -> JSONResponse:
        body = body or InitiateUploadRequest()
        content_type = normalize_content_type(body.content_type) if body.content_type else None
        key = files.storage.new_key(safe_file_name(body.file_name, default="upload.bin"), prefix=UPLOAD_KEY_PREFIX)
        token = files.tokens.issue(key, content_type, multipart=multipart)
        base = server_base_url(request, files.settings)
        path = "multipart" if multipart else "put"
        result = InitiateUploadResponse(
            upload_url=f"{base}/storage/upload/{path}/{token}", file_url=public_file_url(base, key)
        )
        return JSONResponse(result.model_dump(), headers=CORS_HEADERS)

    @router.post("/storage/upload/initiate", response_model=InitiateUploadResponse, dependencies=guarded)
    async def initiate_upload(
        request: Request,
        body: InitiateUploadRequest | None = None,
        storage_type: str | None = None,
        files: FileRoutesDeps = Depends(file_routes_deps),
    ):
        """Start a single-request upload: PUT the bytes to `upload_url`, then use `file_url`."""
        return initiate(request, body, files, multipart=False)

    @router.post(
        "/storage/upload/initiate-multipart", response_model=InitiateUploadResponse, dependencies=guarded
    )
    async def initiate_multipart_upload(
        request: Request,
        body: InitiateUploadRequest | None = None,
        storage_type: str | None = None,
        files: FileRoutesDeps = Depends(file_routes_deps),
    ):
        """Start a multipart upload: PUT `{upload_url}/{n}` per part, then POST `{upload_url}/complete`."""
        return initiate(request, body, files, multipart=True)

    @router.put("/storage/upload/put/{token}")
    async def put_upload(
        request: Request,
        token: str,
        files: FileRoutesDeps = Depends(file_routes_deps),
    ):
        """Receive the bytes of a single-request upload; the token works once."""
        pending = files.tokens.get(token, multipart=False)
        if pending is None:
            raise HTTPException(404, _UNKNOWN_TOKEN, headers=CORS_HEADERS)
        data = await _read_body(request, files.settings.max_upload_bytes)
        content_type = pending.content_type or normalize_content_type(request.headers.get("content-type"))
        stored = await _store(files.storage, data, content_type, pending)
        return _upload_done(request, files.settings, stored)

    @router.put("/storage/upload/multipart/{token}/{part_number}")
    async def put_part(
        request: Request,
        token: str,
        part_number: int,
        files: FileRoutesDeps = Depends(file_routes_deps),
    ):
        """Receive one part; answers `{"partNumber", "etag"}` (and the ETag header)."""
        pending = files.tokens.get(token, multipart=True)
        if pending is None:
            raise HTTPException(404, _UNKNOWN_TOKEN, headers=CORS_HEADERS)
        if not 1 <= part_number <= MAX_PARTS:
            raise HTTPException(400, f"part number must be 1..{MAX_PARTS}", headers=CORS_HEADERS)
        # each part is held to the whole limit; the total is checked again at `complete`
        data = await _read_body(request, files.settings.max_upload_bytes)
        try:
            etag = await run_in_threadpool(files.tokens.save_part, files.storage, pending, part_number, data)
        except FileExistsError:
            raise HTTPException(404, _UNKNOWN_TOKEN, headers=CORS_HEADERS) from None
        return JSONResponse(
            {"partNumber": part_number, "etag": etag}, headers={**CORS_HEADERS, "ETag": f'"{etag}"'}
        )

    @router.post("/storage/upload/multipart/{token}/complete")
    async def complete_multipart(
        request: Request,
        token: str,
        body: CompleteMultipartRequest,
        files: FileRoutesDeps = Depends(file_routes_deps),
    ):
        """Join the listed parts in part order into the file promised by `file_url`."""
        pending = files.tokens.get(token, multipart=True)
        if pending is None or await run_in_threadpool(files.storage.exists, pending.key):
            raise HTTPException(404, _UNKNOWN_TOKEN, headers=CORS_HEADERS)
        parts = [(p.part_number, p.etag.strip('"').lower()) for p in sorted(body.parts, key=lambda p: p.part_number)]
        if len({number for number, _ in parts}) != len(parts):
            raise HTTPException(400, "a part is listed twice")
        try:
            data = await run_in_threadpool(files.tokens.join_parts, files.storage, pending, parts)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if len(data) > files.settings.max_upload_bytes:
            raise HTTPException(413, f"upload is larger than the limit of {files.settings.max_upload_bytes} bytes")
        try:
            stored = await _store(files.storage, data, pending.content_type or DEFAULT_CONTENT_TYPE, pending)
        finally:
            await run_in_threadpool(files.tokens.delete_parts, files.storage, pending, parts)
        return _upload_done(request, files.settings, stored)

    @router.get("/files/{key:path}")
    @router.head("/files/{key:path}", include_in_schema=False)
    async def get_file(request: Request, key: str, storage: Storage = Depends(get_storage)):
        """A stored file; honours a single `Range: bytes=...` (206, or 416 when unsatisfiable)."""
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


async def _store(storage: Storage, data: bytes, content_type: str, pending: PendingUpload) -> StoredFile:
    """Store the upload under its promised key; a key that already exists means the token was spent (404)."""
    try:
        return await run_in_threadpool(
            lambda: storage.put(data, content_type=content_type, file_name=pending.file_name, key=pending.key)
        )
    except StorageError:
        if await run_in_threadpool(storage.exists, pending.key):
            raise HTTPException(404, _UNKNOWN_TOKEN, headers=CORS_HEADERS) from None
        raise


def _upload_done(request: Request, settings: Settings, stored: StoredFile) -> JSONResponse:
    body = {
        "file_url": public_file_url(server_base_url(request, settings), stored.key),
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
