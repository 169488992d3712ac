"""The FastAPI app: fal's queue and run protocols, file uploads/downloads, auth, and the lifespan.

`create_app(settings)` builds everything from arguments (no import-time state). Its lifespan opens
the process's `runtime.Runtime` (job store, file storage, upload-token signer, webhook sender and,
unless `with_worker=False`, an in-process worker thread that loads the model once) and yields it
as Starlette's lifespan state; routes take what they need through the typed dependencies of
`api.deps`, and nothing is created while a request is served.

Where things are
    app.py        this factory: middleware, error handlers, /health, the routers in order
                  (/metrics: `api.metrics`, behind its own token)
    runtime.py    the resources built from settings (shared with `tooncrafter worker` and tests)
    api/          the HTTP surface: `queue`, `run`, `files`, `playground` routers; `protocol` (fal's
                  bodies and `ProtocolError`), `sse`, `submit` (checks, then queue), `deps`
    jobs/         the durable job store and its migrations
    storage/      `base` (the interface, keys), `local`, `s3`, `upload_tokens`; the factory in `__init__`
    worker.py     runs jobs through the generator;  webhooks.py  delivers fal's webhook envelopes
    inputs.py     keyframe URL / data URI fetching with limits;  auth.py  API keys
    server.py     what `tooncrafter serve` and `tooncrafter worker` run

How the two fal hosts are told apart
    fal's clients talk to two hosts with the same path shapes: the queue host (`queue.fal.run`)
    and the run host (`fal.run`), where `POST /fal-ai/toon-crafter` means "queue it" on the first
    and "run it and wait" on the second. Here both are one server:
      * queue host = `{server}/queue`, run host = `{server}`. `fal_client` concatenates its host
        settings raw (`https://{FAL_QUEUE_RUN_HOST}/` + endpoint), so a path in the host works:
            FAL_RUN_HOST=127.0.0.1:8443  FAL_QUEUE_RUN_HOST=127.0.0.1:8443/queue
        and the JS client's `requestMiddleware` rewrites https://queue.fal.run/ to {server}/queue/
        and https://fal.run/ (and https://rest.fal.ai/ for uploads) to {server}/.
      * behind DNS, a Host header starting with `queue.` (queue.example.com) is routed to the queue
        as well, so `FAL_RUN_HOST=example.com` alone works with the default `queue.` prefix.
    The URLs the queue returns (`status_url`, `response_url`, `cancel_url`) are absolute and use the
    same form the request came in on (or PUBLIC_URL).

Errors
    Bad input is a 422 at submit (and at run), before anything is queued, in FastAPI's shape
    `{"detail": [{"loc": ["body", field, ...], "msg", "type"}], "message": "field: msg"}`: Python's
    `fal_client` raises `FalClientHTTPError` (status_code 422, message = detail), the JS client raises
    `ValidationError` (fieldErrors = detail, message from `message`). Errors of a running job (a
    keyframe URL that cannot be fetched, out of memory) are replayed by the result endpoint with
    their own code; the status is COMPLETED with `error`/`error_type` (fal never reports FAILED).
    Every response is JSON (`application/json`) except SSE and file downloads, and every response
    carries `x-fal-request-id`. No redirects: `redirect_slashes` is off, both slash forms exist.
"""

from __future__ import annotations

import logging
import math
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tooncrafter.schema import describe_error
from tooncrafter.service.api.deps import LifespanState, get_runtime, require_owner
from tooncrafter.service.api.files import files_router
from tooncrafter.service.api.limits import RequestLimits, StreamLimits, TrustedHosts
from tooncrafter.service.api.metrics import metrics_router
from tooncrafter.service.api.playground import playground_router
from tooncrafter.service.api.protocol import (
    QUEUE_PREFIX,
    REQUEST_ID_HEADER,
    ProtocolError,
)
from tooncrafter.service.api.queue import queue_router
from tooncrafter.service.api.run import run_router
from tooncrafter.service.runtime import Runtime, open_runtime
from tooncrafter.service.webhook_signing import jwks
from tooncrafter.service.worker import GeneratorFactory, default_generator_factory
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)


