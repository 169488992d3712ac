"""Webhook delivery: a background thread that POSTs fal's envelope and retries with backoff.

The job store records each webhook when its job completes (same transaction), so deliveries live
in the database: a restart resumes pending ones, and a delivered one is never sent again. Several
processes may run a sender; `claim_webhook` makes each attempt belong to one of them. The worker
never waits for a delivery. Envelope: `jobs.webhook_envelope` (fal's `request_id`,
`gateway_request_id`, `status` OK/ERROR, `payload`, `error`).

Retry schedule (fal: 10 tries over about 2 h): attempt n+1 waits `base * 2**(n-1)` seconds, capped,
with the defaults 15 s, 30 s, ... ~64 min, about 2 h in all.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx

from tooncrafter.service.background import BackgroundLoop
from tooncrafter.service.jobs import JobStore, PendingWebhook
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)


class WebhookURLError(ValueError):
    """The webhook URL is not an http(s) URL we may call."""


def check_webhook_url(url: str) -> None:
    """Syntax check at submit time: absolute http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookURLError("fal_webhook must be an absolute http(s) URL")


def _is_public_host(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return True  # let the POST fail with a clear error instead
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            return False
    return True


def retry_delay_s(attempts_done: int, settings: Settings) -> float:
    """Wait before the next try after `attempts_done` failed ones (>= 1)."""
    return min(settings.webhook_base_delay_s * 2 ** (attempts_done - 1), settings.webhook_max_delay_s)


class WebhookSender(BackgroundLoop):
    """Delivers due webhooks in a daemon thread until `stop()`."""

    thread_name = "tooncrafter-webhooks"
    stop_timeout_s = 10.0

    def __init__(self, store: JobStore, settings: Settings, *, poll_s: float = 1.0) -> None:
        super().__init__()
        self._store = store
        self._settings = settings
        self._poll_s = poll_s

    def run_forever(self) -> None:
        with httpx.Client(timeout=self._settings.webhook_timeout_s, follow_redirects=False) as client:
            while not self._stop.is_set():
                try:
                    for hook in self._store.due_webhooks():
                        if self._stop.is_set():
                            break
                        self._deliver(client, hook)
                except Exception:  # keep the sender alive through database hiccups
                    logger.exception("webhook sender loop failed; retrying")
                self._wake.wait(self._poll_s)
                self._wake.clear()

    def _deliver(self, client: httpx.Client, hook: PendingWebhook) -> None:
        # hold the row for longer than one POST can take, so another sender does not double-send
        if not self._store.claim_webhook(hook, hold_s=self._settings.webhook_timeout_s * 2 + 5):
            return
        attempt = hook.attempts + 1
        error: str | None = None
        try:
            parts = urlsplit(hook.url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            if not self._settings.allow_private_urls and not _is_public_host(parts.hostname or "", port):
                raise WebhookURLError(f"webhook host {parts.hostname} is a private address (ALLOW_PRIVATE_URLS is off)")
            response = client.post(
                hook.url,
                content=hook.payload_json.encode(),
                headers={"Content-Type": "application/json", "User-Agent": "tooncrafter-webhooks"},
            )
            if 200 <= response.status_code < 300:
                self._store.finish_webhook(hook.seq, delivered=True, error=None, retry_at=None)
                logger.info("webhook for %s delivered (attempt %d)", hook.job_id, attempt)
                return
            error = f"HTTP {response.status_code}"
        except WebhookURLError as exc:
            self._store.finish_webhook(hook.seq, delivered=False, error=str(exc), retry_at=None)
            logger.warning("webhook for %s refused: %s", hook.job_id, exc)
            return
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if attempt >= self._settings.webhook_max_attempts:
            self._store.finish_webhook(hook.seq, delivered=False, error=error, retry_at=None)
            logger.warning("webhook for %s failed for good after %d attempts: %s", hook.job_id, attempt, error)
        else:
            retry_at = time.time() + retry_delay_s(attempt, self._settings)
            self._store.finish_webhook(hook.seq, delivered=False, error=error, retry_at=retry_at)
            logger.info("webhook for %s failed (attempt %d: %s); retrying", hook.job_id, attempt, error)
