"""The deployment's metrics in the job store: counters bumped inside the transactions that count,
and the gauges read when /metrics is scraped.

Why the database and not each process's memory: API processes and GPU workers run on many
machines and share only the job store. Kept there, every API process answers /metrics with the
whole deployment's figures (the same figures from each), and the counters survive restarts and
the retention purge of job rows. A finished job is counted in the transaction that completes it,
a webhook attempt in the one that records it, a denoising step with its log line: a crash neither
loses nor repeats a count.

Counters are rows of `service_metrics` (name, label set as sorted JSON, value), incremented with an
upsert. A histogram is one row per bucket holding the observations that fell in that bucket alone
(not cumulative, so one observation touches one bucket row and one sum row), accumulated when read.
One transaction touches its rows in sorted order, so concurrent ones on PostgreSQL take the row
locks in the same order and cannot deadlock.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine, func, select

from tooncrafter.service.jobs.records import (
    CANCELLED_OUTCOME,
    RUNNER_DISCONNECTED_OUTCOME,
)
from tooncrafter.service.jobs.tables import (
    IN_PROGRESS,
    IN_QUEUE,
    PRIORITIES,
    jobs_table,
    metrics_table,
    webhooks_table,
    workers_table,
)

# Counter and histogram names as stored (the exposition adds the `tooncrafter_` prefix and `_total`).
JOBS_FINISHED = "jobs_finished"
QUEUE_WAIT_SECONDS = "job_queue_wait_seconds"
RUN_SECONDS = "job_run_seconds"
DENOISING_STEPS = "denoising_steps"
DENOISING_SECONDS = "denoising_seconds"
WEBHOOK_ATTEMPTS = "webhook_attempts"

# Bucket upper bounds (s). Queue waits run from instant to a cold start of several minutes (or a
# backlog of hours); a run from a few seconds on a big GPU to many minutes on a CPU.
QUEUE_WAIT_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
RUN_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

# A finished job's `status` label: fal's status is always COMPLETED, so this tells how it ended.
FINAL_STATUSES = ("completed", "failed", "cancelled", "timed_out", "runner_disconnected")
TIMED_OUT_ERROR_TYPE = "request_timeout"  # expire_start_deadlines' outcome
_STATUS_OF_ERROR_TYPE = {
    CANCELLED_OUTCOME.error_type: "cancelled",
    TIMED_OUT_ERROR_TYPE: "timed_out",
    RUNNER_DISCONNECTED_OUTCOME.error_type: "runner_disconnected",
}

WebhookResult = Literal["delivered", "retrying", "failed"]
WEBHOOK_RESULTS: tuple[WebhookResult, ...] = ("delivered", "retrying", "failed")


# --- counting (inside the caller's transaction) -------------------------------------------------------


@dataclass(frozen=True)
class Increment:
    """Add `amount` to the counter row (`name`, `labels`)."""

    name: str
    labels: str
    amount: float = 1.0


def labels_key(labels: Mapping[str, str]) -> str:
    """A label set as stored: sorted JSON, so one set is always one row."""
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"))


def increment(name: str, amount: float = 1.0, **labels: str) -> Increment:
    return Increment(name, labels_key(labels), amount)


def _upsert(dialect: str, name: str, labels: str, amount: float) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # the job store runs on these two only
        raise NotImplementedError(f"metrics counters need SQLite or PostgreSQL, not {dialect}")
    statement = insert(metrics_table).values(name=name, labels=labels, value=amount)
    return statement.on_conflict_do_update(
        index_elements=[metrics_table.c.name, metrics_table.c.labels],
        set_={"value": metrics_table.c.value + statement.excluded.value},
    )


def bump(conn: Connection, increments: Iterable[Increment]) -> None:
    """Apply `increments` in the caller's transaction (merged per row, rows in sorted order)."""
    merged: dict[tuple[str, str], float] = defaultdict(float)
    for item in increments:
        merged[(item.name, item.labels)] += item.amount
    for (name, labels), amount in sorted(merged.items()):
        conn.execute(_upsert(conn.dialect.name, name, labels, amount))


def observe(name: str, bounds: tuple[float, ...], value: float) -> list[Increment]:
    """One histogram observation: its bucket (the smallest bound >= value) and the sum.

    Durations are clamped at 0: a job's times can come from the clocks of different machines."""
    value = max(0.0, value)
    index = bisect.bisect_left(bounds, value)
    bound = bounds[index] if index < len(bounds) else math.inf
    return [increment(f"{name}:bucket", le=repr(float(bound))), increment(f"{name}:sum", value)]


def final_status(status_code: int, error_type: str | None) -> str:
    """How a job ended, one of FINAL_STATUSES."""
    if 200 <= status_code < 300:
        return "completed"
    return _STATUS_OF_ERROR_TYPE.get(error_type, "failed")


