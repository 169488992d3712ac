"""Shared pieces for the service tests: a fast fake generator, settings, and a real uvicorn on loopback.

Importable as `helpers.service` from any test (pyproject's pytest `pythonpath` holds `tests`).

Swapping the fake for the real pipeline is one line: pass `generator_factory=tiny_pipeline_factory`
(or any `Settings -> Generator` callable) to `running_server`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import numpy as np
from PIL import Image

from tooncrafter.fixtures import DEFAULT_FIXTURES
from tooncrafter.generation import GenerationRequest, GenerationResult, ProgressCallback
from tooncrafter.service.jobs import JobStore
from tooncrafter.service.runtime import Runtime
from tooncrafter.settings import Settings

ENDPOINT = "fal-ai/toon-crafter"
TINY_CHECKPOINT = DEFAULT_FIXTURES
needs_tiny_checkpoint = pytest.mark.skipif(
    not (TINY_CHECKPOINT / "model.ckpt").exists(), reason=f"no tiny fixture checkpoint at {TINY_CHECKPOINT}"
)
SERVICE_TESTS_DIR = Path(__file__).resolve().parents[1] / "service"


@dataclass
class FakeGenerator:
    """A `Generator` whose frames are a function of the inputs, a few ms per step.

    `gate` (when set) holds step 1 until it is set, or until `release()` turns true: a held step
    ends like a long real one, and only then does the worker's `on_step` see a cancel."""

    num_frames: int = 8
    step_sleep_s: float = 0.005
    gate: threading.Event | None = None
    release: Callable[[], bool] | None = None
    started: threading.Event = field(default_factory=threading.Event)
    requests: list[GenerationRequest] = field(default_factory=list)

    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult:
        self.requests.append(request)
        self.started.set()
        for step in range(1, request.steps + 1):
            if step == 1 and self.gate is not None:
                while not self.gate.wait(0.01) and not (self.release is not None and self.release()):
                    pass
            time.sleep(self.step_sleep_s)
            if on_step is not None:
                on_step(step, request.steps)
        first = np.asarray(request.keyframes[0].resize((32, 32)), dtype=np.uint8)
        frames = np.stack([np.roll(first, i, axis=1) for i in range(self.num_frames)])
        return GenerationResult(frames=frames, seed=request.seed)


def cancel_requested(store: JobStore) -> Callable[[], bool]:
    """`FakeGenerator.release` for tests whose cancel comes from a client process: true once any
    running job of `store` was asked to stop."""
    from sqlalchemy import select

    from tooncrafter.service.jobs import IN_PROGRESS
    from tooncrafter.service.jobs.tables import jobs_table

    query = select(jobs_table.c.id).where(jobs_table.c.status == IN_PROGRESS, jobs_table.c.cancel_requested.is_(True))

    def released() -> bool:
        with store.engine.connect() as conn:
            return conn.execute(query).first() is not None

    return released


def runtime_of(client: Any) -> Runtime:
    """The runtime an app's lifespan opened, from a `TestClient` used as a context manager."""
    return client.app_state["runtime"]


def fake_generator(_settings: Settings) -> FakeGenerator:
    """For processes started by tests (`TOONCRAFTER_TEST_GENERATOR=helpers.service:fake_generator`)."""
    return FakeGenerator()


def fake_factory(generator: FakeGenerator | None = None):
    gen = generator or FakeGenerator()
    return lambda _settings: gen


def tiny_pipeline_factory(settings: Settings):
    """The real pipeline on the tiny fixture checkpoint (for end-to-end tests)."""
    from tooncrafter.pipeline import ToonCrafterPipeline

    return ToonCrafterPipeline.from_pretrained(str(TINY_CHECKPOINT), device="cpu", dtype="float32")


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "allow_private_urls": True,
        "worker_poll_s": 0.05,
        "cancel_poll_s": 0.0,  # the fake's steps take milliseconds: read the cancel flag at every one
        "webhook_base_delay_s": 0.2,
        "webhook_max_delay_s": 1.0,
        "webhook_timeout_s": 5.0,
        "allowed_hosts": ["testserver", "127.0.0.1", "localhost", "::1"],  # TestClient's host and loopback
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(color: tuple[int, int, int] = (200, 30, 30)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color)).decode()


