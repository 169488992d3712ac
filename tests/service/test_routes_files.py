"""The file routes through a real uvicorn on loopback: uploads (fal's flow), downloads with ranges.

The router alone, its dependencies (storage, token signer, settings) given through
`app.dependency_overrides`, as FastAPI documents for tests."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from helpers.service import JS_DIR, js_client_dir, make_settings

from tooncrafter.service.api.deps import get_settings, get_storage, get_upload_tokens
from tooncrafter.service.api.files import (
    RangeNotSatisfiable,
    files_router,
    parse_byte_range,
)
from tooncrafter.service.storage.local import LocalFileStorage
from tooncrafter.service.storage.upload_tokens import SignedUploads

MAX_UPLOAD = 64 * 1024


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def require_key(authorization: str | None = Header(None)) -> None:
    if authorization != "Key secret":
        raise HTTPException(401, "missing or wrong key")


def make_app(
    tmp_path: Path, *, auth: bool = False, public_url: str | None = None, max_upload_bytes: int = MAX_UPLOAD
) -> FastAPI:
    app = FastAPI()
    storage = LocalFileStorage(tmp_path / "files")
    tokens = SignedUploads(b"test secret")
    settings = make_settings(tmp_path, public_url=public_url, max_upload_bytes=max_upload_bytes)
    app.dependency_overrides.update({get_storage: lambda: storage, get_upload_tokens: lambda: tokens, get_settings: lambda: settings})
    app.include_router(files_router(auth_dependency=require_key if auth else None))
    return app


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_app(tmp_path)) as live:
        yield live


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=10) as c:
        yield c


def stored_file(server: LiveServer, data: bytes, content_type: str = "video/mp4", name: str = "clip.mp4") -> str:
    storage = server.server.config.app.dependency_overrides[get_storage]()
    return f"{server.url}/files/{storage.put(data, content_type=content_type, file_name=name).key}"


# -- byte ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=5-", (5, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=90-1000", (90, 99)),
        ("bytes=99-99", (99, 99)),
        ("items=0-5", None),
        ("bytes=5-2", None),
        ("bytes=0-1,5-6", None),
        ("bytes=abc", None),
        ("bytes=-", None),
    ],
)
def test_parse_byte_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_byte_range(header, 100) == expected


@pytest.mark.parametrize(
    "header, size", [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_parse_byte_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_byte_range(header, size)


def test_get_whole_file_and_ranges(server: LiveServer, client: httpx.Client) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    url = stored_file(server, data)

    full = client.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["content-type"] == "video/mp4"
    assert full.headers["content-length"] == str(len(data))
    assert full.headers["accept-ranges"] == "bytes"
    assert full.headers["access-control-allow-origin"] == "*"
    assert "content-range" not in full.headers

    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert part.headers["content-length"] == "100"

    tail = client.get(url, headers={"Range": "bytes=10000-"})
    assert tail.status_code == 206 and tail.content == data[10000:]
    assert tail.headers["content-range"] == f"bytes 10000-10239/{len(data)}"

    suffix = client.get(url, headers={"Range": "bytes=-16"})
    assert suffix.status_code == 206 and suffix.content == data[-16:]

    clamped = client.get(url, headers={"Range": "bytes=10200-99999"})
    assert clamped.status_code == 206 and clamped.content == data[10200:]

    bad = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert bad.status_code == 416
    assert bad.headers["content-range"] == f"bytes */{len(data)}"

    ignored = client.get(url, headers={"Range": "bytes=0-1,4-5"})
    assert ignored.status_code == 200 and ignored.content == data

    stale = client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == data
    fresh = client.get(url, headers={"Range": "bytes=0-1", "If-Range": full.headers["etag"]})
    assert fresh.status_code == 206 and fresh.content == data[:2]


def test_head_and_large_file_range(server: LiveServer, client: httpx.Client) -> None:
    data = b"0123456789" * 200_000  # 2 MB: several storage chunks
    url = stored_file(server, data)
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))
    head_range = client.head(url, headers={"Range": "bytes=5-14"})
    assert head_range.status_code == 206
    assert head_range.headers["content-range"] == f"bytes 5-14/{len(data)}"
    assert head_range.headers["content-length"] == "10"
    middle = client.get(url, headers={"Range": "bytes=300000-1700000"})
    assert middle.status_code == 206 and middle.content == data[300000:1700001]


def test_empty_file(server: LiveServer, client: httpx.Client) -> None:
    url = stored_file(server, b"", content_type="image/png", name="empty.png")
    response = client.get(url)
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "0"
    assert client.get(url, headers={"Range": "bytes=0-"}).status_code == 416


@pytest.mark.parametrize(
    "path",
    [
        "/files/nope",
        "/files/aaaaaaaaaaaaaaaaaaaaaaaa/missing.png",
        "/files/..%2F..%2Fetc%2Fpasswd",
        "/files/aaaaaaaaaaaaaaaaaaaaaaaa/..%2F..%2Fmeta.json",
    ],
)
def test_unknown_or_malicious_keys_are_404_json(server: LiveServer, client: httpx.Client, path: str) -> None:
    response = client.get(server.url + path)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"] == "file not found"


def test_active_content_is_sandboxed(server: LiveServer, client: httpx.Client) -> None:
    url = stored_file(server, b"<script>alert(1)</script>", content_type="text/html", name="x.html")
    response = client.get(url)
    assert response.headers["content-security-policy"].endswith("sandbox")
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"
    image = client.get(stored_file(server, b"\x89PNG\r\n\x1a\n", content_type="image/png", name="a.png"))
    assert "content-security-policy" not in image.headers
    assert image.headers["content-disposition"] == 'inline; filename="a.png"'


# -- uploads ------------------------------------------------------------------------------------


def test_upload_initiate_put_get_round_trip(server: LiveServer, client: httpx.Client) -> None:
    initiated = client.post(
        f"{server.url}/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "image/png", "file_name": "key frame 1.png"},
    )
    assert initiated.status_code == 200
    assert initiated.headers["content-type"] == "application/json"
    upload_url, file_url = initiated.json()["upload_url"], initiated.json()["file_url"]
    assert upload_url.startswith(server.url + "/storage/upload/")
    assert file_url.startswith(server.url + "/files/") and file_url.endswith("/key_frame_1.png")
    assert client.get(file_url).status_code == 404  # promised, not there yet

    payload = b"\x89PNG\r\n\x1a\n" + bytes(1000)
    put = client.put(upload_url, content=payload, headers={"Content-Type": "image/png"})
    assert put.status_code == 200
    assert put.json()["file_url"] == file_url and put.json()["file_size"] == len(payload)

    got = client.get(file_url)
    assert got.status_code == 200 and got.content == payload
    assert got.headers["content-type"] == "image/png"

    again = client.put(upload_url, content=b"overwrite", headers={"Content-Type": "image/png"})
    assert again.status_code == 404  # the token works once
    assert client.get(file_url).content == payload


def test_initiate_without_body(server: LiveServer, client: httpx.Client) -> None:
    body = client.post(f"{server.url}/storage/upload/initiate").json()
    assert body["file_url"].endswith("/upload.bin")
    assert client.put(body["upload_url"], content=b"x" * 1000).status_code == 200


def test_upload_content_type_from_put_when_initiate_has_none(server: LiveServer, client: httpx.Client) -> None:
    initiated = client.post(f"{server.url}/storage/upload/initiate", json={"content_type": None, "file_name": "a"})
    body = initiated.json()
    assert client.put(body["upload_url"], content=b"GIF89a", headers={"Content-Type": "image/gif"}).status_code == 200
    assert client.get(body["file_url"]).headers["content-type"] == "image/gif"


def test_upload_size_limit_and_bad_tokens(server: LiveServer, client: httpx.Client) -> None:
    body = client.post(f"{server.url}/storage/upload/initiate", json={"content_type": "image/png"}).json()
    too_big = client.put(body["upload_url"], content=bytes(MAX_UPLOAD + 1))
    assert too_big.status_code == 413
    assert client.get(body["file_url"]).status_code == 404

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for _ in range(20):
            yield bytes(8192)

    body = client.post(f"{server.url}/storage/upload/initiate", json={"content_type": "image/png"}).json()
    assert client.put(body["upload_url"], content=chunks()).status_code == 413

    assert client.put(f"{server.url}/storage/upload/put/made-up-token", content=b"x").status_code == 404


def test_initiate_uses_public_url_setting(tmp_path: Path, client: httpx.Client) -> None:
    with LiveServer(make_app(tmp_path, public_url="https://api.example.test/")) as live:
        body = client.post(f"{live.url}/storage/upload/initiate", json={"file_name": "x.png"}).json()
    assert body["upload_url"].startswith("https://api.example.test/storage/upload/put/")
    assert body["file_url"].startswith("https://api.example.test/files/")


def test_auth_dependency_guards_initiate_only(tmp_path: Path, client: httpx.Client) -> None:
    with LiveServer(make_app(tmp_path, auth=True)) as live:
        denied = client.post(f"{live.url}/storage/upload/initiate", json={"file_name": "x.png"})
        assert denied.status_code == 401
        denied = client.post(f"{live.url}/storage/upload/initiate-multipart", json={"file_name": "x.png"})
        assert denied.status_code == 401
        body = client.post(
            f"{live.url}/storage/upload/initiate",
            json={"content_type": "image/png", "file_name": "x.png"},
            headers={"Authorization": "Key secret"},
        ).json()
        assert client.put(body["upload_url"], content=b"data").status_code == 200  # no auth on the PUT
        assert client.get(body["file_url"]).content == b"data"


def test_multipart_upload(server: LiveServer, client: httpx.Client) -> None:
    initiated = client.post(
        f"{server.url}/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
        json={"content_type": "video/mp4", "file_name": "big.mp4"},
    ).json()
    upload_url, file_url = initiated["upload_url"], initiated["file_url"]
    chunks = [b"a" * 10_000, b"b" * 10_000, b"c" * 5]
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        response = client.put(f"{upload_url}/{number}", content=chunk)
        assert response.status_code == 200
        assert response.json()["partNumber"] == number
        assert response.headers["etag"] == f'"{response.json()["etag"]}"'
        parts.append(response.json())
    # A retried part replaces the earlier attempt.
    retry = client.put(f"{upload_url}/2", content=b"B" * 10_000).json()
    parts[1] = retry

    wrong = client.post(f"{upload_url}/complete", json={"parts": [{"partNumber": 1, "etag": "nope"}]})
    assert wrong.status_code == 400

    done = client.post(f"{upload_url}/complete", json={"parts": parts})
    assert done.status_code == 200 and done.json()["file_url"] == file_url
    got = client.get(file_url)
    assert got.content == b"a" * 10_000 + b"B" * 10_000 + b"c" * 5
    assert got.headers["content-type"] == "video/mp4"
    assert client.post(f"{upload_url}/complete", json={"parts": parts}).status_code == 404


def test_multipart_size_limits(server: LiveServer, client: httpx.Client) -> None:
    """A part over the limit is refused at once; parts that only add up to more are refused at `complete`."""
    upload_url = client.post(f"{server.url}/storage/upload/initiate-multipart", json={}).json()["upload_url"]
    assert client.put(f"{upload_url}/1", content=bytes(MAX_UPLOAD + 1)).status_code == 413
    parts = [client.put(f"{upload_url}/{n}", content=bytes(size)).json() for n, size in ((1, MAX_UPLOAD - 10), (2, 11))]
    assert client.post(f"{upload_url}/complete", json={"parts": parts}).status_code == 413
    parts[1] = client.put(f"{upload_url}/2", content=bytes(10)).json()
    assert client.post(f"{upload_url}/complete", json={"parts": parts}).status_code == 200


def test_single_and_multipart_tokens_do_not_mix(server: LiveServer, client: httpx.Client) -> None:
    single = client.post(f"{server.url}/storage/upload/initiate", json={}).json()["upload_url"]
    token = single.rsplit("/", 1)[1]
    assert client.put(f"{server.url}/storage/upload/multipart/{token}/1", content=b"x").status_code == 404
    multi = client.post(f"{server.url}/storage/upload/initiate-multipart", json={}).json()["upload_url"]
    token = multi.rsplit("/", 1)[1]
    assert client.put(f"{server.url}/storage/upload/put/{token}", content=b"x").status_code == 404


def test_upload_tokens_expire_and_need_the_secret() -> None:
    now = [0.0]
    tokens = SignedUploads(b"secret", ttl_s=10, clock=lambda: now[0])
    token = tokens.issue("k", "image/png")
    assert tokens.get(token, multipart=False).key == "k"
    assert tokens.get(token, multipart=True) is None
    assert SignedUploads(b"other", clock=lambda: now[0]).get(token, multipart=False) is None
    now[0] = 11.0
    assert tokens.get(token, multipart=False) is None


def test_preflight_without_cors_middleware(server: LiveServer, client: httpx.Client) -> None:
    response = client.options(
        f"{server.url}/storage/upload/put/whatever",
        headers={"Origin": "http://app.example", "Access-Control-Request-Method": "PUT"},
    )
    assert response.status_code == 204
    assert "PUT" in response.headers["access-control-allow-methods"]


# -- the real JS client -------------------------------------------------------------------------


def js_upload(server_url: str, path: Path, content_type: str) -> str:
    result = subprocess.run(
        ["node", str(JS_DIR / "upload.mjs"), server_url, str(path), content_type],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["file_url"]


@pytest.fixture(scope="module")
def needs_node() -> None:
    js_client_dir()


@pytest.mark.usefixtures("needs_node")
def test_js_client_storage_upload(server: LiveServer, tmp_path: Path) -> None:
    """`fal.storage.upload` from @fal-ai/client, its REST host rewritten to our server."""
    payload = tmp_path / "frame.png"
    payload.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 50)
    file_url = js_upload(server.url, payload, "image/png")
    assert file_url.startswith(server.url + "/files/") and file_url.endswith("/frame.png")
    with httpx.Client(trust_env=False) as client:
        got = client.get(file_url)
    assert got.status_code == 200 and got.content == payload.read_bytes()
    assert got.headers["content-type"] == "image/png"