def finished_job(
    status_code: int, error_type: str | None, created_at: float, started_at: float | None, completed_at: float
) -> list[Increment]:
    """A job reached COMPLETED: count it by how it ended; if it ran, observe its queue wait and run time."""
    counted = [increment(JOBS_FINISHED, status=final_status(status_code, error_type), status_code=str(status_code))]
    if started_at is not None:  # a job cancelled or timed out in the queue never waited for a run
        counted += observe(QUEUE_WAIT_SECONDS, QUEUE_WAIT_BUCKETS_S, started_at - created_at)
        counted += observe(RUN_SECONDS, RUN_BUCKETS_S, completed_at - started_at)
    return counted


def denoising_steps(steps: int, seconds: float) -> list[Increment]:
    return [increment(DENOISING_STEPS, float(steps)), increment(DENOISING_SECONDS, max(0.0, seconds))]


def webhook_attempt(result: WebhookResult) -> list[Increment]:
    return [increment(WEBHOOK_ATTEMPTS, result=result)]


# --- what workers report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReport:
    """What a worker measured, written into its `workers` row at each check-in (None: nothing to say)."""

    steps_per_second: float | None = None
    gpu_memory_allocated_bytes: int | None = None
    gpu_memory_reserved_bytes: int | None = None
    gpu_memory_peak_bytes: int | None = None

    def columns(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- reading (at scrape time) -------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveWorker:
    worker_id: str
    hostname: str
    report: WorkerReport


@dataclass(frozen=True)
class Histogram:
    buckets: list[tuple[float, float]]
    """(upper bound, cumulative count) in order, the last bound +inf."""
    sum: float

    @property
    def count(self) -> float:
        return self.buckets[-1][1]


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything /metrics shows, read from the job store at one moment."""

    queue_depth: dict[str, int]
    """Queued jobs by priority name (every priority present, 0 included)."""
    running: int
    webhooks_pending: int
    workers: list[LiveWorker]
    counters: dict[str, dict[str, float]]
    """Stored rows: name -> labels key -> value."""

    def counter(self, name: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of every label set of counter `name`."""
        return [(json.loads(labels), value) for labels, value in sorted(self.counters.get(name, {}).items())]

    def counter_value(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(labels_key(labels), 0.0)

    def histogram(self, name: str, bounds: tuple[float, ...]) -> Histogram:
        """Histogram `name` over `bounds` (+inf added). A stored bucket whose bound is no longer among
        `bounds` (the bounds changed between versions) counts in the next larger one."""
        per_bound = dict.fromkeys((*bounds, math.inf), 0.0)
        edges = sorted(per_bound)
        for labels, count in self.counters.get(f"{name}:bucket", {}).items():
            stored = float(json.loads(labels)["le"])
            per_bound[edges[bisect.bisect_left(edges, stored)]] += count
        cumulative, buckets = 0.0, []
        for bound in edges:
            cumulative += per_bound[bound]
            buckets.append((bound, cumulative))
        return Histogram(buckets, self.counter_value(f"{name}:sum"))


def read_snapshot(engine: Engine, *, alive_within_s: float) -> MetricsSnapshot:
    """Queue depth, running jobs, pending webhooks, live workers (seen within `alive_within_s`) and every counter."""
    names = {value: name for name, value in PRIORITIES.items()}
    with engine.connect() as conn:
        depth = dict.fromkeys(PRIORITIES, 0)
        for priority, count in conn.execute(
            select(jobs_table.c.priority, func.count()).where(jobs_table.c.status == IN_QUEUE).group_by(jobs_table.c.priority)
        ):
            depth[names.get(priority, str(priority))] = count
        running = conn.execute(select(func.count()).select_from(jobs_table).where(jobs_table.c.status == IN_PROGRESS)).scalar_one()
        pending = conn.execute(
            select(func.count()).select_from(webhooks_table).where(webhooks_table.c.state == "pending")
        ).scalar_one()
        rows = conn.execute(
            select(workers_table)
            .where(workers_table.c.last_seen_at >= time.time() - alive_within_s)
            .order_by(workers_table.c.worker_id)
        ).all()
        counters: dict[str, dict[str, float]] = defaultdict(dict)
        for name, labels, value in conn.execute(select(metrics_table.c.name, metrics_table.c.labels, metrics_table.c.value)):
            counters[name][labels] = value
    fields = [field.name for field in dataclasses.fields(WorkerReport)]
    workers = [
        LiveWorker(row.worker_id, row.hostname, WorkerReport(**{name: row._mapping[name] for name in fields})) for row in rows
    ]
    return MetricsSnapshot(depth, running, pending, workers, dict(counters))
