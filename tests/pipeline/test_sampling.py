"""DDIM schedule, guidance and step against the official numbers (schedule.safetensors, fixture pipeline runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tooncrafter.fixtures import (
    GUIDED_TOLERANCE,
    PIPELINE_TOLERANCE,
    SCHEDULE_TOLERANCE,
    FixtureSet,
    compare,
    fixtures_dir_from_env,
)
from tooncrafter.model.checkpoint import read_state_dict, schedule_buffers
from tooncrafter.model.config import builtin_config
from tooncrafter.sampling import (
    DDIMStepOutput,
    NoiseSchedule,
    alphas_cumprod_from_betas,
    ddim_schedule,
    ddim_step,
    ddim_timesteps,
    generator_noise,
    guide,
    make_betas,
    make_scale_arr,
    randn_tensor,
    replay_noise,
    sample_ddim,
)

SCHEDULE_FILE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "schedule.safetensors"
REF_CFG_SCALE = 7.5  # the fixture pipeline's guidance (reference README section 3)
REF_GUIDANCE_RESCALE = 0.7


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def reference_schedule() -> dict[str, torch.Tensor]:
    if not SCHEDULE_FILE.is_file():
        pytest.skip(f"{SCHEDULE_FILE} not found")
    return load_file(str(SCHEDULE_FILE))


@pytest.fixture(scope="module")
def fixture_set() -> FixtureSet:
    return FixtureSet.load(fixtures_dir_from_env())


@pytest.fixture(scope="module")
def checkpoint_schedule(fixture_set: FixtureSet) -> NoiseSchedule:
    return NoiseSchedule.from_buffers(schedule_buffers(read_state_dict(fixture_set.checkpoint_path)))


def reference_step_counts(reference_schedule: dict[str, torch.Tensor]) -> list[int]:
    return sorted(int(k[1:].split("_")[0]) for k in reference_schedule if k.endswith("_ddim_timesteps"))


# ---------------------------------------------------------------------------------------------------------------
# Training schedule
# ---------------------------------------------------------------------------------------------------------------


def test_betas_and_alphas_cumprod_match_official_float64(reference_schedule):
    betas = make_betas(1000, 0.00085, 0.012, zero_terminal_snr=True)
    assert betas.dtype == torch.float64
    abar = alphas_cumprod_from_betas(betas)
    assert max_err(abar, reference_schedule["alphas_cumprod_float64"]) <= 1e-14
    assert max_err(betas.float(), reference_schedule["buffer_betas"]) <= SCHEDULE_TOLERANCE
    assert float(abar[-1]) == 0.0  # zero terminal SNR
    assert float(abar.float()[0]) == pytest.approx(0.99915, abs=1e-7)
    plain = alphas_cumprod_from_betas(make_betas(1000, 0.00085, 0.012, zero_terminal_snr=False))
    assert float(plain[-1]) > 0.0


def test_schedule_from_builtin_config_matches_official_buffers(reference_schedule):
    schedule = NoiseSchedule.from_config(builtin_config().diffusion)
    for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        ours = getattr(schedule, name)
        ref = reference_schedule[f"buffer_{name}"]
        assert ours.dtype == torch.float32 and ours.shape == ref.shape, name
        assert max_err(ours, ref) <= SCHEDULE_TOLERANCE, name
    assert schedule.scale_arr.shape == (1400,)


def test_schedule_from_fixture_config_matches_checkpoint_buffers(fixture_set, checkpoint_schedule):
    from_config = NoiseSchedule.from_config(fixture_set.config.diffusion)
    for name in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        ours, ref = getattr(from_config, name), getattr(checkpoint_schedule, name)
        assert ref is not None and ours.shape == ref.shape, name
        assert max_err(ours, ref) <= SCHEDULE_TOLERANCE, name


def test_from_buffers_needs_alphas_cumprod_and_fills_in_the_rest(reference_schedule):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_buffers({"scale_arr": reference_schedule["buffer_scale_arr"]})
    only_abar = NoiseSchedule.from_buffers({"alphas_cumprod": reference_schedule["buffer_alphas_cumprod"]})
    assert only_abar.scale_arr is None
    # computed from the float32 alphas_cumprod (the checkpoint's roots come from float64): close, not exact
    assert max_err(only_abar.sqrt_alphas_cumprod, reference_schedule["buffer_sqrt_alphas_cumprod"]) <= 1e-7
    assert max_err(
        only_abar.sqrt_one_minus_alphas_cumprod, reference_schedule["buffer_sqrt_one_minus_alphas_cumprod"]
    ) <= SCHEDULE_TOLERANCE
    # without dynamic rescale every ratio is 1
    plan = ddim_schedule(only_abar, 5, 0.0)
    assert torch.equal(plan.scale_ratios, torch.ones(5))


def test_schedule_from_config_without_dynamic_rescale():
    schedule = NoiseSchedule.from_values(use_dynamic_rescale=False)
    assert schedule.scale_arr is None
    scale = make_scale_arr(1000, 0.5, turning_step=10)
    assert scale.shape == (1010,) and float(scale[0]) == 1.0 and float(scale[9]) == 0.5 and float(scale[-1]) == 0.5


# ---------------------------------------------------------------------------------------------------------------
# DDIM timesteps and plan
# ---------------------------------------------------------------------------------------------------------------


def test_timesteps_match_official_for_every_reference_n(reference_schedule):
    counts = reference_step_counts(reference_schedule)
    assert counts, "schedule.safetensors lists no N"
    for n in counts:
        ours = ddim_timesteps(n)
        ref = reference_schedule[f"N{n}_ddim_timesteps"]
        assert ours.dtype == torch.int64
        assert torch.equal(ours, ref), n


def test_timesteps_trailing_round_half_even_and_exactly_n_steps():
    assert ddim_timesteps(5).tolist() == [199, 399, 599, 799, 999]
    fifty = ddim_timesteps(50).tolist()
    assert fifty[0] == 19 and fifty[-1] == 999 and fifty[-2] == 979
    # N=16: spacing 62.5, so 937.5 and 812.5 are ties; numpy rounds them to even (938, 812)
    sixteen = ddim_timesteps(16).tolist()
    assert 937 in sixteen and 811 in sixteen and 812 not in sixteen
    # every N of the endpoint (1..100), including those where the official arange yields a bogus t=-1
    for n in range(1, 101):
        ts = ddim_timesteps(n)
        assert len(ts) == n, n
        assert int(ts[-1]) == 999 and int(ts[0]) >= 0, n
        assert bool((ts[1:] > ts[:-1]).all()), n
    assert ddim_timesteps(1000).tolist() == list(range(1000))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(bad)


def test_plan_matches_official_arrays_for_every_reference_n(reference_schedule):
    schedule = NoiseSchedule.from_buffers(
        {k[len("buffer_"):]: v for k, v in reference_schedule.items() if k.startswith("buffer_")}
    )
    for n in reference_step_counts(reference_schedule):
        for eta in (1.0, 0.5):
            plan = ddim_schedule(schedule, n, eta)
            assert len(plan) == n
            assert torch.equal(plan.timesteps.flip(0), reference_schedule[f"N{n}_ddim_timesteps"])
            pairs = {
                "alphas": "ddim_alphas",
                "alphas_prev": "ddim_alphas_prev",
                "scale_arr": "ddim_scale_arr",
                "scale_arr_prev": "ddim_scale_arr_prev",
            }
            for ours, ref in pairs.items():
                assert max_err(getattr(plan, ours).flip(0), reference_schedule[f"N{n}_{ref}"]) <= SCHEDULE_TOLERANCE
            ref_sigmas = eta * reference_schedule[f"N{n}_ddim_sigmas_eta1"].double()
            assert max_err(plan.sigmas.flip(0), ref_sigmas) <= SCHEDULE_TOLERANCE, (n, eta)
            # sampling order: t = 999 first, t_prev is the next one, the last step lands on alphas_cumprod[0]
            assert int(plan.timesteps[0]) == 999 and int(plan.prev_timesteps[-1]) == 0
            assert torch.equal(plan.prev_timesteps[:-1], plan.timesteps[1:])
            assert float(plan.scale_ratios[-1]) == 1.0 and float(plan.scale_ratios[0]) == 1.0


def test_plan_matches_fixture_schedule(fixture_set, checkpoint_schedule):
    etas = [e for e in (0, 1) if fixture_set.has(f"pipe_eta{e}_sched_ddim_timesteps")]
    if not etas:
        pytest.skip("fixture set has no pipeline schedule")
    for e in etas:
        prefix = f"pipe_eta{e}_sched_ddim_"
        n = fixture_set[prefix + "timesteps"].shape[0]
        plan = ddim_schedule(checkpoint_schedule, n, float(e))
        assert compare("timesteps", plan.timesteps.flip(0), fixture_set[prefix + "timesteps"]).passed
        for ours, ref in {
            "alphas": "alphas",
            "alphas_prev": "alphas_prev",
            "sigmas": "sigmas",
            "scale_arr": "scale_arr",
            "scale_arr_prev": "scale_arr_prev",
        }.items():
            c = compare(ref, getattr(plan, ours).flip(0), fixture_set[prefix + ref], SCHEDULE_TOLERANCE)
            assert c.passed, c


def test_schedule_rejects_bad_eta(checkpoint_schedule):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eta"):
            ddim_schedule(checkpoint_schedule, 5, bad)


def test_plan_steps_index_like_a_sequence(checkpoint_schedule):
    plan = ddim_schedule(checkpoint_schedule, 5, 1.0)
    steps = list(plan)
    assert [s.t for s in steps] == [999, 799, 599, 399, 199]
    assert [s.t_prev for s in steps] == [799, 599, 399, 199, 0]
    assert plan[-1] == steps[-1] and plan[0].index == 0
    # the only rescale step of N=5 is 399 -> 199: 0.85038 / 0.7
    assert [s.scale_ratio != 1.0 for s in steps] == [False, False, False, True, False]
    assert plan[3].scale_ratio == pytest.approx(0.8503759503364563 / 0.7, rel=1e-6)
    with pytest.raises(IndexError):
        plan[5]


# ---------------------------------------------------------------------------------------------------------------
# Guidance and the step, per step against the fixture runs
# ---------------------------------------------------------------------------------------------------------------


def fixture_etas(fixture_set: FixtureSet) -> list[int]:
    etas = [e for e in (0, 1) if fixture_set.has(f"pipe_eta{e}_step0_v_cond", f"pipe_eta{e}_sched_ddim_timesteps")]
    if not etas:
        pytest.skip("fixture set has no pipeline steps")
    return etas


@pytest.mark.parametrize("eta", [0, 1])
def test_guidance_and_step_match_fixture_per_step(eta, fixture_set, checkpoint_schedule):
    if eta not in fixture_etas(fixture_set):
        pytest.skip(f"no eta={eta} run in this fixture set")
    p = f"pipe_eta{eta}_"
    n = fixture_set[p + "sched_ddim_timesteps"].shape[0]
    plan = ddim_schedule(checkpoint_schedule, n, float(eta))
    x = fixture_set["pipe_x_T"]
    for i, step in enumerate(plan):
        s = f"{p}step{i}_"
        assert int(fixture_set[s + "t"][0]) == step.t
        v_cfg, v_guided = guide(
            fixture_set[s + "v_cond"], fixture_set[s + "v_uncond"], REF_CFG_SCALE, REF_GUIDANCE_RESCALE
        )
        for name, ours in (("v_cfg", v_cfg), ("v_guided", v_guided)):
            c = compare(s + name, ours, fixture_set[s + name], GUIDED_TOLERANCE)
            assert c.passed, c
        noise = fixture_set[s + "noise"] if fixture_set.has(s + "noise") else None
        if noise is None:
            assert step.sigma == 0.0
        x_prev, x0 = ddim_step(v_guided, x, step, noise)
        for name, ours in (("pred_x0", x0), ("x_prev", x_prev)):
            # observed: bit-identical except 4.8e-7 on one eta=1 step; far inside PIPELINE_TOLERANCE
            c = compare(s + name, ours, fixture_set[s + name], PIPELINE_TOLERANCE / 100)
            assert c.passed, c
        x = fixture_set[s + "x_prev"]


@pytest.mark.parametrize("eta", [0, 1])
def test_sample_ddim_replays_fixture_run(eta, fixture_set, checkpoint_schedule):
    """The whole loop with a denoiser that replays the fixture's v: chaining, noise order, callbacks."""
    if eta not in fixture_etas(fixture_set):
        pytest.skip(f"no eta={eta} run in this fixture set")
    p = f"pipe_eta{eta}_"
    n = fixture_set[p + "sched_ddim_timesteps"].shape[0]
    plan = ddim_schedule(checkpoint_schedule, n, float(eta))
    calls: list[int] = []

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        i = len(calls)
        calls.append(t)
        s = f"{p}step{i}_"
        return guide(fixture_set[s + "v_cond"], fixture_set[s + "v_uncond"], REF_CFG_SCALE)[1]

    x_T = fixture_set["pipe_x_T"]
    zeros = torch.zeros_like(x_T)
    noises = [
        fixture_set[f"{p}step{i}_noise"] if fixture_set.has(f"{p}step{i}_noise") else zeros for i in range(n)
    ]
    drawn: list[int] = []
    replay = replay_noise(noises)

    def noise_fn(i: int, shape: tuple[int, ...]) -> torch.Tensor:
        drawn.append(i)
        return replay(i, shape)

    records: list[DDIMStepOutput] = []
    out = sample_ddim(denoise, x_T, plan, noise_fn, callback=records.append)
    assert calls == plan.timesteps.tolist()
    assert drawn == list(range(n))  # one draw per step, also for eta = 0
    assert [(r.index + 1, r.total) for r in records] == [(i + 1, n) for i in range(n)]
    assert [r.index for r in records] == list(range(n)) and records[0].x is x_T
    for r in records:
        s = f"{p}step{r.index}_"
        assert r.t == plan[r.index].t
        assert compare(s + "pred_x0", r.x0, fixture_set[s + "pred_x0"], PIPELINE_TOLERANCE).passed
        assert compare(s + "x_prev", r.x_prev, fixture_set[s + "x_prev"], PIPELINE_TOLERANCE).passed
    c = compare("final", out, fixture_set[f"{p}step{n - 1}_x_prev"], PIPELINE_TOLERANCE)
    assert c.passed, c


