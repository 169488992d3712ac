"""Scale-out: PostgreSQL + S3 as well as SQLite + files, many API processes and worker processes.

Real servers on loopback: a throw-away PostgreSQL cluster (`helpers.service.postgres_server`) and
moto's S3 server (`ThreadedMotoServer`, the real S3 HTTP API). The multi-process tests start
`python -m tooncrafter.cli serve --no-worker` and `python -m tooncrafter.cli worker` processes;
the workers run `slow_generator` below through the test-only `TOONCRAFTER_TEST_GENERATOR` hook.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.metrics import labelled, scrape, value
from helpers.service import (
    S3_ENV,
    FakeGenerator,
    fake_factory,
    free_port,
    make_settings,
    png_bytes,
    png_data_uri,
    postgres_server,
    wait_until,
)
from sqlalchemy import create_engine, text

from tooncrafter.service.app import create_app
from tooncrafter.service.jobs import JobOutcome, JobStore, metadata, migrate_engine
from tooncrafter.service.storage import storage_from_url
from tooncrafter.service.storage.base import StorageError
from tooncrafter.service.storage.s3 import S3Storage

Q = "/queue/fal-ai/toon-crafter"
SERVICE_TESTS_DIR = Path(__file__).resolve().parent  # this module and `helpers` must import in the workers


def slow_generator(_settings) -> FakeGenerator:
    """The worker processes' generator (TOONCRAFTER_TEST_GENERATOR=test_scaleout_service:slow_generator)."""
    return FakeGenerator(step_sleep_s=float(os.environ.get("SCALEOUT_STEP_S", "0.1")))


# --- servers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory) -> Iterator[str]:
    try:
        server = postgres_server(tmp_path_factory.mktemp("pg"))
        url = server.__enter__()
    except (FileNotFoundError, OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield url
    server.__exit__(None, None, None)


def fresh_database(pg_url: str) -> str:
    """A new empty database in the shared cluster (each test gets its own schema and queue)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return pg_url.rsplit("/", 1)[0] + f"/{name}"


def fresh_bucket(endpoint: str) -> str:
    import boto3

    bucket = f"tc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["sqlite+files", "postgresql+s3"])
def backend(request, tmp_path) -> dict[str, Any]:
    """Settings overrides for one of the two deployments."""
    if request.param == "sqlite+files":
        return {}
    endpoint = request.getfixturevalue("s3_endpoint")
    return {
        "database_url": fresh_database(request.getfixturevalue("pg_url")),
        "storage_url": f"s3://{fresh_bucket(endpoint)}/results",
        "s3_endpoint_url": endpoint,
    }


class Receiver:
    """A loopback webhook receiver that records every envelope."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- schema and storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_create_the_schema_the_code_uses(kind, tmp_path, request):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from tooncrafter.service.jobs.migrate import MIGRATIONS_DIR

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if kind == "sqlite" else fresh_database(request.getfixturevalue("pg_url"))
    engine = create_engine(url)
    migrate_engine(engine, "0001")  # the first release's schema ...
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))  # ... made with create_all: no version row
    store = JobStore(url)  # adopts it (stamp 0001) and upgrades
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_revision() == head
        assert compare_metadata(context, metadata) == []
    job = store.submit(endpoint="fal-ai/toon-crafter", owner="", input={}, base_url="http://x")
    assert store.claim("w", 30).lease_token
    store.close()
    JobStore(url).close()  # idempotent
    assert JobStore(url).get(job.id).status == "IN_PROGRESS"
    engine.dispose()


def test_s3_storage_round_trip(s3_endpoint):
    storage = storage_from_url(f"s3://{fresh_bucket(s3_endpoint)}/some/prefix?endpoint_url={s3_endpoint}")
    assert isinstance(storage, S3Storage) and storage.prefix == "some/prefix"
    stored = storage.put(b"hello world", content_type="text/plain", file_name="../greeting.txt")
    assert stored.file_name == "greeting.txt" and storage.stat(stored.key) == stored
    assert storage.read(stored.key) == b"hello world"
    assert b"".join(storage.iter_range(stored.key, 6, 10, chunk_size=2)) == b"world"
    with pytest.raises(StorageError):
        storage.put(b"other", content_type="text/plain", file_name="x", key=stored.key)  # never overwritten
    assert storage.read(stored.key) == b"hello world"
    names = [o["Key"] for o in storage.client.list_objects_v2(Bucket=storage.bucket)["Contents"]]
    assert names == [f"some/prefix/{stored.key}"]
    assert storage.stat("../../etc/passwd") is None and storage.stat("AAAAAAAAAAAAAAAAAAAA/none") is None
    with pytest.raises(FileNotFoundError):
        storage.read("AAAAAAAAAAAAAAAAAAAA/none")
    storage.delete(stored.key)
    storage.delete(stored.key)  # idempotent
    assert not storage.exists(stored.key)


