"""fal's synchronous run: `POST /{owner}/{alias}` answers with the output itself.

The request still goes through the job store and a worker (so runs and queued requests share the
GPU fairly, and `x-fal-request-id` names a real job); the handler just waits for it and replays
the result (code and body). If the client goes away before the end, the job is cancelled.

`POST /{owner}/{alias}/stream` is fal's streaming run (`fal_client.stream`, the JS `fal.stream`):
server-sent events, each `data:` a JSON object: status objects carrying the new log lines while the
request waits and runs (`step 3/50`, ...), then one last event with the output itself (or the error
body, with `status_code` added), after which the stream closes.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from tooncrafter.schema import ToonCrafterOutput
from tooncrafter.service.api.deps import get_settings, get_store
from tooncrafter.service.api.protocol import queue_base_url, result_response
from tooncrafter.service.api.sse import sse_response, status_events
from tooncrafter.service.api.submit import no_webhook, submitted_job
from tooncrafter.service.jobs import COMPLETED, Job, JobStore
from tooncrafter.settings import Settings

RUN_POLL_S = 0.1


def run_router() -> APIRouter:
    router = APIRouter(tags=["run"])

    async def run(
        request: Request,
        job: Job = Depends(submitted_job(no_webhook)),
        store: JobStore = Depends(get_store),
    ) -> Response:
        """Run the model and wait for its output (no queue handle; use the queue for long jobs)."""
        while True:
            current = await run_in_threadpool(store.get, job.id)
            if current is None:  # purged: only if retention is shorter than the run
                return Response(b'{"detail":"Request expired"}', 410, media_type="application/json")
            if current.status == COMPLETED:
                return result_response(current)
            if await request.is_disconnected():
                await run_in_threadpool(store.request_cancel, job.id)
                return Response(b'{"detail":"Client disconnected"}', 400, media_type="application/json")
            await asyncio.sleep(RUN_POLL_S)

    async def run_stream(
        request: Request,
        job: Job = Depends(submitted_job(no_webhook)),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_settings),
    ) -> StreamingResponse:
        """Run and stream progress (status events with new log lines), then the output as the last event."""

        async def events():
            finished = False
            try:
                async for event in status_events(
                    store, job.id, queue_base=queue_base_url(request, settings), with_logs=True, keepalive_s=settings.sse_keepalive_s
                ):
                    yield event
                final = await run_in_threadpool(store.get, job.id)
                finished = True
                if final is None:
                    yield f"data: {json.dumps({'detail': 'Request expired', 'status_code': 410})}\n\n"
                    return
                body = json.loads(final.result_json or "null")
                if (final.result_status_code or 200) != 200:
                    body = {**(body if isinstance(body, dict) else {"detail": body}), "status_code": final.result_status_code}
                yield f"data: {json.dumps(body)}\n\n"
            finally:
                if not finished:  # the client went away: stop the work it asked for
                    await run_in_threadpool(store.request_cancel, job.id)

        return sse_response(events(), job.id)

    router.add_api_route(
        "/{owner}/{alias}", run, methods=["POST"], summary="Run (wait for the output)", responses={200: {"model": ToonCrafterOutput}}
    )
    router.add_api_route("/{owner}/{alias}/stream", run_stream, methods=["POST"], summary="Run and stream progress (SSE)")
    router.add_api_route("/{owner}/{alias}/{subpath:path}", run, methods=["POST"], include_in_schema=False)
    return router
