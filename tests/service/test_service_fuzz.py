"""No input gives a 5xx: generated bodies, queries and headers against one real server on loopback.

Property-based (hypothesis, derandomized so CI runs the same cases every time), 2,250 requests in
all: JSON bodies whose numbers include NaN, Infinity, 1e400 and 5,000-digit integers; malformed
bodies and queries; and raw HTTP requests whose method, path, Host, Content-Type, Content-Length,
Range, Authorization and X-Fal-* headers are fuzzed, sent over a socket so that nothing in a client
library tidies them up. The server runs the connection-guarded protocol `tooncrafter serve` uses,
with API keys. Every answer is below 500 (a connection the server closes without an answer counts as
refused, which is what h11 does with a request it cannot parse), every 422 from the app names a
location, and /health still answers 200 afterwards.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers.service import (
    ENDPOINT,
    FakeGenerator,
    fake_factory,
    make_settings,
    png_bytes,
    png_data_uri,
    running_server,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tooncrafter.service.app import create_app
from tooncrafter.service.http_limits import guarded_protocol

KEY = "fuzz-key"
AUTH = {"Authorization": f"Key {KEY}"}
BODY_EXAMPLES, MALFORMED_EXAMPLES, HEADER_EXAMPLES = 600, 150, 1200  # 600 + 3 * 150 + 1200 = 2,250 requests
FUZZ = {"deadline": None, "derandomize": True, "database": None, "suppress_health_check": [HealthCheck.too_slow]}


class Raw(str):
    """A JSON token written as it is (NaN, 1e400, ...): what `json.dumps` would refuse or normalise."""


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, allow_nan=True)


odd_numbers = st.sampled_from(
    [Raw(t) for t in ("NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0.0", "4294967296", "1" + "0" * 5000, "0x10", "1_000")]
)
numbers = st.one_of(odd_numbers, st.floats(), st.integers(min_value=-(2**70), max_value=2**70))
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
keyframe = st.one_of(st.just(png_data_uri()), st.text(max_size=30), st.sampled_from(["data:", "data:image/png;base64,!!", "http://", "ftp://x/y.png", "http://127.0.0.1:1/x.png"]))
fields = st.fixed_dictionaries(
    {},
    optional={
        "keyframe_image_urls": st.one_of(st.lists(keyframe, max_size=18), json_values),
        "prompt": st.one_of(st.text(max_size=50), json_values),
        "steps": st.one_of(st.integers(-5, 3), numbers, json_values),  # at most 3 steps when valid: cheap jobs
        "cfg_scale": st.one_of(numbers, json_values),
        "eta": st.one_of(numbers, json_values),
        "motion_steps": st.one_of(st.integers(-5, 200), numbers, json_values),
        "fps": st.one_of(st.integers(-5, 100), numbers, json_values),
        "seed": st.one_of(st.integers(-(2**40), 2**40), numbers, json_values),
        "keyframe_lengths": st.one_of(st.lists(st.one_of(st.integers(-2, 20), odd_numbers), max_size=5), json_values),
        "keep_all_frames": json_values,
    },
)


@dataclass
class Target:
    """The server and real things on it to aim at: a finished job, a stored file, a multipart token."""

    base_url: str
    port: int
    job_id: str
    file_key: str
    multipart_token: str


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    settings_ = make_settings(tmp_path_factory.mktemp("fuzz"), api_keys=[KEY], request_header_timeout_s=2.0, request_body_timeout_s=2.0)
    protocol = guarded_protocol(max_connections=256, header_timeout_s=2.0, body_timeout_s=2.0)
    app = create_app(settings_, generator_factory=fake_factory(FakeGenerator(step_sleep_s=0.0)))
    with running_server(app, http=protocol) as server, server.client(headers=AUTH) as client:
        job = client.post(f"/queue/{ENDPOINT}", json={"keyframe_image_urls": [png_data_uri()] * 2, "steps": 1}).json()
        wait_until(lambda: client.get(f"/queue/{ENDPOINT}/requests/{job['request_id']}/status").status_code == 200)
        upload = client.post("/storage/upload/initiate", json={"file_name": "a.png", "content_type": "image/png"}).json()
        client.put(upload["upload_url"], content=png_bytes())
        multipart = client.post("/storage/upload/initiate-multipart", json={}).json()["upload_url"]
        yield Target(server.base_url, server.port, job["request_id"], upload["file_url"].split("/files/", 1)[1], multipart.rsplit("/", 1)[1])
        assert client.get("/health").status_code == 200


def assert_healthy(target: Target) -> None:
    with httpx.Client(trust_env=False, timeout=30) as client:
        assert client.get(f"{target.base_url}/health").status_code == 200


def check(reply: httpx.Response) -> None:
    assert reply.status_code < 500, (reply.status_code, reply.text[:500])
    assert reply.headers["content-type"].startswith("application/json"), reply.headers["content-type"]
    if reply.status_code == 422:
        detail = reply.json()["detail"]
        assert isinstance(detail, list) and all(entry.get("loc") for entry in detail)


# --- JSON bodies -------------------------------------------------------------------------------


def test_submit_never_answers_5xx(target) -> None:
    sent = []

    @settings(max_examples=BODY_EXAMPLES, **FUZZ)
    @given(body=st.one_of(fields, json_values))
    def submit(body) -> None:
        check(client.post(f"/queue/{ENDPOINT}", content=dumps(body), headers={"content-type": "application/json"}))
        sent.append(1)

    with httpx.Client(base_url=target.base_url, headers=AUTH, trust_env=False, timeout=30) as client:
        submit()
    assert len(sent) == BODY_EXAMPLES
    assert_healthy(target)


def test_malformed_bodies_and_queries_are_4xx(target) -> None:
    sent = []

    @settings(max_examples=MALFORMED_EXAMPLES, **FUZZ)
    @given(raw=st.binary(max_size=200), webhook=st.one_of(st.none(), st.text(max_size=30)), logs=st.text(max_size=5))
    def malformed(raw, webhook, logs) -> None:
        params = {"fal_webhook": webhook} if webhook is not None else {}
        request_id = quote(logs or "x", safe="")  # any text, percent-encoded into the path
        check(client.post(f"/queue/{ENDPOINT}", content=raw, params=params, headers={"content-type": "application/json"}))
        check(client.get(f"/queue/{ENDPOINT}/requests/{request_id}/status", params={"logs": logs}))
        check(client.put(f"/queue/{ENDPOINT}/requests/{request_id}/cancel"))
        sent.append(3)

    with httpx.Client(base_url=target.base_url, headers=AUTH, trust_env=False, timeout=30) as client:
        malformed()
    assert sum(sent) == 3 * MALFORMED_EXAMPLES
    assert_healthy(target)


# --- raw requests with fuzzed headers ------------------------------------------------------------

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=60)
odd_header_bytes = st.sampled_from([b"a\rb", b"a\x00b", b"\x01", b"a\r\nX-Injected: 1", b"\t", b"x" * 9000])


def header_value(choices: list[str]) -> st.SearchStrategy[bytes | None]:
    """A header's value: absent (half the time), one of `choices`, or any text."""
    return st.sampled_from(["absent", "absent", "choice", "text"]).flatmap(
        lambda kind: st.none() if kind == "absent"
        else st.sampled_from(choices).map(str.encode) if kind == "choice"
        else header_text.map(lambda t: t.encode("latin-1"))
    )


