"""The durable job store: requests, their logs, results and pending webhooks, in one SQL database.

SQLAlchemy 2 Core over SQLite (WAL) by default; the same code runs on PostgreSQL, where workers in
several processes claim jobs with `SELECT ... FOR UPDATE SKIP LOCKED`. On SQLite that clause is not
rendered and the claim is made atomic by a conditional `UPDATE ... WHERE status = 'IN_QUEUE'`.

Life of a job (statuses are fal's three, nothing else):
    IN_QUEUE --claim--> IN_PROGRESS --complete--> COMPLETED --retention--> deleted
A running job holds a lease that its worker renews (`heartbeat`); a lease that runs out means the
worker died, and `requeue_expired` puts the job back in the queue (up to `max_attempts` runs).
Completing a job and recording its webhook happen in one transaction, so a restart neither loses
nor repeats a delivery.
"""

from __future__ import annotations

import enum
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # queue order
    Column("id", String(64), nullable=False, unique=True),
    Column("endpoint", String(200), nullable=False),
    Column("owner", String(64), nullable=False, index=True),  # sha256 of the API key, "" when open
    Column("status", String(16), nullable=False, index=True),
    Column("input_json", Text, nullable=False),
    Column("webhook_url", Text),
    Column("base_url", Text, nullable=False),  # where this server is reached; output URLs are built from it
    Column("created_at", Float, nullable=False),
    Column("start_deadline", Float),  # X-Fal-Request-Timeout: must start before this (epoch s)
    Column("started_at", Float),
    Column("completed_at", Float, index=True),
    Column("worker_id", String(64)),
    Column("lease_expires_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("result_status_code", Integer),
    Column("result_json", Text),
    Column("error", Text),
    Column("error_type", String(64)),
    Column("inference_time", Float),
    Column("file_keys_json", Text, nullable=False, default="[]"),
)

logs_table = Table(
    "job_logs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("timestamp", String(40), nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
)

webhooks_table = Table(
    "webhooks",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("payload_json", Text, nullable=False),
    Column("state", String(16), nullable=False, index=True),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
)


def iso_now() -> str:
    """UTC now as ISO-8601 with milliseconds and a Z, as fal's log timestamps."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Job:
    """One request as stored."""

    id: str
    seq: int
    endpoint: str
    owner: str
    status: str
    input: dict[str, Any]
    webhook_url: str | None
    base_url: str
    created_at: float
    start_deadline: float | None
    started_at: float | None
    completed_at: float | None
    worker_id: str | None
    lease_expires_at: float | None
    attempts: int
    cancel_requested: bool
    result_status_code: int | None
    result_json: str | None
    error: str | None
    error_type: str | None
    inference_time: float | None
    file_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LogEntry:
    seq: int
    timestamp: str
    level: str
    message: str

    def to_fal(self) -> dict[str, Any]:
        """fal's log object."""
        return {"message": self.message, "level": self.level, "source": "USER", "timestamp": self.timestamp}


@dataclass(frozen=True)
class JobOutcome:
    """What a finished job replays from its result endpoint (and sends to its webhook)."""

    status_code: int
    body: Any
    error: str | None = None
    error_type: str | None = None
    inference_time: float | None = None
    file_keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PendingWebhook:
    seq: int
    job_id: str
    url: str
    payload_json: str
    attempts: int


class CancelOutcome(enum.Enum):
    NOT_FOUND = "NOT_FOUND"
    CANCELLED = "CANCELLED"  # was queued: removed and completed at once
    REQUESTED = "REQUESTED"  # running: the worker stops between steps
    ALREADY_COMPLETED = "ALREADY_COMPLETED"


CANCELLED_OUTCOME = JobOutcome(
    status_code=400,
    body={"detail": "Request was cancelled", "error_type": "request_cancelled"},
    error="Request was cancelled",
    error_type="request_cancelled",
)