def two_keyframes() -> list[str]:
    return [png_data_uri((200, 30, 30)), png_data_uri((30, 30, 200))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TLSFiles:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_tls(tmp_path: Path) -> TLSFiles:
    """A trustme CA and a server certificate for 127.0.0.1 and localhost."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TLSFiles(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(files.cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        with open(files.cert_pem, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(files.key_pem))
    return files


@dataclass
class RunningServer:
    app: Any
    host: str
    port: int
    scheme: str
    tls: TLSFiles | None
    server: Any = None  # the uvicorn.Server, whose lifespan holds the app's state

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def runtime(self) -> Runtime:
        return self.server.lifespan.state["runtime"]

    @property
    def store(self) -> JobStore:
        return self.runtime.store

    def client(self, **kwargs: Any) -> httpx.Client:
        verify: Any = True
        if self.tls is not None:
            verify = ssl.create_default_context(cafile=str(self.tls.ca_pem))
        return httpx.Client(base_url=self.base_url, verify=verify, **{"timeout": 30, **kwargs})


@contextlib.contextmanager
def running_server(app: Any, *, tls: TLSFiles | None = None, http: Any = "auto") -> Iterator[RunningServer]:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread (lifespan included); `http` is
    uvicorn's protocol (`http_limits.guarded_protocol(...)` for the one `tooncrafter serve` runs)."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=str(tls.cert_pem) if tls else None,
        ssl_keyfile=str(tls.key_pem) if tls else None,
        timeout_graceful_shutdown=5,
        http=http,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield RunningServer(app, "127.0.0.1", port, "https" if tls else "http", tls, server)
    finally:
        server.should_exit = True
        thread.join(20)


def wait_until(predicate, timeout_s: float = 20.0, interval_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


def run_python_client(script: str, server: RunningServer, *, key: str = "test-key", timeout_s: float = 120) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter with fal_client pointed at `server` (https via the test CA)."""
    assert server.tls is not None, "fal_client only speaks https"
    hostport = f"{server.host}:{server.port}"
    env = {
        **os.environ,
        "FAL_RUN_HOST": hostport,
        "FAL_QUEUE_RUN_HOST": f"{hostport}/queue",
        "SSL_CERT_FILE": str(server.tls.ca_pem),
        "FAL_KEY": key,
    }
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout_s
    )


@contextlib.contextmanager
def postgres_server(tmp_path: Path) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port>; yields its SQLAlchemy URL.

    initdb refuses to run as root, so as root the cluster runs as the `postgres` user.
    """
    import getpass
    import shutil as _shutil

    initdb, pg_ctl = _shutil.which("initdb"), _shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    import tempfile

    # not under tmp_path: pytest's base directory is private to root, the postgres user cannot enter it
    root = Path(tempfile.mkdtemp(prefix="tooncrafter-pg-"))
    os.chmod(root, 0o755)
    data = root / "pgdata"
    data.mkdir()
    prefix: list[str] = []
    user = getpass.getuser()
    if os.geteuid() == 0:
        _shutil.chown(data, "postgres")
        prefix, user = ["runuser", "-u", "postgres", "--"], "postgres"
    port = free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", user], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", options, "-w", "start", "-l", str(data / "log")], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        _shutil.rmtree(root, ignore_errors=True)


JS_DIR = SERVICE_TESTS_DIR / "js"


def unavailable(reason: str) -> None:
    """Skip a test that needs a missing tool, except in CI (env CI set), where that is a failure."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def npm_project_dir(directory: Path, package: str) -> Path:
    """`directory` with its package.json installed (npm ci on first use, checked by `package` being in
    node_modules). Skipped without node or npm, except in CI."""
    import shutil

    if shutil.which("node") is None:
        unavailable("node is not installed")
    if not (directory / "node_modules" / package).is_dir():
        npm = shutil.which("npm")
        if npm is None:
            unavailable("npm is not installed")
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=directory, capture_output=True, text=True)
        if proc.returncode != 0:
            unavailable(f"npm ci in {directory.name} failed: {proc.stderr[-500:]}")
    return directory


def js_client_dir() -> Path:
    """tests/service/js with @fal-ai/client installed."""
    return npm_project_dir(JS_DIR, "@fal-ai/client")


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server (the real S3 HTTP API) on 127.0.0.1:<free port>, with boto3's test credentials
    in the environment while it runs; yields its endpoint URL."""
    import pytest
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_ENV.items():
            mp.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def fresh_bucket(endpoint: str) -> str:
    """A new empty bucket on the S3 server at `endpoint`."""
    import uuid

    import boto3

    bucket = f"tc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def storage_settings(kind: str, s3_endpoint: str | None) -> dict[str, Any]:
    """Settings overrides for files on local disk (`local`) or in a fresh bucket of `s3_endpoint` (`s3`)."""
    if kind == "local":
        return {}
    assert s3_endpoint is not None
    return {"storage_url": f"s3://{fresh_bucket(s3_endpoint)}/files", "s3_endpoint_url": s3_endpoint}
