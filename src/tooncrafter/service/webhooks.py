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

import logging
import time

import httpx

from tooncrafter.service.background import BackgroundLoop
from tooncrafter.service.jobs import JobStore, PendingWebhook
from tooncrafter.service.outbound import OutboundURLError, check_url_syntax, pinned_post
from tooncrafter.service.webhook_signing import Keyring, signature_headers
from tooncrafter.settings import Settings

logger = logging.getLogger(__name__)


def check_webhook_url(url: str) -> None:
    """At submit: an absolute http(s) URL with a valid host and port (`fal_webhook`'s 422 otherwise).

    Where it resolves to is checked at each delivery (DNS can change; the checked address is used)."""
    check_url_syntax(url, "fal_webhook")


def retry_delay_s(attempts_done: int, settings: Settings) -> float:
    """Wait before the next try after `attempts_done` failed ones (>= 1)."""
    return min(settings.webhook_base_delay_s * 2 ** (attempts_done - 1), settings.webhook_max_delay_s)


class WebhookSender(BackgroundLoop):
    """Delivers due webhooks in a daemon thread until `stop()`."""

    thread_name = "tooncrafter-webhooks"
    stop_timeout_s = 10.0

    def __init__(self, store: JobStore, settings: Settings, keyring: Keyring, *, poll_s: float = 1.0) -> None:
        super().__init__()
        self._store = store
        self._settings = settings
        self._keyring = keyring
        self._poll_s = poll_s

    def run_forever(self) -> None:
        # trust_env=False: no proxy may take the pinned connection elsewhere
        with httpx.Client(timeout=self._settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
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
        body = hook.payload_json.encode()
        headers = {"Content-Type": "application/json", "User-Agent": "tooncrafter-webhooks"}
        try:
            headers.update(signature_headers(self._keyring.signing_key(), hook.job_id, hook.owner, body))
            response = pinned_post(client, hook.url, body, headers, allow_private=self._settings.allow_private_urls)
            if 200 <= response.status_code < 300:
                self._store.finish_webhook(hook.seq, delivered=True, error=None, retry_at=None)
                logger.info("webhook for %s delivered (attempt %d)", hook.job_id, attempt)
                return
            error = f"HTTP {response.status_code}"
        except OutboundURLError as exc:  # refused or unresolvable: recorded, and retried like any failure
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - every failure is an attempt with its error, never a loop crash
            error = f"{type(exc).__name__}: {exc}"
        if attempt >= self._settings.webhook_max_attempts:
            self._store.finish_webhook(hook.seq, delivered=False, error=error, retry_at=None)
            logger.warning("webhook for %s failed for good after %d attempts: %s", hook.job_id, attempt, error)
        else:
            retry_at = time.time() + retry_delay_s(attempt, self._settings)
            self._store.finish_webhook(hook.seq, delivered=False, error=error, retry_at=retry_at)
            logger.info("webhook for %s failed (attempt %d: %s); retrying", hook.job_id, attempt, error)
