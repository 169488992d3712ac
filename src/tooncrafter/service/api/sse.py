"""Server-sent status events, shared by the queue's status stream and the streaming run."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tooncrafter.service.api.protocol import REQUEST_ID_HEADER, status_body
from tooncrafter.service.jobs import COMPLETED, IN_QUEUE, JobStore

SSE_POLL_S = 0.2


def sse_response(events: AsyncIterator[str], request_id: str) -> StreamingResponse:
    """Server-sent events for request `request_id`, unbuffered by proxies."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={REQUEST_ID_HEADER: request_id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def status_events(
    store: JobStore, job_id: str, *, queue_base: str, with_logs: bool, keepalive_s: float
) -> AsyncIterator[str]:
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
