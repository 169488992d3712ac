"""`tooncrafter` command line: generate, parity, convert, serve, worker.

Heavy imports (torch, the model, the service) happen inside each command so that `--help` and
input errors answer at once. Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _lengths(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 6,5,5, got {text!r}") from None


def _sketch_spec(text: str) -> tuple[int, str]:
    """FRAME:PATH (PATH may itself hold colons: a URL, a data: URI)."""
    frame, sep, source = text.partition(":")
    if not sep or not frame.strip().isdigit() or not source.strip():
        raise argparse.ArgumentTypeError(f"expected FRAME:PATH with FRAME an output frame number, like 5:s5.png, got {text!r}")
    return int(frame), source.strip()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        help="model.ckpt / .safetensors file, or a directory with model.ckpt + config.yaml "
        "(default: TOONCRAFTER_CHECKPOINT, else the Hugging Face repo Doubiiu/ToonCrafter)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default float32 on CPU, float16 on CUDA)")
    parser.add_argument("--offload", action="store_true", help="keep CLIP and the VAE off the GPU while the UNet samples")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first run, faster steps)")
    parser.add_argument(
        "--sketch-checkpoint",
        help="sketch_encoder.ckpt / .safetensors (or a directory holding one), read only when sketches are used "
        "(default: TOONCRAFTER_SKETCH_CHECKPOINT, else Doubiiu/ToonCrafter's sketch_encoder.ckpt from the hub)",
    )


def _add_contract_option(parser: argparse.ArgumentParser, flag: str, field: str, kind: type) -> None:
    """An option of the endpoint's contract: its default and its help are the schema's own."""
    from tooncrafter.schema import field_default, field_help

    default = field_default(field)
    shown = f" (default {default})" if default != "" else ""
    parser.add_argument(flag, type=kind, default=default, help=field_help(field) + shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tooncrafter", description="ToonCrafter cartoon keyframe interpolation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    from tooncrafter.schema import field_help

    gen = sub.add_parser("generate", help="interpolate between keyframes and write a video")
    gen.add_argument("keyframes", nargs="+", metavar="KEYFRAME", help="image path, http(s) URL or data: URI (2 or more)")
    gen.add_argument("-o", "--output", required=True, help="output video (.mp4, .webm or .gif)")
    _add_contract_option(gen, "--prompt", "prompt", str)
    _add_contract_option(gen, "--steps", "steps", int)
    _add_contract_option(gen, "--cfg-scale", "cfg_scale", float)
    _add_contract_option(gen, "--eta", "eta", float)
    _add_contract_option(gen, "--motion-steps", "motion_steps", int)
    _add_contract_option(gen, "--fps", "fps", int)
    gen.add_argument("--seed", type=int, help=field_help("seed") + " (printed)")
    gen.add_argument("--keyframe-lengths", type=_lengths, help="frames per keyframe, e.g. 6,5,5 (sum = model frames)")
    gen.add_argument("--keep-all-frames", action="store_true", help="with >2 keyframes keep every frame of every pair")
    gen.add_argument("--loop", action="store_true", help=field_help("loop"))
    _add_contract_option(gen, "--frame-multiplier", "frame_multiplier", int)
    gen.add_argument(
        "--sketch", action="append", type=_sketch_spec, default=[], metavar="FRAME:PATH",
        help="line art guiding output frame FRAME (repeatable; a path, URL or data: URI). " + field_help("sketch_image_urls"),
    )
    gen.add_argument(
        "--sketch-from-image", action="append", type=_sketch_spec, default=[], metavar="FRAME:PATH",
        help="like --sketch, but PATH is an ordinary picture whose edges become the sketch (repeatable). "
        + field_help("extract_lines", "sketch"),
    )
    _add_contract_option(gen, "--sketch-scale", "sketch_scale", float)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_options(gen)

    par = sub.add_parser("parity", help="compare every stage against a reference fixture directory")
    par.add_argument("fixture_dir", type=Path, metavar="FIXTURE_DIR")
    par.add_argument("--dump", type=Path, metavar="OUT.safetensors", help="write every computed tensor under the fixture's key names")

    conv = sub.add_parser("convert", help="convert a model.ckpt to .safetensors (same keys)")
    conv.add_argument("source", type=Path, metavar="IN.ckpt")
    conv.add_argument("target", type=Path, metavar="OUT.safetensors")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                      help="cast the weights (not the noise schedule) to this dtype; default: keep the file's")

    serve = sub.add_parser("serve", help="run the fal-compatible HTTP API (and, by default, a worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run as `tooncrafter worker`)")
    serve.add_argument("--ssl-certfile", help="serve https with this certificate (PEM); fal_client only speaks https")
    serve.add_argument("--ssl-keyfile", help="private key of --ssl-certfile")
    serve.add_argument(
        "--allow-open", action="store_true", help="allow a non-loopback --host although no API keys are configured"
    )
    _add_model_options(serve)

    worker = sub.add_parser("worker", help="run a worker that takes jobs from the shared job store")
    _add_model_options(worker)

    db = sub.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="create or migrate the job store schema")

    keys = sub.add_parser("webhook-keys", help="the keys that sign webhooks (published at /.well-known/jwks.json)")
    keys.add_argument("action", choices=["list", "rotate"], help="list the published keys, or add a new signing key")
    return parser


def option_name(loc: Sequence[object]) -> str:
    """An endpoint field's location as the CLI spells it: KEYFRAME 2, --keyframe-lengths, --cfg-scale."""
    field, *rest = [str(part) for part in loc] or ["input"]
    index = f" {int(rest[0]) + 1}" if rest and rest[0].isdigit() else ""
    if field == "keyframe_image_urls":
        return f"KEYFRAME{index}"
    if field == "sketch_image_urls":
        return f"--sketch/--sketch-from-image{index}" if index else "--sketch"
    return "--" + field.replace("_", "-") + (f" entry{index}" if index else "")


