"""GET /metrics: Prometheus figures that match what ran, read back with prometheus_client's own parser.

The end-to-end test drives the real tiny pipeline behind uvicorn on loopback, with a real webhook
receiver (one URL fails once, one always fails) and a keyframe URL that answers 404; the other
tests check the token, the scrape of GPU figures a worker reported, and the GPU memory read.
The PostgreSQL test with two API processes is in test_scaleout_service.py.
"""

from __future__ import annotations

import math
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.metrics import Samples, labelled, value
from helpers.metrics import scrape as scrape_with
from helpers.service import (
    ENDPOINT,
    TINY_CHECKPOINT,
    fake_factory,
    make_settings,
    running_server,
    runtime_of,
    tiny_pipeline_factory,
    two_keyframes,
    wait_until,
)

from tooncrafter.generation import GenerationRequest, GenerationResult, ProgressCallback
from tooncrafter.service.app import create_app
from tooncrafter.service.gpu_memory import generator_device, gpu_memory
from tooncrafter.service.jobs import metrics as stored
from tooncrafter.service.jobs.metrics import WorkerReport
from tooncrafter.service.jobs.tables import workers_table

TOKEN = "scrape-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Q = f"/queue/{ENDPOINT}"
STEPS = 2
HOLD = "hold at step 1"


def scrape(client: Any) -> tuple[dict[str, str], Samples]:
    return scrape_with(client, TOKEN)

