"""The SDXL refiner (`refiner.sample_with_refiner`, `samplers.sample(end=)` / `StartLatents`) against diffusers.

Oracle: diffusers' two pipelines composed as its docs compose them,

    latents = StableDiffusionXLPipeline(base)(..., denoising_end=F, output_type="latent", generator=gens)
    StableDiffusionXLImg2ImgPipeline(refiner)(..., image=latents, denoising_start=F, generator=gens)

with the same scheduler class on both and the SAME generator list passed to both calls (the refiner's draws
continue the base's). Tiny random models: sd_fixtures' SDXL base and test_inpaint_refiner_models' refiner (bigG
alone, aesthetic scores). The switch itself is checked on its own: which timesteps each side runs, against
diffusers' formula written out here, on the timesteps diffusers' schedulers lay out. All fp32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ldmcli import pipeline, refiner
from ldmcli.denoiser import CFGDenoiser, Denoiser
from ldmcli.request import ImageRequest
from ldmcli.samplers import StartLatents, check_switch, dpmpp_2m, sample, timestep_cutoff
from ldmcli.schedule import DiffusionSchedule
from sd_fixtures import (SDXL_SCHEDULER_CONFIG, assert_latents_match, assert_pixels_match, build_tiny_sdxl_pipeline,
                         diffusers_latents_and_pixels)
from test_inpaint_refiner_models import build_tiny_refiner_pipeline

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SEEDS = [1234, 99]
STEPS = 10
CFG = 6.0
HEIGHT, WIDTH = 64, 128  # not square (a swapped size would show); the refiner's 4 levels need latents % 8 == 0

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler(name: str, config: dict = SDXL_SCHEDULER_CONFIG, spacing: str | None = None):
    """The oracle's own configuration of each sampler, as a diffusers user writes it (not our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "plms": (diffusers.PNDMScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "lcm": (diffusers.LCMScheduler, {}),
    }
    cls, kwargs = table[name]
    if spacing == "karras":
        kwargs = {**kwargs, "use_karras_sigmas": True, "timestep_spacing": "linspace"}
    elif spacing is not None:
        kwargs = {**kwargs, "timestep_spacing": spacing}
    return cls.from_config(config, **kwargs)


# --- the switch: which timesteps each side runs ----------------------------------------------------------------


def _diffusers_split(scheduler, steps: int, switch: float) -> tuple[list[float], list[float]]:
    """The U-Net timesteps of diffusers' base and refiner, written out from StableDiffusionXLPipeline.__call__
    (8.1 "Apply denoising_end") and StableDiffusionXLImg2ImgPipeline.get_timesteps (denoising_start)."""
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    T = scheduler.config.num_train_timesteps
    cutoff = int(round(T - switch * T))
    base = timesteps[: len([t for t in timesteps if t >= cutoff])]
    count = len([t for t in timesteps if t < cutoff])
    if scheduler.order == 2 and count % 2 == 0:
        count += 1  # diffusers: "ensure that the denoising process always ends after the 2nd derivative step"
    return base, timesteps[len(timesteps) - count :]


def _ours_split(sampler: str, spacing: str | None, steps: int, switch: float) -> tuple[list[float], list[float], int]:
    """The timesteps our denoiser is called at on each side of the switch, and how many draws the refiner made."""
    schedule = DiffusionSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    calls: list[float] = []
    draws = [0]

    def denoiser(x, sigma, t=None):
        assert t is not None, f"sigma {sigma} is not one of the plan's"
        calls.append(float(t))
        return x * 0.5

    def noise():
        draws[0] += 1
        return torch.ones(1, 4, 2, 2)

    latents = sample(sampler, schedule, steps, denoiser, noise, spacing=spacing, end=switch)
    base, calls[:] = list(calls), []
    draws[0] = 0
    sample(sampler, schedule, steps, denoiser, noise, spacing=spacing, start=StartLatents(latents, switch))
    return base, list(calls), draws[0]


def _steps(timesteps: list[float]) -> list[float]:
    """The timesteps with repeats of the one before taken out: one per step."""
    return [t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1]]


CUT_CASES = [("euler", s) for s in ("leading", "linspace", "trailing", "karras")] + [
    ("euler_a", "leading"), ("euler_a", "trailing"), ("heun", "leading"), ("heun", "karras"), ("heun", "trailing"),
    ("lms", "leading"), ("lms", "karras"), ("ddim", "leading"), ("ddim", "trailing"), ("plms", "leading"),
    ("dpmpp_2m", "leading"), ("dpmpp_2m", "linspace"), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "karras"),
    ("lcm", None),
]
SWITCHES = [0.8, 0.5, 0.3, 0.05, 0.999, 0.2005, 0.7995]  # 0.2005: T - 200.5 = 799.5 rounds to even, 800


