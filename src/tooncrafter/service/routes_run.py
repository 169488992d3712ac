"""fal's synchronous run: `POST /{owner}/{alias}` answers with the output itself.

The request still goes through the job store and a worker (so runs and queued requests share the
GPU fairly, and `x-fal-request-id` names a real job); the handler just waits for it and replays
the result (code and body). If the client goes away before the end, the job is cancelled.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from tooncrafter.schema import ToonCrafterInput, ToonCrafterOutput
from tooncrafter.service.auth import require_owner
from tooncrafter.service.jobs import COMPLETED, JobStore
from tooncrafter.service.routes_queue import check_endpoint, enqueue, get_app_settings, get_store, result_response
from tooncrafter.settings import Settings

RUN_POLL_S = 0.1


def run_router() -> APIRouter:
    router = APIRouter(tags=["run"])

    async def run(
        request: Request,
        owner: str,
        alias: str,
        params: ToonCrafterInput,
        caller: str = Depends(require_owner),
        store: JobStore = Depends(get_store),
        settings: Settings = Depends(get_app_settings),
    ) -> Response:
        """Run the model and wait for its output (no queue handle; use the queue for long jobs)."""
        endpoint = check_endpoint(settings, owner, alias, request.path_params.get("subpath", ""))
        job = await run_in_threadpool(
            enqueue, request, store, settings, owner=caller, endpoint=endpoint, params=params, webhook_url=None
        )
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

    router.add_api_route(
        "/{owner}/{alias}", run, methods=["POST"], summary="Run (wait for the output)", responses={200: {"model": ToonCrafterOutput}}
    )
    router.add_api_route("/{owner}/{alias}/{subpath:path}", run, methods=["POST"], include_in_schema=False)
    return router
