"""Noise schedules and spacings against diffusers' schedulers (the oracle).

Timesteps and sigmas must be bit-identical to diffusers', except karras/exponential timesteps in
the *Discrete family, which go through a float32 log table (numpy's and torch's float32 log differ
in the last bit for ~20% of entries): there we allow 1e-4 (= 1-2 ulp at t ~ 1000).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import diffusers  # noqa: E402  (a required oracle: a missing one fails, it never skips)
# diffusers' schedulers call np.array() on torch tensors, which numpy 2 flags on every call; recording
# hundreds of those triples the run time, and they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from ldmcli.schedule import SPACINGS, DiffusionSchedule, make_sigmas  # noqa: E402

from sd_fixtures import MANIFESTS  # noqa: E402

STEPS = [1, 2, 7, 10, 25, 30, 50, 1000]


def _scheduler_config(name: str) -> dict:
    path = MANIFESTS / f"{name}-diffusers-folder.json"
    return json.loads(path.read_text())["scheduler/scheduler_config.json"]


@pytest.fixture(scope="module")
def sd15_cfg() -> dict:
    return _scheduler_config("sd15")


def _diffusers(cls: str, cfg: dict, steps: int, **kwargs):
    sched = getattr(diffusers, cls).from_config(cfg, **kwargs)
    sched.set_timesteps(steps)
    return sched


def test_defaults_are_sd15(sd15_cfg: dict) -> None:
    assert DiffusionSchedule.from_diffusers_config(sd15_cfg) == DiffusionSchedule()


def test_from_diffusers_config_reads_prediction_and_ignores_unrelated_keys() -> None:
    sd21 = DiffusionSchedule.from_diffusers_config(_scheduler_config("sd21"))
    assert sd21.prediction_type == "v_prediction"
    sdxl = DiffusionSchedule.from_diffusers_config(_scheduler_config("sdxl"))  # many unrelated keys
    assert sdxl == DiffusionSchedule()
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        DiffusionSchedule.from_diffusers_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSchedule(prediction_type="sample")


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_diffusers(sd15_cfg: dict, beta_schedule: str) -> None:
    cfg = {**sd15_cfg, "beta_schedule": beta_schedule}
    ours = DiffusionSchedule.from_diffusers_config(cfg)
    ref = diffusers.DDIMScheduler.from_config(cfg)
    assert torch.equal(ours.alphas_cumprod(), ref.alphas_cumprod)
    ref_sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    assert torch.equal(ours.training_sigmas(), ref_sigmas)
    if beta_schedule == "scaled_linear":  # the numbers everyone knows for SD
        assert ours.sigma_max() == pytest.approx(14.6146, abs=1e-4)
        assert ours.sigma_min() == pytest.approx(0.0291675, abs=1e-6)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler"])
def test_discrete_spacings_equal_diffusers(sd15_cfg: dict, cls: str, spacing: str, steps: int) -> None:
    ref = _diffusers(cls, sd15_cfg, steps, timestep_spacing=spacing)
    plan = make_sigmas(DiffusionSchedule.from_diffusers_config(sd15_cfg), spacing, steps)
    assert torch.equal(plan.timesteps, ref.timesteps.float())
    assert torch.equal(plan.sigmas, ref.sigmas)
    assert plan.init_noise_sigma == float(ref.init_noise_sigma)


@pytest.mark.parametrize("steps", [10, 25])
def test_heun_uses_the_same_plan(sd15_cfg: dict, steps: int) -> None:
    """Heun's diffusers schedule repeats each inner timestep/sigma once; deduplicated it is Euler's."""
    ref = _diffusers("HeunDiscreteScheduler", sd15_cfg, steps)
    plan = make_sigmas(DiffusionSchedule(), None, steps)
    assert torch.equal(plan.timesteps, torch.cat([ref.timesteps[:1], ref.timesteps[1::2]]))
    assert torch.equal(plan.sigmas, torch.cat([ref.sigmas[:1], ref.sigmas[1:-1:2], ref.sigmas[-1:]]))


@pytest.mark.parametrize("steps", [s for s in STEPS if s > 1])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"])
def test_sigma_space_spacings_equal_discrete_schedulers(sd15_cfg: dict, cls: str, spacing: str, steps: int) -> None:
    """With timestep_spacing="linspace" (our registry's kwargs) diffusers spans the full training range.
    (steps=1 is excluded: diffusers then collapses sigma_max onto sigma_min, which we do not copy.)"""
    ref = _diffusers(cls, sd15_cfg, steps, timestep_spacing="linspace", **{f"use_{spacing}_sigmas": True})
    ref_t, ref_s = ref.timesteps, ref.sigmas
    if cls == "HeunDiscreteScheduler":
        ref_t = torch.cat([ref_t[:1], ref_t[1::2]])
        ref_s = torch.cat([ref_s[:1], ref_s[1:-1:2], ref_s[-1:]])
    plan = make_sigmas(DiffusionSchedule.from_diffusers_config(sd15_cfg), spacing, steps)
    assert torch.equal(plan.sigmas, ref_s)
    torch.testing.assert_close(plan.timesteps, ref_t.float(), rtol=0, atol=1e-4)
    assert plan.init_noise_sigma == float(ref.init_noise_sigma)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_plan_equals_dpmsolver(sd15_cfg: dict, spacing: str, steps: int) -> None:
    """DPMSolverMultistep lays out steps+1 integer timesteps (leading/linspace) and rounds
    (karras) or truncates (exponential) interpolated ones; its latents start as unit VP noise."""
    kwargs = {"timestep_spacing": spacing} if spacing in ("leading", "linspace", "trailing") else {f"use_{spacing}_sigmas": True}
    ref = _diffusers("DPMSolverMultistepScheduler", sd15_cfg, steps, **kwargs)
    plan = make_sigmas(DiffusionSchedule.from_diffusers_config(sd15_cfg), spacing, steps, convention="dpm")
    assert torch.equal(plan.timesteps, ref.timesteps.float())
    assert torch.equal(plan.sigmas, ref.sigmas)
    assert ref.init_noise_sigma == 1.0
    assert plan.init_noise_sigma == pytest.approx(math.sqrt(1 + plan.sigmas[0].item() ** 2), rel=1e-7)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_ddim_plan_equals_ddim_and_pndm(sd15_cfg: dict, spacing: str, steps: int, set_alpha_to_one: bool) -> None:
    cfg = {**sd15_cfg, "set_alpha_to_one": set_alpha_to_one}
    schedule = DiffusionSchedule.from_diffusers_config(cfg)
    plan = make_sigmas(schedule, spacing, steps, convention="ddim")
    ddim = _diffusers("DDIMScheduler", cfg, steps, timestep_spacing=spacing)
    assert torch.equal(plan.timesteps, ddim.timesteps.float())
    if ddim.timesteps.max() >= 1000:  # leading + steps_offset at 1000 steps: diffusers' DDIM cannot step it
        return
    a = ddim.alphas_cumprod[ddim.timesteps]
    assert torch.equal(plan.sigmas[:-1], ((1 - a) / a) ** 0.5)
    a_final = ddim.final_alpha_cumprod
    assert plan.sigmas[-1].item() == pytest.approx((((1 - a_final) / a_final) ** 0.5).item(), abs=1e-9)
    assert (plan.sigmas[-1] == 0) == set_alpha_to_one
    if steps > 1:  # PNDM (skip_prk_steps) walks the same grid, visiting the second timestep twice
        pndm = _diffusers("PNDMScheduler", cfg, steps, timestep_spacing=spacing, skip_prk_steps=True)
        assert torch.equal(plan.timesteps, torch.cat([pndm.timesteps[:2], pndm.timesteps[3:]]).float())


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma(sd15_cfg: dict) -> None:
    schedule = DiffusionSchedule()
    ref = diffusers.EulerDiscreteScheduler.from_config(sd15_cfg)
    log_sigmas = schedule.training_sigmas().log().numpy()
    sig = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-4, 3, generator=torch.Generator().manual_seed(0)))
    ref_t = torch.from_numpy(ref._sigma_to_t(sig.numpy(), log_sigmas))
    torch.testing.assert_close(schedule.sigma_to_t(sig), ref_t, rtol=0, atol=1e-9)
    # integer timesteps round-trip through t -> sigma (np.interp) -> t (log interpolation); the
    # float32 log table limits this to ~2e-5
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=1e-4)
    # np.interp between grid points is linear in sigma
    torch.testing.assert_close(
        schedule.t_to_sigma(torch.tensor([10.25])),
        0.75 * schedule.t_to_sigma(torch.tensor([10.0])) + 0.25 * schedule.t_to_sigma(torch.tensor([11.0])),
    )


def test_linspace_needs_exact_timesteps() -> None:
    """Why Sigmas carries timesteps: inverting sigma -> t by log interpolation misses diffusers'
    fractional linspace timesteps by ~1e-3 and DPM's rounded karras ones by up to ~0.5."""
    schedule = DiffusionSchedule()
    for spacing, convention, worst in [("linspace", "discrete", 1e-3), ("karras", "dpm", 0.3)]:
        plan = make_sigmas(schedule, spacing, 25, convention=convention)
        err = (schedule.sigma_to_t(plan.sigmas[:-1]) - plan.timesteps.double()).abs().max().item()
        assert err > worst
        assert all(plan.timestep_for(s) == t for s, t in zip(plan.sigmas[:-1], plan.timesteps))


def test_plan_helpers() -> None:
    schedule = DiffusionSchedule()
    plan = make_sigmas(schedule, "leading", 10, convention="ddim")
    assert plan.timestep_for(plan.sigmas[3]) == 601
    assert plan.timestep_for(torch.tensor(0.5)) is None
    x = torch.ones(2)
    torch.testing.assert_close(plan.to_vp(x), x * schedule.alphas_cumprod()[0].sqrt())
    assert make_sigmas(schedule, "karras", 10).to_vp(x) is x
    assert make_sigmas(schedule, None, 10).timesteps[0] == 901  # None = the schedule's own spacing
    assert torch.all(plan.sigmas[:-1] > plan.sigmas[1:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing": "cosine", "steps": 10}, "unknown spacing"),
        ({"spacing": "leading", "steps": 0}, "steps"),
        ({"spacing": "leading", "steps": 1001}, "steps"),
        ({"spacing": "leading", "steps": 10, "convention": "pndm"}, "convention"),
    ],
)
def test_make_sigmas_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_sigmas(DiffusionSchedule(), **kwargs)