def test_guide_without_guidance_and_rescale():
    g = torch.Generator().manual_seed(0)
    v_c = torch.randn(2, 4, 3, 4, 4, generator=g)
    v_u = torch.randn(2, 4, 3, 4, 4, generator=g)
    v_cfg, v_guided = guide(v_c, None, 1.0)
    assert v_cfg is v_c and v_guided is v_c
    with pytest.raises(ValueError, match="v_uncond"):
        guide(v_c, None, 7.5)
    with pytest.raises(ValueError, match="shape"):
        guide(v_c, v_u[:1], 7.5)
    v_cfg, v_guided = guide(v_c, v_u, 7.5, guidance_rescale=0.0)
    assert torch.equal(v_cfg, v_guided)
    torch.testing.assert_close(v_cfg, v_u + 7.5 * (v_c - v_u))
    # full rescale: each batch element's std equals its v_cond's std
    _, v_full = guide(v_c, v_u, 7.5, guidance_rescale=1.0)
    for b in range(2):
        assert float(v_full[b].std()) == pytest.approx(float(v_c[b].std()), rel=1e-5)


def test_guide_and_step_keep_half_precision_dtype(checkpoint_schedule):
    g = torch.Generator().manual_seed(1)
    x, v_c, v_u, n = (torch.randn(1, 4, 3, 4, 8, generator=g) for _ in range(4))
    plan = ddim_schedule(checkpoint_schedule, 5, 1.0)
    ref_cfg, ref_guided = guide(v_c, v_u, 7.5)
    ref_prev, ref_x0 = ddim_step(ref_guided, x, plan[1], n)
    for dtype in (torch.float16, torch.bfloat16):
        v_cfg, v_guided = guide(v_c.to(dtype), v_u.to(dtype), 7.5)
        assert v_cfg.dtype == dtype and v_guided.dtype == dtype
        x_prev, x0 = ddim_step(v_guided, x.to(dtype), plan[1], n.to(dtype))
        assert x_prev.dtype == dtype and x0.dtype == dtype
        assert max_err(x_prev, ref_prev) < 0.1 and max_err(x0, ref_x0) < 0.1


