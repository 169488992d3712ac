"""`tooncrafter parity`: run every stage a fixture directory has inputs for and compare with it.

Each stage names the fixture tensors it reads; a stage whose inputs the fixture lacks (or that needs
CLIP towers the checkpoint does not have) is reported as skipped, never failed and never faked.
The computed tensors are kept under the fixture's own key names for `--dump`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from tooncrafter.conditioning import ConditionEncoder, Conditioning
from tooncrafter.decoding import decode_latents
from tooncrafter.denoising import GUIDANCE_RESCALE, noise_schedule, unet_velocities
from tooncrafter.fixtures import (
    FIXTURE_CFG_SCALE,
    FIXTURE_FS,
    GUIDED_TOLERANCE,
    PIPELINE_TOLERANCE,
    SCHEDULE_TOLERANCE,
    Comparison,
    FixtureSet,
    compare,
    skipped,
)
from tooncrafter.media.tensors import preprocess_keyframe
from tooncrafter.model.checkpoint import read_state_dict
from tooncrafter.model.clip import ImageEncoder, TextEncoder
from tooncrafter.model.loader import ToonCrafterComponents, load_components
from tooncrafter.model.vae import EncoderOutput
from tooncrafter.placement import Placement
from tooncrafter.sampling import DDIMStepOutput, ddim_schedule, guide, replay_noise, sample_ddim

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuidanceRecord:
    """One step's guided denoiser internals."""

    t: int
    v_cond: torch.Tensor
    v_uncond: torch.Tensor | None
    v_cfg: torch.Tensor
    v_guided: torch.Tensor


@dataclass
class ReplayedRun:
    """A fixture pipeline run (`eta0`, `eta1`) redone from the fixture's own noise, with every intermediate."""

    cond: Conditioning
    guidance: list[GuidanceRecord]
    steps: list[DDIMStepOutput]
    video: torch.Tensor  # [1, 3, T, H, W]


def fixture_run_steps(f: FixtureSet, run: str) -> int:
    """How many DDIM steps the fixture recorded for `run`."""
    return len([k for k in f.tensors if k.startswith(f"pipe_{run}_step") and k.endswith("_x_prev")])


@torch.no_grad()
def replay_fixture_run(components: ToonCrafterComponents, placement: Placement, f: FixtureSet, run: str) -> ReplayedRun:
    """The pipeline's steps composed on the fixture's inputs: its keyframes, posterior noise, x_T and step noise
    (and its CLIP embeddings when the checkpoint has no CLIP towers), recording what each step made."""
    frames = components.config.num_frames
    steps, eta = fixture_run_steps(f, run), float(run[3:])
    pixels = torch.cat([f["pipe_keyframe_1"], f["pipe_keyframe_2"]])
    windows = [(0, 1)]
    encoder = ConditionEncoder(components, placement)
    latents, hidden = encoder.encode_keyframes(pixels, f["pipe_vae_posterior_noise"][[0, frames - 1]])
    if components.has_clip:
        text = encoder.text_context(f.meta.get("pipeline_prompt", ""), len(windows), True)
        tokens = encoder.window_image_tokens(pixels, windows, True)
    else:
        text = (f["pipe_text_emb_cond"], f["pipe_text_emb_uncond"])
        tokens = (f["pipe_clip_image_tokens_cond"], f["pipe_clip_image_tokens_uncond"])
    fs = int(f["pipe_fs"][0]) if "pipe_fs" in f.tensors else FIXTURE_FS
    cond = encoder.assemble(latents, hidden, windows, text, tokens, fs)

    velocities = unet_velocities(components.unet, cond, placement.dtype)
    guidance: list[GuidanceRecord] = []

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        v_cond, v_uncond = velocities(x, t)
        v_cfg, v_guided = guide(v_cond, v_uncond, FIXTURE_CFG_SCALE, GUIDANCE_RESCALE)
        guidance.append(GuidanceRecord(t=t, v_cond=v_cond, v_uncond=v_uncond, v_cfg=v_cfg, v_guided=v_guided))
        return v_guided

    x_T = f["pipe_x_T"]
    if f.has(f"pipe_{run}_step0_noise"):
        step_noise = [f[f"pipe_{run}_step{i}_noise"].to(placement.device) for i in range(steps)]
    else:  # eta = 0: every sigma is 0, the draws are multiplied away
        step_noise = [torch.zeros_like(x_T, device=placement.device)] * steps
    plan = ddim_schedule(noise_schedule(components), steps, eta)
    recorded: list[DDIMStepOutput] = []
    final = sample_ddim(denoise, x_T.to(placement.device), plan, replay_noise(step_noise), callback=recorded.append)
    video = decode_latents(
        components.vae, final, cond.ref_context, scale_factor=components.config.diffusion.scale_factor, placement=placement
    )
    return ReplayedRun(cond=cond, guidance=guidance, steps=recorded, video=video)


