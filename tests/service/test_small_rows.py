"""Small rows (issue 13, finding 2): a large input lives in the storage backend, not in the job row,
and no status, queue-position, SSE or result read selects the input, so their cost does not grow
with it. A real server on loopback, on local files and on S3."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
from helpers.service import (
    ENDPOINT,
    FakeGenerator,
    fake_factory,
    make_settings,
    running_server,
    two_keyframes,
    wait_until,
)
from PIL import Image
from sqlalchemy import event, func, select

from tooncrafter.service.app import create_app
from tooncrafter.service.jobs.tables import jobs_table
from tooncrafter.service.worker import Worker

Q = f"/queue/{ENDPOINT}"
MIB = 1024 * 1024


def big_png(seed: int, min_bytes: int = 8 * MIB) -> tuple[bytes, np.ndarray]:
    """An uncompressed PNG of noise of at least `min_bytes`, and its pixels."""
    side = int((min_bytes / 3) ** 0.5) + 1
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue(), pixels


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


class Statements:
    """The SQL every thread but the worker's sends through `engine` while recording."""

    def __init__(self, engine) -> None:
        self.seen: list[str] = []
        self.recording = False
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, _conn, _cursor, statement, _parameters, _context, _executemany) -> None:
        if self.recording and threading.current_thread().name != Worker.thread_name:
            self.seen.append(statement)


def test_a_large_input_leaves_a_small_row_and_status_reads_never_select_it(tmp_path, storage_backend) -> None:
    (first_png, first_pixels), (second_png, second_pixels) = big_png(1), big_png(2)
    body = {"keyframe_image_urls": [data_uri(first_png), data_uri(second_png)], "steps": 2, "seed": 7}
    gen = FakeGenerator(gate=threading.Event())
    settings = make_settings(tmp_path, result_retention_s=1.0, **storage_backend)
    with running_server(create_app(settings, generator_factory=fake_factory(gen))) as server, server.client() as client:
        statements = Statements(server.store.engine)
        running = client.post(Q, json=body).json()
        wait_until(gen.started.is_set)  # the worker holds the first job at step 1
        queued = client.post(Q, json=body).json()  # ... so this one waits in the queue

        # 1. the rows are small: the inputs are files in the storage, the rows keep their keys
        with server.store.engine.connect() as conn:
            rows = conn.execute(select(jobs_table).where(jobs_table.c.id.in_([running["request_id"], queued["request_id"]]))).all()
        for row in rows:
            assert sum(len(str(value)) for value in row) < 4096, "the job row carries the input"
            assert row.input_json == "" and server.runtime.storage.stat(row.input_key).size > 2 * 8 * MIB

        # 2. status (with logs), queue position, the SSE stream and the result never select the input
        statements.recording = True
        in_queue = client.get(queued["status_url"].replace(server.base_url, ""), params={"logs": 1})
        assert in_queue.status_code == 202 and in_queue.json()["queue_position"] == 0
        with client.stream("GET", running["status_url"].replace(server.base_url, "") + "/stream", params={"logs": 1}) as stream:
            first_event = next(line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(first_event[len("data: "):])["status"] == "IN_PROGRESS"
        gen.gate.set()
        for job in (running, queued):
            wait_until(lambda job=job: client.get(job["status_url"].replace(server.base_url, "")).status_code == 200, timeout_s=60)
            result = client.get(job["response_url"].replace(server.base_url, ""))
            assert result.status_code == 200 and result.json()["seed"] == 7
        statements.recording = False
        job_reads = [s for s in statements.seen if "FROM jobs" in s]
        assert job_reads, "no status read was recorded"
        assert not [s for s in statements.seen if "input_json" in s], "a status read selected the input"

        # 3. the worker got the very pixels that were sent
        assert len(gen.requests) == 2
        for request in gen.requests:
            assert [np.array_equal(np.asarray(k), p) for k, p in zip(request.keyframes, (first_pixels, second_pixels))] == [True, True]

        # 4. the retention purge deletes the stored inputs with their jobs
        keys = [row.input_key for row in rows]
        completed_at = max(server.store.get(job["request_id"]).completed_at for job in (running, queued))
        wait_until(lambda: time.time() > completed_at + settings.result_retention_s, timeout_s=10)
        server.runtime.worker.purge()
        assert server.store.get(running["request_id"]) is None
        assert [server.runtime.storage.stat(key) for key in keys] == [None, None]


def test_a_small_input_stays_in_the_row(tmp_path) -> None:
    with running_server(create_app(make_settings(tmp_path), generator_factory=fake_factory())) as server, server.client() as client:
        submitted = client.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 1}).json()
        with server.store.engine.connect() as conn:
            row = conn.execute(select(jobs_table.c.input_key, func.length(jobs_table.c.input_json)).where(jobs_table.c.id == submitted["request_id"])).one()
        assert row[0] is None and row[1] > 0
        wait_until(lambda: client.get(submitted["status_url"].replace(server.base_url, "")).status_code == 200)
        assert client.get(submitted["response_url"].replace(server.base_url, "")).status_code == 200


def test_every_input_can_be_a_file(tmp_path) -> None:
    """`input_inline_max_bytes=0`: even a tiny input is a stored file, and the job runs the same."""
    settings = make_settings(tmp_path, input_inline_max_bytes=0)
    with running_server(create_app(settings, generator_factory=fake_factory())) as server, server.client() as client:
        submitted = client.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 1, "seed": 3}).json()
        assert server.store.get(submitted["request_id"]).input_key is not None
        wait_until(lambda: client.get(submitted["status_url"].replace(server.base_url, "")).status_code == 200)
        assert client.get(submitted["response_url"].replace(server.base_url, "")).json()["seed"] == 3