def _validated_input(args: argparse.Namespace):
    """The endpoint's own input rules (no torch, no model: bad input answers at once)."""
    from pydantic import ValidationError

    from tooncrafter.schema import ToonCrafterInput, describe_error

    fields = {
        "keyframe_image_urls": args.keyframes,
        "prompt": args.prompt,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "eta": args.eta,
        "motion_steps": args.motion_steps,
        "fps": args.fps,
        "seed": args.seed,
        "keyframe_lengths": args.keyframe_lengths,
        "keep_all_frames": args.keep_all_frames,
        "loop": args.loop,
        "frame_multiplier": args.frame_multiplier,
        "sketch_image_urls": _sketch_entries(args) or None,
        "sketch_scale": args.sketch_scale,
    }
    try:
        return ToonCrafterInput.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UsageError(f"{option_name(first['loc'])}: {describe_error(first)}") from None


def _sketch_entries(args: argparse.Namespace) -> list[dict]:
    """`--sketch` then `--sketch-from-image` entries as the endpoint's `sketch_image_urls` items."""
    drawn = [{"frame": frame, "url": source} for frame, source in args.sketch]
    pictures = [{"frame": frame, "url": source, "extract_lines": True} for frame, source in args.sketch_from_image]
    return drawn + pictures


def _served_frames(checkpoint: str | None) -> int:
    """The frame count T of the checkpoint's config, read without torch (it may download the weights)."""
    from tooncrafter.model.config import builtin_config, load_config
    from tooncrafter.weights import resolve_checkpoint

    resolved = resolve_checkpoint(checkpoint)
    config = load_config(resolved.config_path) if resolved.config_path is not None else builtin_config()
    return config.num_frames


def _cmd_generate(args: argparse.Namespace) -> int:
    from tooncrafter.media import MediaError
    from tooncrafter.media.images import load_image
    from tooncrafter.media.video import VIDEO_CONTENT_TYPES
    from tooncrafter.schema import ContractError, check_request_fits_model

    # Everything the user typed is checked before torch is imported or a weight is read.
    inputs = _validated_input(args)
    output = Path(args.output)
    if output.suffix.lower().lstrip(".") not in VIDEO_CONTENT_TYPES:
        raise UsageError(f"--output: unsupported video type {output.suffix or '(none)'!r} (use .mp4, .webm or .gif)")
    images = []
    for i, source in enumerate(inputs.keyframe_image_urls):
        try:
            images.append(load_image(source))
        except (MediaError, OSError) as exc:
            raise UsageError(f"KEYFRAME {i + 1} ({source[:80]}): {exc}") from None
    sketch_images = []
    for i, sketch in enumerate(inputs.sketch_image_urls or ()):
        try:
            sketch_images.append(load_image(sketch.url))
        except (MediaError, OSError) as exc:
            raise UsageError(f"{option_name(['sketch_image_urls', i])} ({sketch.frame}:{sketch.url[:80]}): {exc}") from None
    try:
        check_request_fits_model(inputs, _served_frames(args.checkpoint))
    except ContractError as exc:
        raise UsageError(f"{option_name([exc.field])}: {exc}") from None

    from tqdm import tqdm

    from tooncrafter.generation import GenerationRequest, random_seed
    from tooncrafter.media.video import write_video
    from tooncrafter.pipeline import ToonCrafterPipeline

    sketch_checkpoint = args.sketch_checkpoint
    if sketch_checkpoint is None and sketch_images:
        from tooncrafter.settings import Settings

        sketch_checkpoint = Settings().sketch_checkpoint  # TOONCRAFTER_SKETCH_CHECKPOINT
    pipeline = ToonCrafterPipeline.from_pretrained(
        args.checkpoint, device=args.device, dtype=args.dtype, offload=args.offload, compile=args.compile,
        sketch_checkpoint=sketch_checkpoint,
    )
    seed = inputs.seed if inputs.seed is not None else random_seed()
    request = GenerationRequest.from_input(inputs, images, seed, sketch_images)

    def on_step(step: int, total: int) -> None:
        bar.total = total  # every pass of the request (a frame multiplier adds passes)
        bar.update(step - bar.n)

    with tqdm(total=inputs.steps, desc="denoising", unit="step", disable=args.quiet, file=sys.stderr) as bar:
        result = pipeline(request, on_step=on_step)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_video(result.frames, output, fps=inputs.fps)
    print(f"seed: {result.seed}")
    print(f"wrote {output} ({result.frames.shape[0]} frames, {result.frames.shape[2]}x{result.frames.shape[1]}, {inputs.fps} fps)")
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    from tooncrafter.parity import format_report, run_parity

    if not (args.fixture_dir / "fixtures.safetensors").is_file():
        raise UsageError(f"FIXTURE_DIR: {args.fixture_dir} has no fixtures.safetensors")
    report = run_parity(args.fixture_dir, dump=args.dump)
    print(format_report(report.rows))
    if args.dump:
        print(f"wrote {len(report.computed)} tensors to {args.dump}")
    return 0 if report.passed else 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from tooncrafter.model.checkpoint import convert_to_safetensors

    if args.target.suffix != ".safetensors":
        raise UsageError("OUT: the target must end in .safetensors")
    import torch

    dtype = getattr(torch, args.dtype) if args.dtype else None
    count = convert_to_safetensors(args.source, args.target, dtype=dtype)
    print(f"wrote {count} tensors to {args.target}")
    return 0


