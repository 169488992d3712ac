"""The OFFICIAL ToonCrafter code (Doubiiu/ToonCrafter) run on CPU, timed stage by stage: one process per run.

Runs in the official code's own virtual environment (torch, open_clip_torch 2.22, kornia, omegaconf, einops),
started by `benchmarks.run --official-src`; it imports only the standard library, torch and the official tree
given in the spec (extracted by `benchmarks/official_source.py`; nothing of it is kept in this repository).

The official code needs a GPU stack in a few places; these are patched in memory, none changes the math:
* `DDIMSampler.register_buffer` moves its tensors to the model's device (the official code says `cuda`);
* `xformers.ops.memory_efficient_attention`, which the dual-reference VAE decoder calls unconditionally, is an
  exact stand-in on `F.scaled_dot_product_attention` (the CPU counterpart of the xformers kernel); the UNet keeps
  the plain branch the official code takes when xformers is absent;
* the OpenCLIP towers are built with `pretrained=None` (weights come from the checkpoint); `<arch>.json` files
  beside the config are registered as OpenCLIP architectures;
* `pytorch_lightning`, `transformers`, `cv2` and `torchvision._meta_registrations` are imported by the official
  modules but unused at inference: stubs stand in for them.

`python official_worker.py run SPEC.json OUT.json` times one request (`image_guided_synthesis --interp`);
`python official_worker.py make-checkpoint SPEC.json OUT.json` writes a random-weight checkpoint built by the
official model classes (so that both implementations load the very same official-format file).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for benchmarks.measure (stdlib only)

from benchmarks.measure import StageClock, cpu_seconds, reset_peak_rss, rss_mb  # noqa: E402


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_cpu_patches() -> None:
    """Import stubs and the exact xformers stand-in (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    class LightningModule(torch.nn.Module):
        @property
        def device(self) -> torch.device:
            for tensor in itertools.chain(self.parameters(), self.buffers()):
                return tensor.device
            return torch.device("cpu")

    utilities = _stub("pytorch_lightning.utilities", rank_zero_only=lambda fn: fn)
    _stub("pytorch_lightning", LightningModule=LightningModule, seed_everything=torch.manual_seed, utilities=utilities)

    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("transformers is stubbed: only the OpenCLIP embedders run here")

        from_pretrained = classmethod(lambda cls, *a, **k: cls())

    _stub("transformers", T5Tokenizer=Unavailable, T5EncoderModel=Unavailable, CLIPTokenizer=Unavailable,
          CLIPTextModel=Unavailable)
    _stub("cv2")
    _stub("torchvision._meta_registrations")

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
        if attn_bias is not None or p:
            raise NotImplementedError("xformers stand-in: attn_bias=None and p=0 only")
        four_d = query.dim() == 4  # xformers' [batch, tokens, heads, dim]
        if four_d:
            query, key, value = (t.transpose(1, 2) for t in (query, key, value))
        else:  # [batch, tokens, dim]: lift to 4-D so that the CPU flash kernel is used
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, scale=scale)
        return out.transpose(1, 2) if four_d else out.squeeze(0)

    ops = _stub("xformers.ops", memory_efficient_attention=memory_efficient_attention)
    _stub("xformers", ops=ops, __version__="0.0.0+cpu-standin")


class OfficialCode:
    """The official modules, imported from `tree` with the CPU patches in place."""

    def __init__(self, tree: Path) -> None:
        import importlib.util

        import torch

        install_cpu_patches()
        script_dir = tree / "scripts" / "evaluation"
        sys.path.insert(0, str(script_dir))  # inference.py adds sys.path[0]/../.. itself, as when run as a script
        try:
            spec = importlib.util.spec_from_file_location("official_inference", script_dir / "inference.py")
            self.inference = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.inference)
        finally:
            sys.path[:] = [p for p in sys.path if p not in (str(script_dir), os.path.join(str(script_dir), "..", ".."))]
            sys.path.insert(0, str(tree))
        # The official tree's own packages and its venv's omegaconf: not dependencies of this project (this file
        # runs under the official code's interpreter), so they are imported by name.
        import open_clip

        distributions = importlib.import_module("lvdm.distributions")
        ddim = importlib.import_module("lvdm.models.samplers.ddim")
        attention = importlib.import_module("lvdm.modules.attention")
        OmegaConf = importlib.import_module("omegaconf").OmegaConf

        self.ddim, self.open_clip, self.OmegaConf = ddim, open_clip, OmegaConf
        self.Gaussian = distributions.DiagonalGaussianDistribution

        def register_buffer(sampler, name, attr):
            if type(attr) == torch.Tensor:  # noqa: E721  (as the official method tests it)
                attr = attr.to(sampler.model.device)
            setattr(sampler, name, attr)

        ddim.DDIMSampler.register_buffer = register_buffer
        attention.XFORMERS_IS_AVAILBLE = False  # the UNet branch of a CPU install

    def register_clip_archs(self, directory: Path) -> None:
        for file in sorted(directory.glob("*.json")):
            cfg = json.loads(file.read_text())
            if isinstance(cfg, dict) and "vision_cfg" in cfg and "text_cfg" in cfg:
                self.open_clip.factory._MODEL_CONFIGS[file.stem] = cfg

    def build(self, config_path: Path):
        """`instantiate_from_config` of the `model` section, as `run_inference` does (no activation checkpoints)."""
        self.register_clip_archs(config_path.parent)
        model_config = self.OmegaConf.load(config_path).pop("model")
        model_config.params.unet_config.params.use_checkpoint = False
        for key in ("cond_stage_config", "img_cond_stage_config"):
            model_config.params[key].params.version = None
            model_config.params[key].params.device = "cpu"
        return self.inference.instantiate_from_config(model_config)