def webhook_envelope(job_id: str, outcome: JobOutcome) -> dict[str, Any]:
    """fal's webhook body: status OK with the output, or ERROR with the app's error body as payload."""
    ok = 200 <= outcome.status_code < 300
    envelope: dict[str, Any] = {
        "request_id": job_id,
        "gateway_request_id": job_id,
        "status": "OK" if ok else "ERROR",
        "payload": outcome.body,
        "error": None if ok else f"Invalid status code: {outcome.status_code}",
    }
    return envelope


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("the job store needs a SQLite *file* (several threads share it), not an in-memory database")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001 - DBAPI objects
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def _row_to_job(row: Any) -> Job:
    m = row._mapping
    return Job(
        id=m["id"],
        seq=m["seq"],
        endpoint=m["endpoint"],
        owner=m["owner"],
        status=m["status"],
        input=json.loads(m["input_json"]),
        webhook_url=m["webhook_url"],
        base_url=m["base_url"],
        created_at=m["created_at"],
        start_deadline=m["start_deadline"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        worker_id=m["worker_id"],
        lease_expires_at=m["lease_expires_at"],
        attempts=m["attempts"],
        cancel_requested=bool(m["cancel_requested"]),
        result_status_code=m["result_status_code"],
        result_json=m["result_json"],
        error=m["error"],
        error_type=m["error_type"],
        inference_time=m["inference_time"],
        file_keys=json.loads(m["file_keys_json"] or "[]"),
    )


class JobStore:
    """All reads and writes of jobs, logs and webhooks. Thread-safe (one engine, short transactions)."""

    def __init__(self, database_url: str) -> None:
        self.engine = _make_engine(database_url)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- submit and read ------------------------------------------------------------------------

    def submit(
        self,
        *,
        endpoint: str,
        owner: str,
        input: dict[str, Any],
        base_url: str,
        webhook_url: str | None = None,
        start_deadline: float | None = None,
    ) -> Job:
        job_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(
                insert(jobs_table).values(
                    id=job_id,
                    endpoint=endpoint,
                    owner=owner,
                    status=IN_QUEUE,
                    input_json=json.dumps(input),
                    webhook_url=webhook_url,
                    base_url=base_url,
                    created_at=time.time(),
                    start_deadline=start_deadline,
                    attempts=0,
                    cancel_requested=False,
                    file_keys_json="[]",
                )
            )
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).one()
        return _row_to_job(row)

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs_table).where(jobs_table.c.id == job_id)).first()
        return _row_to_job(row) if row is not None else None

    def queue_position(self, job: Job) -> int:
        """Jobs ahead of `job` in the queue (0 = next to run)."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count())
                .select_from(jobs_table)
                .where(jobs_table.c.status == IN_QUEUE, jobs_table.c.seq < job.seq)
            ).scalar_one()

    def logs(self, job_id: str, after_seq: int = 0) -> list[LogEntry]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(logs_table)
                .where(logs_table.c.job_id == job_id, logs_table.c.seq > after_seq)
                .order_by(logs_table.c.seq)
            ).all()
        return [LogEntry(r.seq, r.timestamp, r.level, r.message) for r in rows]

    def add_log(self, job_id: str, message: str, level: str = "INFO") -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(logs_table).values(job_id=job_id, timestamp=iso_now(), level=level, message=message))

    # --- workers ----------------------------------------------------------------------------------

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Take the oldest queued job and lease it to `worker_id`; None when the queue is empty."""
        for _ in range(8):  # another worker may win the race for the same row; try the next one
            now = time.time()
            with self.engine.begin() as conn:
                candidate = conn.execute(
                    select(jobs_table.c.id)
                    .where(jobs_table.c.status == IN_QUEUE)
                    .order_by(jobs_table.c.seq)
                    .limit(1)
                    .with_for_update(skip_locked=True)  # PostgreSQL; not rendered on SQLite
                ).scalar_one_or_none()
                if candidate is None:
                    return None
                claimed = conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.id == candidate, jobs_table.c.status == IN_QUEUE)
                    .values(
                        status=IN_PROGRESS,
                        worker_id=worker_id,
                        lease_expires_at=now + lease_s,
                        started_at=now,
                        attempts=jobs_table.c.attempts + 1,
                    )
                ).rowcount
                if claimed == 1:
                    row = conn.execute(select(jobs_table).where(jobs_table.c.id == candidate)).one()
                    return _row_to_job(row)
        return None

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Renew the lease; False when the job is no longer this worker's (requeued or finished)."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(jobs_table)
                    .where(
                        jobs_table.c.id == job_id,
                        jobs_table.c.worker_id == worker_id,
                        jobs_table.c.status == IN_PROGRESS,
                    )
                    .values(lease_expires_at=time.time() + lease_s)
                ).rowcount
                == 1
            )

    def release(self, job_id: str, worker_id: str) -> bool:
        """Give a running job back to the queue (graceful worker shutdown; the run does not count)."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.id == job_id, jobs_table.c.worker_id == worker_id, jobs_table.c.status == IN_PROGRESS)
                    .values(
                        status=IN_QUEUE,
                        worker_id=None,
                        lease_expires_at=None,
                        started_at=None,
                        attempts=jobs_table.c.attempts - 1,
                    )
                ).rowcount
                == 1
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        with self.engine.connect() as conn:
            return bool(
                conn.execute(select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)).scalar_one_or_none()
            )

    def complete(self, job_id: str, outcome: JobOutcome, *, worker_id: str | None = None) -> bool:
        """Store the outcome, mark COMPLETED and record the webhook, in one transaction.

        With `worker_id`, only the lease holder may complete (a requeued job's old worker cannot).
        Returns False when nothing was updated.
        """
        now = time.time()
        with self.engine.begin() as conn:
            conditions = [jobs_table.c.id == job_id, jobs_table.c.status != COMPLETED]
            if worker_id is not None:
                conditions += [jobs_table.c.worker_id == worker_id, jobs_table.c.status == IN_PROGRESS]
            updated = conn.execute(
                update(jobs_table)
                .where(*conditions)
                .values(
                    status=COMPLETED,
                    completed_at=now,
                    lease_expires_at=None,
                    result_status_code=outcome.status_code,
                    result_json=json.dumps(outcome.body),
                    error=outcome.error,
                    error_type=outcome.error_type,
                    inference_time=outcome.inference_time,
                    file_keys_json=json.dumps(list(outcome.file_keys)),
                )
            ).rowcount
            if updated != 1:
                return False
            webhook_url = conn.execute(select(jobs_table.c.webhook_url).where(jobs_table.c.id == job_id)).scalar_one()
            if webhook_url:
                conn.execute(
                    insert(webhooks_table).values(
                        job_id=job_id,
                        url=webhook_url,
                        payload_json=json.dumps(webhook_envelope(job_id, outcome)),
                        state="pending",
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
        return True

    def request_cancel(self, job_id: str) -> CancelOutcome:
        """Cancel a queued job at once, or flag a running one for its worker."""
        job = self.get(job_id)
        if job is None:
            return CancelOutcome.NOT_FOUND
        if job.status == COMPLETED:
            return CancelOutcome.ALREADY_COMPLETED
        with self.engine.begin() as conn:
            conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(cancel_requested=True))
        if job.status == IN_QUEUE:
            # A worker may claim it between our read and this write; then it sees the flag at its first step.
            with self.engine.begin() as conn:
                still_queued = conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.id == job_id, jobs_table.c.status == IN_QUEUE)
                    .values(status=IN_PROGRESS, worker_id="cancel")
                ).rowcount
            if still_queued:
                self.add_log(job_id, "Request cancelled while in queue", "WARN")
                self.complete(job_id, CANCELLED_OUTCOME)
                return CancelOutcome.CANCELLED
        return CancelOutcome.REQUESTED

    # --- maintenance ------------------------------------------------------------------------------

    def requeue_expired(self, max_attempts: int) -> int:
        """Requeue running jobs whose lease ran out; fail those that already used `max_attempts` runs."""
        now = time.time()
        with self.engine.connect() as conn:
            expired = conn.execute(
                select(jobs_table.c.id, jobs_table.c.attempts).where(
                    jobs_table.c.status == IN_PROGRESS, jobs_table.c.lease_expires_at < now
                )
            ).all()
        count = 0
        for job_id, attempts in expired:
            if attempts >= max_attempts:
                self.complete(
                    job_id,
                    JobOutcome(
                        status_code=503,
                        body={"detail": "The worker running this request stopped responding", "error_type": "runner_disconnected"},
                        error="The worker running this request stopped responding",
                        error_type="runner_disconnected",
                    ),
                )
                continue
            with self.engine.begin() as conn:
                count += conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.id == job_id, jobs_table.c.status == IN_PROGRESS, jobs_table.c.lease_expires_at < now)
                    .values(status=IN_QUEUE, worker_id=None, lease_expires_at=None, started_at=None)
                ).rowcount
            self.add_log(job_id, "Worker lease expired; request requeued", "WARN")
            logger.warning("requeued job %s after its worker's lease expired", job_id)
        return count

    def expire_start_deadlines(self) -> int:
        """Fail queued jobs whose client-given start deadline (X-Fal-Request-Timeout) has passed."""
        now = time.time()
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(jobs_table.c.id).where(
                    jobs_table.c.status == IN_QUEUE,
                    jobs_table.c.start_deadline.is_not(None),
                    jobs_table.c.start_deadline < now,
                )
            ).scalars().all()
        outcome = JobOutcome(
            status_code=504,
            body={"detail": "Request timed out before it started", "error_type": "request_timeout"},
            error="Request timed out before it started",
            error_type="request_timeout",
        )
        return sum(self.complete(job_id, outcome) for job_id in ids)

    def purge_expired(self, retention_s: float) -> list[str]:
        """Delete finished jobs older than `retention_s` with their logs and webhooks; return their file keys."""
        cutoff = time.time() - retention_s
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs_table.c.id, jobs_table.c.file_keys_json).where(
                    jobs_table.c.status == COMPLETED, jobs_table.c.completed_at < cutoff
                )
            ).all()
            ids = [r.id for r in rows]
            if not ids:
                return []
            # keep webhooks still being retried; their payloads are self-contained
            conn.execute(delete(logs_table).where(logs_table.c.job_id.in_(ids)))
            conn.execute(delete(webhooks_table).where(webhooks_table.c.job_id.in_(ids), webhooks_table.c.state != "pending"))
            conn.execute(delete(jobs_table).where(jobs_table.c.id.in_(ids)))
        return [key for r in rows for key in json.loads(r.file_keys_json or "[]")]

    # --- webhooks ---------------------------------------------------------------------------------

    def due_webhooks(self, limit: int = 16) -> list[PendingWebhook]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(webhooks_table)
                .where(webhooks_table.c.state == "pending", webhooks_table.c.next_attempt_at <= time.time())
                .order_by(webhooks_table.c.next_attempt_at)
                .limit(limit)
            ).all()
        return [PendingWebhook(r.seq, r.job_id, r.url, r.payload_json, r.attempts) for r in rows]

    def claim_webhook(self, hook: PendingWebhook, hold_s: float) -> bool:
        """Reserve one delivery attempt (other senders skip it for `hold_s`); False if someone else has it."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(webhooks_table)
                    .where(
                        webhooks_table.c.seq == hook.seq,
                        webhooks_table.c.state == "pending",
                        webhooks_table.c.attempts == hook.attempts,
                    )
                    .values(attempts=hook.attempts + 1, next_attempt_at=time.time() + hold_s)
                ).rowcount
                == 1
            )

    def finish_webhook(self, seq: int, *, delivered: bool, error: str | None, retry_at: float | None) -> None:
        """Record an attempt: delivered, to be retried at `retry_at`, or failed for good (`retry_at` None)."""
        if delivered:
            values: dict[str, Any] = {"state": "delivered", "last_error": None}
        elif retry_at is not None:
            values = {"next_attempt_at": retry_at, "last_error": error}
        else:
            values = {"state": "failed", "last_error": error}
        with self.engine.begin() as conn:
            conn.execute(update(webhooks_table).where(webhooks_table.c.seq == seq).values(**values))

    def webhook_states(self, job_id: str) -> list[tuple[str, int, str | None]]:
        """(state, attempts, last_error) of each webhook of a job, for tests and diagnostics."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(webhooks_table.c.state, webhooks_table.c.attempts, webhooks_table.c.last_error)
                .where(webhooks_table.c.job_id == job_id)
                .order_by(webhooks_table.c.seq)
            ).all()
        return [tuple(r) for r in rows]


def upgrade_database(settings: "Settings") -> None:
    """Create any missing tables in the configured database (the `tooncrafter db upgrade` command)."""
    JobStore(settings.resolved_database_url).close()
