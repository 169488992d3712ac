"""Make the sketch-encoder parity fixtures (tests/fixtures/sketch_tiny) by running public re-implementations.

ToonCrafter's sketch encoder code was never released; two public re-implementations load the
released `sketch_encoder.ckpt` strictly. This script runs their modules, read at run time from
git mirrors (bare or checked out; nothing of them is copied into this repository), on a random-weight
encoder in the official key layout sized like `reference/tiny_a`'s UNet, and writes small fixtures:

* `mattyamonaca/ToonCrafter_with_SketchGuidance`: `cldm/cldm.py` (`ControlNet`, Stable Diffusion's
  attention: the whole context) and `ControlledUnetModel` (the UNet with residuals) -> variant "all";
* `kijai/ComfyUI-DynamiCrafterWrapper`: `lvdm/modules/networks/openaimodel3d.py` (`ControlNet` on
  ToonCrafter's own attention: text tokens only, and `UNetModel(control=...)`) -> variant "text".

Run it in a separate environment with the references' extra packages (einops, omegaconf), e.g.
    python -m venv /work/sketch-ref-venv && /work/sketch-ref-venv/bin/pip install einops omegaconf
    PYTHONPATH=src /work/sketch-ref-venv/bin/python tools/make_sketch_fixtures.py \
        --mattyamonaca /work/.mirror/mattyamonaca+ToonCrafter_with_SketchGuidance/repo \
        --kijai /work/.mirror/kijai+ComfyUI-DynamiCrafterWrapper/repo
(torch from the project's environment). Imports the references need only for training or ComfyUI
(Lightning models, samplers, cv2, comfy) are replaced by inert stand-ins; the modules that compute
are the references' own.

The weights are not written to the fixtures: `tooncrafter.fixtures.random_state_dict` rebuilds them
from (seed, key, shape), and `fixtures_meta.json` records their digest.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from tooncrafter.fixtures import DEFAULT_FIXTURES, FixtureSet, random_state_dict, state_dict_digest
from tooncrafter.model.checkpoint import component_state_dict, read_state_dict

SEED = 1515
SKETCH_SCALE = 0.6  # both references' default control_scale
SKETCH_FRAMES = (2, 5)  # which output frames get a sketch; the others get no guidance
DAMPED = ("zero_convs", "middle_block_out", "input_hint_block.14", "proj_out", "out_layers.3")
VARIANTS = {"all": "mattyamonaca/ToonCrafter_with_SketchGuidance", "text": "kijai/ComfyUI-DynamiCrafterWrapper"}


# --------------------------------------------------------------------------------------------
# Reading the references from their mirrors
# --------------------------------------------------------------------------------------------


def export_tree(source: Path, into: Path) -> tuple[Path, str]:
    """A checkout of HEAD of `source` (a bare mirror or a work tree) under `into`, and its commit."""
    git = ["git", f"--git-dir={source}"] if (source / "HEAD").is_file() and not (source / ".git").exists() else ["git", "-C", str(source)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run([*git, "archive", "--format=tar", "HEAD"], check=True, capture_output=True).stdout
    target = into / source.parent.name.replace("+", "__")
    target.mkdir(parents=True)
    archive_path = into / (target.name + ".tar")
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(target, filter="data")
    return target, commit


def _stub(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def load_mattyamonaca(root: Path) -> types.ModuleType:
    """`cldm.cldm` of mattyamonaca's tree (absolute imports `ldm`, `lvdm`, `cldm`, `utils`)."""
    _stub("cv2")  # utils/utils.py imports it for video helpers the modules never call
    _stub("ldm.models.diffusion.ddpm", LatentDiffusion=type("LatentDiffusion", (torch.nn.Module,), {}))
    _stub("ldm.models.diffusion.ddim", DDIMSampler=object)
    sys.path.insert(0, str(root))
    import ldm.models.diffusion  # noqa: F401  (the real package, so the stubs above sit inside it)

    return importlib.import_module("cldm.cldm")


