"""One benchmark run in its own process (so peak memory and load time are its own): `ours` or `baseline`.

`python -m benchmarks.worker SPEC.json OUT.json`; the parent (`benchmarks.run`) writes the spec.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.measure import StageClock, cpu_seconds, reset_peak_rss, rss_mb


def keyframes(height: int, width: int) -> list[Image.Image]:
    """Two deterministic, smooth keyframes (a moving disc over a gradient) at the model size."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for shift in (0.3, 0.7):
        base = np.stack([xx / width, yy / height, 0.5 * np.ones_like(xx)], -1)
        disc = ((xx - shift * width) ** 2 + (yy - 0.5 * height) ** 2) < (0.2 * min(height, width)) ** 2
        base[disc] = (0.9, 0.2, 0.1)
        images.append(Image.fromarray((base * 255).astype(np.uint8)))
    return images


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_flops(unet: torch.nn.Module, config, text_length: int, device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of ONE batch-1 UNet call (context: `text_length` text tokens + the image tokens), counted with
    attention as plain matmuls (so SDPA and the math form count the same work; FlopCounterMode does not see
    inside every fused SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tooncrafter.model.attention import math_attention, set_attention_function

    saved = {m: m.attention_fn for m in unet.modules() if hasattr(m, "attention_fn")}
    set_attention_function(unet, math_attention)
    h, w = config.latent_size
    x = torch.zeros(1, config.unet.in_channels, config.num_frames, h, w, device=device, dtype=dtype)
    length = text_length + config.resampler.num_queries * config.num_frames
    context = torch.zeros(1, length, config.unet.context_dim, device=device, dtype=dtype)
    t = torch.full((1,), 999, device=device, dtype=torch.long)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, context, t * 0 + 10)
    finally:
        for module, fn in saved.items():
            module.attention_fn = fn
    return int(counter.get_total_flops())


def _inputs(spec: dict, config) -> tuple[torch.Tensor, dict]:
    """Preprocessed keyframes `[2, 3, H, W]` and the noise options of the request.

    With `spec["inputs"]` (a side-by-side run) the keyframes, the posterior noise of all T frames and x_T come
    from that file, as the official worker reads them; otherwise synthetic keyframes and a seeded generator.
    """
    if spec.get("inputs"):
        given = torch.load(spec["inputs"], weights_only=True)
        frames = given["x_T"].shape[2]
        # the official code encodes all T frames; ours the two distinct keyframes: their noise is frames 0 and T-1
        # (the generator only feeds the per-step draws, which eta 0 multiplies by 0)
        noise = {"posterior_noise": given["posterior_noise"][[0, frames - 1]], "x_T": given["x_T"],
                 "generator": torch.Generator("cpu").manual_seed(spec["seed"])}
        return given["pixels"], noise
    from tooncrafter.media.tensors import preprocess_keyframe

    pixels = torch.stack([preprocess_keyframe(im, *config.pixel_size) for im in keyframes(*config.pixel_size)])
    return pixels, {"generator": torch.Generator("cpu").manual_seed(spec["seed"])}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    import benchmarks.composed as composed
    from tooncrafter.model.config import load_config
    from tooncrafter.pipeline import ToonCrafterPipeline
    from tooncrafter.placement import resolve_dtype

    dtype = resolve_dtype(spec["dtype"], device)
    ckpt_dir = Path(spec["checkpoint_dir"])
    weights = Path(spec.get("weights") or ckpt_dir)
    rss_before = rss_mb()

    # 1. load
    _sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if spec["mode"] == "ours":
        pipe = ToonCrafterPipeline.from_pretrained(
            weights, device=device, dtype=dtype, offload=spec["offload"], compile=spec["compile"], progress=False
        )
        config, parts = pipe.config, pipe.components
        unet, vae, resampler = parts.unet, parts.vae, parts.resampler
        text_encoder, image_encoder = parts.text_encoder, parts.image_encoder
    else:
        from benchmarks.baseline import OfficialStyleBaseline

        config = load_config(ckpt_dir / "config.yaml")
        pipe = OfficialStyleBaseline(config, str(ckpt_dir / "model.ckpt"), device)
        unet, vae, resampler = pipe.unet, pipe.vae, pipe.resampler
        text_encoder, image_encoder = pipe.text_encoder, pipe.image_encoder
    _sync(device)
    load_s, load_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    rss_load = rss_mb()

    # 2. one whole request (preprocessed keyframes -> float video), timing every stage and step
    pixels, noise = _inputs(spec, config)
    clock = StageClock(sync=lambda: _sync(device))
    for module, label in ((text_encoder, "text_encoder"), (image_encoder, "image_encoder"), (resampler, "resampler")):
        clock.wrap(module, "forward", label)
    clock.wrap(vae, "encode", "vae_encode")
    clock.wrap(vae, "decode", "vae_decode")
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def on_step(i: int, n: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        cpu_stamps.append(cpu_seconds())

    if spec["mode"] == "ours":
        import tooncrafter.pipeline as sampler_owner
    else:
        import benchmarks.baseline as sampler_owner
    sample_ddim = sampler_owner.sample_ddim

    def timed_sample_ddim(*args, **kwargs):  # the sampling loop starts: step 1's clock starts here
        on_step(0, 0)
        return sample_ddim(*args, **kwargs)

    sampler_owner.sample_ddim = timed_sample_ddim
    options = dict(
        prompt=spec["prompt"], steps=spec["steps"], cfg_scale=spec["cfg_scale"], eta=spec["eta"],
        motion_steps=spec["motion_steps"], on_step=on_step, **noise,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    peak_reset = reset_peak_rss()
    _sync(device)
    t1, c1 = time.perf_counter(), cpu_seconds()
    if spec["mode"] == "ours":
        video = composed.interpolate_pixels(pipe, pixels, **options)
    else:
        video = pipe(pixels, **options)
    _sync(device)
    request_s, request_cpu_s = time.perf_counter() - t1, cpu_seconds() - c1
    sampler_owner.sample_ddim = sample_ddim
    clock.restore()
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    step_cpu_times = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]

    # 3. memory, before the FLOP count (which runs the math attention)
    rss_end = rss_mb()
    peak_rss_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_end["peak_rss_mb"])
    peak_vram_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    # 4. FLOPs of one batch-1 UNet call (a step is two of them, batched or not)
    flops = unet_flops(unet, config, text_encoder.context_length, device, dtype) if spec["flops"] else None

    torch.save(video.float().cpu(), spec["video_out"])
    # the median leaves out step 1, which for ours also maps the UNet's weights in and packs its convolutions
    step_s = statistics.median(step_times[1:] or step_times) if step_times else None
    step_cpu_s = statistics.median(step_cpu_times[1:] or step_cpu_times) if step_cpu_times else None
    result = {
        "impl": spec["mode"], "mode": spec["mode"], "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "weights": weights.name, "load_s": load_s, "request_s": request_s, "step_s": step_s,
        "step_each_s": step_times, "step_times_s": step_times,
        "load_cpu_s": load_cpu_s, "request_cpu_s": request_cpu_s, "step_cpu_s": step_cpu_s,
        "step_each_cpu_s": step_cpu_times, "step_cpu_times_s": step_cpu_times, **clock.summary(),
        "rss_before_load_mb": rss_before["rss_mb"], "rss_after_load_mb": rss_load["rss_mb"],
        "peak_rss_load_mb": rss_load["peak_rss_mb"],
        "peak_rss_request_mb": rss_end["peak_rss_mb"] if peak_reset else None,
        "peak_rss_mb": peak_rss_mb, "peak_vram_mb": peak_vram_mb,
        "unet_call_flops": flops,
        "step_flops": 2 * flops if flops else None,  # cond + uncond
        "achieved_tflops": (2 * flops / step_s / 1e12) if (flops and step_s) else None,
        "video_shape": list(video.shape), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    # as the `tooncrafter` command starts (the official worker gets no such help)
    from tooncrafter.glibc_tunables import restart_with_allocator_tunables

    restart_with_allocator_tunables()
    main(sys.argv[1], sys.argv[2])
