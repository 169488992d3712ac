"""A daemon thread that loops until stopped and can be woken early: the shape of the worker and
the webhook sender, which both poll the job store and are nudged when something happens."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Subclasses implement `run_forever`, waiting with `self._wake.wait(...)` and leaving when
    `self._stop` is set."""

    thread_name = "tooncrafter-background"
    stop_timeout_s = 30.0

    def __init__(self) -> None:
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self) -> None:
        """Run `run_forever` in a daemon thread."""
        self._thread = threading.Thread(target=self.run_forever, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Ask the loop to end and wait for it (at most `timeout_s`, default `stop_timeout_s`)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.stop_timeout_s if timeout_s is None else timeout_s)

    def notify(self) -> None:
        """Something changed: look now rather than at the next poll."""
        self._wake.set()
