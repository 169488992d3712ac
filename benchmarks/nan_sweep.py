"""`python -m benchmarks.nan_sweep --size full --device cuda --dtype float16 --steps 1,2,5,10,25,50,100 [--out F]`

Issue 14's half-precision check: one whole request (two synthetic keyframes, the endpoint's cfg_scale, eta and
motion_steps) per step count, in one process, and whether its video is finite. fp16 overflows where bf16 does
not (max 65504), most likely in the attention logits and the UNet's deepest activations at high noise, so the
check runs the real pipeline, not a layer. Prints one line per step count and exits 1 when any video holds a NaN
or an infinity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.sizes import SIZES, prepare
from tooncrafter.schema import field_default


def parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps: expected comma-separated step counts like 1,10,100, got {text!r}") from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError(f"--steps: step counts must be >= 1, got {text!r}")
    return steps


def sweep(checkpoint_dir: Path, *, device: str, dtype: str, steps: list[int], cfg_scale: float, seed: int) -> list[dict]:
    """One request per step count on one loaded pipeline: finite or not, the video's range, seconds."""
    import benchmarks.composed as composed
    from benchmarks.worker import keyframes
    from tooncrafter.media.tensors import preprocess_keyframe
    from tooncrafter.pipeline import ToonCrafterPipeline
    from tooncrafter.placement import resolve_dtype

    place = torch.device(device)
    pipe = ToonCrafterPipeline.from_pretrained(checkpoint_dir, device=place, dtype=resolve_dtype(dtype, place), progress=False)
    config = pipe.config
    pixels = torch.stack([preprocess_keyframe(im, *config.pixel_size) for im in keyframes(*config.pixel_size)])
    rows = []
    for count in steps:
        start = time.perf_counter()
        video = composed.interpolate_pixels(
            pipe, pixels, prompt="a cartoon ball rolling", steps=count, cfg_scale=cfg_scale, eta=field_default("eta"),
            motion_steps=field_default("motion_steps"),
            generator=torch.Generator("cpu").manual_seed(seed),
        )
        finite = bool(torch.isfinite(video).all())
        rows.append({
            "steps": count, "finite": finite, "seconds": time.perf_counter() - start,
            "nan": int(torch.isnan(video).sum()), "inf": int(torch.isinf(video).sum()),
            "min": float(video.nan_to_num().min()), "max": float(video.nan_to_num().max()),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nan_sweep", description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--checkpoint", default=None, help="directory with model.ckpt + config.yaml (tiny/full)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=parse_steps, default=parse_steps("1,2,3,5,10,20,25,50,75,100"))
    parser.add_argument("--cfg-scale", type=float, default=field_default("cfg_scale"))
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    bench = prepare(args.size, args.checkpoint)
    rows = sweep(bench.checkpoint_dir, device=args.device, dtype=args.dtype, steps=args.steps, cfg_scale=args.cfg_scale,
                 seed=args.seed)
    for row in rows:
        verdict = "finite" if row["finite"] else f"NOT FINITE ({row['nan']} NaN, {row['inf']} inf)"
        print(f"{args.size} {args.dtype} {args.device} steps {row['steps']:>3}: {verdict}, range "
              f"[{row['min']:.3f}, {row['max']:.3f}], {row['seconds']:.2f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"size": args.size, "dtype": args.dtype, "device": args.device,
                                              "torch": torch.__version__, "rows": rows}, indent=1))
    return 0 if all(row["finite"] for row in rows) else 1


if __name__ == "__main__":
    from tooncrafter.glibc_tunables import restart_with_allocator_tunables

    restart_with_allocator_tunables()  # as the `tooncrafter` command starts
    sys.exit(main())
