"""Benchmark sizes: which checkpoint and config each `--size` runs, and the random-weight checkpoints.

* `tiny`: the reference checkpoint `shared/reference/tiny_a` (the fixtures' model).
* `mid`:  the real 512 UNet, VAE and Resampler widths with RANDOM weights, small CLIP towers (the text
  tower keeps its 1024 width, the image tower its 1280 width, only 2-3 blocks each), 16 frames at 128x128
  pixels (latent 16x16). Written once, in the official checkpoint format, under `benchmarks/.cache/mid`.
* `full`: the real 512 config at 320x512 (for GPUs): `--checkpoint` (e.g. the released model.ckpt), or a
  random-weight checkpoint of the full model (full-size CLIP towers) under `benchmarks/.cache/full`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import yaml

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("TOONCRAFTER_BENCH_CACHE", BENCH_DIR / ".cache"))
REFERENCE_DIR = BENCH_DIR.parent.parent / "shared" / "reference"
SIZES = ("tiny", "mid", "full")

# Small OpenCLIP towers for `mid`: output widths must stay those the UNet (1024) and Resampler (1280) expect.
MID_CLIP_ARCH = "bench-clip-mid"
MID_CLIP = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 3},
}
MID_LATENT = (16, 16)  # 128x128 pixels


@dataclass(frozen=True)
class BenchSize:
    name: str
    checkpoint_dir: Path  # holds model.ckpt + config.yaml (+ the OpenCLIP json it names)


def _builtin_yaml() -> dict:
    text = resources.files("tooncrafter.configs").joinpath("tooncrafter_512.yaml").read_text()
    return yaml.safe_load(text)


def _mid_yaml() -> dict:
    raw = copy.deepcopy(_builtin_yaml())
    params = raw["model"]["params"]
    params["image_size"] = list(MID_LATENT)
    for key in ("cond_stage_config", "img_cond_stage_config"):
        params[key]["params"] = {**(params[key].get("params") or {}), "arch": MID_CLIP_ARCH, "version": None}
    return raw


def _schedule_state(config) -> dict[str, torch.Tensor]:
    """The top-level DDPM buffers an official checkpoint carries (the ones the sampler reads)."""
    from tooncrafter.sampling import alphas_cumprod_from_betas, make_betas, make_scale_arr

    d = config.diffusion
    betas = make_betas(d.timesteps, d.linear_start, d.linear_end, d.rescale_betas_zero_snr)
    abar = alphas_cumprod_from_betas(betas)
    return {
        "betas": betas.float(),
        "alphas_cumprod": abar.float(),
        "alphas_cumprod_prev": torch.cat([abar.new_ones(1), abar[:-1]]).float(),
        "sqrt_alphas_cumprod": abar.sqrt().float(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt().float(),
        "scale_arr": make_scale_arr(d.timesteps, d.base_scale),
    }


def write_random_checkpoint(directory: Path, raw_config: dict, clip_jsons: dict[str, dict], seed: int = 0) -> None:
    """Build every component with PyTorch's default init (seeded), save `model.ckpt` in the official layout
    (`{"state_dict": {prefix + key: tensor}}`) plus `config.yaml` and the OpenCLIP json files."""
    from tooncrafter.model.checkpoint import PREFIXES
    from tooncrafter.model.config import load_config
    from tooncrafter.model.loader import build_on_meta

    directory.mkdir(parents=True, exist_ok=True)
    for arch, cfg in clip_jsons.items():
        (directory / f"{arch}.json").write_text(json.dumps(cfg, indent=1))
    (directory / "config.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
    config = load_config(directory / "config.yaml")
    torch.manual_seed(seed)  # benchmark tooling, not library code: the random weights are reproducible
    state: dict[str, torch.Tensor] = {}
    for name, meta_module in build_on_meta(config).items():
        module = meta_module.to_empty(device="cpu")
        with torch.no_grad():
            for pname, p in module.named_parameters():
                # N(0, 1/fan_in) for matrices/kernels (activations stay O(1) through the depth), norm scales 1,
                # biases and other vectors small
                if p.ndim >= 2:
                    fan_in = p[0].numel()
                    p.normal_(0.0, fan_in**-0.5)
                elif pname.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        for key, value in module.state_dict().items():
            state[PREFIXES[name] + key] = value
        del module
    state.update(_schedule_state(config))
    tmp = directory / "model.ckpt.tmp"
    torch.save({"state_dict": state}, tmp)
    tmp.rename(directory / "model.ckpt")


def prepare(size: str, checkpoint: str | None = None) -> BenchSize:
    """The checkpoint directory of `size`, generating the random-weight one on first use."""
    if size == "tiny":
        return BenchSize("tiny", Path(checkpoint) if checkpoint else REFERENCE_DIR / "tiny_a")
    if size == "full" and checkpoint:
        path = Path(checkpoint)
        if path.is_file():
            raise SystemExit("--checkpoint for the benchmark must be a directory holding model.ckpt + config.yaml")
        return BenchSize("full", path)
    directory = CACHE_DIR / size
    if not (directory / "model.ckpt").is_file():
        logger.warning("writing the random-weight %s checkpoint to %s (once)", size, directory)
        if size == "mid":
            write_random_checkpoint(directory, _mid_yaml(), {MID_CLIP_ARCH: MID_CLIP})
        elif size == "full":
            import open_clip

            raw = copy.deepcopy(_builtin_yaml())
            params = raw["model"]["params"]
            for key in ("cond_stage_config", "img_cond_stage_config"):
                params[key]["params"] = {**(params[key].get("params") or {}), "arch": "bench-clip-full", "version": None}
            write_random_checkpoint(directory, raw, {"bench-clip-full": open_clip.get_model_config("ViT-H-14")})
        else:
            raise SystemExit(f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    return BenchSize(size, directory)
