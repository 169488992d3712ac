"""DDIM for ToonCrafter as pure tensor math: schedule, timesteps, guidance, one step, and the loop.

No `nn.Module` and no network here (and no import of `tooncrafter.model`): the pipeline reads the
schedule buffers from the checkpoint (or builds them from the config), builds a denoiser closure
`denoise(x, t) -> v` around the UNet (one batched cond+uncond pass, then `guide`), and calls
`sample_ddim`. Everything follows section 4.7 of `reference/README.md`, i.e. the official
`DDIMSampler` with `timestep_spacing="uniform_trailing"`, v-prediction and dynamic rescale.

Notation (DDIM, Song et al. 2021, arXiv:2010.02502; v-prediction, Salimans & Ho 2022):
    t, t_prev   the current training timestep and the next (smaller) one the step lands on
    a_t         alphas_cumprod[t] ("alpha bar"), a_prev = alphas_cumprod[t_prev]
    sigma       sigma_t, the DDIM noise level: eta * sqrt((1-a_prev)/(1-a_t) * (1 - a_t/a_prev))
    v           the (guided) network output, v = sqrt(a_t) eps - sqrt(1-a_t) x0
    x0          the predicted clean latent, sqrt(a_t) x - sqrt(1-a_t) v
    eps         the predicted noise, sqrt(a_t) v + sqrt(1-a_t) x
    s_t         scale_arr[t], the dynamic-rescale factor of the training latents (1.0 -> base_scale)
    n           a standard normal draw, one per step
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
"""`denoise(x, t) -> v`: the guided v prediction for latents `x` `[B, C, T, h, w]` at integer timestep `t`."""
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]
"""`noise_fn(step_index, shape) -> n`: the standard normal draw of one step (step 0 is the noisiest)."""

# The official model's `turning_step`: scale_arr falls linearly from 1.0 to base_scale over the first 400 entries.
DEFAULT_TURNING_STEP = 400


# ---------------------------------------------------------------------------------------------------------------
# Training noise schedule
# ---------------------------------------------------------------------------------------------------------------


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1).

    Shift sqrt(alpha bar) so its last value is 0, scale it so its first value is unchanged, and
    convert back to betas. Float64 in, float64 out (the official code does this in numpy float64).
    """
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_betas(
    num_timesteps: int, linear_start: float, linear_end: float, zero_terminal_snr: bool
) -> torch.Tensor:
    """The "linear" (really scaled-linear) LDM beta schedule, float64 `[num_timesteps]`.

    `betas = linspace(sqrt(linear_start), sqrt(linear_end), num_timesteps)^2`, optionally rescaled to
    zero terminal SNR (ToonCrafter: `rescale_betas_zero_snr: True`).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha bar_t = prod_{s<=t} (1 - beta_s), in the dtype of `betas` (float64 for the official values)."""
    return torch.cumprod(1.0 - betas, dim=0)


