"""The durable job store: requests, their logs, results and pending webhooks, in one SQL database.

SQLAlchemy 2 Core over SQLite (WAL) by default; the same code runs on PostgreSQL, where API
processes and workers on many machines share one database and workers claim jobs with
`SELECT ... FOR UPDATE SKIP LOCKED`. On SQLite that clause is not rendered and the claim is made
atomic by a conditional `UPDATE ... WHERE status = 'IN_QUEUE'`. The schema is owned by the Alembic
migrations in `jobs/migrations/` (applied on open, or by `tooncrafter db upgrade`); `metadata`
below is what the queries use and a test checks that the two agree.

Life of a job (statuses are fal's three, nothing else):
    IN_QUEUE --claim--> IN_PROGRESS --complete--> COMPLETED --retention--> deleted
A running job holds a lease that its worker renews (`heartbeat`); a lease that runs out means the
worker died, and `requeue_expired` puts the job back in the queue (up to `max_attempts` runs).
Every claim mints a fresh `lease_token`; heartbeat, release and complete only act while the row
still carries the caller's token, so a stale worker (paused, partitioned, or simply slow) whose job
was requeued and taken over can neither renew nor overwrite: the result is written once.
Completing a job and recording its webhook happen in one transaction, so a restart neither loses
nor repeats a delivery.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from tooncrafter.service.jobs import metrics
from tooncrafter.service.jobs.migrate import migrate_engine
from tooncrafter.service.jobs.records import (
    CANCELLED_OUTCOME,
    RUNNER_DISCONNECTED_OUTCOME,
    CancelOutcome,
    Job,
    JobOutcome,
    LogEntry,
    PendingWebhook,
    iso_now,
    webhook_envelope,
)
from tooncrafter.service.jobs.tables import (
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    PRIORITIES,
    jobs_table,
    logs_table,
    secrets_table,
    webhooks_table,
    workers_table,
)

if TYPE_CHECKING:
    from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if not parsed.database or parsed.database == ":memory:":
        raise ValueError("the job store needs a SQLite *file* (several threads share it), not an in-memory database")
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection, _record):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return engine


def _log_insert(job_id: str, message: str, level: str) -> Any:
    """The INSERT of one log line stamped now (run it in the caller's transaction)."""
    return insert(logs_table).values(job_id=job_id, timestamp=iso_now(), level=level, message=message)


# Every column but the input: what status, queue position, SSE and result reads select, so their
# cost does not grow with the input (a data URI can be tens of MiB). Only `claim` reads the input.
_READ_COLUMNS = [column for column in jobs_table.c if column.name != "input_json"]


def _row_to_job(row: Any) -> Job:
    m = row._mapping
    document = m.get("input_json")
    return Job(
        id=m["id"],
        seq=m["seq"],
        endpoint=m["endpoint"],
        owner=m["owner"],
        status=m["status"],
        input=json.loads(document) if document else None,
        input_key=m["input_key"],
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
        lease_token=m["lease_token"],
        priority=m["priority"],
    )


class JobStore:
    """All reads and writes of jobs, logs and webhooks. Thread-safe (one engine, short transactions)."""

    def __init__(self, database_url: str, *, migrate: bool = True) -> None:
        self.engine = _make_engine(database_url)
        if migrate:
            migrate_engine(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- submit and read ------------------------------------------------------------------------

    def submit(
        self,
        *,
        endpoint: str,
        owner: str,
        input: dict[str, Any] | None,
        base_url: str,
        webhook_url: str | None = None,
        start_deadline: float | None = None,
        priority: int = PRIORITIES["normal"],
        input_key: str | None = None,
    ) -> Job:
        """Queue a request; its input is the `input` document, or (None) the stored file `input_key`."""
        if (input is None) == (input_key is None):
            raise ValueError("give the input document or the key of its stored file, not both")
        job_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            row = conn.execute(
                insert(jobs_table).values(
                    id=job_id,
                    endpoint=endpoint,
                    owner=owner,
                    status=IN_QUEUE,
                    input_json=json.dumps(input) if input is not None else "",
                    input_key=input_key,
                    webhook_url=webhook_url,
                    base_url=base_url,
                    created_at=time.time(),
                    start_deadline=start_deadline,
                    attempts=0,
                    cancel_requested=False,
                    file_keys_json="[]",
                    priority=priority,
                )
                .returning(*_READ_COLUMNS)  # the stored row (seq, defaults) without a second query
            ).one()
        return _row_to_job(row)

    def get(self, job_id: str, *, with_input: bool = False) -> Job | None:
        """The job; its `input` column only `with_input` (status reads never carry the input)."""
        columns = jobs_table.c if with_input else _READ_COLUMNS
        with self.engine.connect() as conn:
            row = conn.execute(select(*columns).where(jobs_table.c.id == job_id)).first()
        return _row_to_job(row) if row is not None else None

    def queue_position(self, job: Job) -> int:
        """Jobs ahead of `job` in the queue (0 = next to run): higher priorities, then earlier submissions."""
        ahead = or_(
            jobs_table.c.priority < job.priority,
            and_(jobs_table.c.priority == job.priority, jobs_table.c.seq < job.seq),
        )
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(jobs_table).where(jobs_table.c.status == IN_QUEUE, ahead)
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
            conn.execute(_log_insert(job_id, message, level))

    def add_step(self, job_id: str, step: int, total: int, seconds: float) -> None:
        """A denoising step's log line (`step 3/50`) and its count and seconds in the metrics, together."""
        with self.engine.begin() as conn:
            conn.execute(_log_insert(job_id, f"step {step}/{total}", "INFO"))
            metrics.bump(conn, metrics.denoising_steps(1, seconds))

    # --- workers ----------------------------------------------------------------------------------

    def claim(self, worker_id: str, lease_s: float) -> Job | None:
        """Take the next queued job (priority, then submission order) and lease it to `worker_id` under a fresh `lease_token`; None when none is queued."""
        for _ in range(8):  # another worker may win the race for the same row; try the next one
            now = time.time()
            token = secrets.token_hex(16)
            with self.engine.begin() as conn:
                candidate = conn.execute(
                    select(jobs_table.c.id)
                    .where(jobs_table.c.status == IN_QUEUE)
                    .order_by(jobs_table.c.priority, jobs_table.c.seq)
                    .limit(1)
                    .with_for_update(skip_locked=True)  # PostgreSQL; not rendered on SQLite
                ).scalar_one_or_none()
                if candidate is None:
                    return None
                row = conn.execute(
                    update(jobs_table)
                    .where(jobs_table.c.id == candidate, jobs_table.c.status == IN_QUEUE)
                    .values(
                        status=IN_PROGRESS,
                        worker_id=worker_id,
                        lease_token=token,
                        lease_expires_at=now + lease_s,
                        started_at=now,
                        attempts=jobs_table.c.attempts + 1,
                    )
                    .returning(*jobs_table.c)
                ).first()
                if row is not None:
                    return _row_to_job(row)
        return None

    @staticmethod
    def _lease_holder(job_id: str, worker_id: str | None, lease_token: str | None) -> list[Any]:
        """WHERE clauses matching a running job still leased to this worker (and this claim, given its token)."""
        conditions = [jobs_table.c.id == job_id, jobs_table.c.status == IN_PROGRESS]
        if worker_id is not None:
            conditions.append(jobs_table.c.worker_id == worker_id)
        if lease_token is not None:
            conditions.append(jobs_table.c.lease_token == lease_token)
        return conditions

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float, lease_token: str | None = None) -> bool:
        """Renew the lease; False when the job is no longer this worker's (requeued, taken over or finished)."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(jobs_table)
                    .where(*self._lease_holder(job_id, worker_id, lease_token))
                    .values(lease_expires_at=time.time() + lease_s)
                ).rowcount
                == 1
            )

    def release(self, job_id: str, worker_id: str, lease_token: str | None = None) -> bool:
        """Give a running job back to the queue (graceful worker shutdown; the run does not count)."""
        with self.engine.begin() as conn:
            return (
                conn.execute(
                    update(jobs_table)
                    .where(*self._lease_holder(job_id, worker_id, lease_token))
                    .values(
                        status=IN_QUEUE,
                        worker_id=None,
                        lease_token=None,
                        lease_expires_at=None,
                        started_at=None,
                        attempts=jobs_table.c.attempts - 1,
                    )
                ).rowcount
                == 1
            )

    def is_cancel_requested(self, job_id: str) -> bool:
        """One primary-key read; workers call it between steps (throttled by `cancel_poll_s`)."""
        with self.engine.connect() as conn:
            return bool(
                conn.execute(select(jobs_table.c.cancel_requested).where(jobs_table.c.id == job_id)).scalar_one_or_none()
            )

    def complete(
        self, job_id: str, outcome: JobOutcome, *, worker_id: str | None = None, lease_token: str | None = None
    ) -> bool:
        """Store the outcome, mark COMPLETED and record the webhook, in one transaction.

        With `worker_id` (and `lease_token`), only that lease holder may complete: a requeued job's
        old worker cannot, even when the job runs again under the same worker id. Returns False
        when nothing was updated (the result was already written, or the lease is gone).
        """
        if worker_id is not None or lease_token is not None:
            conditions = self._lease_holder(job_id, worker_id, lease_token)
        else:
            conditions = [jobs_table.c.id == job_id, jobs_table.c.status != COMPLETED]
        with self.engine.begin() as conn:
            return self._finish(conn, job_id, conditions, outcome)

    def _finish(self, conn: Connection, job_id: str, conditions: list[Any], outcome: JobOutcome) -> bool:
        """The conditional UPDATE to COMPLETED plus the webhook row, inside the caller's transaction."""
        now = time.time()
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
            .returning(jobs_table.c.webhook_url, jobs_table.c.created_at, jobs_table.c.started_at)
        ).first()
        if updated is None:
            return False
        counted = metrics.finished_job(outcome.status_code, outcome.error_type, updated.created_at, updated.started_at, now)
        metrics.bump(conn, counted)  # counted with the completion itself: never lost, never twice
        webhook_url = updated.webhook_url
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
        """Cancel a queued job at once, or flag a running one for its worker (whichever process runs it)."""
        with self.engine.begin() as conn:
            flagged = conn.execute(
                update(jobs_table)
                .where(jobs_table.c.id == job_id, jobs_table.c.status != COMPLETED)
                .values(cancel_requested=True)
            ).rowcount
            if not flagged:
                exists = conn.execute(select(jobs_table.c.id).where(jobs_table.c.id == job_id)).first()
                return CancelOutcome.ALREADY_COMPLETED if exists else CancelOutcome.NOT_FOUND
            # Still queued: complete it here, atomically (a worker claiming it meanwhile sees the flag instead).
            if self._finish(conn, job_id, [jobs_table.c.id == job_id, jobs_table.c.status == IN_QUEUE], CANCELLED_OUTCOME):
                conn.execute(_log_insert(job_id, "Request cancelled while in queue", "WARN"))
                return CancelOutcome.CANCELLED
        return CancelOutcome.REQUESTED

    # --- maintenance ------------------------------------------------------------------------------

    def requeue_expired(self, max_attempts: int) -> int:
        """Requeue running jobs whose lease ran out; fail those that already used `max_attempts` runs.

        Each change is fenced on the lease token seen here, so a worker that renewed in between keeps
        its job. A job whose cancel was requested completes as cancelled instead of running again.
        """
        now = time.time()
        with self.engine.connect() as conn:
            expired = conn.execute(
                select(jobs_table.c.id, jobs_table.c.attempts, jobs_table.c.lease_token, jobs_table.c.cancel_requested).where(
                    jobs_table.c.status == IN_PROGRESS, jobs_table.c.lease_expires_at < now
                )
            ).all()
        count = 0
        for job_id, attempts, token, cancel in expired:
            fence = [
                jobs_table.c.id == job_id,
                jobs_table.c.status == IN_PROGRESS,
                jobs_table.c.lease_expires_at < now,
                jobs_table.c.lease_token.is_(None) if token is None else jobs_table.c.lease_token == token,
            ]
            with self.engine.begin() as conn:
                if cancel:
                    self._finish(conn, job_id, fence, CANCELLED_OUTCOME)
                    continue
                if attempts >= max_attempts:
                    self._finish(conn, job_id, fence, RUNNER_DISCONNECTED_OUTCOME)
                    continue
                requeued = conn.execute(
                    update(jobs_table)
                    .where(*fence)
                    .values(status=IN_QUEUE, worker_id=None, lease_token=None, lease_expires_at=None, started_at=None)
                ).rowcount
                if requeued:  # the requeue and its log line commit together
                    conn.execute(_log_insert(job_id, "Worker lease expired; request requeued", "WARN"))
            if requeued:
                count += 1
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
        finished = 0
        for job_id in ids:
            with self.engine.begin() as conn:  # fenced on IN_QUEUE: a job a worker just claimed runs
                finished += self._finish(conn, job_id, [jobs_table.c.id == job_id, jobs_table.c.status == IN_QUEUE], outcome)
        return finished

    def purge_expired(self, retention_s: float) -> list[str]:
        """Delete finished jobs older than `retention_s` with their logs and webhooks; return their file
        keys (outputs and stored inputs) for the caller to delete from storage."""
        cutoff = time.time() - retention_s
        with self.engine.begin() as conn:
            rows = conn.execute(
                select(jobs_table.c.id, jobs_table.c.file_keys_json, jobs_table.c.input_key).where(
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
        outputs = [key for r in rows for key in json.loads(r.file_keys_json or "[]")]
        return outputs + [r.input_key for r in rows if r.input_key]

    # --- webhooks ---------------------------------------------------------------------------------

    def due_webhooks(self, limit: int = 16) -> list[PendingWebhook]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(webhooks_table, jobs_table.c.owner)
                .select_from(webhooks_table.outerjoin(jobs_table, jobs_table.c.id == webhooks_table.c.job_id))
                .where(webhooks_table.c.state == "pending", webhooks_table.c.next_attempt_at <= time.time())
                .order_by(webhooks_table.c.next_attempt_at)
                .limit(limit)
            ).all()
        return [PendingWebhook(r.seq, r.job_id, r.url, r.payload_json, r.attempts, r.owner or "") for r in rows]

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
            result: metrics.WebhookResult = "delivered"
        elif retry_at is not None:
            values, result = {"next_attempt_at": retry_at, "last_error": error}, "retrying"
        else:
            values, result = {"state": "failed", "last_error": error}, "failed"
        with self.engine.begin() as conn:
            conn.execute(update(webhooks_table).where(webhooks_table.c.seq == seq).values(**values))
            metrics.bump(conn, metrics.webhook_attempt(result))

    def webhook_states(self, job_id: str) -> list[tuple[str, int, str | None]]:
        """(state, attempts, last_error) of each webhook of a job, for tests and diagnostics."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(webhooks_table.c.state, webhooks_table.c.attempts, webhooks_table.c.last_error)
                .where(webhooks_table.c.job_id == job_id)
                .order_by(webhooks_table.c.seq)
            ).all()
        return [tuple(r) for r in rows]


    # --- live workers -------------------------------------------------------------------------------

    def worker_check_in(
        self, worker_id: str, hostname: str, *, forget_after_s: float = 3600.0, report: metrics.WorkerReport | None = None
    ) -> None:
        """Record that `worker_id` is running now (insert on the first call, renew after), with what it
        measured (`report`, for /metrics); rows of workers not seen for `forget_after_s` (killed without
        checking out) are forgotten on the way."""
        now = time.time()
        measured = (report or metrics.WorkerReport()).columns()
        with self.engine.begin() as conn:
            conn.execute(delete(workers_table).where(workers_table.c.last_seen_at < now - forget_after_s))
            renewed = conn.execute(
                update(workers_table).where(workers_table.c.worker_id == worker_id).values(last_seen_at=now, **measured)
            ).rowcount
        if renewed:
            return
        try:
            with self.engine.begin() as conn:
                row = {"worker_id": worker_id, "hostname": hostname, "started_at": now, "last_seen_at": now}
                conn.execute(insert(workers_table).values(**row, **measured))
        except IntegrityError:  # a concurrent first check-in of the same id: the row is there now
            pass

    def worker_check_out(self, worker_id: str) -> None:
        """A worker stopping cleanly leaves at once instead of fading out after `worker_alive_s`."""
        with self.engine.begin() as conn:
            conn.execute(delete(workers_table).where(workers_table.c.worker_id == worker_id))

    def live_workers(self, within_s: float) -> int:
        """Workers that checked in during the last `within_s` seconds (a read only: probes call it often)."""
        now = time.time()
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(workers_table).where(workers_table.c.last_seen_at >= now - within_s)
            ).scalar_one()

    # --- shared secrets -----------------------------------------------------------------------------

    def shared_secret(self, name: str) -> str:
        """A random secret that every process using this database sees the same (made on first use)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(secrets_table.c.value).where(secrets_table.c.name == name)).scalar_one_or_none()
        if value is not None:
            return value
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(secrets_table).values(name=name, value=secrets.token_urlsafe(32), created_at=time.time()))
        except IntegrityError:
            pass  # another process made it first; read theirs
        with self.engine.connect() as conn:
            return conn.execute(select(secrets_table.c.value).where(secrets_table.c.name == name)).scalar_one()

    def add_secret(self, name: str, value: str) -> bool:
        """Store `value` under `name` unless that name exists; True if this call stored it."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(secrets_table).values(name=name, value=value, created_at=time.time()))
        except IntegrityError:
            return False
        return True

    def secrets_named(self, prefix: str) -> list[tuple[str, str]]:
        """(name, value) of the secrets whose name starts with `prefix`, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(secrets_table.c.name, secrets_table.c.value)
                .where(secrets_table.c.name.startswith(prefix, autoescape=True))
                .order_by(secrets_table.c.created_at.desc(), secrets_table.c.name.desc())
            ).all()
        return [(row[0], row[1]) for row in rows]


def upgrade_database(settings: Settings) -> None:
    """Create or migrate the configured job store to the latest schema (the `tooncrafter db upgrade` command)."""
    JobStore(settings.resolved_database_url, migrate=True).close()