@dataclass
class ParityReport:
    rows: list[Comparison] = field(default_factory=list)
    computed: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed or r.skipped for r in self.rows)

    def check(self, name: str, ours: torch.Tensor, ref: torch.Tensor, tolerance: float | None = None) -> None:
        self.computed[name] = ours.detach().cpu().contiguous()
        self.rows.append(compare(name, ours, ref, tolerance))

    def skip(self, names: list[str], reason: str) -> None:
        self.rows.extend(skipped(n, reason) for n in names)


class _Stages:
    """The stages, sharing one set of loaded components."""

    def __init__(self, fixtures: FixtureSet, components: ToonCrafterComponents, report: ParityReport) -> None:
        self.f = fixtures
        self.c = components
        self.report = report
        self.placement = Placement(torch.device("cpu"), torch.float32)
        self._keyframe_encoding: EncoderOutput | None = None

    def _encode_keyframes(self) -> EncoderOutput:
        """The VAE posterior of the two fixture keyframes, computed once for the VAE and pipeline stages."""
        if self._keyframe_encoding is None:
            with torch.no_grad():
                self._keyframe_encoding = self.c.vae.encode(torch.cat([self.f["pipe_keyframe_1"], self.f["pipe_keyframe_2"]]))
        return self._keyframe_encoding

    def _needs(self, inputs: list[str], outputs: list[str], clip: bool = False) -> bool:
        present_outputs = [o for o in outputs if o in self.f.tensors]
        missing = [i for i in inputs if i not in self.f.tensors]
        if missing:
            self.report.skip(present_outputs or outputs, f"fixture lacks {', '.join(missing)}")
            return False
        if clip and not self.c.has_clip:
            self.report.skip(present_outputs or outputs, "checkpoint has no CLIP towers")
            return False
        return True

    def unet(self) -> None:
        f = self.f
        names = ["unet_x_noisy", "unet_c_concat", "unet_timesteps", "unet_context", "unet_fs"]
        if not self._needs(names, ["unet_out", "unet_out_fs_default_batch1"]):
            return
        x = torch.cat([f["unet_x_noisy"], f["unet_c_concat"]], dim=1)
        with torch.no_grad():
            out = self.c.unet(x, f["unet_timesteps"], f["unet_context"], f["unet_fs"])
            self.report.check("unet_out", out, f["unet_out"])
            if "unet_out_fs_default_batch1" in f.tensors:
                one = self.c.unet(x[1:2], f["unet_timesteps"][1:2], f["unet_context"][1:2], None)
                self.report.check("unet_out_fs_default_batch1", one, f["unet_out_fs_default_batch1"])

    def vae(self) -> None:
        f = self.f
        outputs = [k for k in f.tensors if k.startswith("vae_enc_") and k != "vae_enc_noise"]
        if not self._needs(["pipe_keyframe_1", "pipe_keyframe_2"], outputs + ["vae_dec_out"]):
            return
        scale = self.c.config.diffusion.scale_factor
        with torch.no_grad():
            enc = self._encode_keyframes()
            ours = {
                "vae_enc_moments": enc.moments,
                "vae_enc_mean": enc.mean,
                "vae_enc_logvar_clamped": enc.logvar,
                "vae_enc_std": enc.std,
                "vae_enc_z_mode_scaled": scale * enc.mode(),
            }
            if "vae_enc_noise" in f.tensors:
                ours["vae_enc_z_scaled"] = scale * enc.sample(f["vae_enc_noise"])
            for i, hidden in enumerate(enc.hidden_states):
                ours[f"vae_enc_hidden_{i}"] = hidden
            for name in sorted(ours):
                if name in f.tensors:
                    self.report.check(name, ours[name], f[name])
            if "vae_dec_z" in f.tensors and "vae_dec_out" in f.tensors:
                refs = [torch.stack([h[0:1], h[1:2]], dim=2) for h in enc.hidden_states]
                out = self.c.vae.decode(f["vae_dec_z"] / scale, refs, chunk_frames=self.c.config.num_frames)
                self.report.check("vae_dec_out", out, f["vae_dec_out"])

    def resampler(self) -> None:
        if not self._needs(["resampler_in"], ["resampler_out"]):
            return
        with torch.no_grad():
            self.report.check("resampler_out", self.c.resampler(self.f["resampler_in"]), self.f["resampler_out"])

    def _weightless_clip(self) -> tuple[TextEncoder, ImageEncoder] | None:
        """The CLIP towers built on `meta`: enough for the tokenizer and the preprocessing, which need no weights.
        None when the OpenCLIP architecture is unknown (a custom arch whose json is not beside the config)."""
        try:
            with torch.device("meta"):
                return TextEncoder(self.c.config.text_encoder), ImageEncoder(self.c.config.image_encoder)
        except ValueError as exc:
            logger.info("no CLIP towers to tokenize or preprocess with: %s", exc)
            return None

    def clip_text(self) -> None:
        f = self.f
        prompts = f.meta.get("clip_text_prompts")
        outputs = ["clip_text_tokens", "clip_text_out"]
        if prompts is None:
            self.report.skip(outputs, "fixture meta lacks clip_text_prompts")
            return
        towers = None if self.c.text_encoder is not None else self._weightless_clip()
        encoder = self.c.text_encoder or (towers[0] if towers else None)
        if encoder is None:
            self.report.skip(outputs, "no CLIP towers and no OpenCLIP config for the tokenizer")
            return
        tokens = encoder.tokenize(list(prompts))
        if "clip_text_tokens" in f.tensors:
            self.report.check("clip_text_tokens", tokens, f["clip_text_tokens"])
        if "clip_text_out" in f.tensors and self._needs([], ["clip_text_out"], clip=True):
            with torch.no_grad():
                self.report.check("clip_text_out", encoder(tokens), f["clip_text_out"])

    def clip_image(self) -> None:
        f = self.f
        if not self._needs(["pipe_keyframe_1", "pipe_keyframe_2"], ["clip_image_preprocessed_0", "clip_image_tokens"]):
            return
        towers = None if self.c.image_encoder is not None else self._weightless_clip()
        encoder = self.c.image_encoder or (towers[1] if towers else None)
        if encoder is None:
            self.report.skip(["clip_image_preprocessed_0", "clip_image_tokens"], "no CLIP towers and no OpenCLIP config")
            return
        images = torch.cat([f["pipe_keyframe_1"], f["pipe_keyframe_2"], torch.zeros_like(f["pipe_keyframe_1"])])
        with torch.no_grad():
            if "clip_image_preprocessed_0" in f.tensors:
                self.report.check("clip_image_preprocessed_0", encoder.preprocess(images[:1]), f["clip_image_preprocessed_0"])
            if "clip_image_tokens" in f.tensors and self._needs([], ["clip_image_tokens"], clip=True):
                self.report.check("clip_image_tokens", encoder(images), f["clip_image_tokens"])

    def preprocessing(self) -> None:
        f = self.f
        if not self._needs(["preproc_src_uint8_hwc"], ["pipe_keyframe_1", "pipe_keyframe_2"]):
            return
        height, width = self.c.config.pixel_size
        for i in range(f["preproc_src_uint8_hwc"].shape[0]):
            name = f"pipe_keyframe_{i + 1}"
            if name in f.tensors:
                ours = preprocess_keyframe(Image.fromarray(f["preproc_src_uint8_hwc"][i].numpy()), height, width)
                self.report.check(name, ours.unsqueeze(0), f[name])

    def pipeline_runs(self) -> None:
        f = self.f
        runs = sorted({k.split("_")[1] for k in f.tensors if k.startswith("pipe_eta") and "_step" in k})
        required = ["pipe_keyframe_1", "pipe_keyframe_2", "pipe_x_T", "pipe_vae_posterior_noise"]
        pipe_outputs = [k for k in f.tensors if k.startswith("pipe_") and k not in required and not k.startswith("pipe_keyframe")]
        if not self._needs(required, pipe_outputs):
            return
        have_clip = self.c.has_clip
        if not have_clip and not f.has("pipe_text_emb_cond", "pipe_text_emb_uncond", "pipe_clip_image_tokens_cond", "pipe_clip_image_tokens_uncond"):
            self.report.skip(pipe_outputs, "no CLIP towers and the fixture lacks the pipeline embeddings")
            return
        shared_done = False
        for run in runs:  # "eta0", "eta1"
            if float(run[3:]) > 0 and not f.has(f"pipe_{run}_step0_noise"):
                self.report.skip([k for k in pipe_outputs if k.startswith(f"pipe_{run}_")], "fixture lacks the step noise")
                continue
            replayed = replay_fixture_run(self.c, self.placement, f, run)
            if not shared_done:
                shared_done = True
                self._shared_pipeline_checks(replayed.cond, f["pipe_vae_posterior_noise"])
            self._schedule_checks(run, fixture_run_steps(f, run), float(run[3:]))
            for i, (g, s) in enumerate(zip(replayed.guidance, replayed.steps)):
                prefix = f"pipe_{run}_step{i}_"
                ours = {
                    "t": torch.tensor([s.t]), "v_cond": g.v_cond, "v_uncond": g.v_uncond, "v_cfg": g.v_cfg,
                    "v_guided": g.v_guided, "pred_x0": s.x0, "x_prev": s.x_prev,
                }
                for key, value in ours.items():
                    name = prefix + key
                    if name in f.tensors and value is not None:
                        tol = GUIDED_TOLERANCE if key in ("v_cfg", "v_guided") else PIPELINE_TOLERANCE
                        self.report.check(name, value, f[name], None if key == "t" else tol)
            name = f"pipe_{run}_video_out"
            if name in f.tensors:
                self.report.check(name, replayed.video[0], f[name], PIPELINE_TOLERANCE)

    def _shared_pipeline_checks(self, cond: Conditioning, posterior_noise: torch.Tensor) -> None:
        f = self.f
        frames = self.c.config.num_frames
        if "pipe_z_all_frames" in f.tensors:
            # the official code encodes all T frames (key 1 repeated T/2 times, then key 2); the encoder is per
            # frame, so encoding the two distinct keyframes once and sampling with each frame's noise is the same
            enc = self._encode_keyframes()
            which = torch.tensor([0] * (frames // 2) + [1] * (frames - frames // 2))
            z = self.c.config.diffusion.scale_factor * (enc.mean[which] + enc.std[which] * posterior_noise)
            self.report.check("pipe_z_all_frames", z.permute(1, 0, 2, 3).unsqueeze(0), f["pipe_z_all_frames"], PIPELINE_TOLERANCE)
        ours = {
            "pipe_c_concat": cond.c_concat,
            "pipe_text_emb_cond": cond.text[0],
            "pipe_text_emb_uncond": cond.text[1],
            "pipe_resampler_out_cond": cond.image[0],
            "pipe_resampler_out_uncond": cond.image[1],
            "pipe_context_cond": cond.context_cond,
            "pipe_context_uncond": cond.context_uncond,
        }
        for fixture_name, value in ours.items():
            if fixture_name in f.tensors and value is not None:
                self.report.check(fixture_name, value, f[fixture_name], PIPELINE_TOLERANCE)
        if not self.c.has_clip:
            given = ["pipe_text_emb_cond", "pipe_text_emb_uncond", "pipe_clip_image_tokens_cond", "pipe_clip_image_tokens_uncond"]
            self.report.skip([n for n in given if n in f.tensors], "used as input: the checkpoint has no CLIP towers")
        else:
            with torch.no_grad():
                for suffix, image in (("cond", f["pipe_keyframe_1"]), ("uncond", torch.zeros_like(f["pipe_keyframe_1"]))):
                    name = f"pipe_clip_image_tokens_{suffix}"
                    if name in f.tensors:
                        self.report.check(name, self.c.image_encoder(image), f[name], PIPELINE_TOLERANCE)

    def _schedule_checks(self, run: str, steps: int, eta: float) -> None:
        f = self.f
        plan = ddim_schedule(noise_schedule(self.c), steps, eta)
        ascending = {
            "ddim_timesteps": plan.timesteps.flip(0),
            "ddim_alphas": plan.alphas.flip(0),
            "ddim_alphas_prev": plan.alphas_prev.flip(0),
            "ddim_sigmas": plan.sigmas.flip(0),
            "ddim_scale_arr": plan.scale_arr.flip(0),
            "ddim_scale_arr_prev": plan.scale_arr_prev.flip(0),
        }
        for key, value in ascending.items():
            name = f"pipe_{run}_sched_{key}"
            if name in f.tensors:
                self.report.check(name, value, f[name], None if key == "ddim_timesteps" else SCHEDULE_TOLERANCE)


STAGES: tuple[Callable[[_Stages], None], ...] = (
    _Stages.unet,
    _Stages.vae,
    _Stages.resampler,
    _Stages.clip_text,
    _Stages.clip_image,
    _Stages.preprocessing,
    _Stages.pipeline_runs,
)


def run_parity(fixture_dir: str | Path, *, dump: str | Path | None = None) -> ParityReport:
    """Load the fixture's own config and checkpoint, run every stage, optionally dump what was computed."""
    fixtures = FixtureSet.load(fixture_dir)
    state = read_state_dict(fixtures.checkpoint_path)
    components = load_components(fixtures.config, state, device="cpu", dtype=torch.float32)
    report = ParityReport()
    stages = _Stages(fixtures, components, report)
    for stage in STAGES:
        stage(stages)
    if dump is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in report.computed.items()}, str(dump))
    return report


def format_report(rows: list[Comparison]) -> str:
    """A fixed-width table: tensor, shape, max abs error, tolerance, verdict."""
    lines = [f"{'tensor':<40} {'shape':<22} {'max abs err':>12} {'tolerance':>10}  result", "-" * 96]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.name:<40} {'':<22} {'':>12} {'':>10}  skipped ({r.skipped})")
            continue
        verdict = "ok" if r.passed else "FAIL"
        lines.append(f"{r.name:<40} {str(list(r.shape)):<22} {r.max_abs_error:>12.3e} {r.tolerance:>10.1e}  {verdict}")
    failed = sum(1 for r in rows if not r.passed and not r.skipped)
    skipped_count = sum(1 for r in rows if r.skipped)
    lines.append("-" * 96)
    lines.append(f"parity: {len(rows) - failed - skipped_count} within tolerance, {failed} over, {skipped_count} skipped")
    return "\n".join(lines)