# --- one process, both backends -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_stale_worker_cannot_overwrite_the_result(kind, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if kind == "sqlite" else fresh_database(request.getfixturevalue("pg_url"))
    store = JobStore(url)
    job = store.submit(endpoint="fal-ai/toon-crafter", owner="", input={}, base_url="http://x", webhook_url="http://hook")
    first = store.claim("worker-a", lease_s=0.05)
    time.sleep(0.1)
    assert store.requeue_expired(max_attempts=3) == 1
    second = store.claim("worker-a", lease_s=30)  # the same worker id runs it again: only the token tells them apart
    assert second.id == job.id and second.lease_token != first.lease_token and second.attempts == 2
    assert not store.heartbeat(job.id, "worker-a", 30, first.lease_token)
    assert not store.complete(job.id, JobOutcome(200, {"stale": True}), worker_id="worker-a", lease_token=first.lease_token)
    assert not store.release(job.id, "worker-a", first.lease_token)
    assert store.complete(job.id, JobOutcome(200, {"fresh": True}), worker_id="worker-a", lease_token=second.lease_token)
    assert not store.complete(job.id, JobOutcome(500, {}), worker_id="worker-a", lease_token=second.lease_token)
    done = store.get(job.id)
    assert json.loads(done.result_json) == {"fresh": True} and len(store.webhook_states(job.id)) == 1
    store.close()


def test_key_behaviours_on_both_backends(backend, tmp_path):
    """Upload, submit with a webhook, SSE logs, result, ranged download, cancel of a running job."""
    receiver = Receiver()
    gate = threading.Event()
    gen = FakeGenerator()
    settings = make_settings(tmp_path, **backend)
    try:
        with TestClient(create_app(settings, generator_factory=fake_factory(gen))) as client:
            initiated = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}).json()
            upload_path = initiated["upload_url"].replace("http://testserver", "")
            assert client.put(upload_path, content=png_bytes((10, 200, 10))).status_code == 200
            assert client.put(upload_path, content=b"again").status_code == 404  # the token works once

            body = {"keyframe_image_urls": [initiated["file_url"], png_data_uri()], "steps": 3}
            rid = client.post(Q, params={"fal_webhook": receiver.url}, json=body).json()["request_id"]
            with client.stream("GET", f"{Q}/requests/{rid}/status/stream?logs=1") as stream:
                events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
            assert events[-1]["status"] == "COMPLETED"
            assert [m for e in events for m in (log["message"] for log in e["logs"]) if m.startswith("step")] == [
                "step 1/3", "step 2/3", "step 3/3"
            ]
            video = client.get(f"{Q}/requests/{rid}").json()["video"]
            ranged = client.get(video["url"].replace("http://testserver", ""), headers={"Range": "bytes=4-11"})
            assert ranged.status_code == 206 and ranged.content == b"ftypisom"
            assert ranged.headers["content-range"] == f"bytes 4-11/{video['file_size']}"
            assert gen.requests[0].keyframes[0].getpixel((0, 0)) == (10, 200, 10)  # the uploaded keyframe
            wait_until(lambda: len(receiver.received) == 1)

            gen.gate = gate  # the next job holds at its first step until cancelled
            running = client.post(Q, json=body).json()["request_id"]
            wait_until(lambda: client.get(f"{Q}/requests/{running}/status").json()["status"] == "IN_PROGRESS")
            assert client.put(f"{Q}/requests/{running}/cancel").status_code == 202
            gate.set()  # the held step ends; the worker sees the cancel right after it
            wait_until(lambda: client.get(f"{Q}/requests/{running}/status").json()["status"] == "COMPLETED")
            assert client.get(f"{Q}/requests/{running}/status").json()["error_type"] == "request_cancelled"
            time.sleep(0.3)
            assert [e["request_id"] for e in receiver.received] == [rid]  # one webhook, delivered once
    finally:
        gate.set()
        receiver.close()