def load_kijai(root: Path) -> types.ModuleType:
    """`lvdm.modules.networks.openaimodel3d` of kijai's tree, imported as package `kijai_dcw` (relative imports)."""
    package = _stub("kijai_dcw")
    package.__path__ = [str(root)]  # a package without running its ComfyUI `__init__`
    nn = torch.nn
    ops = types.SimpleNamespace(Linear=nn.Linear, Conv1d=nn.Conv1d, Conv2d=nn.Conv2d, Conv3d=nn.Conv3d,
                                GroupNorm=nn.GroupNorm, LayerNorm=nn.LayerNorm)
    comfy = _stub("comfy")
    comfy.ops = _stub("comfy.ops", manual_cast=ops)
    comfy.model_management = _stub("comfy.model_management", get_torch_device=lambda: torch.device("cpu"),
                                   is_device_mps=lambda device: False)
    return importlib.import_module("kijai_dcw.lvdm.modules.networks.openaimodel3d")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def controlnet_params(unet_params: dict) -> dict:
    """cldm_v21-style ControlNet arguments with the widths of the given UNet (hint: one channel)."""
    return {
        "image_size": 32,  # unused by ControlNet
        "in_channels": unet_params["out_channels"],
        "hint_channels": 1,
        "model_channels": unet_params["model_channels"],
        "attention_resolutions": list(unet_params["attention_resolutions"]),
        "num_res_blocks": unet_params["num_res_blocks"],
        "channel_mult": list(unet_params["channel_mult"]),
        "num_head_channels": unet_params["num_head_channels"],
        "use_spatial_transformer": True,
        "use_linear_in_transformer": unet_params.get("use_linear", True),
        "transformer_depth": unet_params.get("transformer_depth", 1),
        "context_dim": unet_params["context_dim"],
        "legacy": False,
        "use_checkpoint": False,
    }


