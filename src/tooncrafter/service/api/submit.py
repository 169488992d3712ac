"""Taking a request in, for the queue's submit and the synchronous run: check it, then queue it.

Everything that can be checked before any work is queued is checked here (the endpoint, the
served model's frame count, URL schemes, data URIs within the size limit, the webhook URL), so bad
input is a 422 naming the field at submit and never a failed job later.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import Depends, Query, Request

from tooncrafter.schema import ContractError, ToonCrafterInput, check_request_fits_model
from tooncrafter.service.api.deps import get_runtime, require_owner
from tooncrafter.service.api.protocol import (
    ProtocolError,
    check_endpoint,
    field_error_response,
    server_base_url,
)
from tooncrafter.service.inputs import InputError, decode_data_uri
from tooncrafter.service.jobs import Job
from tooncrafter.service.jobs.tables import PRIORITIES
from tooncrafter.service.outbound import OutboundURLError
from tooncrafter.service.runtime import Runtime
from tooncrafter.service.stored_inputs import save_input
from tooncrafter.service.webhooks import check_webhook_url
from tooncrafter.settings import Settings


def check_input_urls(params: ToonCrafterInput, settings: Settings, num_frames: int) -> None:
    """Submit-time checks the schema cannot do: the served model's frame count (keyframes it can place,
    `keyframe_lengths`, sketch frames, the frame multiplier), URL schemes, data URIs that decode within the
    size limit (keyframes and sketches alike)."""
    try:
        check_request_fits_model(params, num_frames)
    except ContractError as exc:
        raise field_error_response([exc.field], str(exc)) from exc

    for index, url in enumerate(params.keyframe_image_urls):
        _check_input_url("keyframe_image_urls", "keyframe", index, url, settings)
    for index, sketch in enumerate(params.sketch_image_urls or ()):
        _check_input_url("sketch_image_urls", "sketch", index, sketch.url, settings)


def _check_input_url(field: str, noun: str, index: int, url: str, settings: Settings) -> None:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        try:
            decode_data_uri(url, max_bytes=settings.input_max_bytes)
        except (InputError, ValueError) as exc:
            raise field_error_response([field, index], f"{noun} {index}: {exc}") from exc
    elif scheme not in ("http", "https"):
        raise field_error_response([field, index], f"{noun} {index} must be an http(s) URL or a data: URI")


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


PRIORITY_HEADER = "x-fal-queue-priority"


def queue_priority(request: Request) -> int:
    """`X-Fal-Queue-Priority: normal|low` (absent = normal); anything else is a 422 naming the header."""
    value = request.headers.get(PRIORITY_HEADER, "normal").strip().lower()
    if value not in PRIORITIES:
        message = f"must be one of {', '.join(PRIORITIES)}, got {value[:40]!r}"
        raise ProtocolError(
            422,
            {"detail": [{"loc": ["header", PRIORITY_HEADER], "msg": message, "type": "value_error"}],
             "message": f"{PRIORITY_HEADER}: {message}"},
        )
    return PRIORITIES[value]


def enqueue(
    request: Request, runtime: Runtime, *, owner: str, endpoint: str, params: ToonCrafterInput, webhook_url: str | None
) -> Job:
    """Checks, then the input (to storage when large, see `stored_inputs`) and one INSERT; wakes the in-process worker."""
    settings = runtime.settings
    check_input_urls(params, settings, runtime.num_frames)
    if webhook_url is not None:
        try:
            check_webhook_url(webhook_url)
        except OutboundURLError as exc:
            raise ProtocolError(422, {"detail": [{"loc": ["query", "fal_webhook"], "msg": str(exc), "type": "value_error"}], "message": str(exc)}) from exc
    priority, deadline = queue_priority(request), start_deadline(request)
    document, input_key = save_input(
        runtime.storage, params.model_dump(mode="json", exclude_unset=True), inline_max_bytes=settings.input_inline_max_bytes
    )
    try:
        job = runtime.store.submit(
            priority=priority,
            endpoint=endpoint,
            owner=owner,
            input=document,
            input_key=input_key,
            base_url=server_base_url(request, settings),
            webhook_url=webhook_url,
            start_deadline=deadline,
        )
    except BaseException:
        if input_key is not None:  # nothing refers to the file: do not leave it behind
            runtime.storage.delete(input_key)
        raise
    runtime.job_queued()
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
        runtime: Runtime = Depends(get_runtime),
    ) -> Job:
        endpoint = check_endpoint(runtime.settings, owner, alias, request.path_params.get("subpath", ""))
        return enqueue(request, runtime, owner=caller, endpoint=endpoint, params=params, webhook_url=webhook_url)

    return dependency
