"""Throughput of batching across requests: clips per minute with N queued requests, one at a time vs one batch.

`python -m benchmarks.throughput --size tiny|mid|full [--queued 1,2,4] [--steps 3] [--dtype bfloat16]`

For each N the same N requests (own seeds and prompts) run twice in this process, on one loaded pipeline:
one after the other (a worker with `TOONCRAFTER_WORKER_BATCH_SIZE=1`) and as one batch (`generate_batch`, what a
worker with a batch size >= N does: one UNet call per step for all). A warm-up request runs first, so neither
pays the first touch of the weights. Both are our own code: this measures what batching adds, not a comparison
with the official code (which has no batching across requests).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.measure import cpu_seconds
from benchmarks.sizes import SIZES, prepare
from benchmarks.worker import keyframes
from tooncrafter.generation import GenerationRequest
from tooncrafter.pipeline import ToonCrafterPipeline


def _requests(pipeline: ToonCrafterPipeline, count: int, steps: int) -> list[GenerationRequest]:
    frames = keyframes(*pipeline.pixel_size)
    return [
        GenerationRequest(keyframes=frames, seed=100 + i, prompt=f"request {i}", steps=steps, cfg_scale=7.5, eta=1.0)
        for i in range(count)
    ]


def _timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--checkpoint", default=None, help="directory with model.ckpt + config.yaml (tiny/full)")
    parser.add_argument("--queued", default="1,2,4", help="comma list of queued request counts")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file to write the figures to")
    args = parser.parse_args(argv)

    size = prepare(args.size, args.checkpoint)
    pipeline = ToonCrafterPipeline.from_pretrained(size.checkpoint_dir, device=args.device, dtype=args.dtype, progress=False)
    pipeline(_requests(pipeline, 1, args.steps)[0])  # warm-up: first touch of the weights, kernel selection
    print(f"{args.size}, {args.dtype} on {args.device}, {args.steps} steps, {torch.get_num_threads()} threads")
    print("| queued | one at a time clips/min | one batch clips/min | batch / one at a time | CPU s one at a time / batch |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for count in (int(n) for n in args.queued.split(",")):
        requests = _requests(pipeline, count, args.steps)
        sequential_s, sequential_cpu = _timed(lambda: [pipeline(r) for r in requests])
        outcomes: list = []
        batched_s, batched_cpu = _timed(lambda: outcomes.extend(pipeline.generate_batch(requests)))
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise failed[0]
        row = {
            "queued": count,
            "sequential_clips_per_min": 60 * count / sequential_s,
            "batched_clips_per_min": 60 * count / batched_s,
            "sequential_s": sequential_s, "batched_s": batched_s,
            "sequential_cpu_s": sequential_cpu, "batched_cpu_s": batched_cpu,
        }
        rows.append(row)
        print(f"| {count} | {row['sequential_clips_per_min']:.2f} | {row['batched_clips_per_min']:.2f} | "
              f"{sequential_s / batched_s:.2f}x | {sequential_cpu:.0f} / {batched_cpu:.0f} |", flush=True)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"size": args.size, "dtype": args.dtype, "device": args.device, "steps": args.steps, "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    from tooncrafter.glibc_tunables import restart_with_allocator_tunables

    restart_with_allocator_tunables()  # as the `tooncrafter` command starts
    raise SystemExit(main())