def test_step_needs_noise_when_sigma_is_nonzero(checkpoint_schedule):
    x = torch.zeros(1, 4, 2, 2, 2)
    stochastic = ddim_schedule(checkpoint_schedule, 5, 1.0)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, x, stochastic[0], None)
    deterministic = ddim_schedule(checkpoint_schedule, 5, 0.0)
    x_prev, _ = ddim_step(x + 1, x, deterministic[0], None)
    assert torch.isfinite(x_prev).all()
    with pytest.raises(ValueError, match="noise_fn"):
        sample_ddim(lambda x, t: x, x, stochastic)


# ---------------------------------------------------------------------------------------------------------------
# The official NaN bug at t = 999 with eta = 1
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [7, 25])
def test_first_step_with_eta_one_is_finite_where_official_gives_nan(num_steps):
    schedule = NoiseSchedule.from_values()  # the released model's schedule
    plan = ddim_schedule(schedule, num_steps, 1.0)
    step = plan[0]
    assert step.t == 999 and step.alpha == 0.0
    # the official formula in float32: 1 - a_prev - sigma^2 rounds below zero, its sqrt is NaN
    unclamped = 1.0 - plan.alphas_prev[:1] - plan.sigmas[:1] ** 2
    assert unclamped.dtype == torch.float32 and float(unclamped) < 0.0
    assert torch.isnan(unclamped.sqrt()).all()
    assert step.dir_coef == 0.0

    g = torch.Generator().manual_seed(num_steps)
    x, v, n = (torch.randn(1, 4, 4, 8, 8, generator=g) for _ in range(3))
    x_prev, x0 = ddim_step(v, x, step, n)
    assert torch.isfinite(x_prev).all() and torch.isfinite(x0).all()
    # with a_t = 0: x0 = -v, and x_prev = sqrt(a_prev) x0 + sigma n (the direction term is zero)
    torch.testing.assert_close(x0, -v)
    torch.testing.assert_close(x_prev, step.sqrt_alpha_prev * x0 + step.sigma * n)


