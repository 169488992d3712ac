"""fal's protocol, as bodies and errors: what the queue and run routes answer, written once.

Every error a route answers on purpose is a `ProtocolError` (JSON `body`, `status_code`, and the
request id in `x-fal-request-id` when it can be a header value); the app turns it into a response.
The bodies (`status_body`, `result_response`, `request_urls`) follow fal-protocol.md section 4.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request, Response

from tooncrafter.service.jobs import (
    COMPLETED,
    IN_QUEUE,
    Job,
    JobStore,
    field_error_body,
)
from tooncrafter.settings import Settings

QUEUE_PREFIX = "/queue"
REQUEST_ID_HEADER = "x-fal-request-id"

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


def check_endpoint(settings: Settings, owner: str, alias: str, subpath: str = "") -> str:
    """`owner/alias` when this server serves it (and `subpath` is empty), else a fal-style 404."""
    endpoint = f"{owner}/{alias}"
    if endpoint != settings.endpoint_id:
        raise ProtocolError(404, {"detail": f"Application '{endpoint}' not found; this server runs '{settings.endpoint_id}'"})
    if subpath.strip("/"):
        raise ProtocolError(404, {"detail": f"Path /{subpath.strip('/')} not found"})
    return endpoint


def find_job(store: JobStore, owner: str, endpoint: str, request_id: str, not_found: dict[str, Any] | None = None) -> Job:
    """The job, if it exists and belongs to `owner` on `endpoint`; 404 `not_found` otherwise (no existence leak)."""
    job = store.get(request_id)
    if job is None or job.owner != owner or job.endpoint != endpoint:
        raise ProtocolError(404, not_found or {"detail": "Request not found"}, request_id)
    return job


def server_base_url(request: Request, settings: Settings) -> str:
    """Where this server is reached: PUBLIC_URL, else the request's scheme, host and root path."""
    return settings.public_url or str(request.base_url).rstrip("/")


def queue_base_url(request: Request, settings: Settings) -> str:
    """The queue host: `{server}/queue`, or the bare host when the client came in on a `queue.` host name."""
    if request.scope.get("tooncrafter.queue_host"):
        return server_base_url(request, settings)
    return server_base_url(request, settings) + QUEUE_PREFIX


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
