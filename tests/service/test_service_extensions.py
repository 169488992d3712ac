"""The extension inputs through the service: loop, frame_multiplier, sketch_image_urls, sketch_scale.

Validation and routing run in-process with the fake generator (TestClient, lifespan included); the end-to-end
test runs the worker's own generator factory on the tiny checkpoints behind uvicorn, with sketches fetched
like keyframes (a data URI and a file of this server's storage).
"""

from __future__ import annotations

import io
import json

import av
import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.service import (
    TINY_CHECKPOINT,
    FakeGenerator,
    fake_factory,
    make_settings,
    png_bytes,
    png_data_uri,
    running_server,
    runtime_of,
    two_keyframes,
    wait_until,
)
from helpers.sketch import write_tiny_sketch_checkpoint

from tooncrafter.generation import SketchGuidanceUnavailable
from tooncrafter.schema import contract_defaults
from tooncrafter.service.app import create_app
from tooncrafter.service.worker import default_generator_factory

Q = "/queue/fal-ai/toon-crafter"


def _client(tmp_path, gen: FakeGenerator | None = None, **overrides) -> TestClient:
    return TestClient(create_app(make_settings(tmp_path, **overrides), generator_factory=fake_factory(gen)))


def _completed(client: TestClient, request_id: str) -> dict:
    def done():
        status = client.get(f"{Q}/requests/{request_id}/status").json()
        return status if status["status"] == "COMPLETED" else None

    return wait_until(done)


def _sketch(frame, url=None, **extra) -> dict:
    return {"frame": frame, "url": url or png_data_uri((250, 250, 250)), **extra}


@pytest.mark.parametrize(
    "field,value,loc,words",
    [
        ("frame_multiplier", 3, ["body", "frame_multiplier"], "one of 1, 2 or 4"),
        ("frame_multiplier", "two", ["body", "frame_multiplier"], "one of 1, 2 or 4"),
        ("loop", "sometimes", ["body", "loop"], "true or false"),
        ("sketch_scale", 2.5, ["body", "sketch_scale"], "<= 2"),
        ("sketch_scale", -0.1, ["body", "sketch_scale"], ">= 0"),
        ("sketch_image_urls", [_sketch(3), _sketch(3)], ["body", "sketch_image_urls"], "frame 3 has two sketches"),
        ("sketch_image_urls", [_sketch(-1)], ["body", "sketch_image_urls", 0, "frame"], ">= 0"),
        ("sketch_image_urls", [{"frame": 1}], ["body", "sketch_image_urls", 0, "url"], "required"),
        ("sketch_image_urls", [_sketch(1, image="x")], ["body", "sketch_image_urls", 0, "image"], "not a known field"),
        ("sketch_image_urls", ["http://a/b.png"], ["body", "sketch_image_urls", 0], "JSON object"),
        # past the served model's clip (16 frames: the 512 model), checked at submit
        ("sketch_image_urls", [_sketch(16)], ["body", "sketch_image_urls"], "past the clip, which has 16 frames"),
        ("sketch_image_urls", [_sketch(2), _sketch(5, "file:///etc/passwd")], ["body", "sketch_image_urls", 1], "http(s) URL"),
        ("sketch_image_urls", [_sketch(2, "data:image/png;base64,@@@")], ["body", "sketch_image_urls", 0], "sketch 0"),
    ],
)
def test_422_names_the_extension_field(tmp_path, field, value, loc, words):
    with _client(tmp_path) as client:
        response = client.post(Q, json={"keyframe_image_urls": two_keyframes(), field: value})
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert detail[0]["loc"][: len(loc)] == loc, detail
        assert words in detail[0]["msg"], detail
        assert runtime_of(client).store.claim("nobody", 1) is None  # nothing was queued


def test_sketch_frames_count_the_final_clip(tmp_path):
    """A loop at multiplier 4 of the 512 model has 64 frames: frame 63 is fine there, not in a plain clip."""
    with _client(tmp_path) as client:
        body = {"keyframe_image_urls": two_keyframes(), "sketch_image_urls": [_sketch(63)]}
        assert client.post(Q, json=body).status_code == 422
        assert client.post(Q, json={**body, "loop": True, "frame_multiplier": 4}).status_code == 200


def test_the_worker_hands_the_generator_decoded_sketches_in_order(tmp_path):
    gen = FakeGenerator()
    with _client(tmp_path, gen) as client:
        sketches = [_sketch(5, png_data_uri((10, 10, 10))), _sketch(1, extract_lines=True)]
        body = {"keyframe_image_urls": two_keyframes(), "steps": 1, "loop": True, "frame_multiplier": 2,
                "sketch_image_urls": sketches, "sketch_scale": 1.25}
        rid = client.post(Q, json=body).json()["request_id"]
        assert "error" not in _completed(client, rid)
    (request,) = gen.requests
    assert (request.loop, request.frame_multiplier, request.sketch_scale) == (True, 2, 1.25)
    assert [(s.frame, s.extract_lines) for s in request.sketches] == [(5, False), (1, True)]
    assert request.sketches[0].image.getpixel((0, 0)) == (10, 10, 10)


def test_defaults_reach_the_generator_unchanged(tmp_path):
    gen = FakeGenerator()
    with _client(tmp_path, gen) as client:
        rid = client.post(Q, json={"keyframe_image_urls": two_keyframes(), "steps": 1}).json()["request_id"]
        _completed(client, rid)
    (request,) = gen.requests
    defaults = contract_defaults()
    assert request.sketches == () and not request.uses_sketches
    assert (request.loop, request.frame_multiplier, request.sketch_scale) == (
        defaults["loop"], defaults["frame_multiplier"], defaults["sketch_scale"]
    )