def test_clamp_changes_nothing_where_official_is_finite():
    schedule = NoiseSchedule.from_values()
    for n in (5, 10, 50, 60):
        plan = ddim_schedule(schedule, n, 1.0)
        official = (1.0 - plan.alphas_prev - plan.sigmas**2).sqrt()
        assert torch.isfinite(official).all()
        assert torch.equal(official, plan.dir_coefs), n


# ---------------------------------------------------------------------------------------------------------------
# Noise, cancellation
# ---------------------------------------------------------------------------------------------------------------


def test_generator_noise_is_deterministic_per_seed():
    shape = (1, 4, 3, 4, 8)

    def draws(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
        fn = generator_noise(torch.Generator("cpu").manual_seed(seed), "cpu", dtype)
        return [fn(i, shape) for i in range(3)]

    a, b, c = draws(123, torch.float32), draws(123, torch.float32), draws(124, torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # each step gets a fresh draw
    half = draws(123, torch.float16)
    assert half[0].dtype == torch.float16
    torch.testing.assert_close(half[0].float(), a[0], atol=2e-3, rtol=1e-3)
    # x_T then per-step noise from one generator: the same sequence as plain torch.randn on that generator
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_T = randn_tensor(shape, g1, "cpu", torch.float32)
    first = generator_noise(g1, "cpu", torch.float32)(0, shape)
    assert torch.equal(x_T, torch.randn(shape, generator=g2))
    assert torch.equal(first, torch.randn(shape, generator=g2))


def test_an_exception_in_the_callback_stops_the_loop_between_steps(checkpoint_schedule):
    """How a caller cancels: its callback raises, and no further step runs."""
    plan = ddim_schedule(checkpoint_schedule, 5, 0.0)
    calls: list[int] = []

    class Stop(Exception):
        pass

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        calls.append(t)
        return torch.zeros_like(x)

    def callback(out: DDIMStepOutput) -> None:
        if out.index + 1 == 2:
            raise Stop

    with pytest.raises(Stop):
        sample_ddim(denoise, torch.ones(1, 4, 2, 2, 2), plan, callback=callback)
    assert calls == [999, 799]