@pytest.mark.parametrize("sampler, spacing", CUT_CASES)
def test_each_side_runs_the_timesteps_diffusers_runs(sampler, spacing):
    """For every switch and step count: the base calls the U-Net at the timesteps >= diffusers' cutoff, in
    diffusers' order (Heun's repeated corrector timesteps included), the refiner at the ones diffusers' refiner
    runs (Heun: from the predictor of the step the base stopped inside), and no draw is made for the refiner's
    start. PLMS's refiner walks PNDM from its step as defined (our deliberate difference, `samplers.sample`):
    the same steps, its pseudo-Heun corrector evaluated where PNDM evaluates it."""
    for steps in (1, 2, 4, 10, 25):
        if spacing == "karras" and steps == 1:
            continue  # diffusers collapses one Karras step onto sigma_min (a documented difference, samplers.sample)
        for switch in SWITCHES:
            want_base, want_refiner = _diffusers_split(_scheduler(sampler, spacing=spacing), steps, switch)
            base, refined, draws = _ours_split(sampler, spacing, steps, switch)
            label = f"{sampler}/{spacing} {steps} steps, switch {switch}"
            # approx: Euler-family Karras timesteps may differ from diffusers' in the last float32 bit (~3e-5)
            assert base == pytest.approx(want_base, rel=1e-6, abs=0), label
            if sampler == "plms":  # the same steps; PNDM's corrector call where ours has one, not where diffusers'
                assert _steps(refined) == _steps(want_refiner), label
            else:
                assert refined == pytest.approx(want_refiner, rel=1e-6, abs=0), label
            if sampler not in ("euler_a", "dpmpp_2m_sde", "lcm"):
                assert draws == 0, label  # nothing drawn to start from the base's latents
            assert draws <= len(want_refiner), label  # at most the steps' own draws


def test_the_cutoff_formula():
    assert [timestep_cutoff(s, 1000) for s in (0.8, 0.5, 0.2005, 0.2015, 0.999, 0.001)] == [200, 500, 800, 798, 1, 999]
    assert check_switch(0.8) == 0.8
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, math.nan, math.inf, True, "0.8", None):
        with pytest.raises(ValueError, match=r"^the refiner switch must be a fraction between 0 and 1") as info:
            check_switch(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="refiner switch"):
        sample("euler", DiffusionSchedule(), 4, lambda x, s, t=None: x, lambda: torch.zeros(1, 4, 2, 2), end=1.0)


