"""fal's queue protocol: submit, status, status stream (SSE), result and cancel.

Paths (under the queue prefix `/queue`, see `app.py` for how the queue host is told apart):
    POST /queue/{owner}/{alias}[/{path}]                       submit -> 200 {request_id, *_url, queue_position}
    GET  /queue/{owner}/{alias}/requests/{id}/status[/]         202 while IN_QUEUE/IN_PROGRESS, 200 when COMPLETED
    GET  /queue/{owner}/{alias}/requests/{id}/status/stream[/]  text/event-stream, log deltas, closes after COMPLETED
    GET  /queue/{owner}/{alias}/requests/{id}[/]                the stored result replayed (code + body), 400 before
    PUT  /queue/{owner}/{alias}/requests/{id}/cancel[/]         202 / 400 ALREADY_COMPLETED / 404 NOT_FOUND
Every slash variant is registered (no redirects, ever); an unknown id, or another key's id, is 404.
The helpers at the bottom (body checks, status bodies, result replay) are shared with `routes_run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from tooncrafter.schema import ContractError, ToonCrafterInput, check_fits_model
from tooncrafter.service.auth import require_owner
from tooncrafter.service.jobs import COMPLETED, IN_QUEUE, CancelOutcome, Job, JobStore
from tooncrafter.service.webhooks import WebhookURLError, check_webhook_url
from tooncrafter.service.worker import field_error_body
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)

QUEUE_PREFIX = "/queue"
REQUEST_ID_HEADER = "x-fal-request-id"
SSE_POLL_S = 0.2

# --- dependencies -------------------------------------------------------------------------------


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    return request.app.state.job_store


_HEADER_SAFE_ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")


class ProtocolError(Exception):
    """An error answered as JSON `body` with `status_code` (submit checks, fal's cancel bodies)."""

    def __init__(self, status_code: int, body: dict[str, Any], request_id: str | None = None) -> None:
        super().__init__(body.get("detail") or body.get("status"))
        self.status_code = status_code
        self.body = body
        # only ids that can be a header value are echoed in `x-fal-request-id` (a path may carry anything)
        self.request_id = request_id if request_id and _HEADER_SAFE_ID.fullmatch(request_id) else None


def field_error_response(loc: list[Any], message: str) -> ProtocolError:
    """A 422 naming one field, shaped like FastAPI's validation errors."""
    return ProtocolError(422, field_error_body(loc, message))


# --- shared helpers -----------------------------------------------------------------------------


def check_endpoint(settings: Settings, owner: str, alias: str, subpath: str = "") -> str:
    """`owner/alias` when this server serves it (and `subpath` is empty), else a fal-style 404."""
    endpoint = f"{owner}/{alias}"
    if endpoint != settings.endpoint_id:
        raise ProtocolError(404, {"detail": f"Application '{endpoint}' not found; this server runs '{settings.endpoint_id}'"})
    if subpath.strip("/"):
        raise ProtocolError(404, {"detail": f"Path /{subpath.strip('/')} not found"})
    return endpoint


def check_input_urls(params: ToonCrafterInput, settings: Settings) -> None:
    """Submit-time checks the schema cannot do: the served model's frame count (keyframes it can place,
    `keyframe_lengths`), URL schemes, data URIs that decode within the size limit."""
    from tooncrafter.service.inputs import InputError, decode_data_uri

    try:
        check_fits_model(len(params.keyframe_image_urls), params.keyframe_lengths, settings.model_num_frames())
    except ContractError as exc:
        raise field_error_response([exc.field], str(exc)) from exc

    for index, url in enumerate(params.keyframe_image_urls):
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            try:
                decode_data_uri(url, max_bytes=settings.input_max_bytes)
            except (InputError, ValueError) as exc:
                raise field_error_response(["keyframe_image_urls", index], f"keyframe {index}: {exc}") from exc
        elif scheme not in ("http", "https"):
            raise field_error_response(
                ["keyframe_image_urls", index], f"keyframe {index} must be an http(s) URL or a data: URI"
            )


def start_deadline(request: Request) -> float | None:
    """X-Fal-Request-Timeout (seconds to start, queue wait included) as an epoch deadline."""
    value = request.headers.get("x-fal-request-timeout")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ProtocolError(400, {"detail": "X-Fal-Request-Timeout must be a number of seconds"}) from None
    return time.time() + seconds if seconds > 0 else None


def server_base_url(request: Request) -> str:
    """Where this server is reached: PUBLIC_URL, else the request's scheme, host and root path."""
    settings: Settings = request.app.state.settings
    return settings.public_url or str(request.base_url).rstrip("/")


def queue_base_url(request: Request) -> str:
    """The queue host: `{server}/queue`, or the bare host when the client came in on a `queue.` host name."""
    if request.scope.get("tooncrafter.queue_host"):
        return server_base_url(request)
    return server_base_url(request) + QUEUE_PREFIX


def request_urls(queue_base: str, endpoint: str, request_id: str) -> dict[str, str]:
    base = f"{queue_base}/{endpoint}/requests/{request_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def wants_logs(value: str | None) -> bool:
    """fal's clients send logs=1/0 (JS, fal SDK) or true/false (Python); absent is false."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def status_body(job: Job, *, queue_base: str, queue_position: int | None, logs: list[dict] | None) -> dict[str, Any]:
    """fal's status object: the status plus the keys each status requires (see fal-protocol.md section 4)."""
    body: dict[str, Any] = {"status": job.status, "request_id": job.id, **request_urls(queue_base, job.endpoint, job.id)}
    body["logs"] = logs
    if job.status == IN_QUEUE:
        body["queue_position"] = queue_position if queue_position is not None else 0
    if job.status == COMPLETED:
        body["metrics"] = {"inference_time": job.inference_time}
        if job.error:
            body["error"] = job.error
            body["error_type"] = job.error_type or "request_error"
    return body


def result_response(job: Job) -> Response:
    """The stored outcome, replayed: the app's status code and JSON body."""
    headers = {REQUEST_ID_HEADER: job.id}
    if job.error_type and job.result_status_code != 200:
        headers["X-Fal-Error-Type"] = job.error_type
    return Response(
        content=(job.result_json or "null").encode("utf-8"),
        status_code=job.result_status_code or 200,
        media_type="application/json",
        headers=headers,
    )


def sse_response(events: AsyncIterator[str], request_id: str) -> StreamingResponse:
    """Server-sent events for request `request_id`, unbuffered by proxies."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def find_job(store: JobStore, owner: str, endpoint: str, request_id: str, not_found: dict[str, Any] | None = None) -> Job:
    """The job, if it exists and belongs to `owner` on `endpoint`; 404 `not_found` otherwise (no existence leak)."""
    job = store.get(request_id)
    if job is None or job.owner != owner or job.endpoint != endpoint:
        raise ProtocolError(404, not_found or {"detail": "Request not found"}, request_id)
    return job


class RequestedJob:
    """Dependency of the per-request routes: the caller's job at `/{owner}/{alias}/requests/{request_id}`,
    or a 404 with `not_found` as its body (fal's cancel answers `status: NOT_FOUND`)."""

    def __init__(self, not_found: dict[str, Any] | None = None) -> None:
        self.not_found = not_found

    def __call__(
        self,
        owner: str,
        alias: str,
        request_id: str,
        caller: str = Depends(require_owner),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_app_settings),
    ) -> Job:
        return find_job(store, caller, check_endpoint(settings, owner, alias), request_id, self.not_found)


requested_job = RequestedJob()
cancellable_job = RequestedJob({"status": "NOT_FOUND", "detail": "Request not found"})


def enqueue(
    request: Request, store: JobStore, settings: Settings, *, owner: str, endpoint: str, params: ToonCrafterInput,
    webhook_url: str | None,
) -> Job:
    """Checks, then one INSERT; wakes the in-process worker."""
    check_input_urls(params, settings)
    if webhook_url is not None:
        try:
            check_webhook_url(webhook_url)
        except WebhookURLError as exc:
            raise ProtocolError(422, {"detail": [{"loc": ["query", "fal_webhook"], "msg": str(exc), "type": "value_error"}], "message": str(exc)}) from exc
    job = store.submit(
        endpoint=endpoint,
        owner=owner,
        input=params.model_dump(mode="json", exclude_unset=True),
        base_url=server_base_url(request),
        webhook_url=webhook_url,
        start_deadline=start_deadline(request),
    )
    worker = getattr(request.app.state, "worker", None)
    if worker is not None:
        worker.notify()
    return job


def fal_webhook_query(
    fal_webhook: str | None = Query(None, description="URL that receives fal's webhook envelope when the request completes."),
) -> str | None:
    return fal_webhook


def no_webhook() -> None:
    """The run routes take no webhook (fal's `fal_webhook` is a queue parameter)."""


def submitted_job(webhook: Callable[..., str | None]) -> Callable[..., Job]:
    """Dependency of the submit and run routes: the endpoint and the input checked, then the job queued.
    `webhook` is the dependency giving its webhook URL (`fal_webhook_query` or `no_webhook`)."""

    def dependency(
        request: Request,
        owner: str,
        alias: str,
        params: ToonCrafterInput,
        webhook_url: str | None = Depends(webhook),
        caller: str = Depends(require_owner),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_app_settings),
    ) -> Job:
        endpoint = check_endpoint(settings, owner, alias, request.path_params.get("subpath", ""))
        return enqueue(request, store, settings, owner=caller, endpoint=endpoint, params=params, webhook_url=webhook_url)

    return dependency


