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


def cpu_seconds() -> float:
    """CPU time of this process (user + system, all threads): robust to other load on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    from tooncrafter.model.config import load_config
    from tooncrafter.pipeline import ToonCrafterPipeline
    from tooncrafter.placement import resolve_dtype

    dtype = resolve_dtype(spec["dtype"], device)
    ckpt_dir = Path(spec["checkpoint_dir"])

    # 1. load
    _sync(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if spec["mode"] == "ours":
        pipe = ToonCrafterPipeline.from_pretrained(
            ckpt_dir, device=device, dtype=dtype, offload=spec["offload"], compile=spec["compile"], progress=False
        )
        config, unet, text_encoder = pipe.config, pipe.components.unet, pipe.components.text_encoder
    else:
        from benchmarks.baseline import OfficialStyleBaseline

        config = load_config(ckpt_dir / "config.yaml")
        pipe = OfficialStyleBaseline(config, str(ckpt_dir / "model.ckpt"), device)
        unet, text_encoder = pipe.unet, pipe.text_encoder
    _sync(device)
    load_s, load_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0

    # 2. one whole request (keyframe images -> uint8 frames), timing every step
    images = keyframes(*config.pixel_size)
    stamps: list[float] = []
    cpu_stamps: list[float] = []

    def on_step(i: int, n: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        cpu_stamps.append(cpu_seconds())

    options = dict(
        prompt=spec["prompt"], steps=spec["steps"], cfg_scale=spec["cfg_scale"], eta=spec["eta"],
        motion_steps=spec["motion_steps"],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t1, c1 = time.perf_counter(), cpu_seconds()
    if spec["mode"] == "ours":
        from tooncrafter.generation import GenerationRequest

        frames = pipe(GenerationRequest(keyframes=images, seed=spec["seed"], **options), on_step=on_step).frames
    else:
        frames = pipe(images, **options, generator=torch.Generator("cpu").manual_seed(spec["seed"]), on_step=on_step)
    _sync(device)
    request_s, request_cpu_s = time.perf_counter() - t1, cpu_seconds() - c1
    # step i's time = between the ends of steps i-1 and i (the first step, which also pays first-touch costs,
    # is left out of the median)
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    step_cpu_times = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]

    # 3. memory, before the FLOP count (which runs the math attention)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_vram_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    # 4. FLOPs of one batch-1 UNet call (a step is two of them, batched or not)
    flops = unet_flops(unet, config, text_encoder.context_length, device, dtype) if spec["flops"] else None

    torch.save(torch.from_numpy(frames), spec["video_out"])
    step_s = statistics.median(step_times) if step_times else None
    step_cpu_s = statistics.median(step_cpu_times) if step_cpu_times else None
    result = {
        "mode": spec["mode"], "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "load_s": load_s, "request_s": request_s, "step_s": step_s, "step_times_s": step_times,
        "load_cpu_s": load_cpu_s, "request_cpu_s": request_cpu_s, "step_cpu_s": step_cpu_s,
        "step_cpu_times_s": step_cpu_times,
        "peak_rss_mb": peak_rss_mb, "peak_vram_mb": peak_vram_mb,
        "unet_call_flops": flops,
        "step_flops": 2 * flops if flops else None,  # cond + uncond
        "achieved_tflops": (2 * flops / step_s / 1e12) if (flops and step_s) else None,
        "frames_shape": list(frames.shape),
    }
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