class FalGatewayMiddleware:
    """Routes `queue.*` host names to the queue prefix and puts `x-fal-request-id` on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        path = scope["path"]
        if host.lower().startswith("queue.") and not path.startswith(QUEUE_PREFIX + "/"):
            scope = dict(scope, path=QUEUE_PREFIX + path, raw_path=None)
            scope["tooncrafter.queue_host"] = True
        fallback_id = str(uuid.uuid4()).encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == REQUEST_ID_HEADER.encode() for k, _ in headers):
                    headers.append((REQUEST_ID_HEADER.encode(), fallback_id))
                    message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, receive, send_with_id)


def _validation_entries(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's error entries in our words, echoing only small, JSON-safe inputs (a data URI can be
    megabytes; NaN cannot be written as JSON)."""
    entries = []
    for error in errors:
        entry: dict[str, Any] = {"loc": list(error.get("loc", ())), "msg": describe_error(error), "type": error.get("type")}
        value = error.get("input")
        if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            entry["input"] = value
        elif isinstance(value, str) and len(value) <= 200:
            entry["input"] = value
        entries.append(entry)
    return jsonable_encoder(entries)


def _summary(entries: list[dict[str, Any]]) -> str:
    parts = []
    for entry in entries:
        loc = [str(p) for p in entry.get("loc", []) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {entry.get('msg', 'invalid')}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        entries = _validation_entries(list(exc.errors()))
        return JSONResponse({"detail": entries, "message": _summary(entries)}, status_code=422)

    @app.exception_handler(ProtocolError)
    async def _on_protocol_error(_request: Request, exc: ProtocolError) -> JSONResponse:
        headers = {REQUEST_ID_HEADER: exc.request_id} if exc.request_id else None
        return JSONResponse(exc.body, status_code=exc.status_code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"detail": exc.detail}
        if isinstance(exc.detail, str):
            body["message"] = exc.detail
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _on_unhandled(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        # 500 with our request id: fal_client then does not mistake it for an ingress error to retry
        return JSONResponse(
            {"detail": "Internal Server Error"}, status_code=500, headers={REQUEST_ID_HEADER: str(uuid.uuid4())}
        )


def create_app(
    settings: Settings,
    *,
    generator_factory: GeneratorFactory | None = None,
    with_worker: bool = True,
) -> FastAPI:
    """The whole service; `with_worker=False` for API-only processes (workers run elsewhere)."""
    factory = generator_factory or default_generator_factory

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[LifespanState]:
        runtime = open_runtime(settings, generator_factory=factory if with_worker else None)
        if not settings.auth_enabled:
            logger.warning("no API keys configured (TOONCRAFTER_API_KEYS): the API is open to anyone who can reach it")
        try:
            yield {"runtime": runtime}
        finally:
            runtime.close()

    # /docs and /redoc from the Swagger UI and ReDoc files installed with fastapi-offline: no CDN, so
    # the documentation renders on a machine without internet.
    app = FastAPIOffline(
        title="tooncrafter",
        summary="ToonCrafter keyframe interpolation behind fal's queue protocol (fal-ai/toon-crafter).",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    _install_error_handlers(app)

    @app.get("/health", tags=["service"], include_in_schema=False)
    def health(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
        """Ready to run work: 200 while at least one worker (any process) checked in recently, else 503."""
        live = runtime.store.live_workers(settings.worker_alive_s)
        body: dict[str, Any] = {"status": "ok" if live else "no_worker", "workers": live, "worker": runtime.worker_health()}
        if not live:
            body["message"] = (
                f"no worker has checked in during the last {settings.worker_alive_s:g} s: queued requests wait "
                "until one runs (`tooncrafter worker`)"
            )
        return JSONResponse(body, status_code=200 if live else 503)

    @app.get("/health/live", tags=["service"], include_in_schema=False)
    def health_live(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
        """The API process answers and reaches its job store (a liveness probe: no worker needed)."""
        return JSONResponse({"status": "ok", "workers": runtime.store.live_workers(settings.worker_alive_s)})

    @app.get("/.well-known/jwks.json", tags=["service"], include_in_schema=False)
    def webhook_keys(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
        """The public keys that verify our webhook signatures (fal's scheme; see webhook_signing)."""
        return JSONResponse(jwks(runtime.keyring.published()), headers={"Cache-Control": "public, max-age=300"})

    # order matters: the queue and file routes before the run route's catch-all `/{owner}/{alias}/...`
    app.include_router(metrics_router())  # its own token (METRICS_TOKEN), never the API keys
    app.include_router(playground_router())
    app.include_router(queue_router())
    app.include_router(files_router(auth_dependency=require_owner))
    app.include_router(run_router())

    app.add_middleware(StreamLimits, settings=settings)  # open event streams per key
    app.add_middleware(RequestLimits, settings=settings)  # auth and body size before any body is read
    app.add_middleware(TrustedHosts, settings=settings)  # before anything builds a URL from Host
    app.add_middleware(FalGatewayMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "HEAD", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=[REQUEST_ID_HEADER, "x-fal-error-type", "content-range", "accept-ranges", "content-length", "etag"],
        max_age=600,
    )
    return app
