"""Precision and execution modes of the fast path: bf16 drift against the fp32 fixtures, `--offload` and
`torch.compile` as code paths on the CPU.

The bf16 bounds are about 2x the drift measured on tiny_a (benchmarks/README.md, "bf16 drift"): bf16 keeps
~3 significant digits and the guidance (x7.5) amplifies the difference of the two UNet branches, so the
fixture video drifts by a few percent of its range, against 5e-5 in fp32. GroupNorm, LayerNorm, softmax
and the timestep sinusoids stay in fp32 inside the bf16 model; a regression there shows up as a larger drift.
"""

from __future__ import annotations

import pytest
import torch

from tooncrafter.model.checkpoint import read_state_dict
from tooncrafter.model.onednn import native_bfloat16, prepack_available
from tooncrafter.model.loader import load_components
from tooncrafter.parity import replay_fixture_run
from tooncrafter.pipeline import ToonCrafterPipeline

# measured on tiny_a (5 DDIM steps, cfg 7.5): unet_out max 0.127 (3.7% of max|ref| 3.47), video max 0.59 / 0.79 and
# mean 0.063 / 0.100 for eta 0 / 1 (ref max ~5)
BF16_UNET_MAX_REL = 0.08  # of max|ref|
BF16_VIDEO_MAX = 1.6
BF16_VIDEO_MEAN = 0.2


def _pipeline(fixture_set, dtype: torch.dtype) -> ToonCrafterPipeline:
    components = load_components(fixture_set.config, read_state_dict(fixture_set.checkpoint_path), dtype=dtype)
    return ToonCrafterPipeline(components, dtype=dtype)


def _fixture_video(pipeline: ToonCrafterPipeline, f, run: str = "eta1") -> tuple[torch.Tensor, torch.Tensor]:
    """Our video for the fixture's pipeline run (the pipeline's steps on the fixture's noise) and the reference one."""
    video = replay_fixture_run(pipeline.components, pipeline.placement, f, run).video
    return video[0], f[f"pipe_{run}_video_out"]


@pytest.fixture(scope="module")
def bf16_pipeline(fixture_set) -> ToonCrafterPipeline:
    return _pipeline(fixture_set, torch.bfloat16)


def test_bf16_unet_drift_is_bounded(bf16_pipeline: ToonCrafterPipeline, fixture_set) -> None:
    f = fixture_set
    x = torch.cat([f["unet_x_noisy"], f["unet_c_concat"]], dim=1).to(torch.bfloat16)
    with torch.no_grad():
        out = bf16_pipeline.components.unet(x, f["unet_timesteps"], f["unet_context"].to(torch.bfloat16), f["unet_fs"])
    assert out.dtype == torch.bfloat16
    drift = (out.float() - f["unet_out"]).abs().max().item()
    assert drift <= BF16_UNET_MAX_REL * f["unet_out"].abs().max().item(), drift
    assert drift > 0  # really computed in bf16


def test_bf16_pipeline_drift_against_the_fp32_fixture_is_bounded(bf16_pipeline: ToonCrafterPipeline, fixture_set) -> None:
    video, ref = _fixture_video(bf16_pipeline, fixture_set)
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
    diff = (video - ref).abs()
    assert diff.max().item() <= BF16_VIDEO_MAX, diff.max().item()
    assert diff.mean().item() <= BF16_VIDEO_MEAN, diff.mean().item()


def test_offload_runs_on_cpu_and_changes_nothing(fixture_set) -> None:
    """`offload` moves CLIP and the VAE to the compute device only while used; on the CPU it is a no-op move,
    so this checks the code path (context managers, module moves) and that the result is identical."""
    plain = ToonCrafterPipeline.from_pretrained(fixture_set.directory, device="cpu", dtype="float32", progress=False)
    offloaded = ToonCrafterPipeline.from_pretrained(
        fixture_set.directory, device="cpu", dtype="float32", offload=True, progress=False
    )
    assert offloaded.placement.offload
    a, _ = _fixture_video(plain, fixture_set)
    b, ref = _fixture_video(offloaded, fixture_set)
    assert torch.equal(a, b)
    assert (b - ref).abs().max().item() <= 1e-3


def test_low_precision_on_a_cpu_without_its_kernels_says_so(fixture_set, caplog) -> None:
    """bf16 on a CPU without bf16 kernels (AVX2 only) or without bf16 arithmetic (AVX-512 without AVX512-BF16 or
    AMX) runs, slowly: the load says float32 is faster, and says nothing where bf16 is native."""
    with caplog.at_level("WARNING", logger="tooncrafter.pipeline"):
        ToonCrafterPipeline.from_pretrained(fixture_set.directory, device="cpu", dtype="bfloat16", progress=False)
    warned = [r.getMessage() for r in caplog.records if "float32 (the CPU default) is the fast choice" in r.getMessage()]
    assert bool(warned) == (not native_bfloat16())
    if not prepack_available(torch.bfloat16):
        assert "no oneDNN" in warned[0]
    elif warned:
        assert "AVX512-BF16 or AMX" in warned[0]
