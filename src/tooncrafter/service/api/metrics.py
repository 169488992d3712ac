"""`GET /metrics`: the deployment's figures in Prometheus' exposition format, for a scraper holding the metrics token.

Every figure is read from the job store when scraped (`jobs.metrics`: gauges from the queue and the
`workers` table, counters that the transactions finishing jobs, steps and webhook attempts bump)
and handed to prometheus_client as metric families of a collector, in a registry of its own. No
figure lives in process memory, so every API process answers the same, across machines, and one
scrape through the load balancer sees the whole deployment. The registry holds nothing else: no
`process_*` or `python_*` metrics of whichever API process happened to answer.

Protected by a token of its own (`TOONCRAFTER_METRICS_TOKEN`, sent as `Authorization: Bearer
<token>`), not by the API keys: a monitoring system should not hold a key that can submit jobs,
and a client's key must not read the deployment's figures. No token configured: 404 (off);
missing or wrong: 401. One port for everything keeps probes, Services and the embedded
`tooncrafter serve` as they are; a second, private port would need its own listener in each.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from tooncrafter.service.api.deps import get_runtime
from tooncrafter.service.jobs import JobStore
from tooncrafter.service.jobs import metrics as stored
from tooncrafter.service.runtime import Runtime
from tooncrafter.settings import Settings

METRICS_PATH = "/metrics"
PREFIX = "tooncrafter_"

# Per-worker gauges: (name, WorkerReport field, help). A worker without the figure has no sample.
_WORKER_GAUGES = (
    ("worker_steps_per_second", "steps_per_second",
     "Denoising steps per second of the worker's running (else last) job, its conditioning included."),
    ("worker_gpu_memory_allocated_bytes", "gpu_memory_allocated_bytes",
     "GPU memory held by tensors now (PyTorch allocator); CUDA workers only."),
    ("worker_gpu_memory_reserved_bytes", "gpu_memory_reserved_bytes",
     "GPU memory the PyTorch caching allocator holds from the driver now; CUDA workers only."),
    ("worker_gpu_memory_peak_bytes", "gpu_memory_peak_bytes",
     "Most GPU memory held by tensors since the worker started; CUDA workers only."),
)


def metric_families(snapshot: stored.MetricsSnapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families (names with units, `_total` on counters)."""
    depth = GaugeMetricFamily(f"{PREFIX}queue_depth", "Jobs waiting in the queue, by priority.", labels=["priority"])
    for priority, count in snapshot.queue_depth.items():
        depth.add_metric([priority], count)
    yield depth
    yield GaugeMetricFamily(f"{PREFIX}jobs_running", "Jobs a worker is running now.", value=snapshot.running)
    yield GaugeMetricFamily(
        f"{PREFIX}workers_live", "Workers that checked in within TOONCRAFTER_WORKER_ALIVE_S.", value=len(snapshot.workers)
    )
    yield GaugeMetricFamily(
        f"{PREFIX}webhooks_pending", "Webhooks waiting for a (next) delivery attempt.", value=snapshot.webhooks_pending
    )

    finished = CounterMetricFamily(
        f"{PREFIX}jobs_finished", "Jobs that reached COMPLETED, by how they ended and their HTTP status code.",
        labels=["status", "status_code"],
    )
    for labels, value in snapshot.counter(stored.JOBS_FINISHED):
        finished.add_metric([labels["status"], labels["status_code"]], value)
    yield finished
    for name, bounds, help_text in (
        (stored.QUEUE_WAIT_SECONDS, stored.QUEUE_WAIT_BUCKETS_S, "Seconds from submission to the start of the run that finished the job."),
        (stored.RUN_SECONDS, stored.RUN_BUCKETS_S, "Seconds from the start of a job's run to its completion."),
    ):
        histogram = snapshot.histogram(name, bounds)
        yield HistogramMetricFamily(
            f"{PREFIX}{name}", help_text,
            buckets=[(floatToGoString(bound), count) for bound, count in histogram.buckets], sum_value=histogram.sum,
        )
    yield CounterMetricFamily(
        f"{PREFIX}denoising_steps", "Denoising steps run by all workers.", value=snapshot.counter_value(stored.DENOISING_STEPS)
    )
    yield CounterMetricFamily(
        f"{PREFIX}denoising_seconds", "Seconds spent in denoising steps (each step's conditioning included).",
        value=snapshot.counter_value(stored.DENOISING_SECONDS),
    )
    attempts = CounterMetricFamily(
        f"{PREFIX}webhook_attempts",
        "Webhook delivery attempts by result: delivered, retrying (failed, tried again later), failed (given up).",
        labels=["result"],
    )
    for result in stored.WEBHOOK_RESULTS:
        attempts.add_metric([result], snapshot.counter_value(stored.WEBHOOK_ATTEMPTS, result=result))
    yield attempts

    for name, field, help_text in _WORKER_GAUGES:
        gauge = GaugeMetricFamily(f"{PREFIX}{name}", help_text, labels=["worker_id", "hostname"])
        for worker in snapshot.workers:
            value = getattr(worker.report, field)
            if value is not None:
                gauge.add_metric([worker.worker_id, worker.hostname], value)
        yield gauge


class JobStoreCollector:
    """A prometheus_client collector that reads the job store at each scrape."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(stored.read_snapshot(self.store.engine, alive_within_s=self.settings.worker_alive_s))


def require_metrics_token(settings: Settings, authorization: str | None) -> None:
    """404 while no metrics token is configured; 401 unless `Authorization: Bearer <the token>`."""
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if not expected:
        raise HTTPException(404, detail="Not Found")
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), expected.encode("utf-8")):
        raise HTTPException(
            401,
            detail="Missing or wrong metrics token: send 'Authorization: Bearer <TOONCRAFTER_METRICS_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def metrics_router() -> APIRouter:
    router = APIRouter(tags=["service"])

    @router.get(METRICS_PATH, include_in_schema=False)
    def metrics(request: Request, runtime: Annotated[Runtime, Depends(get_runtime)]) -> Response:
        """Prometheus text format (OpenMetrics when the scraper asks for it); a sync route: the reads run in the threadpool."""
        require_metrics_token(runtime.settings, request.headers.get("authorization"))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(JobStoreCollector(runtime.store, runtime.settings))
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return router