class Receiver:
    """Loopback HTTP: POST /flaky fails once then accepts, POST /down always fails, GET answers 404."""

    def __init__(self) -> None:
        self.posts: dict[str, int] = defaultdict(int)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.posts[self.path] += 1
                ok = self.path == "/flaky" and outer.posts[self.path] > 1
                self.send_response(200 if ok else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HoldingPipeline:
    """The real pipeline; a request whose prompt is HOLD waits before reporting its first step until
    `release` is set, so a scrape can see it running."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.placement = pipeline.placement  # the worker reads the device from it, as from the pipeline
        self.held = threading.Event()
        self.release = threading.Event()

    @property
    def num_frames(self) -> int:
        return self.pipeline.num_frames

    def __call__(self, request: GenerationRequest, *, on_step: ProgressCallback | None = None) -> GenerationResult:
        def step(index: int, total: int) -> None:
            if request.prompt == HOLD and index == 1:
                self.held.set()
                self.release.wait(120)
            if on_step is not None:
                on_step(index, total)

        return self.pipeline(request, on_step=step)


def submit(client: httpx.Client, *, webhook: str | None = None, priority: str = "normal", **body: Any) -> dict:
    payload = {"keyframe_image_urls": two_keyframes(), "steps": STEPS, "seed": 1, **body}
    params = {"fal_webhook": webhook} if webhook else None
    response = client.post(Q, json=payload, params=params, headers={"X-Fal-Queue-Priority": priority})
    assert response.status_code == 200, response.text
    return response.json()


def status(client: httpx.Client, handle: dict) -> str:
    return client.get(handle["status_url"]).json()["status"]


@pytest.mark.slow
@pytest.mark.skipif(not (TINY_CHECKPOINT / "model.ckpt").exists(), reason="tiny fixture checkpoint not available")
def test_metrics_match_a_run_of_jobs_and_survive_the_purge(tmp_path: Path) -> None:
    receiver = Receiver()
    holding = HoldingPipeline(tiny_pipeline_factory(None))
    settings = make_settings(tmp_path, checkpoint=str(TINY_CHECKPOINT), metrics_token=TOKEN, webhook_max_attempts=2)
    app = create_app(settings, generator_factory=lambda _settings: holding)
    try:
        with running_server(app) as server, server.client() as client:
            # 1. four jobs run: a webhook that fails once, one that always fails, none, and a keyframe URL that is a 404
            flaky = submit(client, webhook=f"{receiver.base}/flaky")
            down = submit(client, webhook=f"{receiver.base}/down")
            plain = submit(client)
            bad = submit(client, keyframe_image_urls=[f"{receiver.base}/missing.png", two_keyframes()[1]])
            ran = [flaky, down, plain, bad]
            wait_until(lambda: all(status(client, h) == "COMPLETED" for h in ran), timeout_s=300, interval_s=0.2)
            assert client.get(bad["response_url"]).status_code == 422
            wait_until(lambda: receiver.posts["/flaky"] == 2 and receiver.posts["/down"] == 2, timeout_s=60)
            wait_until(lambda: all(state != "pending" for h in (flaky, down)
                                   for state, _, _ in server.store.webhook_states(h["request_id"])))
            # 2. one job held running, one low and one normal job queued behind it
            held = submit(client, prompt=HOLD)
            assert holding.held.wait(120)
            low = submit(client, priority="low")
            queued = submit(client)

            types, samples = scrape(client)
            assert types["tooncrafter_jobs_finished"] == "counter" and types["tooncrafter_job_run_seconds"] == "histogram"
            assert value(samples, "tooncrafter_queue_depth", priority="normal") == 1
            assert value(samples, "tooncrafter_queue_depth", priority="low") == 1
            assert value(samples, "tooncrafter_jobs_running") == 1
            assert value(samples, "tooncrafter_workers_live") == 1
            assert labelled(samples, "tooncrafter_jobs_finished_total") == {
                frozenset({("status", "completed"), ("status_code", "200")}): 3,
                frozenset({("status", "failed"), ("status_code", "422")}): 1,
            }
            jobs = [server.store.get(h["request_id"]) for h in ran]
            for name, seconds in (
                ("tooncrafter_job_queue_wait_seconds", [j.started_at - j.created_at for j in jobs]),
                ("tooncrafter_job_run_seconds", [j.completed_at - j.started_at for j in jobs]),
            ):
                assert value(samples, f"{name}_count") == value(samples, f"{name}_bucket", le="+Inf") == 4
                assert value(samples, f"{name}_sum") == pytest.approx(sum(seconds))
            assert value(samples, "tooncrafter_denoising_steps_total") == 3 * STEPS  # the 404 job never sampled
            assert value(samples, "tooncrafter_denoising_seconds_total") > 0
            assert labelled(samples, "tooncrafter_webhook_attempts_total") == {
                frozenset({("result", "delivered")}): 1,
                frozenset({("result", "retrying")}): 2,
                frozenset({("result", "failed")}): 1,
            }
            assert value(samples, "tooncrafter_webhooks_pending") == 0
            (worker_labels,) = labelled(samples, "tooncrafter_worker_steps_per_second")
            assert dict(worker_labels)["worker_id"] == server.runtime.worker.worker_id
            assert labelled(samples, "tooncrafter_worker_steps_per_second")[worker_labels] > 0
            assert labelled(samples, "tooncrafter_worker_gpu_memory_peak_bytes") == {}  # a CPU worker reports none

            # 3. cancel the queued normal job and the held one; the low one runs last
            assert client.put(queued["cancel_url"]).status_code == 202
            assert client.put(held["cancel_url"]).status_code == 202
            holding.release.set()
            wait_until(lambda: all(status(client, h) == "COMPLETED" for h in (held, low)), timeout_s=300, interval_s=0.2)
            _, samples = scrape(client)
            assert labelled(samples, "tooncrafter_jobs_finished_total") == {
                frozenset({("status", "completed"), ("status_code", "200")}): 4,
                frozenset({("status", "failed"), ("status_code", "422")}): 1,
                frozenset({("status", "cancelled"), ("status_code", "400")}): 2,
            }
            # the job cancelled in the queue never ran: 6 runs observed, not 7
            assert value(samples, "tooncrafter_job_run_seconds_count") == 6
            assert value(samples, "tooncrafter_job_queue_wait_seconds_count") == 6
            assert value(samples, "tooncrafter_denoising_steps_total") == 4 * STEPS + 1  # the held job ran one step
            assert value(samples, "tooncrafter_queue_depth", priority="normal") == 0
            assert value(samples, "tooncrafter_queue_depth", priority="low") == 0
            assert value(samples, "tooncrafter_jobs_running") == 0

            # 4. the retention purge deletes every job row; the counters stay
            server.store.purge_expired(0.0)
            assert server.store.get(flaky["request_id"]) is None
            assert scrape(client)[1] == samples
    finally:
        holding.release.set()
        receiver.close()


def test_metrics_need_their_own_token_and_are_off_without_one(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path), with_worker=False)) as client:
        assert client.get("/metrics", headers=AUTH).status_code == 404  # no token configured: off
    settings = make_settings(tmp_path, metrics_token=TOKEN, api_keys=["client-key"])
    with TestClient(create_app(settings, with_worker=False)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Key {TOKEN}"},
                        {"Authorization": "Bearer client-key"}, {"Authorization": "Key client-key"}):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
        # the token opens nothing else, and answers under any Host (a scraper reaches each pod by its address)
        assert client.post(Q, json={}, headers=AUTH).status_code == 401
        assert client.get("/metrics", headers={**AUTH, "Host": "10.1.2.3:8000"}).status_code == 200
        assert client.get(f"{Q}/requests/x/status", headers={"Host": "10.1.2.3:8000"}).status_code == 400  # builds URLs
        response = client.get("/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"})
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")


def test_gpu_figures_a_worker_reported_are_scraped_per_worker(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_token=TOKEN)
    with TestClient(create_app(settings, generator_factory=fake_factory())) as client:
        store = runtime_of(client).store
        gpu = WorkerReport(steps_per_second=2.5, gpu_memory_allocated_bytes=3 << 30,
                           gpu_memory_reserved_bytes=4 << 30, gpu_memory_peak_bytes=5 << 30)
        store.worker_check_in("gpu-worker-1", "gpu-node", report=gpu)
        store.worker_check_in("gone-worker", "old-node", report=gpu)
        with store.engine.begin() as conn:  # a worker last seen long ago is not live: none of its figures show
            conn.execute(workers_table.update().where(workers_table.c.worker_id == "gone-worker").values(last_seen_at=0.0))
        wait_until(lambda: value(scrape(client)[1], "tooncrafter_workers_live") == 2)  # + the in-process CPU worker
        _, samples = scrape(client)
        where = frozenset({("worker_id", "gpu-worker-1"), ("hostname", "gpu-node")})
        assert labelled(samples, "tooncrafter_worker_gpu_memory_allocated_bytes") == {where: 3 << 30}
        assert labelled(samples, "tooncrafter_worker_gpu_memory_reserved_bytes") == {where: 4 << 30}
        assert labelled(samples, "tooncrafter_worker_gpu_memory_peak_bytes") == {where: 5 << 30}
        assert labelled(samples, "tooncrafter_worker_steps_per_second")[where] == 2.5


class RecordingCuda:
    """Stands in for `torch.cuda` (no GPU here): fixed figures, and the device each call asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def memory_allocated(self, device: str) -> int:
        self.asked.append(device)
        return 1000

    def memory_reserved(self, device: str) -> int:
        self.asked.append(device)
        return 2000

    def max_memory_allocated(self, device: str) -> int:
        self.asked.append(device)
        return 1500


def test_gpu_memory_reads_the_cuda_allocator_only_for_a_cuda_device() -> None:
    cuda = RecordingCuda()
    for device in (None, "cpu", "auto", "mps"):
        assert gpu_memory(device, cuda) is None
    assert cuda.asked == []
    memory = gpu_memory("cuda:1", cuda)
    assert (memory.allocated_bytes, memory.reserved_bytes, memory.peak_bytes) == (1000, 2000, 1500)
    assert cuda.asked == ["cuda:1"] * 3


def test_worker_device_comes_from_the_pipeline_then_the_settings() -> None:
    import torch

    from tooncrafter.placement import Placement

    class Placed:
        placement = Placement(device=torch.device("cuda", 2))

    assert generator_device(Placed(), "cpu") == "cuda:2"
    assert generator_device(object(), "cuda") == "cuda"
    assert generator_device(object(), None) is None
    assert gpu_memory(generator_device(object(), "cpu")) is None  # the CPU path reads nothing


def test_a_histogram_keeps_counts_stored_under_bounds_it_no_longer_has() -> None:
    rows = {
        f"{stored.RUN_SECONDS}:bucket": {stored.labels_key({"le": repr(b)}): n for b, n in ((1.0, 2), (7.0, 1), (math.inf, 1))},
        f"{stored.RUN_SECONDS}:sum": {"{}": 20.0},
    }
    snapshot = stored.MetricsSnapshot({}, 0, 0, [], rows)
    histogram = snapshot.histogram(stored.RUN_SECONDS, (1.0, 5.0, 10.0))
    assert histogram.buckets == [(1.0, 2), (5.0, 2), (10.0, 3), (math.inf, 4)]  # 7 s counts under le=10
    assert histogram.count == 4 and histogram.sum == 20.0


def test_the_readme_lists_every_metric_and_only_those(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, metrics_token=TOKEN), with_worker=False)) as client:
        types, _ = scrape(client)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(tooncrafter_\w+)` \| (\w+) \|", readme, re.MULTILINE)}
    assert table == {name + ("_total" if kind == "counter" else ""): kind for name, kind in types.items()}  # names and types


def test_a_failing_measurement_does_not_make_a_worker_look_dead(tmp_path: Path) -> None:
    from tooncrafter.service.jobs import JobStore
    from tooncrafter.service.worker import _CheckIn

    def broken_report() -> WorkerReport:
        raise RuntimeError("CUDA error: unspecified launch failure")

    store = JobStore(make_settings(tmp_path).resolved_database_url)
    check_in = _CheckIn(store, "worker-1", period_s=0.05, report=broken_report)
    check_in.start()
    try:
        wait_until(lambda: store.live_workers(within_s=30) == 1)
        snapshot = stored.read_snapshot(store.engine, alive_within_s=30)
        assert [(w.worker_id, w.report) for w in snapshot.workers] == [("worker-1", WorkerReport())]
    finally:
        check_in.stop()
        store.close()