def _settings_from_args(args: argparse.Namespace):
    from tooncrafter.settings import Settings

    overrides = {}
    for name in ("checkpoint", "device", "dtype", "sketch_checkpoint"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "offload", False):
        overrides["offload"] = True
    if getattr(args, "compile", False):
        overrides["compile"] = True
    return Settings(**overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tooncrafter.service.server import serve

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise UsageError("--ssl-certfile and --ssl-keyfile go together")
    serve(
        _settings_from_args(args),
        host=args.host,
        port=args.port,
        with_worker=not args.no_worker,
        allow_open=args.allow_open,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from tooncrafter.service.server import run_worker

    run_worker(_settings_from_args(args))
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from tooncrafter.service.jobs import upgrade_database
    from tooncrafter.settings import Settings

    upgrade_database(Settings())
    print("database schema is up to date")
    return 0


def _cmd_webhook_keys(args: argparse.Namespace) -> int:
    from tooncrafter.service.jobs import JobStore
    from tooncrafter.service.webhook_signing import Keyring
    from tooncrafter.settings import Settings

    store = JobStore(Settings().resolved_database_url)
    try:
        keyring = Keyring(store, refresh_s=0)
        if args.action == "rotate":
            print(f"new signing key: {keyring.rotate().kid}")
        for position, key in enumerate(keyring.published()):
            print(f"{key.kid}\t{'signing' if position == 0 else 'published (previous)'}")
    finally:
        store.close()
    return 0


COMMANDS = {
    "generate": _cmd_generate,
    "parity": _cmd_parity,
    "convert": _cmd_convert,
    "serve": _cmd_serve,
    "worker": _cmd_worker,
    "db": _cmd_db,
    "webhook-keys": _cmd_webhook_keys,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a missing file rather than a bug: one line, exit 2.

    Only modules already imported are looked in: an error cannot come from a module never loaded,
    and importing the checkpoint reader here would import torch just to print a message.
    """
    errors: list[type[BaseException]] = [UsageError]
    for module_name, class_name in (
        ("tooncrafter.model.checkpoint", "CheckpointError"),
        ("tooncrafter.model.config", "ConfigError"),
        ("tooncrafter.weights", "WeightsNotFoundError"),
        ("tooncrafter.generation", "SketchGuidanceUnavailable"),
    ):
        module = sys.modules.get(module_name)
        error = getattr(module, class_name, None) if module is not None else None
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tooncrafter.logs import configure_logging

    log_format = os.environ.get("TOONCRAFTER_LOG_FORMAT", "text").strip().lower()
    if log_format not in ("text", "json"):
        print(f"error: TOONCRAFTER_LOG_FORMAT must be text or json, got {log_format!r}", file=sys.stderr)
        return 2
    configure_logging(logging.DEBUG if args.verbose else logging.INFO, log_format)  # type: ignore[arg-type]
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


def run() -> int:
    """The `tooncrafter` command (a process entry point: it may restart itself once, see glibc_tunables.py)."""
    from tooncrafter.glibc_tunables import restart_with_allocator_tunables

    restart_with_allocator_tunables()
    return main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
