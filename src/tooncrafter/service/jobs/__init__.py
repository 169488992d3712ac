"""The durable job store (see `store`): requests, their logs, results, pending webhooks and live workers."""

from tooncrafter.service.jobs.metrics import WorkerReport
from tooncrafter.service.jobs.migrate import migrate_engine
from tooncrafter.service.jobs.records import (
    CANCELLED_OUTCOME,
    RUNNER_DISCONNECTED_OUTCOME,
    CancelOutcome,
    Job,
    JobOutcome,
    LogEntry,
    PendingWebhook,
    field_error_body,
    webhook_envelope,
)
from tooncrafter.service.jobs.store import JobStore, upgrade_database
from tooncrafter.service.jobs.tables import COMPLETED, IN_PROGRESS, IN_QUEUE, metadata

__all__ = [
    "CANCELLED_OUTCOME",
    "COMPLETED",
    "IN_PROGRESS",
    "IN_QUEUE",
    "RUNNER_DISCONNECTED_OUTCOME",
    "CancelOutcome",
    "Job",
    "JobOutcome",
    "JobStore",
    "LogEntry",
    "PendingWebhook",
    "WorkerReport",
    "field_error_body",
    "metadata",
    "migrate_engine",
    "upgrade_database",
    "webhook_envelope",
]