def make_scale_arr(num_timesteps: int, base_scale: float, turning_step: int = DEFAULT_TURNING_STEP) -> torch.Tensor:
    """The dynamic-rescale table, float32 `[turning_step + num_timesteps]` (1400 for the official model).

    `cat([linspace(1.0, base_scale, turning_step), full(num_timesteps, base_scale)])`, as the official
    `LatentDiffusion.__init__` builds it (it is indexed by timestep, so only its first
    `num_timesteps` entries are ever read).
    """
    ramp = torch.from_numpy(np.linspace(1.0, base_scale, turning_step))
    flat = torch.full((num_timesteps,), base_scale, dtype=torch.float64)
    return torch.cat([ramp, flat]).to(torch.float32)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training schedule tensors the sampler reads, all float32 `[num_train_timesteps]` on the CPU.

    `scale_arr` is None when the model does not use dynamic rescale (then every ratio is 1).
    """

    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    scale_arr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.alphas_cumprod.shape[0]
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected ({n},)")
        if self.scale_arr is not None and self.scale_arr.shape[0] < n:
            raise ValueError(f"scale_arr has {self.scale_arr.shape[0]} entries, fewer than the {n} timesteps")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_buffers(cls, buffers: Mapping[str, torch.Tensor]) -> "NoiseSchedule":
        """From the checkpoint's top-level buffers (`checkpoint.schedule_buffers(state)`).

        Needs `alphas_cumprod`; the square roots are taken from the buffers when present (they are
        float32 roundings of float64 roots, which float32 `sqrt` does not always reproduce) and
        computed in float64 otherwise; `scale_arr` absent means no dynamic rescale.
        """
        if "alphas_cumprod" not in buffers:
            raise ValueError(f"schedule buffers lack 'alphas_cumprod' (have: {sorted(buffers)})")
        abar = buffers["alphas_cumprod"].detach().to("cpu", torch.float32)
        abar64 = abar.double()

        def buffer_or(name: str, fallback: torch.Tensor) -> torch.Tensor:
            value = buffers.get(name)
            return (value if value is not None else fallback).detach().to("cpu", torch.float32)

        scale_arr = buffers.get("scale_arr")
        return cls(
            alphas_cumprod=abar,
            sqrt_alphas_cumprod=buffer_or("sqrt_alphas_cumprod", abar64.sqrt()),
            sqrt_one_minus_alphas_cumprod=buffer_or("sqrt_one_minus_alphas_cumprod", (1.0 - abar64).sqrt()),
            scale_arr=None if scale_arr is None else scale_arr.detach().to("cpu", torch.float32),
        )

    @classmethod
    def from_config(cls, diffusion_config: Any) -> "NoiseSchedule":
        """From a `DiffusionConfig`-like object (read duck-typed: `timesteps`, `linear_start`, `linear_end`,
        `rescale_betas_zero_snr`, `use_dynamic_rescale`, `base_scale`, optional `turning_step`)."""
        c = diffusion_config
        return cls.from_values(
            num_timesteps=c.timesteps,
            linear_start=c.linear_start,
            linear_end=c.linear_end,
            zero_terminal_snr=c.rescale_betas_zero_snr,
            use_dynamic_rescale=c.use_dynamic_rescale,
            base_scale=c.base_scale,
            turning_step=getattr(c, "turning_step", DEFAULT_TURNING_STEP),
        )

    @classmethod
    def from_values(
        cls,
        num_timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        zero_terminal_snr: bool = True,
        use_dynamic_rescale: bool = True,
        base_scale: float = 0.7,
        turning_step: int = DEFAULT_TURNING_STEP,
    ) -> "NoiseSchedule":
        """From plain numbers (defaults: the released 512 model). Float64 math, stored as float32, as officially."""
        abar64 = alphas_cumprod_from_betas(make_betas(num_timesteps, linear_start, linear_end, zero_terminal_snr))
        return cls(
            alphas_cumprod=abar64.to(torch.float32),
            sqrt_alphas_cumprod=abar64.sqrt().to(torch.float32),
            sqrt_one_minus_alphas_cumprod=(1.0 - abar64).sqrt().to(torch.float32),
            scale_arr=make_scale_arr(num_timesteps, base_scale, turning_step) if use_dynamic_rescale else None,
        )


# ---------------------------------------------------------------------------------------------------------------
# DDIM sampling schedule
# ---------------------------------------------------------------------------------------------------------------


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The "uniform_trailing" DDIM timesteps, int64 `[num_steps]`, ascending (N=5 -> 199, 399, 599, 799, 999).

    `round(arange(T, 0, -T/N)) - 1` with numpy's round-half-to-even (it matters, e.g. N=16), always
    starting at T-1. One deliberate difference from the official code: for some N (61, 103, 121, ...)
    float error makes numpy's `arange` yield an extra value ~1e-13 that the official sampler turns
    into a bogus step at t = -1 (which wraps to t = 999); we keep exactly N steps.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    spacing = num_train_timesteps / num_steps
    grid = np.arange(num_train_timesteps, 0, -spacing)[:num_steps]
    ts = np.flip(np.round(grid)).astype(np.int64) - 1
    return torch.from_numpy(ts.copy())


@dataclass(frozen=True)
class DDIMStep:
    """The scalars of one DDIM step, each already rounded to float32 (held as Python floats).

    `sqrt_alpha` / `sqrt_one_minus_alpha` are the schedule's `sqrt_alphas_cumprod[t]` /
    `sqrt_one_minus_alphas_cumprod[t]`; `dir_coef = sqrt(max(0, 1 - a_prev - sigma^2))`;
    `scale_ratio = s_{t_prev} / s_t` (1 on the last step and without dynamic rescale).
    """

    index: int  # 0 is the first (noisiest) step
    t: int
    t_prev: int  # 0 on the last step, whose a_prev is alphas_cumprod[0]
    alpha: float  # a_t
    alpha_prev: float  # a_prev
    sigma: float
    sqrt_alpha: float
    sqrt_one_minus_alpha: float
    sqrt_alpha_prev: float
    dir_coef: float
    scale_ratio: float


@dataclass(frozen=True, eq=False)
class DDIMPlan:
    """Every per-step quantity of one DDIM run, float32/int64 tensors `[N]` in sampling order (t = T-1 first).

    The official sampler stores the same arrays in ascending order (`ddim_timesteps`, `ddim_alphas`, ...):
    `plan.timesteps.flip(0)` is its `ddim_timesteps`, and so on.
    """

    eta: float
    timesteps: torch.Tensor  # t
    prev_timesteps: torch.Tensor  # t_prev (0 for the last step)
    alphas: torch.Tensor  # a_t
    alphas_prev: torch.Tensor  # a_prev
    sigmas: torch.Tensor  # sigma
    scale_arr: torch.Tensor  # s_t (ones without dynamic rescale)
    scale_arr_prev: torch.Tensor  # s_{t_prev}, the first step repeating s_t as officially
    scale_ratios: torch.Tensor  # s_{t_prev} / s_t
    sqrt_alphas: torch.Tensor  # sqrt_alphas_cumprod[t]
    sqrt_one_minus_alphas: torch.Tensor  # sqrt_one_minus_alphas_cumprod[t]
    sqrt_alphas_prev: torch.Tensor  # sqrt(a_prev), float32 sqrt
    dir_coefs: torch.Tensor  # sqrt(max(0, 1 - a_prev - sigma^2)), float32

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __getitem__(self, i: int) -> DDIMStep:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"step {i} out of range for a {n}-step plan")
        i %= n
        return DDIMStep(
            index=i,
            t=int(self.timesteps[i]),
            t_prev=int(self.prev_timesteps[i]),
            alpha=float(self.alphas[i]),
            alpha_prev=float(self.alphas_prev[i]),
            sigma=float(self.sigmas[i]),
            sqrt_alpha=float(self.sqrt_alphas[i]),
            sqrt_one_minus_alpha=float(self.sqrt_one_minus_alphas[i]),
            sqrt_alpha_prev=float(self.sqrt_alphas_prev[i]),
            dir_coef=float(self.dir_coefs[i]),
            scale_ratio=float(self.scale_ratios[i]),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def ddim_schedule(schedule: NoiseSchedule, num_steps: int, eta: float) -> DDIMPlan:
    """Build the per-step DDIM quantities for `num_steps` trailing steps at stochasticity `eta`.

    Reproduces the official `make_schedule` bit for bit: a_t and a_prev are the float32 buffer
    values, sigma is computed in float64 from them and rounded to float32, the rescale ratio is a
    float32 division. The one change is the clamp in `dir_coefs` (see `ddim_step`).
    """
    if not eta >= 0.0 or math.isinf(eta):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    abar = schedule.alphas_cumprod
    ts_up = ddim_timesteps(num_steps, schedule.num_train_timesteps)  # ascending, as the official arrays

    # 1. a_t and a_prev (float32 buffer values); the smallest t steps to alphas_cumprod[0]
    prev_up = torch.cat([ts_up.new_zeros(1), ts_up[:-1]])
    alphas_up = abar[ts_up]
    alphas_prev_up = abar[prev_up]

    # 2. sigma_t, DDIM eq. (16): float64 from the float32 alphas, then float32. The official code mixes numpy
    #    and torch, so 1/(1 - a_t) alone is formed in float32 (torch's `__rtruediv__` is reciprocal-then-
    #    multiply); doing the same keeps sigma bit-identical.
    a64, ap64 = alphas_up.double(), alphas_prev_up.double()
    inv_one_minus_a = (1.0 - alphas_up).reciprocal().double()
    sigmas_up = (eta * torch.sqrt((1.0 - ap64) * inv_one_minus_a * (1.0 - a64 / ap64))).to(torch.float32)

    # 3. dynamic rescale s_{t_prev}/s_t; the official "prev" array repeats its first entry, so ratio 1 at the end
    if schedule.scale_arr is not None:
        scale_up = schedule.scale_arr[ts_up]
        scale_prev_up = torch.cat([scale_up[:1], scale_up[:-1]])
    else:
        scale_up = torch.ones(num_steps, dtype=torch.float32)
        scale_prev_up = scale_up.clone()
    ratios_up = scale_prev_up / scale_up

    # 4. coefficients of x_prev in float32; the direction term is clamped at 0 (official NaN bug, see ddim_step)
    sqrt_alphas_prev_up = alphas_prev_up.sqrt()
    dir_coefs_up = (1.0 - alphas_prev_up - sigmas_up**2).clamp_min(0.0).sqrt()

    def down(x: torch.Tensor) -> torch.Tensor:  # ascending (official storage) -> sampling order
        return x.flip(0).contiguous()

    return DDIMPlan(
        eta=float(eta),
        timesteps=down(ts_up),
        prev_timesteps=down(prev_up),
        alphas=down(alphas_up),
        alphas_prev=down(alphas_prev_up),
        sigmas=down(sigmas_up),
        scale_arr=down(scale_up),
        scale_arr_prev=down(scale_prev_up),
        scale_ratios=down(ratios_up),
        sqrt_alphas=down(schedule.sqrt_alphas_cumprod[ts_up]),
        sqrt_one_minus_alphas=down(schedule.sqrt_one_minus_alphas_cumprod[ts_up]),
        sqrt_alphas_prev=down(sqrt_alphas_prev_up),
        dir_coefs=down(dir_coefs_up),
    )


# ---------------------------------------------------------------------------------------------------------------
# Guidance and the step
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half-precision latents are stepped in float32 and cast back."""
    return torch.promote_types(dtype, torch.float32)


