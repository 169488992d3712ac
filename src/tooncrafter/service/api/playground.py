"""The playground: a self-hosted page for trying the endpoint in a browser, before writing code.

    GET /                    the page (static/index.html)
    GET /playground/{name}   its scripts (ES modules) and style sheet (a fixed list: no directory walking)
    GET /playground/config   what the page must know about this server: whether it needs an API
                             key, the model's frame count, the endpoint id and the endpoint's defaults

The page itself uses only the public API (uploads through `/storage/upload/initiate`, the queue,
the status stream, cancel), like any client would: nothing here is a private back door.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, JSONResponse

from tooncrafter.schema import MAX_KEYFRAMES, contract_defaults
from tooncrafter.service.api.deps import get_runtime
from tooncrafter.service.runtime import Runtime

STATIC_DIR = Path(__file__).parents[1] / "static"
# The page's ES modules (app.js imports the others) and its style sheet.
SCRIPTS = ("app.js", "api.js", "state.js", "form.js", "keyframes.js", "sketches.js", "run.js", "history_store.js", "history.js", "code.js", "tabs.js")
ASSETS = {**{name: "text/javascript; charset=utf-8" for name in SCRIPTS}, "style.css": "text/css; charset=utf-8"}
# The page loads its own script and style sheet only; media and API calls may go to other origins
# (S3 video URLs, PUBLIC_URL behind a proxy, keyframe URLs the user pastes).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src * data: blob:; media-src * blob:; connect-src *; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def playground_router() -> APIRouter:
    """Routes of the playground page; hidden from the OpenAPI schema (they are not the API)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @router.get("/playground/config")
    def config(runtime: Runtime = Depends(get_runtime)) -> JSONResponse:
        return JSONResponse(
            {
                "auth_required": runtime.settings.auth_enabled,
                "num_frames": runtime.num_frames,
                "endpoint_id": runtime.settings.endpoint_id,
                "max_keyframes": MAX_KEYFRAMES,
                "defaults": contract_defaults(),
            }
        )

    @router.get("/playground/{name}")
    def asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise HTTPException(404, f"no playground file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=PAGE_HEADERS)

    return router
