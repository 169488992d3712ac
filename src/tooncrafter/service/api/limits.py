"""Limits checked before any work: which host was asked for, who is calling, how big the body may be,
how many event streams a key holds open.

ASGI middlewares in front of every route, so that a request pays for nothing before it is allowed:
* a request with a body (POST/PUT/PATCH) to a keyed route is authenticated from its headers before
  a byte of the body is read (a 100 MB body without a key costs nothing but the 401);
* the body is limited by route: `max_upload_bytes` for the token-authorised upload routes,
  `max_request_bytes` for everything else. A declared `Content-Length` over the limit is refused
  at once; a body that grows past it while streaming is cut off. Both are a 413 naming the limit;
* an API key holds at most `max_streams_per_key` event streams open at once (`StreamLimits`).
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tooncrafter.service.auth import authenticate
from tooncrafter.settings import Settings

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN_ROUTES = ("/storage/upload/put/", "/storage/upload/multipart/")  # authorised by the signed token in the path
# Answer whatever Host they are asked under (they build no URL from it): kubelet probes and a scraper reach
# each pod by its address.
_ANY_HOST_PATHS = frozenset({"/metrics", "/health", "/health/live"})


async def _send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                        (b"connection", b"close"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestLimits:
    """See the module docstring; `settings` gives the keys and the limits."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        by_token = any(part in scope["path"] for part in _TOKEN_ROUTES)
        if self.settings.auth_enabled and not by_token:
            try:
                authenticate(self.settings, headers.get("authorization"))
            except HTTPException as exc:
                extra = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
                await _send_json(send, exc.status_code, {"detail": exc.detail, "message": exc.detail}, extra)
                return
        limit = self.settings.max_upload_bytes if by_token else self.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._too_large(send, limit)
            return

        received = 0

        async def limited_receive() -> Message:
            # Raised inside the route's body read, so the app's own HTTPException handling answers
            # it (FastAPI passes HTTPExceptions from the body read through unchanged).
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, detail=_too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _too_large(send: Send, limit: int) -> None:
        message = _too_large_message(limit)
        await _send_json(send, 413, {"detail": message, "message": message})


def _too_large_message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def host_of(header: str) -> str:
    """The host name of a `Host` header, lower-cased, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(host: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.strip().lower().strip("[]")
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class TrustedHosts:
    """Without PUBLIC_URL the returned URLs come from the `Host` header, so it must be a known name:
    a spoofed Host would otherwise be baked into status, result and stored file URLs. 400 otherwise."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.settings.public_url or scope["path"] in _ANY_HOST_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if not host_allowed(host_of(header), self.settings.allowed_hosts):
            message = f"unknown Host {header[:100]!r}: set TOONCRAFTER_PUBLIC_URL or add it to TOONCRAFTER_ALLOWED_HOSTS"
            await _send_json(send, 400, {"detail": message, "message": message})
            return
        await self.app(scope, receive, send)


class StreamLimits:
    """At most `max_streams_per_key` open event streams per API key in this process: the queue's
    status streams (`GET .../requests/{id}/status/stream`) and the streaming run (`POST /{endpoint}/stream`).

    Each one polls the job store for as long as it is open, so a key that opens many would slow every
    other client. A stream over the limit is a 429 before anything runs (a streaming run queues no job);
    the slot is freed when the stream's response ends, whether it finished, failed or its client went
    away (Starlette cancels a stream whose client disconnects). A request that does not authenticate is
    passed on uncounted: the route answers its 401.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._queue_streams = f"/queue/{settings.endpoint_id}/requests/"
        self._run_stream = f"/{settings.endpoint_id}/stream"
        self._open: dict[str, int] = {}  # owner -> open streams; only touched on the event loop

    def _is_stream(self, scope: Scope) -> bool:
        path, method = scope["path"], scope["method"]
        if method == "POST":
            return path == self._run_stream
        return method == "GET" and path.startswith(self._queue_streams) and path.rstrip("/").endswith("/status/stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._is_stream(scope):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        try:
            owner = authenticate(self.settings, header)
        except HTTPException:
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_streams_per_key
        if self._open.get(owner, 0) >= limit:
            message = (
                f"too many open event streams for this API key: at most {limit} at once "
                "(TOONCRAFTER_MAX_STREAMS_PER_KEY); close one, or poll the status URL instead"
            )
            await _send_json(send, 429, {"detail": message, "message": message}, [(b"retry-after", b"1")])
            return
        self._open[owner] = self._open.get(owner, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._open[owner] -= 1
            if not self._open[owner]:
                del self._open[owner]
