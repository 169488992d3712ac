"""`python -m benchmarks.run --size tiny|mid|full [--dtype float32,bfloat16] [--steps N] [--out results.json]`

With `--official-src PATH --official-python PY` (tiny or mid, CPU) it runs the OFFICIAL code side by side on
the same official-format checkpoint, inputs and noise, one fresh process each, and prints every stage as
ours / official (`side_by_side.py`). Without it, the baseline is OUR OWN IMITATION of the official code:

Runs the same request (two synthetic keyframes, fixed seed and prompt, cfg 7.5, eta 1) with the
official-style baseline (`baseline.py`, fp32) and with our pipeline in each `--dtype`, every run in a fresh
subprocess, checks that the videos agree (fp32: within the pipeline parity tolerance 1e-3; other dtypes:
the drift is reported), prints a table of figures and ours/baseline ratios and writes them as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.sizes import SIZES, prepare
from tooncrafter.fixtures import PIPELINE_TOLERANCE  # fp32 ours vs fp32 baseline

# figures compared as ours / baseline (lower is better for all but FLOP/s)
FIGURES = (
    ("load_s", "model load s"),
    ("request_s", "whole request s"),
    ("step_s", "one step s (median)"),
    ("load_cpu_s", "model load CPU s"),
    ("request_cpu_s", "whole request CPU s"),
    ("step_cpu_s", "one step CPU s (median)"),
    ("peak_rss_mb", "peak RSS MB"),
    ("peak_vram_mb", "peak VRAM MB"),
    ("step_flops", "FLOPs per step"),
    ("achieved_tflops", "achieved TFLOP/s"),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_worker(spec: dict, workdir: Path, tag: str) -> dict:
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    print(f"[bench] {tag}: running ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {tag} failed with exit code {proc.returncode}")
    return json.loads(out_path.read_text())


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.3e}"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(results: dict, ratios: dict) -> str:
    names = list(results)
    rows = [["figure", *names, *[f"{n}/baseline" for n in names if n != "baseline"]]]
    for key, label in FIGURES:
        if all(results[n].get(key) is None for n in names):
            continue
        rows.append([label, *[fmt(results[n].get(key)) for n in names],
                     *[fmt(ratios[n].get(key)) for n in names if n != "baseline"]])
    rows.append(["max |video - baseline|", *[fmt(results[n].get("max_abs_diff_vs_baseline")) for n in names],
                 *["" for n in names if n != "baseline"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--dtype", default="float32", help="comma list of dtypes for OUR pipeline (baseline: fp32)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default=None, help="directory with model.ckpt + config.yaml (tiny/full)")
    parser.add_argument("--offload", action="store_true", help="ours with --offload (CLIP/VAE off the GPU while sampling)")
    parser.add_argument("--compile", action="store_true", help="ours with torch.compile of the UNet")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline (no ratios, no parity check)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra UNet call per process)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--out", default=None, help="JSON file to write (default: benchmarks/results/<size>.json)")
    parser.add_argument("--official-src", default=None,
                        help="the official code (a work tree or git dir of Doubiiu/ToonCrafter): run it side by side")
    parser.add_argument("--official-python", default=None,
                        help="Python of the official code's venv (default: $TOONCRAFTER_OFFICIAL_PYTHON)")
    parser.add_argument("--official-rev", default="HEAD", help="revision to extract when --official-src is a git dir")
    parser.add_argument("--weights-bfloat16", default=None,
                        help="with --official-src: ours in bf16 loads this pre-converted file (tooncrafter convert --dtype bfloat16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.official_src:
        return official_main(args)
    print("[bench] baseline: OUR OWN IMITATION of the official code (benchmarks/baseline.py), not the official code; "
          "give --official-src to compare with the real thing", flush=True)

    size = prepare(args.size, args.checkpoint)
    base_spec = {
        "checkpoint_dir": str(size.checkpoint_dir), "device": args.device, "steps": args.steps, "seed": args.seed,
        "prompt": "a cartoon cat", "cfg_scale": 7.5, "eta": 1.0, "motion_steps": 10, "threads": args.threads,
        "offload": args.offload, "compile": args.compile, "flops": not args.no_flops,
    }
    runs = [] if args.no_baseline else [("baseline", "baseline", "float32")]
    runs += [(f"ours_{d}", "ours", d) for d in args.dtype.split(",")]
    results: dict[str, dict] = {}
    videos: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="tc-bench-") as tmp:
        workdir = Path(tmp)
        for tag, mode, dtype in runs:
            spec = {**base_spec, "mode": mode, "dtype": dtype, "video_out": str(workdir / f"{tag}.pt")}
            results[tag] = run_worker(spec, workdir, tag)
            videos[tag] = torch.load(workdir / f"{tag}.pt", weights_only=True)

    ratios: dict[str, dict] = {}
    failures = []
    if "baseline" in results:
        base = results["baseline"]
        for tag, res in results.items():
            diff = float((videos[tag] - videos["baseline"]).abs().max())
            res["max_abs_diff_vs_baseline"] = diff
            if tag != "baseline" and res["dtype"] == "float32" and not diff <= PIPELINE_TOLERANCE:
                failures.append(f"{tag}: max |video - baseline| = {diff:.3g} > {PIPELINE_TOLERANCE}")
            ratios[tag] = {
                key: (res[key] / base[key]) if (res.get(key) is not None and base.get(key)) else None for key, _ in FIGURES
            }
    else:
        ratios = {tag: {} for tag in results}

    report = {
        "date": datetime.date.today().isoformat(), "size": args.size, "steps": args.steps, "device": args.device,
        "cpu_model": cpu_model(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "threads": args.threads, "torch": torch.__version__, "load_average_at_end": os.getloadavg(), "checkpoint_dir": str(size.checkpoint_dir),
        "parity_tolerance_fp32": PIPELINE_TOLERANCE, "results": results, "ratios_vs_baseline": ratios,
        "parity_failures": failures,
    }
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{args.size}, {args.steps} steps, {args.device} ({report['gpu'] or report['cpu_model']}, {args.threads} threads)")
    print(table(results, ratios))
    print(f"\nwritten: {out}")
    for failure in failures:
        print(f"PARITY FAILURE: {failure}")
    return 1 if failures else 0


def official_main(args) -> int:
    """`--official-src`: ours against the official code itself (benchmarks/side_by_side.py)."""
    from benchmarks.official_source import resolve_official_source
    from benchmarks.side_by_side import run_side_by_side, table
    from benchmarks.sizes import CACHE_DIR

    source = resolve_official_source(args.official_src, args.official_python, CACHE_DIR, args.official_rev)
    with tempfile.TemporaryDirectory(prefix="tc-bench-") as tmp:
        args.workdir = tmp
        report, failures = run_side_by_side(args, source, lambda spec, tag: run_worker(spec, Path(tmp), tag))
    report.update({
        "date": datetime.date.today().isoformat(), "size": args.size, "steps": args.steps, "device": "cpu",
        "cpu_model": cpu_model(), "threads": args.threads, "torch": torch.__version__,
        "load_average_at_end": os.getloadavg(),
    })
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"{args.size}-vs-official.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{args.size}, {args.steps} steps, eta 0, cpu ({report['cpu_model']}, {args.threads} threads), "
          f"official commit {source.commit}; ours / official < 1 means ours is faster or smaller")
    print(table(report["results"]))
    print()
    for line in report["targets"]:
        print(line)
    print(f"\nwritten: {out}")
    for failure in failures:
        print(f"PARITY FAILURE: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
