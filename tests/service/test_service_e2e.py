"""End to end: the real pipeline on the tiny fixture checkpoint, behind uvicorn, driven by fal_client."""

from __future__ import annotations

import json
import textwrap

import pytest

pytest.importorskip("fal_client")
pytest.importorskip("trustme")

from helpers.service import (  # noqa: E402
    TINY_CHECKPOINT,
    make_settings,
    make_tls,
    run_python_client,
    running_server,
    tiny_pipeline_factory,
)

from tooncrafter.service.app import create_app  # noqa: E402

# One line to change the generator for every test in this file.
GENERATOR_FACTORY = tiny_pipeline_factory


@pytest.mark.slow
@pytest.mark.skipif(not (TINY_CHECKPOINT / "model.ckpt").exists(), reason="tiny fixture checkpoint not available")
def test_python_client_real_tiny_pipeline(tmp_path):
    app = create_app(make_settings(tmp_path), generator_factory=GENERATOR_FACTORY)
    with running_server(app, tls=make_tls(tmp_path)) as server:
        script = textwrap.dedent(
            """
            import json, fal_client, httpx
            from PIL import Image
            frames = [fal_client.encode_image(Image.new("RGB", (96, 48), c), format="png") for c in ((220, 40, 40), (40, 40, 220))]
            logs = []
            def on_update(update):
                if getattr(update, "logs", None):
                    logs[:] = [l["message"] for l in update.logs]
            result = fal_client.subscribe("fal-ai/toon-crafter", arguments={"keyframe_image_urls": frames, "steps": 2, "seed": 42},
                                          with_logs=True, on_queue_update=on_update)
            video = httpx.get(result["video"]["url"]).content
            print("RESULT " + json.dumps({"result": result, "logs": logs, "ftyp": video[4:8].decode("latin-1")}))
            """
        )
        proc = run_python_client(script, server, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert out["result"]["seed"] == 42 and out["ftyp"] == "ftyp"
    assert "step 2/2" in out["logs"]