# --- many processes -----------------------------------------------------------------------------------


class Cluster:
    """API and worker processes of one deployment (PostgreSQL + S3) on loopback."""

    def __init__(self, tmp_path: Path, database_url: str, storage_url: str, s3_endpoint: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.env = {
            **os.environ,
            **S3_ENV,
            "PYTHONPATH": os.pathsep.join([str(SERVICE_TESTS_DIR), str(SERVICE_TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")]),
            "TOONCRAFTER_DATA_DIR": str(tmp_path / "data"),
            "TOONCRAFTER_DATABASE_URL": database_url,
            "TOONCRAFTER_STORAGE_URL": storage_url,
            "TOONCRAFTER_S3_ENDPOINT_URL": s3_endpoint,
            "TOONCRAFTER_ALLOW_PRIVATE_URLS": "true",
            "TOONCRAFTER_LEASE_S": "2",
            "TOONCRAFTER_HEARTBEAT_S": "0.4",
            "TOONCRAFTER_WORKER_POLL_S": "0.1",
            "TOONCRAFTER_CANCEL_POLL_S": "0.1",
            "TOONCRAFTER_WEBHOOK_BASE_DELAY_S": "0.2",
            "TOONCRAFTER_TEST_GENERATOR": "test_scaleout_service:slow_generator",
        }
        self.apis: list[tuple[subprocess.Popen, str]] = []
        self.workers: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.tmp_path / f"{name}.log", "wb") as log:  # the child keeps its own copy of the handle
            return subprocess.Popen(
                [sys.executable, "-m", "tooncrafter.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def start_apis(self, count: int, *, wait: bool = True) -> list[str]:
        for i in range(count):
            port = free_port()
            self.apis.append((self._spawn(["serve", "--no-worker", "--port", str(port)], f"api{i}"), f"http://127.0.0.1:{port}"))
        if wait:
            self.wait_for_apis()
        return [url for _, url in self.apis]

    def wait_for_apis(self) -> None:
        for proc, url in self.apis:
            wait_until(lambda proc=proc, url=url: self._healthy(proc, url), timeout_s=60, interval_s=0.1)

    def start_workers(self, count: int) -> list[subprocess.Popen]:
        self.workers += [self._spawn(["worker"], f"worker{len(self.workers) + i}") for i in range(count)]
        return self.workers

    def _healthy(self, proc: subprocess.Popen, url: str) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"API process exited: {self.logs()}")
        try:
            return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp_path.glob("*.log")))

    def stop(self) -> None:
        for proc in [p for p, _ in self.apis] + self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc in [p for p, _ in self.apis] + self.workers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextlib.contextmanager
def cluster(tmp_path: Path, pg_url: str, s3_endpoint: str) -> Iterator[Cluster]:
    bucket = fresh_bucket(s3_endpoint)
    running = Cluster(tmp_path, fresh_database(pg_url), f"s3://{bucket}/prod", s3_endpoint)
    try:
        yield running
    except BaseException:
        print(running.logs())
        raise
    finally:
        running.stop()


def test_concurrent_submissions_over_three_api_processes(tmp_path, pg_url, s3_endpoint):
    """200 submissions at once through 3 API processes: 200 ids, none lost, one queue order for all."""
    with cluster(tmp_path, pg_url, s3_endpoint) as running:
        apis = running.start_apis(3)  # three processes migrate one fresh database at once
        body = {"keyframe_image_urls": [png_data_uri(), png_data_uri()], "steps": 1}
        # a connection of its own per call: with one pooled client shared by 24 threads, a full test run once failed
        # here with httpx.ReadError EBADF, a descriptor closed inside this (client) process, not a server answer

        def submit(i: int) -> dict:
            response = httpx.post(f"{apis[i % 3]}{Q}", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(max_workers=24) as pool:
            submitted = list(pool.map(submit, range(200)))
        ids = [s["request_id"] for s in submitted]
        assert len(set(ids)) == 200
        assert all(0 <= s["queue_position"] < 200 for s in submitted)

        store = JobStore(running.database_url)
        try:
            order = sorted(ids, key=lambda rid: store.get(rid).seq)  # the database's queue order
        finally:
            store.close()

        def positions(rid: str) -> list[int]:
            return [httpx.get(f"{api}{Q}/requests/{rid}/status", timeout=60).json()["queue_position"] for api in apis]

        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = dict(zip(order, pool.map(positions, order)))
        assert [answers[rid] for rid in order] == [[n, n, n] for n in range(200)]


def test_workers_survive_a_sigkill_and_processes_share_everything(tmp_path, pg_url, s3_endpoint):
    """3 API + 2 worker processes: uploads, SSE logs and cancel across processes; a worker killed
    mid-job loses nothing: 10 jobs complete exactly once, one webhook each, every video downloads."""
    receiver = Receiver()
    with cluster(tmp_path, pg_url, s3_endpoint) as running, httpx.Client(timeout=30) as client:
        apis = running.start_apis(3, wait=False)
        workers = running.start_workers(2)  # all five processes boot together
        running.wait_for_apis()
        store = JobStore(running.database_url)
        try:
            # an upload initiated on one API process, PUT to a second, downloaded from a third
            initiated = client.post(f"{apis[0]}/storage/upload/initiate", json={"content_type": "image/png", "file_name": "k.png"}).json()
            put_url = initiated["upload_url"].replace(apis[0], apis[1])
            assert client.put(put_url, content=png_bytes((5, 5, 250))).status_code == 200
            file_path = initiated["file_url"].removeprefix(apis[0])
            assert client.get(f"{apis[2]}{file_path}").content == png_bytes((5, 5, 250))
            parts_url = client.post(f"{apis[1]}/storage/upload/initiate-multipart", json={"file_name": "m.bin"}).json()
            etags = [client.put(f"{parts_url['upload_url'].replace(apis[1], apis[i])}/{i + 1}", content=bytes([i]) * 100).json()
                     for i in range(3)]
            done = client.post(f"{parts_url['upload_url'].replace(apis[1], apis[2])}/complete", json={"parts": etags})
            assert done.status_code == 200 and done.json()["file_size"] == 300

            # a running job: its logs streamed by another API process, cancelled through a third
            slow = client.post(f"{apis[0]}{Q}", json={"keyframe_image_urls": [initiated["file_url"], png_data_uri()], "steps": 60})
            assert slow.status_code == 200, slow.text
            slow = slow.json()
            events: list[dict] = []

            def stream() -> None:
                with client.stream("GET", f"{apis[1]}{Q}/requests/{slow['request_id']}/status/stream?logs=1") as response:
                    events.extend(json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:"))

            streamer = threading.Thread(target=stream)
            streamer.start()
            wait_until(lambda: any(log["message"] == "step 2/60" for e in events for log in e["logs"]), timeout_s=30)
            assert client.put(f"{apis[2]}{Q}/requests/{slow['request_id']}/cancel").status_code == 202
            streamer.join(30)
            assert events[-1]["status"] == "COMPLETED" and events[-1]["error_type"] == "request_cancelled"
            assert not any(log["message"] == "step 60/60" for e in events for log in e["logs"])

            # 10 jobs with webhooks; one worker is SIGKILLed in the middle of one of them
            body = {"keyframe_image_urls": [png_data_uri(), initiated["file_url"]], "steps": 6}
            ids = [
                client.post(f"{apis[i % 3]}{Q}", params={"fal_webhook": receiver.url}, json=body).json()["request_id"]
                for i in range(10)
            ]
            victim = workers[0]

            def victim_mid_job():
                for job in map(store.get, ids):
                    mine = job.status == "IN_PROGRESS" and f"-{victim.pid}-" in (job.worker_id or "")
                    if mine and any(e.message.startswith("step 3/") for e in store.logs(job.id)):
                        return job
                return None

            killed_job = wait_until(victim_mid_job, timeout_s=60, interval_s=0.05)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)

            wait_until(lambda: all(store.get(rid).status == "COMPLETED" for rid in ids), timeout_s=90, interval_s=0.2)
            wait_until(lambda: len(receiver.received) >= 10, timeout_s=30)
            time.sleep(1.0)  # room for a duplicate delivery to show up
            jobs = {rid: store.get(rid) for rid in ids}
            assert all(job.result_status_code == 200 for job in jobs.values())
            assert jobs[killed_job.id].attempts == 2 and f"-{workers[1].pid}-" in jobs[killed_job.id].worker_id
            assert sorted(e["request_id"] for e in receiver.received) == sorted(ids)  # one webhook each
            for i, rid in enumerate(ids):
                result = client.get(f"{apis[(i + 1) % 3]}{Q}/requests/{rid}").json()
                assert result == receiver.received[[e["request_id"] for e in receiver.received].index(rid)]["payload"]
                video = client.get(result["video"]["url"])
                assert video.status_code == 200 and len(video.content) == result["video"]["file_size"] > 0
                assert video.content[4:8] == b"ftyp"
            storage = storage_from_url(running.env["TOONCRAFTER_STORAGE_URL"], endpoint_url=s3_endpoint)
            listed = storage.client.list_objects_v2(Bucket=storage.bucket)["Contents"]
            assert sum(o["Key"].endswith("/output.mp4") for o in listed) == 10  # each result written once
        finally:
            store.close()
            receiver.close()


def test_sigterm_lets_the_running_job_finish_once_then_the_worker_exits(tmp_path, pg_url, s3_endpoint):
    """SIGTERM mid-job: the worker takes no new job, finishes the running one within its grace
    period (completed once, by it, on its first attempt) and exits 0; the queued job waits."""
    with cluster(tmp_path, pg_url, s3_endpoint) as running, httpx.Client(timeout=30) as client:
        running.env["TOONCRAFTER_WORKER_GRACE_S"] = "60"
        (api,) = running.start_apis(1)
        (worker,) = running.start_workers(1)
        store = JobStore(running.database_url)
        try:
            body = {"keyframe_image_urls": [png_data_uri(), png_data_uri((9, 9, 9))], "steps": 20}
            first = client.post(f"{api}{Q}", json=body).json()["request_id"]
            second = client.post(f"{api}{Q}", json=body).json()["request_id"]
            wait_until(lambda: any(e.message.startswith("step 3/") for e in store.logs(first)), timeout_s=60, interval_s=0.05)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
            done, waiting = store.get(first), store.get(second)
            assert done.status == "COMPLETED" and done.result_status_code == 200 and done.attempts == 1
            assert sum(e.message == "step 20/20" for e in store.logs(first)) == 1  # run once, to its end
            assert waiting.status == "IN_QUEUE" and waiting.attempts == 0
            assert store.live_workers(60) == 0  # it checked out on its way
        finally:
            store.close()


def test_two_api_processes_report_the_same_metrics(tmp_path, pg_url, s3_endpoint):
    """/metrics lives in the database: two API processes on one PostgreSQL answer the same figures,
    which count the jobs and steps of two worker processes and a webhook delivered by either."""
    receiver = Receiver()
    with cluster(tmp_path, pg_url, s3_endpoint) as running, httpx.Client(timeout=30) as client, contextlib.closing(receiver):
        running.env["TOONCRAFTER_METRICS_TOKEN"] = token = "metrics-token"
        apis = running.start_apis(2, wait=False)
        running.start_workers(2)
        running.wait_for_apis()
        body = {"keyframe_image_urls": [png_data_uri(), png_data_uri((9, 9, 9))], "steps": 3}
        ids = [
            client.post(f"{apis[i % 2]}{Q}", json=body, params={"fal_webhook": receiver.url} if i == 0 else None).json()["request_id"]
            for i in range(4)
        ]
        wait_until(lambda: all(client.get(f"{apis[1]}{Q}/requests/{rid}/status").json()["status"] == "COMPLETED" for rid in ids),
                   timeout_s=60, interval_s=0.2)
        wait_until(lambda: len(receiver.received) == 1, timeout_s=30)

        def settled() -> dict | None:
            """The figures both processes answer alike, once the webhook's attempt and both workers' check-ins are in."""
            first, second = (scrape(client, token, f"{api}/metrics")[1] for api in apis)
            done = value(first, "tooncrafter_workers_live") == 2
            done &= value(first, "tooncrafter_webhook_attempts_total", result="delivered") == 1
            return first if done and first == second else None

        first = wait_until(settled, timeout_s=30)
        assert labelled(first, "tooncrafter_jobs_finished_total") == {frozenset({("status", "completed"), ("status_code", "200")}): 4}
        assert value(first, "tooncrafter_denoising_steps_total") == 12
        assert value(first, "tooncrafter_job_run_seconds_count") == value(first, "tooncrafter_job_queue_wait_seconds_count") == 4
        assert value(first, "tooncrafter_queue_depth", priority="normal") == value(first, "tooncrafter_jobs_running") == 0
