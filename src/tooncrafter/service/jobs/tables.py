"""The job store's tables, as the queries see them (the Alembic migrations own the real schema;
a test checks that the two agree), and fal's three job statuses."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

# X-Fal-Queue-Priority: every `normal` request runs before any `low` one (fal's rule), each in
# submission order. Stored as a small integer so the claim query can order on it.
PRIORITIES = {"normal": 0, "low": 1}

metadata = MetaData()

jobs_table = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # queue order
    Column("id", String(64), nullable=False, unique=True),
    Column("endpoint", String(200), nullable=False),
    Column("owner", String(64), nullable=False, index=True),  # sha256 of the API key, "" when open
    Column("status", String(16), nullable=False, index=True),
    Column("input_json", Text, nullable=False),  # the input document, or "" when it is stored at input_key
    Column("input_key", Text),  # storage key of a large input document (see service/stored_inputs.py)
    Column("webhook_url", Text),
    Column("base_url", Text, nullable=False),  # where this server is reached; output URLs are built from it
    Column("created_at", Float, nullable=False),
    Column("start_deadline", Float),  # X-Fal-Request-Timeout: must start before this (epoch s)
    Column("started_at", Float),
    Column("completed_at", Float, index=True),
    Column("worker_id", String(64)),
    Column("lease_token", String(32)),  # minted per claim: fences heartbeat/release/complete
    Column("lease_expires_at", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("result_status_code", Integer),
    Column("result_json", Text),
    Column("error", Text),
    Column("error_type", String(64)),
    Column("inference_time", Float),
    Column("file_keys_json", Text, nullable=False, default="[]"),
    Column("priority", SmallInteger, nullable=False, server_default="0"),  # PRIORITIES: lower runs first
    Index("ix_jobs_status_seq", "status", "seq"),
    Index("ix_jobs_status_priority_seq", "status", "priority", "seq"),  # claim order and queue positions
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

secrets_table = Table(
    "service_secrets",  # secrets every process of a deployment must share (the upload-token HMAC key)
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

workers_table = Table(
    "workers",  # one row per running worker, renewed every `worker_checkin_s`: /health counts the fresh ones
    metadata,
    Column("worker_id", String(64), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False, index=True),
    # what the worker measured at its last check-in (/metrics); NULL when it has nothing to say (no GPU, no job yet)
    Column("steps_per_second", Float),
    Column("gpu_memory_allocated_bytes", BigInteger),
    Column("gpu_memory_reserved_bytes", BigInteger),
    Column("gpu_memory_peak_bytes", BigInteger),
)

metrics_table = Table(
    "service_metrics",  # cumulative counters of the whole deployment (/metrics), bumped in the transaction that counts
    metadata,
    Column("name", String(100), primary_key=True),
    Column("labels", String(255), primary_key=True),  # the label set as sorted JSON; "{}" for none
    Column("value", Float, nullable=False),
)