def draw_sketches(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """`count` line drawings, white strokes on black, uint8 `[count, 1, height, width]`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    sketches = []
    for _ in range(count):
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(6):
            points = (torch.rand(4, generator=generator) * torch.tensor([width, height, width, height])).tolist()
            draw.line(points, fill=255, width=1 + int(torch.randint(0, 3, (1,), generator=generator)))
        box = (torch.rand(4, generator=generator) * torch.tensor([width, height, width, height])).tolist()
        draw.ellipse((min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])), outline=180)
        sketches.append(torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(1, height, width))
    return torch.stack(sketches)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mattyamonaca", type=Path, required=True, help="mirror of mattyamonaca/ToonCrafter_with_SketchGuidance")
    parser.add_argument("--kijai", type=Path, required=True, help="mirror of kijai/ComfyUI-DynamiCrafterWrapper")
    parser.add_argument("--reference", type=Path, default=DEFAULT_FIXTURES, help="the tiny reference set (config, model.ckpt, fixtures)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sketch_tiny")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    config = yaml.safe_load((args.reference / "config.yaml").read_text())
    unet_params = dict(config["model"]["params"]["unet_config"]["params"], use_checkpoint=False)
    cn_params = controlnet_params(unet_params)
    reference = FixtureSet.load(args.reference)
    unet_state = component_state_dict(read_state_dict(reference.checkpoint_path), "unet")

    with tempfile.TemporaryDirectory() as scratch:
        matty_root, matty_commit = export_tree(args.mattyamonaca, Path(scratch))
        kijai_root, kijai_commit = export_tree(args.kijai, Path(scratch))
        matty = load_mattyamonaca(matty_root)
        kijai = load_kijai(kijai_root)
        encoders = {"all": matty.ControlNet(**cn_params), "text": kijai.ControlNet(**cn_params)}
        unets = {"all": matty.ControlledUnetModel(**unet_params), "text": kijai.UNetModel(**unet_params)}

    # 1. random weights in the official layout, which both references share
    shapes = {k: tuple(v.shape) for k, v in encoders["all"].state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in encoders["text"].state_dict().items()}:
        raise SystemExit("the two references disagree on the sketch encoder's key layout")
    weights = random_state_dict(shapes, SEED, damped=DAMPED)
    for variant in VARIANTS:
        encoders[variant].load_state_dict(weights, strict=True)
        unets[variant].load_state_dict(unet_state, strict=True)
        encoders[variant].eval()
        unets[variant].eval()

    # 2. inputs: the UNet fixture of the reference set, sketches on some frames
    x_noisy, c_concat = reference["unet_x_noisy"], reference["unet_c_concat"]
    timesteps, context, fs = reference["unet_timesteps"], reference["unet_context"], reference["unet_fs"]
    b, _, t, h, w = x_noisy.shape
    frames = torch.tensor(SKETCH_FRAMES, dtype=torch.int64)
    sketch_u8 = draw_sketches(len(frames), h * 8, w * 8, SEED)
    hint = sketch_u8.float() / 255.0  # [F, 1, H, W], as both references scale their sketches

    tensors: dict[str, torch.Tensor] = {
        "x_noisy": x_noisy, "c_concat": c_concat, "timesteps": timesteps, "context": context, "fs": fs,
        "sketch_uint8": sketch_u8, "sketch_frames": frames, "sketch_scale": torch.tensor(SKETCH_SCALE),
    }
    # rows (batch element, sketched frame), batch-major like the UNet's (b t) folding
    rows_x = x_noisy[:, :, frames].transpose(1, 2).reshape(b * len(frames), -1, h, w)
    rows_hint = hint.repeat(b, 1, 1, 1)
    rows_t = timesteps.repeat_interleave(len(frames))
    rows_context = context.repeat_interleave(len(frames), dim=0)
    unet_in = torch.cat([x_noisy, c_concat], dim=1)
    errors = {}
    for variant in VARIANTS:
        residuals = encoders[variant](x=rows_x, hint=rows_hint, timesteps=rows_t, context=rows_context)
        control = []
        for index, residual in enumerate(residuals):
            tensors[f"residual_{variant}_{index:02d}"] = residual.contiguous()
            # our masking: no sketch, no guidance (zero residual on those frames)
            full = residual.new_zeros((b, t, *residual.shape[1:]))
            full[:, frames] = SKETCH_SCALE * residual.reshape(b, len(frames), *residual.shape[1:])
            control.append(full.reshape(b * t, *residual.shape[1:]))
        tensors[f"unet_out_{variant}"] = unets[variant](unet_in, timesteps, context=context, fs=fs, control=control).contiguous()
        plain = unets[variant](unet_in, timesteps, context=context, fs=fs, control=None)
        errors[variant] = float((plain - reference["unet_out"]).abs().max())

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "fixtures.safetensors"))
    meta = {
        "what": "sketch encoder (ControlNet) residuals and UNet outputs with residuals, random weights",
        "seed": SEED,
        "damped": list(DAMPED),
        "weights_digest": state_dict_digest(weights),
        "num_keys": len(weights),
        "num_parameters": sum(v.numel() for v in weights.values()),
        "controlnet_params": cn_params,
        "unet_checkpoint": {"reference_set": args.reference.name, "sha256": sha256(reference.checkpoint_path)},
        "sketch_frames": list(SKETCH_FRAMES),
        "sketch_scale": SKETCH_SCALE,
        "variants": {
            "all": {"repo": VARIANTS["all"], "commit": matty_commit, "encoder": "cldm/cldm.py ControlNet",
                    "unet": "cldm/cldm.py ControlledUnetModel", "context": "text + all image tokens"},
            "text": {"repo": VARIANTS["text"], "commit": kijai_commit,
                     "encoder": "lvdm/modules/networks/openaimodel3d.py ControlNet",
                     "unet": "lvdm/modules/networks/openaimodel3d.py UNetModel", "context": "first 77 (text) tokens"},
        },
        "reference_unet_vs_reference_set_without_sketch": errors,
        "residual_layout": "residual_{variant}_{i}: [(B F), C_i, h_i, w_i], rows batch-major over sketch_frames, unscaled",
        "unet_out_layout": "unet_out_{variant}: [B, 4, T, h, w] with sketch_scale * residuals on sketch_frames, zero elsewhere",
    }
    (args.out / "fixtures_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = (args.out / "fixtures.safetensors").stat().st_size
    print(f"wrote {args.out} ({size / 1e3:.0f} kB); reference UNets vs {args.reference.name} unet_out without sketch: {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