def redraw_weights(model, seed: int) -> None:
    """Random weights with no zero layer: N(0, 1/fan_in) kernels, 1 + 0.1 N norm scales, 0.05 N biases,
    N(0, 1) mix factors. Buffers (the diffusion schedule) keep their official values."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor") or p.dim() == 0:
                p.normal_(0.0, 1.0, generator=generator)
            elif p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05, generator=generator)
            else:
                p.normal_(1.0, 0.1, generator=generator)


def make_checkpoint(spec: dict) -> dict:
    """The official 512 config with `spec`'s latent size and OpenCLIP arch, random weights, official layout."""
    import torch

    torch.set_num_threads(spec["threads"])
    tree, out_dir = Path(spec["tree"]), Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    code = OfficialCode(tree)
    config = code.OmegaConf.load(tree / "configs" / "inference_512_v1.0.yaml")
    params = config.model.params
    params.image_size = list(spec["latent_size"])
    arch = spec["clip_arch"]
    (out_dir / f"{arch}.json").write_text(json.dumps(spec["clip_config"], indent=1))
    for key in ("cond_stage_config", "img_cond_stage_config"):
        params[key].params.arch = arch
        params[key].params.version = None
    code.OmegaConf.save(config, out_dir / "config.yaml")
    model = code.build(out_dir / "config.yaml")
    redraw_weights(model, spec["seed"])
    state = model.state_dict()
    torch.save({"state_dict": state}, out_dir / "model.ckpt.partial")
    os.replace(out_dir / "model.ckpt.partial", out_dir / "model.ckpt")
    return {"tensors": len(state), "numbers": sum(t.numel() for t in state.values()), "seed": spec["seed"]}


def run(spec: dict) -> dict:
    """Load, then one `image_guided_synthesis --interp` request on the given keyframes and noise."""
    import torch

    torch.set_num_threads(spec["threads"])
    code = OfficialCode(Path(spec["tree"]))
    ckpt_dir = Path(spec["checkpoint_dir"])
    rss_before = rss_mb()

    # 1. load: build, then the official load_model_checkpoint (torch.load of the whole file, strict)
    t0, c0 = time.perf_counter(), cpu_seconds()
    model = code.build(ckpt_dir / "config.yaml")
    model = code.inference.load_model_checkpoint(model, str(ckpt_dir / "model.ckpt"))
    model.eval()
    load_s, load_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    rss_load = rss_mb()

    inputs = torch.load(spec["inputs"], weights_only=True)
    pixels, posterior_noise, x_T = inputs["pixels"], inputs["posterior_noise"], inputs["x_T"]
    frames = x_T.shape[2]
    # the --interp input video of load_data_prompts: key 1 for the first T/2 frames, key 2 for the rest
    video = torch.cat([pixels[0:1, :, None].expand(-1, -1, frames // 2, -1, -1),
                       pixels[1:2, :, None].expand(-1, -1, frames - frames // 2, -1, -1)], dim=2).contiguous()

    clock = StageClock()
    clock.wrap(model, "get_learned_conditioning", "text_encoder")
    clock.wrap(model.embedder, "forward", "image_encoder")
    clock.wrap(model.image_proj_model, "forward", "resampler")
    clock.wrap(model.first_stage_model, "encode", "vae_encode")
    clock.wrap(code.ddim.DDIMSampler, "p_sample_ddim", "step")
    clock.wrap(model, "decode_first_stage", "vae_decode")
    official_sample = code.Gaussian.sample
    code.Gaussian.sample = lambda posterior, noise=None: official_sample(posterior, noise=posterior_noise)

    # 2. one request
    peak_reset = reset_peak_rss()
    t1, c1 = time.perf_counter(), cpu_seconds()
    with torch.no_grad():
        out = code.inference.image_guided_synthesis(
            model, [spec["prompt"]], video, [1, model.model.diffusion_model.out_channels, *x_T.shape[2:]],
            n_samples=1, ddim_steps=spec["steps"], ddim_eta=spec["eta"],
            unconditional_guidance_scale=spec["cfg_scale"], cfg_img=None, fs=spec["motion_steps"], text_input=True,
            multiple_cond_cfg=False, loop=False, interp=True, timestep_spacing="uniform_trailing",
            guidance_rescale=spec["guidance_rescale"], x_T=x_T.clone(),
        )
    request_s, request_cpu_s = time.perf_counter() - t1, cpu_seconds() - c1
    rss_end = rss_mb()
    clock.restore()
    code.Gaussian.sample = official_sample

    torch.save(out[0, 0].unsqueeze(0).float(), spec["video_out"])  # [1, 3, T, H, W]
    return {
        "impl": "official", "dtype": "float32", "load_s": load_s, "load_cpu_s": load_cpu_s,
        "request_s": request_s, "request_cpu_s": request_cpu_s, **clock.summary(),
        "rss_before_load_mb": rss_before["rss_mb"], "rss_after_load_mb": rss_load["rss_mb"],
        "peak_rss_load_mb": rss_load["peak_rss_mb"],
        "peak_rss_request_mb": rss_end["peak_rss_mb"] if peak_reset else None,
        "peak_rss_mb": max(rss_load["peak_rss_mb"], rss_end["peak_rss_mb"]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    command, spec_path, out_path = sys.argv[1:4]
    job = {"run": run, "make-checkpoint": make_checkpoint}[command]
    result = job(json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result, indent=1))
