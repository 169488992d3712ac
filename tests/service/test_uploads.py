"""Uploads through the whole app on both storage backends (local files, S3 on moto's server):
multipart uploads from the real `@fal-ai/client` over its multipart threshold, concurrent PUTs of one
part (issue 13, finding 3), and the retention of uploads and abandoned parts (finding 8)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers.service import (
    ENDPOINT,
    JS_DIR,
    fake_factory,
    js_client_dir,
    make_settings,
    png_bytes,
    running_server,
    wait_until,
)

from tooncrafter.service.app import create_app
from tooncrafter.service.storage.base import UPLOAD_KEY_PREFIX
from tooncrafter.service.storage.local import LocalFileStorage

MIB = 1024 * 1024
JS_MULTIPART_THRESHOLD = 90 * MIB  # @fal-ai/client 1.x, src/storage.ts: `file.size > 90 * 1024 * 1024`


def upload_tokens_left(storage) -> list[str]:
    """The tokens of stored uploads and parts, listed from the backend itself."""
    if isinstance(storage, LocalFileStorage):
        return sorted(name for name in os.listdir(storage.root) if name.startswith(UPLOAD_KEY_PREFIX))
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{storage.prefix}/{UPLOAD_KEY_PREFIX}")
    return sorted(obj["Key"].split("/")[-2] for obj in listed.get("Contents", []))


def path_of(server, url: str) -> str:
    return url.replace(server.base_url, "")


def test_concurrent_puts_of_one_part_all_succeed(tmp_path, storage_backend) -> None:
    """20 PUTs of part 1 at once (two different contents) are all a 200, and complete joins the listed one."""
    app = create_app(make_settings(tmp_path, **storage_backend), generator_factory=fake_factory())
    with running_server(app) as server, server.client() as client:
        upload_url = client.post("/storage/upload/initiate-multipart", json={"file_name": "big.bin"}).json()["upload_url"]
        contents = [b"A" * 300_000, b"B" * 300_000]

        def put(index: int) -> httpx.Response:
            with server.client() as own:
                return own.put(f"{upload_url}/1", content=contents[index % 2])

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(put, range(20)))
        assert [a.status_code for a in answers] == [200] * 20
        etags = {a.json()["etag"] for a in answers}
        assert etags == {hashlib.md5(c).hexdigest() for c in contents}
        second = client.put(f"{upload_url}/2", content=b"tail").json()
        done = client.post(f"{upload_url}/complete", json={"parts": [answers[1].json(), second]})
        assert done.status_code == 200
        assert client.get(path_of(server, done.json()["file_url"])).content == contents[1] + b"tail"
        assert client.post(f"{upload_url}/complete", json={"parts": [answers[0].json(), second]}).status_code == 404


@pytest.fixture(scope="module")
def node() -> str:
    js_client_dir()
    return "node"


def test_js_client_multipart_upload_comes_back_identical(node, tmp_path, storage_backend) -> None:
    """`fal.storage.upload` of threshold + a bit: initiate-multipart, ten 10 MiB parts and a small one, complete."""
    size = JS_MULTIPART_THRESHOLD + 123_457
    app = create_app(make_settings(tmp_path, **storage_backend), generator_factory=fake_factory())
    with running_server(app) as server:
        proc = subprocess.run(
            [node, "multipart.mjs", server.base_url, str(size)], cwd=JS_DIR, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        sent = json.loads(proc.stdout.strip().splitlines()[-1])
        assert sent["file_url"].startswith(f"{server.base_url}/files/{UPLOAD_KEY_PREFIX}")
        digest, received = hashlib.sha256(), 0
        with server.client(timeout=120) as client, client.stream("GET", path_of(server, sent["file_url"])) as download:
            assert download.status_code == 200 and download.headers["content-length"] == str(size)
            for chunk in download.iter_bytes():
                digest.update(chunk)
                received += len(chunk)
        assert (received, digest.hexdigest()) == (size, sent["sha256"])
        assert [t for t in upload_tokens_left(server.runtime.storage) if "parts" in t] == []  # parts deleted at complete
        server.runtime.storage.delete(sent["file_url"].split("/files/", 1)[1])  # moto keeps objects in memory


def test_uploads_and_abandoned_parts_expire_in_the_purge_loop(tmp_path, storage_backend) -> None:
    # Retention is short but not so short that a loaded machine passes it between an upload and the count of
    # uploads below; the job runs first on an inline keyframe so that nothing it needs can expire under it.
    settings = make_settings(tmp_path, upload_retention_s=5.0, purge_interval_s=0.1, **storage_backend)
    with running_server(create_app(settings, generator_factory=fake_factory())) as server, server.client() as client:
        storage = server.runtime.storage
        # a job's output is not an upload: it stays with the job when the uploads expire
        keyframe = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
        job = client.post(f"/queue/{ENDPOINT}", json={"keyframe_image_urls": [keyframe] * 2, "steps": 1}).json()
        wait_until(lambda: client.get(path_of(server, job["status_url"])).status_code == 200)
        result = client.get(path_of(server, job["response_url"])).json()
        assert "video" in result, result
        video_url = result["video"]["url"]

        single = client.post("/storage/upload/initiate", json={"file_name": "key.png", "content_type": "image/png"}).json()
        assert client.put(single["upload_url"], content=png_bytes()).status_code == 200
        abandoned = client.post("/storage/upload/initiate-multipart", json={"file_name": "big.bin"}).json()["upload_url"]
        for number in (1, 2):
            assert client.put(f"{abandoned}/{number}", content=bytes([number]) * 1000).status_code == 200
        assert len(upload_tokens_left(storage)) == 3
        assert storage.purge(UPLOAD_KEY_PREFIX, time.time() - 3600) == 0  # nothing is an hour old

        wait_until(lambda: upload_tokens_left(storage) == [], timeout_s=30)  # the workers' retention loop
        assert client.get(path_of(server, single["file_url"])).status_code == 404
        assert client.get(path_of(server, video_url)).status_code == 200
