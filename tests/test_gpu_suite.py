"""The prepared GPU suite (benchmarks/gpu_suite.sh, benchmarks/nan_sweep.py) runs end to end, here on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.nan_sweep import main as nan_sweep_main
from benchmarks.nan_sweep import parse_steps

ROOT = Path(__file__).resolve().parent.parent


def test_step_lists_are_sorted_unique_and_positive():
    assert parse_steps("10, 1,10,2") == [1, 2, 10]
    for bad in ("", "0,5", "a,b", "-1"):
        with pytest.raises(Exception, match="--steps"):
            parse_steps(bad)


def test_the_nan_sweep_reports_every_step_count_and_fails_on_a_non_finite_video(tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    assert nan_sweep_main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "1,2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [1, 2] and all(r["finite"] and r["nan"] == 0 for r in rows)

    import benchmarks.composed as composed

    real = composed.interpolate_pixels

    def poisoned(*args, **kwargs):  # what an fp16 overflow would leave in the video
        video = real(*args, **kwargs)
        video[0, 0, 0, 0] = float("nan")
        return video

    monkeypatch.setattr(composed, "interpolate_pixels", poisoned)
    assert nan_sweep_main(["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "1", "--out", str(out)]) == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["finite"] is False and row["nan"] == 1


def test_the_eager_part_of_the_gpu_suite_writes_its_figures(tmp_path):
    env = {**os.environ, "SIZE": "tiny", "DEVICE": "cpu", "STEPS": "1", "DTYPES": "float32", "SWEEP": "1",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "eager", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    eager = json.loads((tmp_path / "eager.json").read_text())
    offload = json.loads((tmp_path / "offload.json").read_text())
    sweep = json.loads((tmp_path / "nan_sweep.json").read_text())
    assert eager["results"]["ours_float32"]["request_s"] > 0 and eager["results"]["ours_float32"]["step_flops"] > 0
    assert offload["results"]["ours_float32"]["request_s"] > 0
    assert [r["steps"] for r in sweep["rows"]] == [1] and sweep["rows"][0]["finite"]
    assert torch.__version__ in (tmp_path / "machine.txt").read_text()
