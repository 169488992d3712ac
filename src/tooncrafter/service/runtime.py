"""The resources one service process holds for its life, built from settings in one place.

`open_runtime(settings)` opens the job store, the file storage, the upload-token signer and the
webhook sender (started), reads the served model's frame count once, and, with a generator
factory, builds the worker (started unless `start_worker=False`, for a process that runs it in the
foreground). The app's lifespan (`app.py`), `tooncrafter worker` (`server.run_worker`) and the
tests all build their resources here; `Runtime.close` stops and closes them in reverse order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tooncrafter.service.jobs import JobStore
from tooncrafter.service.storage import storage_from_url
from tooncrafter.service.storage.base import Storage
from tooncrafter.service.storage.upload_tokens import SignedUploads
from tooncrafter.service.webhook_signing import Keyring
from tooncrafter.service.webhooks import WebhookSender
from tooncrafter.service.worker import GeneratorFactory, Worker
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)

UPLOAD_SECRET_NAME = "upload-tokens"


@dataclass
class Runtime:
    """What routes and workers share; built by `open_runtime`, never while a request is served."""

    settings: Settings
    store: JobStore
    storage: Storage
    upload_tokens: SignedUploads
    webhooks: WebhookSender
    keyring: Keyring
    """The webhook signing keys (published at /.well-known/jwks.json)."""
    num_frames: int
    """T of the served model (keyframes it can place, `keyframe_lengths` sums), read once at startup."""
    worker: Worker | None = None

    def job_queued(self) -> None:
        """A job was queued: the in-process worker (if any) looks now rather than at its next poll."""
        if self.worker is not None:
            self.worker.notify()

    def job_completed(self) -> None:
        """A job completed outside a worker (a cancel of a queued one): its webhook goes out now."""
        self.webhooks.notify()

    def worker_health(self) -> dict[str, Any] | None:
        """The in-process worker's state for /health; None in an API-only process."""
        if self.worker is None:
            return None
        error = self.worker.load_error
        return {"ready": self.worker.ready.is_set() and error is None, "alive": self.worker.alive, "error": str(error) if error else None}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.webhooks.stop()
        self.store.close()


def served_num_frames(checkpoint: str | None) -> int:
    """T of the served model, from the checkpoint's config (no weights loaded, torch not imported).

    A given checkpoint is resolved locally (file or directory); none means the released 512 model.
    An API process may not see the workers' checkpoint path: then it checks against the 512 model's
    frames and the worker re-checks each job against its own model.
    """
    from tooncrafter.model.config import builtin_config, load_config
    from tooncrafter.weights import WeightsNotFoundError, resolve_checkpoint

    try:
        config_path = resolve_checkpoint(checkpoint).config_path if checkpoint else None
    except WeightsNotFoundError as exc:
        logger.warning("checking keyframe_lengths against the 512 model's frames: %s", exc)
        config_path = None
    return load_config(config_path).num_frames if config_path is not None else builtin_config().num_frames


def open_runtime(
    settings: Settings, *, generator_factory: GeneratorFactory | None = None, start_worker: bool = True
) -> Runtime:
    """Every resource of one process; a worker only when `generator_factory` is given."""
    store = JobStore(settings.resolved_database_url)
    storage = storage_from_url(settings.resolved_storage_url)
    secret = settings.upload_secret.get_secret_value() if settings.upload_secret else store.shared_secret(UPLOAD_SECRET_NAME)
    num_frames = served_num_frames(settings.checkpoint)
    keyring = Keyring(store)
    webhooks = WebhookSender(store, settings, keyring)
    worker = None
    if generator_factory is not None:
        worker = Worker(store, storage, settings, generator_factory, on_complete=webhooks.notify)
    webhooks.start()
    if worker is not None and start_worker:
        worker.start()
    upload_tokens = SignedUploads(secret.encode("utf-8"))
    return Runtime(settings, store, storage, upload_tokens, webhooks, keyring, num_frames, worker)
