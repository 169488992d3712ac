"""fal's queue protocol: submit, status, status stream (SSE), result and cancel.

Paths (under the queue prefix `/queue`, see `app.py` for how the queue host is told apart):
    POST /queue/{owner}/{alias}[/{path}]                       submit -> 200 {request_id, *_url, queue_position}
    GET  /queue/{owner}/{alias}/requests/{id}/status[/]         202 while IN_QUEUE/IN_PROGRESS, 200 when COMPLETED
    GET  /queue/{owner}/{alias}/requests/{id}/status/stream[/]  text/event-stream, log deltas, closes after COMPLETED
    GET  /queue/{owner}/{alias}/requests/{id}[/]                the stored result replayed (code + body), 400 before
    PUT  /queue/{owner}/{alias}/requests/{id}/cancel[/]         202 / 400 ALREADY_COMPLETED / 404 NOT_FOUND
Every slash variant is registered (no redirects, ever); an unknown id, or another key's id, is 404.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from tooncrafter.service.api.deps import (
    cancellable_job,
    get_runtime,
    get_settings,
    get_store,
    requested_job,
)
from tooncrafter.service.api.protocol import (
    QUEUE_PREFIX,
    REQUEST_ID_HEADER,
    ProtocolError,
    queue_base_url,
    request_urls,
    result_response,
    status_body,
    wants_logs,
)
from tooncrafter.service.api.sse import sse_response, status_events
from tooncrafter.service.api.submit import fal_webhook_query, submitted_job
from tooncrafter.service.jobs import COMPLETED, IN_QUEUE, CancelOutcome, Job, JobStore
from tooncrafter.service.runtime import Runtime
from tooncrafter.settings import Settings


class QueueSubmitted(BaseModel):
    """What submit answers (fal's queue handle); the URLs are absolute and point back at this server."""

    status: str = Field("IN_QUEUE", description="Always IN_QUEUE at submit.")
    request_id: str
    response_url: str = Field(..., description="GET it for the result once the status is COMPLETED.")
    status_url: str = Field(..., description="GET it (202 while queued or running, 200 when completed); `?logs=1` adds logs.")
    cancel_url: str = Field(..., description="PUT it to cancel.")
    queue_position: int = Field(..., description="Requests ahead of this one.")


def queue_router() -> APIRouter:
    router = APIRouter(prefix=QUEUE_PREFIX, tags=["queue"])
    base = "/{owner}/{alias}/requests/{request_id}"

    def submit(
        request: Request,
        job: Job = Depends(submitted_job(fal_webhook_query)),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_settings),
    ) -> JSONResponse:
        """Queue a request; poll `status_url`, then fetch `response_url`."""
        body = {
            "status": "IN_QUEUE",
            "request_id": job.id,
            "gateway_request_id": job.id,
            **request_urls(queue_base_url(request, settings), job.endpoint, job.id),
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
        settings: Settings = Depends(get_settings),
    ) -> JSONResponse:
        """202 while queued or running, 200 once completed."""
        entries = [entry.to_fal() for entry in store.logs(job.id)] if wants_logs(logs) else None
        position = store.queue_position(job) if job.status == IN_QUEUE else None
        body = status_body(job, queue_base=queue_base_url(request, settings), queue_position=position, logs=entries)
        return JSONResponse(body, status_code=200 if job.status == COMPLETED else 202, headers={REQUEST_ID_HEADER: job.id})

    for path in (f"{base}/status", f"{base}/status/"):
        router.add_api_route(path, status, methods=["GET"], summary="Request status", include_in_schema=path.endswith("status"))

    def status_stream(
        request: Request,
        logs: str | None = Query(None, description="1/true to include the logs"),
        job: Job = Depends(requested_job),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_settings),
    ) -> StreamingResponse:
        """Server-sent status events; each carries only new log lines; closes after COMPLETED."""
        events = status_events(
            store, job.id, queue_base=queue_base_url(request, settings), with_logs=wants_logs(logs), keepalive_s=settings.sse_keepalive_s
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

    def cancel(job: Job = Depends(cancellable_job), runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
        """Remove a queued request, or ask a running one to stop between steps."""
        outcome = runtime.store.request_cancel(job.id)
        headers = {REQUEST_ID_HEADER: job.id}
        if outcome is CancelOutcome.ALREADY_COMPLETED:
            return JSONResponse({"status": "ALREADY_COMPLETED", "detail": "Request already completed"}, 400, headers)
        if outcome is CancelOutcome.NOT_FOUND:  # purged between the two reads
            return JSONResponse({"status": "NOT_FOUND", "detail": "Request not found"}, 404, headers)
        if outcome is CancelOutcome.CANCELLED:  # was queued: completed now, its webhook is due
            runtime.job_completed()
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202, headers)

    for path in (f"{base}/cancel", f"{base}/cancel/"):
        router.add_api_route(path, cancel, methods=["PUT"], summary="Cancel a request", include_in_schema=not path.endswith("/"))

    return router
