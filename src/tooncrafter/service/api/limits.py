"""Limits checked before any work: who is calling, and how big the body may be.

An ASGI middleware in front of every route, so that a request pays for nothing before it is allowed:
* a request with a body (POST/PUT/PATCH) to a keyed route is authenticated from its headers before
  a byte of the body is read (a 100 MB body without a key costs nothing but the 401);
* the body is limited by route: `max_upload_bytes` for the token-authorised upload routes,
  `max_request_bytes` for everything else. A declared `Content-Length` over the limit is refused
  at once; a body that grows past it while streaming is cut off. Both are a 413 naming the limit.
"""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tooncrafter.service.auth import authenticate
from tooncrafter.settings import Settings

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN_ROUTES = ("/storage/upload/put/", "/storage/upload/multipart/")  # authorised by the signed token in the path


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