@st.composite
def raw_requests(draw, target: Target) -> bytes:
    """One HTTP/1.1 request as bytes. Three in four are well-formed (the route's own method, this
    server's Host, the key, the exact Content-Length) with the other headers, the query and the body
    fuzzed, so that they reach the code behind the framing; the rest fuzz everything."""
    wellformed = draw(st.sampled_from([True, True, True, False]))
    job = draw(st.sampled_from([target.job_id, "0" * 36, quote(draw(header_text), safe="")]))
    queue = f"/queue/{ENDPOINT}"
    part = draw(st.sampled_from(["1", "0", "10001", "x"]))
    method, path = draw(st.sampled_from([
        ("POST", queue), ("GET", f"{queue}/requests/{job}/status"), ("GET", f"{queue}/requests/{job}/status/stream"),
        ("GET", f"{queue}/requests/{job}"), ("PUT", f"{queue}/requests/{job}/cancel"), ("POST", f"/{ENDPOINT}"),
        ("POST", f"/{ENDPOINT}/stream"), ("POST", "/storage/upload/initiate"), ("POST", "/storage/upload/initiate-multipart"),
        ("PUT", f"/storage/upload/put/{quote(draw(header_text), safe='')}"),
        ("PUT", f"/storage/upload/multipart/{target.multipart_token}/{part}"),
        ("POST", f"/storage/upload/multipart/{target.multipart_token}/complete"),
        ("GET", f"/files/{target.file_key}"), ("HEAD", f"/files/{target.file_key}"), ("GET", "/files/nope/x.png"),
        ("OPTIONS", f"/files/{target.file_key}"), ("GET", "/health"), ("GET", "/.well-known/jwks.json"),
        ("GET", "/playground/config"), ("GET", "/" + quote(draw(header_text), safe="/")),
    ]))
    if not wellformed:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH", "FOO"]))
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["logs=1", "logs=", "fal_webhook=http://[::1", "storage_type=x", "a=%ZZ", "logs=1&logs=0"]))
    body = draw(st.one_of(
        st.just(b""), st.just(b"{}"), st.binary(max_size=100),
        st.just(json.dumps({"keyframe_image_urls": [png_data_uri()] * 2, "steps": 1}).encode()),
        fields.map(lambda f: dumps(f).encode()),
        st.just(b'{"parts": [{"partNumber": 1, "etag": "x"}]}'),
    ))
    length = "exact" if wellformed else draw(st.sampled_from(["exact", "absent", "short", "padded", "huge", "digits", "negative", "text", "twice"]))
    declared = {
        "exact": str(len(body)), "absent": None, "short": str(max(0, len(body) - 1)), "padded": f" {len(body)} ",
        "huge": str(10**12), "digits": "9" * 30, "negative": "-1", "text": "abc", "twice": f"{len(body)}, {len(body)}",
    }[length]
    host, key = f"127.0.0.1:{target.port}".encode(), f"Key {KEY}".encode()
    if not wellformed:
        host = draw(header_value(["localhost", "evil.example", "", "[::1]", "[::1", "a" * 300, "127.0.0.1:99999", f"127.0.0.1:{target.port}"]))
        key = draw(header_value(["Key wrong", "Bearer " + KEY, "Key", "", "Basic Zm9vOmJhcg==", "key " + KEY, f"Key {KEY}:x", "Key " + "x" * 5000, f"Key {KEY}"]))
    headers: list[tuple[bytes, bytes | None]] = [
        (b"Host", host),
        (b"Authorization", key),
        (b"Content-Length", declared.encode() if declared is not None else None),
        (b"Content-Type", draw(header_value(["application/json", "text/plain", "multipart/form-data; boundary=x", "application/json; charset=utf-16", "application/x-www-form-urlencoded", "*/*", ";"]))),
        (b"Range", draw(header_value(["bytes=0-", "bytes=-0", "bytes=" + "9" * 4301 + "-", "bytes=0-" + "9" * 30, "bytes=5-2", "items=0-1", "bytes=0-1,2-3", "bytes=-", "bytes=18446744073709551616-"]))),
        (b"If-Range", draw(header_value(['"x"', "Wed, 21 Oct 2015 07:28:00 GMT"]))),
        (b"X-Fal-Queue-Priority", draw(header_value(["normal", "low", "LOW", "high", ""]))),
        (b"X-Fal-Request-Timeout", draw(header_value(["10", "0", "-5", "NaN", "inf", "-inf", "1e400", "1" + "0" * 5000, "abc"]))),
        (b"X-Fal-Object-Lifecycle-Preference", draw(header_value(['{"expiration_duration_seconds": 10}', "{", "null"]))),
        (b"X-Fal-File-Name", draw(header_value(["../../etc/passwd", "a.png", "\u00e9.png"]))),
        (b"Origin", draw(header_value(["http://app.example", "null"]))),
        (b"Access-Control-Request-Method", draw(header_value(["PUT", "POST"]))),
        (b"Accept", draw(header_value(["text/event-stream", "application/json", "*/*"]))),
    ]
    if not wellformed and draw(st.booleans()):
        headers.append((b"X-Odd", draw(odd_header_bytes)))
    head = f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers if value is not None)
    return head + b"Connection: close\r\n\r\n" + body


def send_raw(port: int, request: bytes) -> int | None:
    """The status code of the answer to `request`, or None when the server closed without one."""
    data = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(request)
            while chunk := s.recv(65536):  # `Connection: close`: the server ends the answer by closing
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed on a request it refused; what came before still counts
    if not data:
        return None
    return int(bytes(data).split(b"\r\n", 1)[0].split(b" ", 2)[1])


def test_fuzzed_headers_never_get_a_5xx(target) -> None:
    answers: list[int | None] = []

    @settings(max_examples=HEADER_EXAMPLES, **FUZZ)
    @given(request=raw_requests(target))
    def fuzz(request: bytes) -> None:
        status = send_raw(target.port, request)
        assert status is None or status < 500, (status, request[:600])
        answers.append(status)

    fuzz()
    assert len(answers) == HEADER_EXAMPLES
    # the fuzzing reached the routes, not only the HTTP parser: many answers are the app's own
    assert sum(1 for status in answers if status is not None and status < 300) > HEADER_EXAMPLES // 10
    assert_healthy(target)
