"""What `tooncrafter serve` and `tooncrafter worker` run."""

from __future__ import annotations

import importlib
import ipaddress
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from tooncrafter.settings import Settings

if TYPE_CHECKING:
    from tooncrafter.service.worker import GeneratorFactory

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8000,
    with_worker: bool = True,
    *,
    allow_open: bool = False,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> None:
    """Run the API (and by default a worker) under uvicorn until interrupted.

    With no API keys configured the API is open, so it binds loopback only: a non-loopback `host`
    is replaced by 127.0.0.1 (and logged) unless `allow_open` is set.
    """
    import uvicorn

    from tooncrafter.service.app import create_app
    from tooncrafter.service.http_limits import guarded_protocol, raise_open_file_limit
    from tooncrafter.service.worker import default_generator_factory

    if not settings.auth_enabled and not _is_loopback(host):
        if allow_open:
            logger.warning("no API keys configured and binding %s: the API is open to the network", host)
        else:
            logger.warning(
                "no API keys configured (TOONCRAFTER_API_KEYS): binding 127.0.0.1 instead of %s; "
                "set API keys to serve other machines",
                host,
            )
            host = "127.0.0.1"
    factory = test_generator_factory_from_env() or default_generator_factory
    if with_worker:
        # The model loads before the port opens: a server that cannot run jobs must not take them.
        generator = factory(settings)
        factory = lambda _settings: generator  # noqa: E731 - the worker thread gets the loaded model
    app = create_app(settings, generator_factory=factory, with_worker=with_worker)
    # Room for every allowed connection plus the database, storage and model files.
    raise_open_file_limit(settings.max_connections + 512)
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        log_level="info",
        log_config=None,  # the CLI's logging (redacted, text or JSON) handles uvicorn's lines too
        timeout_graceful_shutdown=30,
        timeout_keep_alive=int(max(1, settings.keep_alive_s)),
        http=guarded_protocol(
            max_connections=settings.max_connections,
            header_timeout_s=settings.request_header_timeout_s,
            body_timeout_s=settings.request_body_timeout_s,
        ),
        backlog=min(settings.max_connections, 4096),
    )


TEST_GENERATOR_ENV = "TOONCRAFTER_TEST_GENERATOR"


def test_generator_factory_from_env() -> GeneratorFactory | None:
    """TESTS ONLY: `TOONCRAFTER_TEST_GENERATOR=module:factory` swaps the model for a fake generator.

    The scale-out tests start real worker processes that must not load a model; this is how they
    hand one over. It is deliberately not a `Settings` field and it logs a warning: a deployment
    never sets it.
    """
    spec = os.environ.get(TEST_GENERATOR_ENV)
    if not spec:
        return None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{TEST_GENERATOR_ENV} must be 'module:factory', got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    logger.warning("%s=%s: using a TEST generator instead of the model", TEST_GENERATOR_ENV, spec)
    return factory


def run_worker(settings: Settings, generator_factory: GeneratorFactory | None = None) -> None:
    """A worker alone (scale-out): takes jobs from the shared job store until SIGINT/SIGTERM.

    It also delivers due webhooks (claimed per attempt in the database, so any number of API and
    worker processes can run senders without sending one twice). SIGTERM (or SIGINT) takes no new
    job and lets the running one finish within `worker_grace_s`; past that, or at a second signal,
    it goes back to the queue after its current step. A SIGKILL loses nothing either: the job's
    lease runs out and another worker takes it.
    """
    from tooncrafter.service.runtime import open_runtime
    from tooncrafter.service.worker import default_generator_factory

    factory = generator_factory or test_generator_factory_from_env() or default_generator_factory
    generator = factory(settings)  # fails before anything starts: a worker without its model exits non-zero
    runtime = open_runtime(settings, generator_factory=lambda _settings: generator, start_worker=False)
    worker = runtime.worker
    assert worker is not None

    def _stop(signum: int, _frame: object) -> None:
        if worker.draining:  # a second signal: hand the running job back after its current step
            logger.info("signal %d again: stopping after the current step", signum)
            threading.Thread(target=worker.stop, daemon=True).start()
            return
        logger.info("signal %d: taking no new job; the running one has %g s to finish", signum, settings.worker_grace_s)
        worker.drain(settings.worker_grace_s)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run_forever()
    finally:
        runtime.close()
