"""Open event streams per API key (issue 13, finding 2): a key holds at most `max_streams_per_key`
status streams and streaming runs at once; one more is a 429 that names the setting, and a slot comes
back when a stream ends or its client goes away. A real server on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import httpx
import pytest
from helpers.service import (
    ENDPOINT,
    FakeGenerator,
    fake_factory,
    make_settings,
    running_server,
    two_keyframes,
    wait_until,
)
from sqlalchemy import func, select

from tooncrafter.service.app import create_app
from tooncrafter.service.jobs.tables import jobs_table

Q = f"/queue/{ENDPOINT}"
LIMIT = 2


@pytest.fixture
def server(tmp_path):
    gen = FakeGenerator(gate=threading.Event())
    settings = make_settings(tmp_path, api_keys=["k1", "k2"], max_streams_per_key=LIMIT)
    with running_server(create_app(settings, generator_factory=fake_factory(gen))) as running:
        running.gen = gen
        yield running


def keyed(server, key: str) -> httpx.Client:
    return server.client(headers={"Authorization": f"Key {key}"})


@contextlib.contextmanager
def open_stream(client: httpx.Client, path: str, method: str = "GET", **kwargs) -> Iterator[tuple[httpx.Response, Iterator[dict]]]:
    """A stream whose response has started, and an iterator over its events (empty unless a 200)."""
    with client.stream(method, path, **kwargs) as response:
        if response.status_code != 200:
            response.read()
            yield response, iter(())
            return
        events = (json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: "))
        yield response, events


def slots_free(client: httpx.Client, path: str, count: int) -> bool:
    """True when `count` streams on `path` can be open at once (they are closed again at once)."""
    with contextlib.ExitStack() as streams:
        return all(streams.enter_context(open_stream(client, path))[0].status_code == 200 for _ in range(count))


def jobs_in(server) -> int:
    with server.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs_table)).scalar_one()


def test_a_key_holds_at_most_its_streams_and_gets_them_back(server) -> None:
    with keyed(server, "k1") as k1, keyed(server, "k2") as k2:
        job = k1.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 1}).json()
        wait_until(server.gen.started.is_set)  # running, held at step 1: its streams stay open
        path = job["status_url"].replace(server.base_url, "") + "/stream"
        with contextlib.ExitStack() as streams:
            opened = [streams.enter_context(open_stream(k1, path)) for _ in range(LIMIT)]
            assert [next(events)["status"] for _, events in opened] == ["IN_PROGRESS"] * LIMIT

            with open_stream(k1, path) as (refused, _):
                assert refused.status_code == 429
                assert "TOONCRAFTER_MAX_STREAMS_PER_KEY" in refused.json()["message"]
            before = jobs_in(server)  # the streaming run is refused before it queues anything
            with open_stream(k1, f"/{ENDPOINT}/stream", "POST", json={"keyframe_image_urls": two_keyframes()}) as (run, _):
                assert run.status_code == 429 and jobs_in(server) == before
            with open_stream(k2, path) as (other, _):  # other keys are not counted (k1's job: a 404 for k2)
                assert other.status_code == 404

            opened[0][0].close()  # a client that goes away frees its slot
            wait_until(lambda: slots_free(k1, path, 1))

            server.gen.gate.set()  # a stream that ends (the job completed) frees its slot too
            assert [event["status"] for event in opened[1][1]][-1] == "COMPLETED"
            wait_until(lambda: slots_free(k1, path, LIMIT))  # its client still holds the connection