@torch.no_grad()
def test_split_walks_compose():
    """Euler keeps no state, so base + refiner on one model is the whole walk, bit for bit; DPM++ 2M's refiner
    starts a new history (its first step first order), so it is dpmpp_2m run on each side's noise levels."""
    schedule = DiffusionSchedule.from_diffusers_config(SDXL_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 4, 3, 3, generator=g)
    mix = torch.randn(4, 4, generator=g) * 0.3

    def denoiser(x, sigma, t=None):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", mix, x) / (1 + sigma**2) ** 0.5)

    def run(sampler, **kwargs):
        return sample(sampler, schedule, STEPS, denoiser, lambda: start.clone(), **kwargs)

    for sampler in ("euler", "dpmpp_2m"):
        handed = run(sampler, end=0.5)
        split = run(sampler, start=StartLatents(handed, 0.5))
        if sampler == "euler":
            assert torch.equal(split, run(sampler))
            continue
        from ldmcli.schedule import make_sigmas

        plan = make_sigmas(schedule, None, STEPS, convention="dpm")
        k = int((plan.timesteps >= 500).sum())
        x = dpmpp_2m(denoiser, start * plan.init_noise_sigma, plan.sigmas[: k + 1], noise=None)
        x = dpmpp_2m(denoiser, x, plan.sigmas[k:], noise=None)
        torch.testing.assert_close(split, x, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(split, run(sampler), atol=1e-4)  # the history restart shows


# --- whole pipelines against diffusers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers base, diffusers refiner, our base, our refiner), loaded from the folders diffusers saved."""
    base, refiner_pipe = build_tiny_sdxl_pipeline(), build_tiny_refiner_pipeline()
    folders = []
    for name, pipe in (("base", base), ("refiner", refiner_pipe)):
        folder = tmp_path_factory.mktemp(f"tiny-sdxl-{name}")
        pipe.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return base, refiner_pipe, pipeline.load(folders[0]), pipeline.load(folders[1])


def _request(sampler: str, negative: str) -> ImageRequest:
    name, _, spacing = sampler.partition("/")
    return ImageRequest(prompt=PROMPT, negative_prompt=negative, width=WIDTH, height=HEIGHT, steps=STEPS,
                        cfg_scale=CFG, sampler=name, schedule=spacing or None)


def _our_base_latents(model, request: ImageRequest, switch: float) -> torch.Tensor:
    """The base's half alone (`sample(..., end=switch)`), to compare with diffusers' output_type="latent"."""
    cond, uncond = pipeline.guidance_conditioning(model, request, len(SEEDS))
    denoiser = CFGDenoiser(Denoiser(model.unet, model.spec.schedule), cond, uncond, request.cfg_scale)
    noise = pipeline.noise_source(SEEDS, (4, HEIGHT // 8, WIDTH // 8), model.device, torch.float32)
    return sample(request.sampler, model.spec.schedule, request.steps, denoiser, noise, spacing=request.schedule,
                  end=switch)


PARITY = [(s, w, NEGATIVE) for s in ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m/karras", "heun") for w in (0.8, 0.5)]
PARITY += [("euler", 0.8, ""), ("euler_a", 0.5, ""), ("dpmpp_2m/karras", 0.8, ""), ("ddim", 0.8, NEGATIVE)]


@pytest.mark.parametrize("sampler, switch, negative", PARITY)
@torch.inference_mode()
def test_base_then_refiner_equals_diffusers(models, sampler, switch, negative):
    """Latents (base's at the switch, refiner's at the end) within the SDXL tolerance and the refiner-VAE
    decoded PNG within 1/255 of diffusers' composed pipelines. An empty negative prompt is diffusers'
    negative_prompt=None: zeros for the base (force_zeros_for_empty_prompt), "" encoded for the refiner."""
    theirs_base, theirs_refiner, ours_base, ours_refiner = models
    name, _, spacing = sampler.partition("/")
    # a scheduler each, as a user configures both pipelines
    theirs_base.scheduler = _scheduler(name, spacing=spacing or None)
    theirs_refiner.scheduler = _scheduler(name, spacing=spacing or None)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    shared = dict(prompt=[PROMPT] * len(SEEDS), negative_prompt=[negative] * len(SEEDS) if negative else None,
                  num_inference_steps=STEPS, guidance_scale=CFG, generator=generators)
    handed = theirs_base(**shared, height=HEIGHT, width=WIDTH, denoising_end=switch, output_type="latent").images
    expected, expected_pixels = diffusers_latents_and_pixels(theirs_refiner, **shared, image=handed,
                                                             denoising_start=switch)

    request = _request(sampler, negative)
    label = f"{sampler} switch {switch} negative {negative!r}"
    assert_latents_match(_our_base_latents(ours_base, request, switch), handed, "sdxl", f"{label} (base at the switch)")
    steps_seen = []
    latents = refiner.sample_with_refiner(ours_base, ours_refiner, request, SEEDS, switch=switch,
                                          callback=lambda i, d: steps_seen.append(i))
    assert_latents_match(latents, expected, "sdxl", label)
    assert_pixels_match(pipeline.decode_latents(ours_refiner, latents), expected_pixels, label)
    assert steps_seen == list(range(sum(refiner.split_steps(ours_base, ours_refiner, request, switch))))


# --- what the lead wires --------------------------------------------------------------------------------------


def test_infotext_fields_are_a1111s(models):
    """The PNG's A1111 text names the refiner by A1111's short title, NAME [hash] (the name alone without a
    hash), and writes the switch as A1111 prints a float (metadata.py writes both)."""
    from ldmcli.metadata import _a1111_fields, _additions_a1111

    _, _, _, ours_refiner = models
    titled = _additions_a1111({"refiner_model": {"name": ours_refiner.name, "hash": "7440042bbd"}})[0]
    assert titled == {"Refiner": f"{ours_refiner.name} [7440042bbd]"}
    assert _additions_a1111({"refiner_model": {"name": ours_refiner.name, "hash": None}})[0] == {"Refiner": ours_refiner.name}
    for switch, text in ((0.8, "0.8"), (0.25, "0.25")):
        assert _a1111_fields(ImageRequest(refiner="r", refiner_switch=switch))["Refiner switch at"] == text


def test_split_steps_counts(models):
    _, _, ours_base, ours_refiner = models
    assert refiner.split_steps(ours_base, ours_refiner, _request("euler", NEGATIVE), 0.8) == (8, 2)  # 901..201 | 101, 1
    assert refiner.split_steps(ours_base, ours_refiner, _request("heun", NEGATIVE), 0.8) == (8, 3)  # step 7 twice
    assert refiner.split_steps(ours_base, ours_refiner, _request("dpmpp_2m/karras", NEGATIVE), 0.5) == (5, 5)


def test_refused_pairs(models):
    _, _, ours_base, ours_refiner = models
    request = _request("euler", NEGATIVE)
    with pytest.raises(ValueError, match="is an SDXL refiner"):
        refiner.sample_with_refiner(ours_refiner, ours_refiner, request, SEEDS, switch=0.8)
    with pytest.raises(ValueError, match="A1111's refiner"):
        refiner.sample_with_refiner(ours_base, ours_refiner, replace(request, match="a1111"),
                                    SEEDS, switch=0.8)
    with pytest.raises(ValueError, match="refiner switch"):
        refiner.sample_with_refiner(ours_base, ours_refiner, request, SEEDS, switch=1)
