"""X-Fal-Queue-Priority: every `normal` request runs before any `low` one, through both official clients."""

from __future__ import annotations

import json
import subprocess

from helpers.service import (
    ENDPOINT,
    FakeGenerator,
    fake_factory,
    js_client_dir,
    make_settings,
    make_tls,
    png_data_uri,
    run_python_client,
    running_server,
    two_keyframes,
    wait_until,
)

from tooncrafter.service.app import create_app


def test_low_waits_for_every_normal_one_and_positions_agree(tmp_path) -> None:
    import threading

    gate = threading.Event()
    generator = FakeGenerator(gate=gate)
    app = create_app(make_settings(tmp_path), generator_factory=fake_factory(generator))
    with running_server(app) as server, server.client() as client:
        body = {"keyframe_image_urls": two_keyframes(), "steps": 1}
        first = client.post(f"/queue/{ENDPOINT}", json=body).json()  # taken by the worker, held at its gate
        generator.started.wait(10)
        low = client.post(f"/queue/{ENDPOINT}", json=body, headers={"X-Fal-Queue-Priority": "low"}).json()
        normal = client.post(f"/queue/{ENDPOINT}", json=body).json()
        assert (low["queue_position"], normal["queue_position"]) == (0, 0)  # positions at submit time
        assert client.get(low["status_url"].replace(server.base_url, "")).json()["queue_position"] == 1
        bad = client.post(f"/queue/{ENDPOINT}", json=body, headers={"X-Fal-Queue-Priority": "urgent"})
        assert bad.status_code == 422 and "x-fal-queue-priority" in bad.json()["message"]
        gate.set()
        ids = [run["request_id"] for run in (first, normal, low)]
        wait_until(lambda: all(server.store.get(i).status == "COMPLETED" for i in ids), timeout_s=30)
        first_job, normal_job, low_job = (server.store.get(i) for i in ids)
    assert first_job.started_at <= normal_job.started_at <= low_job.started_at  # low after the later normal one


def test_both_clients_send_the_priority(tmp_path) -> None:
    tls = make_tls(tmp_path)
    app = create_app(make_settings(tmp_path), with_worker=False)  # nothing runs: the rows show what was sent
    with running_server(app, tls=tls) as server:
        script = (
            "import fal_client\n"
            f"h = fal_client.submit({ENDPOINT!r}, arguments={{'keyframe_image_urls': {two_keyframes()!r}}}, priority='low')\n"
            "print(h.request_id)\n"
        )
        proc = run_python_client(script, server)
        assert proc.returncode == 0, proc.stderr[-2000:]
        python_id = proc.stdout.strip().splitlines()[-1]
        assert server.store.get(python_id).priority == 1
    with running_server(create_app(make_settings(tmp_path), with_worker=False)) as server:
        js_dir = js_client_dir()
        script = js_dir / "priority-check.mjs"
        script.write_text(
            'import { createFalClient } from "@fal-ai/client";\n'
            f'const server = "{server.base_url}";\n'
            "const fal = createFalClient({ credentials: 'k', requestMiddleware: async (req) => "
            "({ ...req, url: req.url.replace(/^https:\\/\\/queue\\.fal\\.run\\//, `${server}/queue/`) }) });\n"
            f"const r = await fal.queue.submit({ENDPOINT!r}, {{ input: {{ keyframe_image_urls: {json.dumps([png_data_uri(), png_data_uri((1, 2, 3))])} }}, priority: 'low' }});\n"
            "console.log(r.request_id);\n"
        )
        try:
            proc = subprocess.run(["node", script.name], cwd=js_dir, capture_output=True, text=True, timeout=60)
        finally:
            script.unlink()
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.store.get(proc.stdout.strip().splitlines()[-1]).priority == 1
