"""Ours against the OFFICIAL code itself: same checkpoint file, same inputs and noise, one fresh process each.

`python -m benchmarks.run --size tiny|mid --official-src PATH --official-python PY` lands here. Every stage is
timed in both (load, CLIP text / image / Resampler, VAE encode, each DDIM step, each decode, the whole request,
peak RSS of the load and of the request) and printed as ours / official. The keyframes, the posterior noise of
all T frames and x_T are written once and read by both workers; with eta 0 nothing else is random, so at fp32
the two videos must agree to float rounding (checked against the pipeline parity tolerance).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.official_source import OfficialSource
from benchmarks.sizes import CACHE_DIR, MID_CLIP, MID_CLIP_ARCH, MID_LATENT, REFERENCE_DIR

ROOT = Path(__file__).resolve().parent.parent

# (key, label): figures compared as ours / official (lower is better for all)
FIGURES = (
    ("load_s", "model load s"),
    ("load_cpu_s", "model load CPU s"),
    ("clip_s", "CLIP text+image+Resampler s"),
    ("vae_encode_s", "VAE encode s"),
    ("step_first_s", "step 1 s"),
    ("step_s", "one step s (median of 2..N)"),
    ("steps_s", "all steps s"),
    ("decode_1_s", "decode 1 (T frames) s"),
    ("decode_2_s", "decode 2 (splice) s"),
    ("decode_1_system_s", "decode 1 system CPU s"),
    ("decode_1_minor_faults", "decode 1 minor page faults"),
    ("request_s", "whole request s"),
    ("request_cpu_s", "whole request CPU s"),
    ("peak_rss_load_mb", "peak RSS load MB"),
    ("peak_rss_request_mb", "peak RSS request MB"),
    ("peak_rss_mb", "peak RSS process MB"),
)

# the targets of the issue, as (dtype, key, the most ours / official may be)
TARGETS = (
    ("float32", "request_s", 0.8), ("float32", "peak_rss_mb", 0.5),
    *(("float32", key, 1.0) for key in ("load_s", "clip_s", "vae_encode_s", "step_s", "decode_1_s", "decode_2_s")),
    ("bfloat16", "step_s", 0.25), ("bfloat16", "request_s", 1 / 3), ("bfloat16", "peak_rss_mb", 0.4),
)


def official_checkpoint(size: str, source: OfficialSource, threads: int) -> Path:
    """tiny: the reference tiny_a; mid: the official 512 widths on a 16x16 latent with OpenCLIP towers of the
    real output widths (so CLIP runs in both), random weights, written once by the official model classes."""
    if size == "tiny":
        return REFERENCE_DIR / "tiny_a"
    if size != "mid":
        raise SystemExit("--official-src runs on CPU at --size tiny or mid only")
    directory = CACHE_DIR / "mid-official"
    if not (directory / "model.ckpt").is_file():
        print(f"[bench] writing the official-format mid checkpoint to {directory} (once)", flush=True)
        spec = {"tree": str(source.tree), "out_dir": str(directory), "latent_size": list(MID_LATENT),
                "clip_arch": MID_CLIP_ARCH, "clip_config": MID_CLIP, "seed": 123, "threads": threads}
        run_official(source, "make-checkpoint", spec, directory.parent / "mid-official.spec.json")
    return directory


def run_official(source: OfficialSource, command: str, spec: dict, spec_path: Path) -> dict:
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    out_path = spec_path.with_suffix(".result.json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the official venv sees none of ours
    proc = subprocess.run([source.python, str(ROOT / "benchmarks" / "official_worker.py"), command, str(spec_path),
                           str(out_path)], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] official {command} failed with exit code {proc.returncode}")
    return json.loads(out_path.read_text())


def write_inputs(checkpoint_dir: Path, path: Path, seed: int) -> None:
    """The keyframes (preprocessed) and the noise both workers read: posterior noise of T frames, then x_T."""
    from benchmarks.worker import keyframes
    from tooncrafter.media.tensors import preprocess_keyframe
    from tooncrafter.model.config import load_config

    config = load_config(checkpoint_dir / "config.yaml")
    (height, width), (h, w) = config.pixel_size, config.latent_size
    frames, channels = config.num_frames, config.diffusion.channels
    pixels = torch.stack([preprocess_keyframe(image, height, width) for image in keyframes(height, width)])
    generator = torch.Generator("cpu").manual_seed(seed)
    posterior_noise = torch.randn((frames, channels, h, w), generator=generator)
    x_T = torch.randn((1, channels, frames, h, w), generator=generator)
    torch.save({"pixels": pixels, "posterior_noise": posterior_noise, "x_T": x_T}, path)


def derive(result: dict) -> dict:
    """The compared figures that are sums or picks of the workers' stage records."""
    steps = result.get("step_each_s") or []
    decodes = result.get("vae_decode_each_s") or []
    return {
        **result,
        "clip_s": sum(result.get(f"{k}_s", 0.0) for k in ("text_encoder", "image_encoder", "resampler")),
        "step_first_s": steps[0] if steps else None,
        "step_s": statistics.median(steps[1:] or steps) if steps else None,
        "steps_s": sum(steps) if steps else None,
        "decode_1_s": decodes[0] if decodes else None,
        "decode_2_s": decodes[1] if len(decodes) > 1 else None,
        # the kernel's share of decode 1: where it grows the heap into fresh pages
        "decode_1_system_s": (result.get("vae_decode_each_system_s") or [None])[0],
        "decode_1_minor_faults": (result.get("vae_decode_each_minor_faults") or [None])[0],
    }


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(results: dict[str, dict]) -> str:
    ours = [tag for tag in results if tag != "official"]
    rows = [["figure", "official", *ours, *[f"{tag}/official" for tag in ours]]]
    base = results["official"]
    for key, label in FIGURES:
        ratios = [(results[t][key] / base[key]) if results[t].get(key) is not None and base.get(key) else None
                  for t in ours]
        rows.append([label, fmt(base.get(key)), *[fmt(results[t].get(key)) for t in ours], *[fmt(r) for r in ratios]])
    rows.append(["max |video - official|", "0", *[fmt(results[t]["max_abs_diff_vs_official"]) for t in ours],
                 *["" for _ in ours]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def target_lines(results: dict[str, dict]) -> list[str]:
    base, lines = results["official"], []
    for dtype, key, limit in TARGETS:
        tag = f"ours_{dtype}"
        if tag not in results or results[tag].get(key) is None or not base.get(key):
            continue
        ratio = results[tag][key] / base[key]
        lines.append(f"{'met ' if ratio <= limit else 'MISS'} {tag} {key}: ours/official {ratio:.3f} (target <= {limit:.3g})")
    return lines


def run_side_by_side(args, source: OfficialSource, run_ours) -> tuple[dict, list[str]]:
    """Official fp32 first, then ours in each dtype; `run_ours(spec, tag)` runs our worker."""
    from tooncrafter.fixtures import PIPELINE_TOLERANCE

    checkpoint_dir = official_checkpoint(args.size, source, args.threads)
    workdir = Path(args.workdir)
    inputs = workdir / "inputs.pt"
    write_inputs(checkpoint_dir, inputs, args.seed)
    common = {"checkpoint_dir": str(checkpoint_dir), "steps": args.steps, "prompt": "a cartoon cat",
              "cfg_scale": 7.5, "guidance_rescale": 0.7, "eta": 0.0, "motion_steps": 10, "threads": args.threads,
              "inputs": str(inputs)}
    print("[bench] official: running ...", flush=True)
    results = {"official": run_official(source, "run", {**common, "tree": str(source.tree),
                                                        "video_out": str(workdir / "official.pt")},
                                        workdir / "official.spec.json")}
    videos = {"official": torch.load(workdir / "official.pt", weights_only=True)}
    for dtype in args.dtype.split(","):
        tag = f"ours_{dtype}"
        spec = {**common, "mode": "ours", "dtype": dtype, "device": "cpu", "offload": False, "compile": args.compile,
                "flops": False, "seed": args.seed, "weights": getattr(args, f"weights_{dtype}", None),
                "video_out": str(workdir / f"{tag}.pt")}
        results[tag] = run_ours(spec, tag)
        videos[tag] = torch.load(workdir / f"{tag}.pt", weights_only=True)
    failures = []
    for tag in results:
        results[tag] = derive(results[tag])
        diff = float((videos[tag] - videos["official"]).abs().max())
        results[tag]["max_abs_diff_vs_official"] = diff
        if results[tag]["dtype"] == "float32" and not diff <= PIPELINE_TOLERANCE:
            failures.append(f"{tag}: max |video - official| = {diff:.3g} > {PIPELINE_TOLERANCE}")
    report = {"baseline": "the official code (Doubiiu/ToonCrafter)", "official_commit": source.commit,
              "official_python": sys.executable if source.python is None else source.python,
              "checkpoint_dir": str(checkpoint_dir), "eta": 0.0, "results": results,
              "targets": target_lines(results), "parity_failures": failures}
    return report, failures