class QueueSubmitted(BaseModel):
    """What submit answers (fal's queue handle); the URLs are absolute and point back at this server."""

    status: str = Field("IN_QUEUE", description="Always IN_QUEUE at submit.")
    request_id: str
    response_url: str = Field(..., description="GET it for the result once the status is COMPLETED.")
    status_url: str = Field(..., description="GET it (202 while queued or running, 200 when completed); `?logs=1` adds logs.")
    cancel_url: str = Field(..., description="PUT it to cancel.")
    queue_position: int = Field(..., description="Requests ahead of this one.")


# --- the router ---------------------------------------------------------------------------------


def queue_router() -> APIRouter:
    router = APIRouter(prefix=QUEUE_PREFIX, tags=["queue"])
    base = "/{owner}/{alias}/requests/{request_id}"

    def submit(
        request: Request,
        job: Job = Depends(submitted_job(fal_webhook_query)),
        store: JobStore = Depends(get_store),
    ) -> JSONResponse:
        """Queue a request; poll `status_url`, then fetch `response_url`."""
        body = {
            "status": "IN_QUEUE",
            "request_id": job.id,
            "gateway_request_id": job.id,
            **request_urls(queue_base_url(request), job.endpoint, job.id),
            "queue_position": store.queue_position(job),
        }
        return JSONResponse(body, headers={REQUEST_ID_HEADER: job.id})

    router.add_api_route(
        "/{owner}/{alias}", submit, methods=["POST"], summary="Submit a request", responses={200: {"model": QueueSubmitted}}
    )
    router.add_api_route("/{owner}/{alias}/{subpath:path}", submit, methods=["POST"], include_in_schema=False)

    def status(
        request: Request,
        logs: str | None = Query(None, description="1/true to include the logs"),
        job: Job = Depends(requested_job),
        store: JobStore = Depends(get_store),
    ) -> JSONResponse:
        """202 while queued or running, 200 once completed."""
        entries = [entry.to_fal() for entry in store.logs(job.id)] if wants_logs(logs) else None
        position = store.queue_position(job) if job.status == IN_QUEUE else None
        body = status_body(job, queue_base=queue_base_url(request), queue_position=position, logs=entries)
        return JSONResponse(body, status_code=200 if job.status == COMPLETED else 202, headers={REQUEST_ID_HEADER: job.id})

    for path in (f"{base}/status", f"{base}/status/"):
        router.add_api_route(path, status, methods=["GET"], summary="Request status", include_in_schema=path.endswith("status"))

    def status_stream(
        request: Request,
        logs: str | None = Query(None, description="1/true to include the logs"),
        job: Job = Depends(requested_job),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_app_settings),
    ) -> StreamingResponse:
        """Server-sent status events; each carries only new log lines; closes after COMPLETED."""
        events = status_events(
            store, job.id, queue_base=queue_base_url(request), with_logs=wants_logs(logs), keepalive_s=settings.sse_keepalive_s
        )
        return sse_response(events, job.id)

    for path in (f"{base}/status/stream", f"{base}/status/stream/"):
        router.add_api_route(path, status_stream, methods=["GET"], summary="Request status stream (SSE)", include_in_schema=not path.endswith("/"))

    def result(job: Job = Depends(requested_job)) -> Response:
        """The output (or the app's error, with its status code); 400 until the request completes."""
        if job.status != COMPLETED:
            where = "in the queue" if job.status == IN_QUEUE else "in progress"
            raise ProtocolError(400, {"detail": f"Request is still {where}", "status": job.status}, job.id)
        return result_response(job)

    for path in (base, f"{base}/"):
        router.add_api_route(path, result, methods=["GET"], summary="Request result", include_in_schema=not path.endswith("/"))

    def cancel(
        request: Request,
        job: Job = Depends(cancellable_job),
        store: JobStore = Depends(get_store),
    ) -> JSONResponse:
        """Remove a queued request, or ask a running one to stop between steps."""
        outcome = store.request_cancel(job.id)
        headers = {REQUEST_ID_HEADER: job.id}
        if outcome is CancelOutcome.ALREADY_COMPLETED:
            return JSONResponse({"status": "ALREADY_COMPLETED", "detail": "Request already completed"}, 400, headers)
        if outcome is CancelOutcome.NOT_FOUND:  # purged between the two reads
            return JSONResponse({"status": "NOT_FOUND", "detail": "Request not found"}, 404, headers)
        if outcome is CancelOutcome.CANCELLED:
            sender = getattr(request.app.state, "webhook_sender", None)
            if sender is not None:
                sender.notify()
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202, headers)

    for path in (f"{base}/cancel", f"{base}/cancel/"):
        router.add_api_route(path, cancel, methods=["PUT"], summary="Cancel a request", include_in_schema=not path.endswith("/"))

    return router


async def status_events(store: JobStore, job_id: str, *, queue_base: str, with_logs: bool, keepalive_s: float):
    """SSE frames: a status event on every change (new logs, status, queue position), `: ping` when idle."""
    last_log_seq = 0
    last_state: tuple | None = None
    last_sent = time.monotonic()
    while True:
        job = await run_in_threadpool(store.get, job_id)
        if job is None:  # purged while streaming
            return
        new_logs = await run_in_threadpool(store.logs, job_id, last_log_seq) if with_logs else []
        if new_logs:
            last_log_seq = new_logs[-1].seq
        position = await run_in_threadpool(store.queue_position, job) if job.status == IN_QUEUE else None
        state = (job.status, position)
        if new_logs or state != last_state or job.status == COMPLETED:
            body = status_body(
                job, queue_base=queue_base, queue_position=position, logs=[e.to_fal() for e in new_logs] if with_logs else None
            )
            yield f"data: {json.dumps(body)}\n\n"
            last_state = state
            last_sent = time.monotonic()
            if job.status == COMPLETED:
                return
        elif time.monotonic() - last_sent >= keepalive_s:
            yield ": ping\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(SSE_POLL_S)
