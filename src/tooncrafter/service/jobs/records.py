"""What the job store hands out: jobs, log lines, outcomes, pending webhooks (plain data)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def iso_now() -> str:
    """UTC now as ISO-8601 with milliseconds and a Z, as fal's log timestamps."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Job:
    """One request as stored."""

    id: str
    seq: int
    endpoint: str
    owner: str
    status: str
    input: dict[str, Any] | None  # the inline input document; None when stored at `input_key`, or not read
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
    lease_token: str | None = None
    priority: int = 0
    input_key: str | None = None  # storage key of the input document when it was too large for the row


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
    owner: str = ""  # the job's owner: signed as the webhook's user id


class CancelOutcome(enum.Enum):
    NOT_FOUND = "NOT_FOUND"
    CANCELLED = "CANCELLED"  # was queued: removed and completed at once
    REQUESTED = "REQUESTED"  # running: the worker stops between steps
    ALREADY_COMPLETED = "ALREADY_COMPLETED"


def field_error_body(loc: list[Any], message: str, error_type: str = "value_error") -> dict[str, Any]:
    """A 422 body naming one body field, in FastAPI's `detail` shape (as fal's FieldException): what
    a submit-time check answers and what a job that fails on its input replays."""
    where = ".".join(str(part) for part in loc)
    return {"detail": [{"loc": ["body", *loc], "msg": message, "type": error_type}], "message": f"{where}: {message}"}


CANCELLED_OUTCOME = JobOutcome(
    status_code=400,
    body={"detail": "Request was cancelled", "error_type": "request_cancelled"},
    error="Request was cancelled",
    error_type="request_cancelled",
)


RUNNER_DISCONNECTED_OUTCOME = JobOutcome(
    status_code=503,
    body={"detail": "The worker running this request stopped responding", "error_type": "runner_disconnected"},
    error="The worker running this request stopped responding",
    error_type="runner_disconnected",
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