def test_a_bad_sketch_is_a_replayed_422_naming_its_entry(tmp_path):
    with _client(tmp_path) as client:
        body = {"keyframe_image_urls": two_keyframes(), "sketch_image_urls": [_sketch(1), _sketch(2, "data:image/png;base64,aGVsbG8=")]}
        rid = client.post(Q, json=body).json()["request_id"]
        assert _completed(client, rid)["error"]
        result = client.get(f"{Q}/requests/{rid}")
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "sketch_image_urls", 1]
    assert "sketch 1" in result.json()["detail"][0]["msg"]


def test_a_worker_without_sketch_weights_answers_422_naming_the_field(tmp_path):
    class NoSketches(FakeGenerator):
        def __call__(self, request, **kwargs):
            if request.uses_sketches:
                raise SketchGuidanceUnavailable("--sketch-checkpoint /srv/secret/path: no such file")
            return super().__call__(request, **kwargs)

    with _client(tmp_path, NoSketches()) as client:
        body = {"keyframe_image_urls": two_keyframes(), "sketch_image_urls": [_sketch(1)]}
        rid = client.post(Q, json=body).json()["request_id"]
        _completed(client, rid)
        result = client.get(f"{Q}/requests/{rid}")
        plain = client.post(Q, json={"keyframe_image_urls": two_keyframes()}).json()["request_id"]
        assert "error" not in _completed(client, plain)  # the worker goes on
    assert result.status_code == 422
    detail = result.json()["detail"][0]
    assert detail["loc"] == ["body", "sketch_image_urls"] and "TOONCRAFTER_SKETCH_CHECKPOINT" in detail["msg"]
    assert "/srv/secret" not in result.text  # the server's paths stay in its log


def test_openapi_documents_the_extension_inputs(tmp_path):
    with _client(tmp_path) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    fields = schemas["ToonCrafterInput"]["properties"]
    for name in ("loop", "frame_multiplier", "sketch_image_urls", "sketch_scale"):
        assert fields[name]["description"].startswith("Extension"), name
    assert fields["frame_multiplier"]["enum"] == [1, 2, 4] and fields["sketch_scale"]["maximum"] == 2
    item = schemas["SketchImage"]["properties"]
    assert {"frame", "url", "extract_lines"} <= item.keys() and "Canny" in item["extract_lines"]["description"]


def _frames(video: bytes) -> int:
    with av.open(io.BytesIO(video)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


@pytest.mark.skipif(not (TINY_CHECKPOINT / "model.ckpt").exists(), reason="tiny fixture checkpoint not available")
def test_sketches_loop_and_multiplier_end_to_end(tmp_path):
    """The worker's own factory (TOONCRAFTER_SKETCH_CHECKPOINT read from the settings) on the tiny checkpoints;
    one sketch is a data URI, the other a file uploaded to this server's storage, both fetched like keyframes."""
    from tooncrafter.model.config import load_config

    config = load_config(TINY_CHECKPOINT / "config.yaml")
    sketch_checkpoint = write_tiny_sketch_checkpoint(tmp_path / "weights" / "sketch_encoder.ckpt", config.unet)
    settings = make_settings(
        tmp_path, checkpoint=str(TINY_CHECKPOINT), device="cpu", dtype="float32", sketch_checkpoint=str(sketch_checkpoint)
    )
    with running_server(create_app(settings, generator_factory=default_generator_factory)) as server, httpx.Client(
        base_url=server.base_url, timeout=60
    ) as http:
        upload = http.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "lines.png"}).json()
        assert http.put(upload["upload_url"], content=png_bytes((255, 255, 255), size=(64, 32)), headers={"Content-Type": "image/png"}).is_success
        last = 2 * config.num_frames - 1
        body = {
            "keyframe_image_urls": two_keyframes(), "steps": 1, "seed": 9, "loop": True, "frame_multiplier": 2,
            "sketch_image_urls": [{"frame": 1, "url": upload["file_url"]}, {"frame": last, "url": png_data_uri((0, 0, 0)), "extract_lines": True}],
        }
        queued = http.post(Q, json=body).json()

        def done():
            status = http.get(queued["status_url"], params={"logs": 1}).json()
            return status if status["status"] == "COMPLETED" else None

        status = wait_until(done, timeout_s=600, interval_s=0.2)
        result = http.get(queued["response_url"])
        assert result.status_code == 200, result.text
        video = http.get(result.json()["video"]["url"]).content
    assert _frames(video) == 2 * config.num_frames  # a T-frame loop, doubled; frame 0 not repeated at the end
    logs = [entry["message"] for entry in status["logs"]]
    steps = [line for line in logs if line.startswith("step ")]
    assert steps[-1].split()[1].split("/")[0] == steps[-1].split("/")[1]  # progress ends at its total
    assert int(steps[-1].split("/")[1]) > 1  # the in-between pass is counted too (steps=1 per pass)
    assert json.loads(json.dumps(result.json()))["seed"] == 9


def test_sketches_per_request_are_bounded(tmp_path):
    from tooncrafter.schema import MAX_SKETCHES

    with _client(tmp_path) as client:
        body = {"keyframe_image_urls": two_keyframes(), "loop": True, "frame_multiplier": 4,
                "sketch_image_urls": [_sketch(i, "http://a/s.png") for i in range(MAX_SKETCHES + 1)]}
        response = client.post(Q, json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "sketch_image_urls"]
    assert f"at most {MAX_SKETCHES} sketches" in response.json()["detail"][0]["msg"]
