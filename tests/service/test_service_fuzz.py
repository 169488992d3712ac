"""No input gives a 500: random JSON bodies, queries and headers against a real server on loopback.

Property-based (hypothesis): every answer is a 2xx or a 4xx with a JSON body, never a 5xx, and
every 422 names a location. Bounded in examples and time.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from helpers.service import fake_factory, make_settings, png_data_uri, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooncrafter.service.app import create_app

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
keyframe = st.one_of(st.just(png_data_uri()), st.text(max_size=30), st.sampled_from(["data:", "data:image/png;base64,!!", "http://", "ftp://x/y.png", "http://127.0.0.1:1/x.png"]))
fields = st.fixed_dictionaries(
    {},
    optional={
        "keyframe_image_urls": st.one_of(st.lists(keyframe, max_size=18), json_values),
        "prompt": st.one_of(st.text(max_size=50), json_values),
        "steps": st.one_of(st.integers(-5, 200), json_values),
        "cfg_scale": st.one_of(st.floats(-10, 50, allow_nan=False), json_values),
        "eta": st.one_of(st.floats(-1, 2, allow_nan=False), json_values),
        "motion_steps": st.one_of(st.integers(-5, 200), json_values),
        "fps": st.one_of(st.integers(-5, 100), json_values),
        "seed": st.one_of(st.integers(-(2**40), 2**40), json_values),
        "keyframe_lengths": st.one_of(st.lists(st.integers(-2, 20), max_size=5), json_values),
        "keep_all_frames": json_values,
    },
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz")), generator_factory=fake_factory())
    with running_server(app) as running:
        yield running


def _check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:500])
    assert reply.headers["content-type"].startswith("application/json"), reply.headers["content-type"]
    if reply.status_code == 422:
        detail = reply.json()["detail"]
        assert isinstance(detail, list) and all(entry.get("loc") for entry in detail)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(fields, json_values))
def test_submit_never_answers_5xx(server, body) -> None:
    with httpx.Client(trust_env=False, timeout=30) as client:
        _check(client.post(f"{server.base_url}/queue/fal-ai/toon-crafter", json=body))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), webhook=st.one_of(st.none(), st.text(max_size=30)), logs=st.text(max_size=5))
def test_malformed_bodies_and_queries_are_4xx(server, raw, webhook, logs) -> None:
    params = {"fal_webhook": webhook} if webhook is not None else {}
    request_id = quote(logs or "x", safe="")  # any text, percent-encoded into the path
    with httpx.Client(trust_env=False, timeout=30) as client:
        _check(client.post(f"{server.base_url}/queue/fal-ai/toon-crafter", content=raw, params=params,
                           headers={"content-type": "application/json"}))
        _check(client.get(f"{server.base_url}/queue/fal-ai/toon-crafter/requests/{request_id}/status", params={"logs": logs}))
        _check(client.put(f"{server.base_url}/queue/fal-ai/toon-crafter/requests/{request_id}/cancel"))