def guide(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None,
    cfg_scale: float,
    guidance_rescale: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022) plus guidance rescale (Lin et al. 2023, section 3.4).

    `v_cfg = v_u + w (v_c - v_u)`; `v_guided = phi * v_cfg * std(v_c)/std(v_cfg) + (1 - phi) * v_cfg`,
    std unbiased over all non-batch dims, per batch element. Inputs `[B, C, T, h, w]`. Returns
    `(v_cfg, v_guided)` in the input dtype. With `cfg_scale == 1` there is no guidance at all (the
    official sampler skips the unconditional pass and the rescale), `v_uncond` may be None and both
    outputs are `v_cond`.
    """
    if cfg_scale == 1.0:
        return v_cond, v_cond
    if v_uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs v_uncond (only cfg_scale == 1 runs without it)")
    if v_uncond.shape != v_cond.shape:
        raise ValueError(f"v_cond {tuple(v_cond.shape)} and v_uncond {tuple(v_uncond.shape)} differ in shape")
    dtype = v_cond.dtype
    work = _compute_dtype(dtype)
    vc, vu = v_cond.to(work), v_uncond.to(work)
    v_cfg = vu + cfg_scale * (vc - vu)
    if guidance_rescale <= 0.0:
        return v_cfg.to(dtype), v_cfg.to(dtype)
    dims = list(range(1, v_cfg.ndim))
    std_cond = vc.std(dim=dims, keepdim=True)
    std_cfg = v_cfg.std(dim=dims, keepdim=True)
    v_guided = guidance_rescale * (v_cfg * (std_cond / std_cfg)) + (1 - guidance_rescale) * v_cfg
    return v_cfg.to(dtype), v_guided.to(dtype)


def ddim_step(
    v: torch.Tensor, x: torch.Tensor, step: DDIMStep, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from `x` at `step.t` to `x_prev` at `step.t_prev`; returns `(x_prev, x0)`.

    `v`, `x`, `noise`: `[B, C, T, h, w]`. Computed in (at least) float32 and returned in `x.dtype`.
    `noise` is the step's standard normal draw n (multiplied by sigma); it may be None only when
    sigma is 0.

    Fix of an official bug: at t = T-1 (a_t = 0) with eta = 1, sigma^2 = 1 - a_prev exactly, and
    `1 - a_prev - sigma^2` rounds to -6e-8 in float32 for N in {7, 11, 14, 15, 20, 25, ...}, so the
    official sampler's square root returns an all-NaN latent. The plan's `dir_coef` clamps that term at
    0, which equals the official result wherever the latter is finite.
    """
    if noise is None and step.sigma != 0.0:
        raise ValueError(f"step {step.index} (t={step.t}) has sigma={step.sigma}: it needs a noise tensor")
    work = _compute_dtype(x.dtype)
    xw, vw = x.to(work), v.to(work)

    # 1. x0 and eps from v: x0 = sqrt(a_t) x - sqrt(1-a_t) v, eps = sqrt(a_t) v + sqrt(1-a_t) x
    x0 = step.sqrt_alpha * xw - step.sqrt_one_minus_alpha * vw
    eps = step.sqrt_alpha * vw + step.sqrt_one_minus_alpha * xw

    # 2. dynamic rescale of x0 by s_{t_prev}/s_t (eps is deliberately not recomputed, as officially)
    x0 = x0 * step.scale_ratio

    # 3. direction pointing to x_t, DDIM eq. (12): sqrt(1 - a_prev - sigma^2) eps (clamped, see above)
    dir_xt = step.dir_coef * eps

    # 4. x_prev = sqrt(a_prev) x0 + dir_xt + sigma n
    x_prev = step.sqrt_alpha_prev * x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + step.sigma * noise.to(device=x.device, dtype=work)
    return x_prev.to(x.dtype), x0.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Noise and the loop
