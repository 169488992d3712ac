"""`tooncrafter generate` / `convert` end to end, as a user runs them (subprocesses, real files)."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import av
import pytest

from tooncrafter.model.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tooncrafter.cli", *args], capture_output=True, text=True, timeout=timeout)


def _probe(path: Path) -> tuple[int, int, int, float, str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.width, stream.height, float(stream.average_rate), stream.codec_context.name


@pytest.fixture(scope="module")
def model_dir(fixture_set) -> Path:
    if not (fixture_set.directory / "config.yaml").is_file():
        pytest.skip("fixture set has no config.yaml")
    return fixture_set.directory


@pytest.fixture(scope="module")
def model_config(model_dir):
    return load_config(model_dir / "config.yaml")


@pytest.fixture(scope="module")
def needs_clip(fixture_set):
    from tooncrafter.model.checkpoint import has_component, read_state_dict

    state = read_state_dict(fixture_set.checkpoint_path)
    if not has_component(state, "text_encoder"):
        pytest.skip("checkpoint without CLIP towers: generate would download OpenCLIP weights")


def test_generate_two_keyframes(model_dir: Path, model_config, needs_clip, tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(out),
                "--checkpoint", str(model_dir), "--steps", "3", "--seed", "7", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seed: 7" in proc.stdout and str(out) in proc.stdout
    height, width = model_config.pixel_size
    assert _probe(out) == (model_config.num_frames, width, height, 8.0, "h264")


def test_three_keyframes_fps_data_uri_and_keep_all(model_dir: Path, model_config, needs_clip, tmp_path: Path) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode((EXAMPLES / "keyframe_2.png").read_bytes()).decode()
    out = tmp_path / "three.mp4"
    keys = [str(EXAMPLES / "keyframe_1.png"), data_uri, str(EXAMPLES / "keyframe_1.png")]
    proc = _run("generate", *keys, "-o", str(out), "--checkpoint", str(model_dir), "--steps", "2", "--fps", "12", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames, _, _, fps, _ = _probe(out)
    assert frames == model_config.num_frames and fps == 12.0
    assert "seed: " in proc.stdout  # a random seed is printed
    out_all = tmp_path / "all.mp4"
    proc = _run("generate", *keys, "-o", str(out_all), "--checkpoint", str(model_dir), "--steps", "2", "--keep-all-frames", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _probe(out_all)[0] == 2 * (model_config.num_frames - 1) + 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "steps"),
        (["--cfg-scale", "0.5"], "cfg-scale"),
        (["--eta", "2"], "eta"),
        (["--seed", "-1"], "seed"),
        (["--fps", "0"], "fps"),
        (["--motion-steps", "0"], "motion-steps"),
        (["--keyframe-lengths", "3,3,3"], "keyframe-lengths"),
    ],
)
def test_bad_options_exit_2_with_one_line(extra: list[str], message: str, tmp_path: Path) -> None:
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"), *extra)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


BAD_INPUTS = [
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--cfg-scale", "nan"], "--cfg-scale: must be a finite number"),
    (["--eta", "2"], "--eta: must be <= 1, got 2"),
    (["--keyframe-lengths", "3,3,3"], "--keyframe-lengths: has 3 entries but there are 2 keyframes"),
    (["--prompt", "x" * 2001], "--prompt: is longer than 2000 characters"),
    (["-o", "clip.avi"], "--output: unsupported video type '.avi'"),
    (["--checkpoint", "/nonexistent/model.ckpt"], "--checkpoint /nonexistent/model.ckpt: no such file"),
    (["--frame-multiplier", "3"], "--frame-multiplier: must be one of 1, 2 or 4"),
    (["--sketch-scale", "2.5"], "--sketch-scale: must be <= 2, got 2.5"),
    (["--sketch", f"5:{EXAMPLES / 'keyframe_1.png'}", "--sketch-from-image", f"5:{EXAMPLES / 'keyframe_2.png'}"],
     "--sketch: frame 5 has two sketches (entries 0 and 1)"),
    (["--sketch", "3:/nonexistent/s3.png"], "(3:/nonexistent/s3.png): image file not found"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS)
def test_bad_input_is_reported_in_our_words_before_torch_is_imported(extra: list[str], message: str, tmp_path: Path) -> None:
    """Every argument is checked (and every keyframe read) before torch loads: bad input answers at once."""
    argv = ["generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"), *extra]
    script = (
        "import sys, contextlib, io\n"
        "from tooncrafter.cli import main\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    code = main({argv!r})\n"
        "print(code, 'torch' in sys.modules, repr(err.getvalue()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    code, torch_loaded, stderr = proc.stdout.strip().split(" ", 2)
    assert (code, torch_loaded) == ("2", "False"), proc.stdout + proc.stderr
    assert message in stderr
    for leak in ("Value error", "validation error", "List should", "Input should", "keyframe_image_urls"):
        assert leak not in stderr


def test_one_keyframe_missing_file_and_bad_checkpoint_exit_2(tmp_path: Path) -> None:
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), "-o", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and "KEYFRAME: needs at least 2 keyframes, got 1" in proc.stderr
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(tmp_path / "missing.png"), "-o", str(tmp_path / "x.mp4"))
    assert proc.returncode == 2 and "KEYFRAME 2" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"),
                "--checkpoint", str(tmp_path / "nope.ckpt"))
    assert proc.returncode == 2 and "nope.ckpt" in proc.stderr and "Traceback" not in proc.stderr


def test_keyframe_lengths_must_sum_to_the_loaded_models_frames(model_dir: Path, model_config, needs_clip, tmp_path: Path) -> None:
    lengths = f"1,{model_config.num_frames}"  # right count, one frame too many for this model
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"),
                "--checkpoint", str(model_dir), "--keyframe-lengths", lengths, "--steps", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "keyframe-lengths" in proc.stderr and str(model_config.num_frames) in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.mp4").exists()


def test_generate_a_loop_with_a_multiplier_and_sketches(model_dir: Path, model_config, needs_clip, tmp_path: Path) -> None:
    import os

    from helpers.sketch import write_tiny_sketch_checkpoint

    sketch_checkpoint = write_tiny_sketch_checkpoint(tmp_path / "sketch_encoder.ckpt", model_config.unet)
    out = tmp_path / "loop.mp4"
    last = 2 * model_config.num_frames - 1  # the last frame of a 2x loop
    proc = subprocess.run(
        [sys.executable, "-m", "tooncrafter.cli", "generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"),
         "-o", str(out), "--checkpoint", str(model_dir), "--steps", "1", "--cfg-scale", "1", "--seed", "3", "--loop",
         "--frame-multiplier", "2", "--sketch", f"1:{EXAMPLES / 'keyframe_2.png'}",
         "--sketch-from-image", f"{last}:{EXAMPLES / 'keyframe_1.png'}", "--sketch-scale", "0.8"],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "TOONCRAFTER_SKETCH_CHECKPOINT": str(sketch_checkpoint)},  # the setting, not the flag
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _probe(out)[0] == 2 * model_config.num_frames  # a loop of T frames, doubled; frame 0 not repeated
    assert f"({2 * model_config.num_frames} frames" in proc.stdout


def test_sketch_frames_must_be_inside_the_clip_of_the_loaded_model(model_dir: Path, model_config, needs_clip, tmp_path: Path) -> None:
    past = model_config.num_frames  # one past the last frame of a plain clip
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"),
                "--checkpoint", str(model_dir), "--sketch", f"{past}:{EXAMPLES / 'keyframe_1.png'}")
    assert proc.returncode == 2 and "--sketch: entry 0: frame" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("generate", str(EXAMPLES / "keyframe_1.png"), str(EXAMPLES / "keyframe_2.png"), "-o", str(tmp_path / "x.mp4"),
                "--checkpoint", str(model_dir), "--sketch", f"{past}:{EXAMPLES / 'keyframe_1.png'}", "--frame-multiplier", "2",
                "--sketch-checkpoint", str(tmp_path / "nowhere.ckpt"), "--steps", "1")
    assert proc.returncode == 2 and "--sketch-checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_convert_writes_safetensors_that_load_the_same(fixture_set, tmp_path: Path) -> None:
    from tooncrafter.model.checkpoint import read_state_dict

    out = tmp_path / "model.safetensors"
    proc = _run("convert", str(fixture_set.checkpoint_path), str(out))
    assert proc.returncode == 0, proc.stderr
    a, b = read_state_dict(fixture_set.checkpoint_path), read_state_dict(out)
    assert a.keys() == b.keys()


def test_convert_dtype_bfloat16_halves_the_weights(fixture_set, tmp_path: Path) -> None:
    import torch

    from tooncrafter.model.checkpoint import read_state_dict

    out = tmp_path / "model.safetensors"
    proc = _run("convert", str(fixture_set.checkpoint_path), str(out), "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    state = read_state_dict(out)
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    assert state["alphas_cumprod"].dtype == torch.float32
