"""The job store on SQLite and PostgreSQL: claims, leases, cancel, purge, webhooks."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from helpers.service import postgres_server

from tooncrafter.service.jobs import CancelOutcome, JobOutcome, JobStore, metadata

BODY = {"keyframe_image_urls": ["data:,a", "data:,b"]}


@pytest.fixture(scope="module")
def pg_url(tmp_path_factory):
    try:
        server = postgres_server(tmp_path_factory.mktemp("pg"))
        url = server.__enter__()
    except (FileNotFoundError, OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield url
    server.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = JobStore(url)
    try:
        yield store
    finally:
        metadata.drop_all(store.engine)  # the PostgreSQL cluster is shared by the module
        store.close()


def _submit(store: JobStore, **kw):
    return store.submit(endpoint="fal-ai/toon-crafter", owner="o", input=BODY, base_url="http://x", **kw)


def test_claims_are_fifo_and_exclusive(store):
    jobs = [_submit(store) for _ in range(12)]
    assert [store.queue_position(j) for j in jobs[:3]] == [0, 1, 2]
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := store.claim(name, lease_s=30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.id for j in jobs)  # every job once, none twice


def test_lease_expiry_requeues_and_heartbeat_extends(store):
    a, b = _submit(store), _submit(store)
    assert store.claim("w1", lease_s=0.05).id == a.id
    assert store.claim("w2", lease_s=30).id == b.id
    time.sleep(0.1)
    assert store.requeue_expired(max_attempts=3) == 1
    assert store.get(a.id).status == "IN_QUEUE" and store.get(b.id).status == "IN_PROGRESS"
    assert not store.heartbeat(a.id, "w1", 30)  # the old worker lost it
    assert not store.complete(a.id, JobOutcome(200, {}), worker_id="w1")
    again = store.claim("w3", lease_s=30)
    assert again.id == a.id and again.attempts == 2
    assert store.heartbeat(a.id, "w3", 30)


def test_cancel_and_complete_record_webhooks(store):
    queued = _submit(store, webhook_url="http://hook")
    assert store.request_cancel(queued.id) is CancelOutcome.CANCELLED
    assert store.get(queued.id).result_status_code == 400
    assert store.request_cancel(queued.id) is CancelOutcome.ALREADY_COMPLETED
    assert store.request_cancel("nope") is CancelOutcome.NOT_FOUND
    running = _submit(store)
    store.claim("w", 30)
    assert store.request_cancel(running.id) is CancelOutcome.REQUESTED and store.is_cancel_requested(running.id)
    hooks = store.due_webhooks()
    assert [h.job_id for h in hooks] == [queued.id]
    assert store.claim_webhook(hooks[0], hold_s=60) and not store.claim_webhook(hooks[0], hold_s=60)


def test_purge_returns_file_keys(store):
    job = _submit(store)
    store.claim("w", 30)
    store.add_log(job.id, "step 1/1")
    store.complete(job.id, JobOutcome(200, {"ok": True}, file_keys=["tok/output.mp4"]), worker_id="w")
    assert store.purge_expired(retention_s=3600) == []
    time.sleep(0.02)
    assert store.purge_expired(retention_s=0.01) == ["tok/output.mp4"]
    assert store.get(job.id) is None and store.logs(job.id) == []


def test_low_priority_runs_after_every_normal_one_and_positions_agree(tmp_path):
    from tooncrafter.service.jobs.tables import PRIORITIES

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        low1 = store.submit(endpoint="e", owner="", input={}, base_url="http://x", priority=PRIORITIES["low"])
        normal1 = store.submit(endpoint="e", owner="", input={}, base_url="http://x")
        low2 = store.submit(endpoint="e", owner="", input={}, base_url="http://x", priority=PRIORITIES["low"])
        normal2 = store.submit(endpoint="e", owner="", input={}, base_url="http://x")
        expected = [normal1, normal2, low1, low2]
        assert [store.queue_position(job) for job in expected] == [0, 1, 2, 3]
        claimed = [store.claim("w", 30).id for _ in expected]
        assert claimed == [job.id for job in expected]
        assert store.claim("w", 30) is None
    finally:
        store.close()