# ---------------------------------------------------------------------------------------------------------------


def randn_tensor(
    shape: Sequence[int], generator: torch.Generator, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """A standard normal tensor drawn in float32 on the generator's device, then moved to `device`/`dtype`.

    With a CPU generator (the pipeline's choice) one seed gives the same numbers on every device
    and in every dtype (up to the final rounding), like diffusers' `randn_tensor` and flux's `get_noise`.
    """
    n = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return n.to(device=device, dtype=dtype)


def generator_noise(generator: torch.Generator, device: torch.device | str, dtype: torch.dtype) -> NoiseFn:
    """A `noise_fn` drawing each step's normal from `generator` (one draw per step, whatever eta is)."""

    def noise_fn(step_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        return randn_tensor(shape, generator, device, dtype)

    return noise_fn


def replay_noise(noises: Sequence[torch.Tensor]) -> NoiseFn:
    """A `noise_fn` that returns given tensors (e.g. a fixture's `step{i}_noise`) in step order."""

    def noise_fn(step_index: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = noises[step_index]
        if tuple(n.shape) != tuple(shape):
            raise ValueError(f"replayed noise {step_index} has shape {tuple(n.shape)}, expected {tuple(shape)}")
        return n

    return noise_fn


@dataclass(frozen=True)
class DDIMStepOutput:
    """What one step saw and made, handed to `sample_ddim`'s `callback` (progress, cancel, the parity tool)."""

    index: int  # 0-based; the step count so far is index + 1
    total: int  # the plan's number of steps
    t: int
    x: torch.Tensor  # the step's input latent
    v: torch.Tensor  # the denoiser output (already guided)
    noise: torch.Tensor | None
    x0: torch.Tensor  # after dynamic rescale
    x_prev: torch.Tensor


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    plan: DDIMPlan,
    noise_fn: NoiseFn | None = None,
    callback: Callable[[DDIMStepOutput], None] | None = None,
) -> torch.Tensor:
    """Run the DDIM loop from `x_T` `[B, C, T, h, w]`; returns the final latent x_0 (same shape and dtype).

    `denoise(x, t)` returns the guided v at integer timestep t. `noise_fn(i, shape)` is called once
    per step, after the denoiser, also when sigma is 0 (as the official sampler draws), so a
    generator advances the same way for every eta; None is allowed only when every sigma is 0.
    `callback` receives a `DDIMStepOutput` after each step; an exception it raises (a cancel) stops the loop.
    """
    if noise_fn is None and bool((plan.sigmas != 0).any()):
        raise ValueError(f"eta={plan.eta} gives non-zero sigmas: sample_ddim needs a noise_fn")
    n = len(plan)
    x = x_T
    for i, step in enumerate(plan):
        v = denoise(x, step.t)
        noise = noise_fn(i, tuple(x.shape)) if noise_fn is not None else None
        x_prev, x0 = ddim_step(v, x, step, noise)
        if callback is not None:
            callback(DDIMStepOutput(index=i, total=n, t=step.t, x=x, v=v, noise=noise, x0=x0, x_prev=x_prev))
        x = x_prev
    return x
