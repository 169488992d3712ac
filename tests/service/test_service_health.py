"""A server that cannot run work says so: /health counts live workers, and processes without a model exit.

`tooncrafter serve` (with its in-process worker) and `tooncrafter worker` load the model before they
take anything, and exit non-zero with one line when they cannot; an API-only process keeps queueing
but its /health answers 503 until a worker, in any process sharing the job store, checks in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers.service import (
    ENDPOINT,
    fake_factory,
    free_port,
    make_settings,
    two_keyframes,
    wait_until,
)

from tooncrafter.service.app import create_app
from tooncrafter.service.jobs import JobStore
from tooncrafter.service.storage import storage_from_url
from tooncrafter.service.worker import Worker


def test_health_counts_the_in_process_worker(tmp_path: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as client:
        body = wait_until(lambda: (r := client.get("/health")).status_code == 200 and r.json())
        assert body["status"] == "ok" and body["workers"] == 1 and body["worker"]["ready"] is True


def test_api_only_health_is_503_until_a_worker_checks_in_and_again_after_it_leaves(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, worker_alive_s=3.0)
    with TestClient(create_app(settings, with_worker=False)) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["workers"] == 0 and "no worker" in response.json()["message"]
        assert client.get("/health/live").status_code == 200  # the process itself is fine
        # work is still accepted: it waits in the queue for a worker
        submitted = client.post(f"/queue/{ENDPOINT}", json={"keyframe_image_urls": two_keyframes(), "steps": 2})
        assert submitted.status_code == 200

        # a worker in another "process" (its own store on the same database) checks in
        store = JobStore(settings.resolved_database_url)
        worker = Worker(store, storage_from_url(settings.resolved_storage_url), settings, fake_factory())
        worker.start()
        try:
            wait_until(lambda: client.get("/health").status_code == 200, timeout_s=20)
            assert client.get("/health").json()["workers"] == 1
            status_url = submitted.json()["status_url"].replace("http://testserver", "")
            wait_until(lambda: client.get(status_url).json()["status"] == "COMPLETED", timeout_s=20)
        finally:
            worker.stop()
            store.close()
        assert client.get("/health").status_code == 503  # a clean stop checks out at once


def test_a_worker_that_stops_checking_in_fades_out(tmp_path: Path) -> None:
    store = JobStore(make_settings(tmp_path).resolved_database_url)
    try:
        store.worker_check_in("w1", "host")
        store.worker_check_in("w1", "host")  # renewing is not a second worker
        assert store.live_workers(within_s=5) == 1
        time.sleep(0.3)
        assert store.live_workers(within_s=0.1) == 0
    finally:
        store.close()


def _offline_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOONCRAFTER_")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),  # an empty cache: the weights are nowhere
        TOONCRAFTER_DATA_DIR=str(tmp_path / "data"),
    )
    return env


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["worker"]])
def test_processes_without_a_model_exit_with_one_line(command: list[str], tmp_path: Path) -> None:
    if command[0] == "serve":
        command = ["serve", "--port", str(free_port())]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tooncrafter.cli", *command],
        env=_offline_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--checkpoint" in lines[0] and "HF_HUB_OFFLINE" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_in_process_worker_load_failure_shows_in_health(tmp_path: Path) -> None:
    """Library use (create_app with a factory that fails): the failure is reported, not hidden."""

    def broken(_settings):
        raise FileNotFoundError("model.ckpt is missing")

    with TestClient(create_app(make_settings(tmp_path), generator_factory=broken)) as client:
        body = wait_until(lambda: (r := client.get("/health")).json()["worker"]["error"] and r.json())
        assert client.get("/health").status_code == 503
        assert body["worker"]["ready"] is False and "model.ckpt is missing" in body["worker"]["error"]
