"""Typed dependencies of the routes: the process's `Runtime` from the lifespan state, and what it holds.

The app's lifespan yields `LifespanState` (Starlette's lifespan state), so every request carries the
runtime in `request.state.runtime`; routes ask for the piece they need (`Depends(get_store)`, ...)
and tests replace any of them through `app.dependency_overrides`.
"""

from __future__ import annotations

from typing import Any, TypedDict

from fastapi import Depends, Request

from tooncrafter.service.api.protocol import check_endpoint, find_job
from tooncrafter.service.auth import authenticate
from tooncrafter.service.jobs import Job, JobStore
from tooncrafter.service.runtime import Runtime
from tooncrafter.service.storage.base import Storage
from tooncrafter.service.storage.upload_tokens import SignedUploads
from tooncrafter.settings import Settings


class LifespanState(TypedDict):
    """What the app's lifespan yields; Starlette copies it into every request's `request.state`."""

    runtime: Runtime


def get_runtime(request: Request) -> Runtime:
    return request.state.runtime


def get_settings(runtime: Runtime = Depends(get_runtime)) -> Settings:
    return runtime.settings


def get_store(runtime: Runtime = Depends(get_runtime)) -> JobStore:
    return runtime.store


def get_storage(runtime: Runtime = Depends(get_runtime)) -> Storage:
    return runtime.storage


def get_upload_tokens(runtime: Runtime = Depends(get_runtime)) -> SignedUploads:
    return runtime.upload_tokens


def require_owner(request: Request, settings: Settings = Depends(get_settings)) -> str:
    """The authenticated caller's owner id (401 when keys are configured and this one is not among them)."""
    return authenticate(settings, request.headers.get("authorization"))


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
        settings: Settings = Depends(get_settings),
    ) -> Job:
        return find_job(store, caller, check_endpoint(settings, owner, alias), request_id, self.not_found)


requested_job = RequestedJob()
cancellable_job = RequestedJob({"status": "NOT_FOUND", "detail": "Request not found"})
