"""The SDXL refiner: the base model denoises until the switch, the refiner finishes from the same latents.

`sample_with_refiner` reproduces diffusers' "ensemble of expert denoisers" (Podell et al. 2023, sec. 2.5):

    latents = StableDiffusionXLPipeline(base)(prompt, denoising_end=switch, output_type="latent",
                                              generator=generators).images
    image = StableDiffusionXLImg2ImgPipeline(refiner)(prompt, image=latents, denoising_start=switch,
                                                      generator=generators).images

with the same sampler (scheduler class) for both and the SAME per-image generator list passed to both calls.
What each side runs (`samplers.denoising_cut`): the base the steps whose timestep is >= diffusers'
``int(round(T - switch * T))``, the refiner the rest, from the base's latents as they are (no noise added, no
draw) and with a fresh sampler (a multistep sampler's history starts empty, as the refiner pipeline's new
scheduler's does). Heun, diffusers' one second-order scheduler here, ends the base on the first half of a step
and has the refiner walk that step again (`samplers.denoising_cut` says how); ldm does the same.

Conditioning: each model its own, from its own text encoders (`pipeline.guidance_conditioning`): the base its
CLIP-L + bigG context and size `y` (an empty negative prompt conditions it on zeros:
``force_zeros_for_empty_prompt`` true in sd_xl_base_1.0's model_index.json), the refiner bigG alone and the
aesthetic score in `y`, 6.0 for the prompt and 2.5 for the negative (StableDiffusionXLImg2ImgPipeline's
``aesthetic_score`` / ``negative_aesthetic_score`` defaults); its empty negative prompt is encoded as ""
(``force_zeros_for_empty_prompt`` false in the refiner's model_index.json). Same prompt, negative prompt, CFG
scale, size and clip skip for both.

Random numbers: one generator per image (`pipeline.noise_source`), which the refiner CONTINUES: the base draws
the initial latents and its ancestral steps' noise, the refiner its steps' noise after those -- what diffusers
gives when both calls get the same generator objects, and what A1111 gives, whose base and refiner are one
sampling loop with one noise source.

Decoding: with the REFINER's VAE (diffusers' refiner pipeline decodes with its own ``self.vae``; SDXL base and
refiner ship the same VAE architecture and scale factor): ``pipeline.decode_latents(refiner, latents)``.

A1111 (modules/sd_samplers_common.py `apply_refiner`, modules/sd_models.py `CheckpointInfo.short_title`)
writes ``Refiner: NAME [hash]`` (the file's stem and its short sha256 hash) and ``Refiner switch at: 0.8``
(written by `metadata.py`). Its switch is not diffusers' cutoff, and ldm follows diffusers:

- A1111 (its current `apply_refiner`) switches inside its one sampling loop, at the first model call whose
  noise level's nearest training timestep t (argmin |sigmas - sigma|) has ``(999 - t) / 1000 >= switch``. For
  whole timesteps and a switch of whole thousandths that is t <= 999 - 1000 * switch, the steps diffusers'
  t < round(1000 - 1000 * switch) gives; fractional timesteps (Karras, "linspace") are rounded to the nearest
  first, and a second-order sampler may switch between the two evaluations of one step.
- With its "Switch to refiner by sampling steps" compatibility option ("Old behavior for refiner") it
  switches at the model call whose ``step / total_steps`` reaches the switch (total_steps doubled for
  second-order samplers): a fraction of the steps, not of the timesteps; it then also writes
  ``Refiner switch by sampling steps: True``.
- Its sampler goes on across the switch (DPM++ 2M keeps its history, the noise source goes on), where
  diffusers' refiner starts a new scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldmcli import pipeline
from ldmcli.request import ImageRequest
from ldmcli.samplers import (
    SAMPLERS,
    StartLatents,
    check_switch,
    denoising_cut,
    resolve_sampler_name,
    sample,
)
from ldmcli.schedule import make_sigmas

__all__ = ["check_switch", "sample_with_refiner", "split_steps"]


def split_steps(base: pipeline.StableDiffusion, refiner: pipeline.StableDiffusion, request: ImageRequest,
                switch: float) -> tuple[int, int]:
    """(steps the base runs, steps the refiner runs) for `request`: how many `callback` calls each side makes
    (their sum is ``request.steps``, plus one with Heun, whose step at the switch both sides walk)."""
    name, implied = resolve_sampler_name(request.sampler)
    info = SAMPLERS[name]
    counts = []
    for model, part in ((base, "base"), (refiner, "refiner")):
        plan = make_sigmas(model.spec.schedule, request.schedule or implied, request.steps, convention=info.convention)
        cut = denoising_cut(plan.timesteps, switch, model.spec.schedule.num_train_timesteps,
                            second_order=info.second_order)
        counts.append(cut.base_steps if part == "base" else len(plan.timesteps) - cut.refiner_first)
    return counts[0], counts[1]


def _check_pair(base: pipeline.StableDiffusion, refiner: pipeline.StableDiffusion, request: ImageRequest) -> None:
    for model, what in ((base, "base model"), (refiner, "refiner")):
        if model.unet is None:
            raise RuntimeError(f"the {what}'s U-Net was released (release_unet)")
    if base.spec.refiner:
        raise ValueError(f"{base.name} is an SDXL refiner: it refines another model's latents, it cannot be the base")
    if (base.spec.vae.embed_dim, base.spec.vae.downsample_factor) != (refiner.spec.vae.embed_dim,
                                                                      refiner.spec.vae.downsample_factor):
        raise ValueError(f"the refiner {refiner.name} works on other latents than {base.name} "
                         f"({refiner.spec.vae.embed_dim} channels at 1/{refiner.spec.vae.downsample_factor} vs "
                         f"{base.spec.vae.embed_dim} at 1/{base.spec.vae.downsample_factor})")
    if request.match != "diffusers":
        raise ValueError(f"match {request.match!r}: A1111's refiner (one sampling loop switching models) is not "
                         "reproduced yet; use match 'diffusers'")


@torch.inference_mode()
def sample_with_refiner(
    base: pipeline.StableDiffusion,
    refiner: pipeline.StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    switch: float,
    callback: Callable[[int, Tensor], None] | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Denoised latents for `request`, one per seed: `base` up to `switch`, `refiner` from there (module
    docstring). Decode them with the refiner's VAE: ``pipeline.decode_latents(refiner, latents)``.

    switch: in (0, 1), the fraction of the training timesteps the base denoises (A1111's "Refiner switch at",
        diffusers' ``denoising_end`` / ``denoising_start``).
    callback: ``callback(i, denoised)`` once per step, i counting on from the base's steps into the refiner's
        (`split_steps` gives both counts).
    `request` must be resolved (`ImageRequest.checked`); its own `seed` is ignored for `seeds`. Raises
    `NonFiniteError` if any image's latents are NaN/Inf, unless `check_finite` is False.
    """
    check_switch(switch)
    _check_pair(base, refiner, request)
    n = len(seeds)
    factor = base.spec.vae.downsample_factor
    latent_shape = (base.spec.vae.embed_dim, request.height // factor, request.width // factor)
    # One generator per image for both models: the refiner's draws continue the base's.
    noise = pipeline.noise_source(seeds, latent_shape, base.device, torch.float32, request.rng, request.ensd)

    cond, uncond = pipeline.guidance_conditioning(base, request, n)
    denoiser = pipeline.guided_denoiser(pipeline.text_to_image_network(base, n, request), base.spec.schedule, cond, uncond,
                                        request)
    base_steps = 0

    def base_callback(i: int, denoised: Tensor) -> None:
        nonlocal base_steps
        base_steps = i + 1
        if callback is not None:
            callback(i, denoised)

    latents = sample(request.sampler, base.spec.schedule, request.steps, denoiser, noise, spacing=request.schedule,
                     match=request.match, callback=base_callback, end=switch)

    cond, uncond = pipeline.guidance_conditioning(refiner, request, n)
    base_calls = denoiser.calls
    denoiser = pipeline.guided_denoiser(refiner.unet, refiner.spec.schedule, cond, uncond, request)
    # A prompt's schedule ([from:to:when], [a|b]) goes on where the base left it: A1111's base and refiner are
    # one sampling loop, whose model calls it counts.
    denoiser.calls = base_calls

    def refiner_noise() -> Tensor:
        return noise().to(refiner.device)

    refiner_callback = None if callback is None else (lambda i, denoised: callback(base_steps + i, denoised))
    latents = sample(request.sampler, refiner.spec.schedule, request.steps, denoiser, refiner_noise,
                     spacing=request.schedule, match=request.match, callback=refiner_callback,
                     start=StartLatents(latents.to(refiner.device), switch))
    if check_finite:
        pipeline.check_finite_latents(latents, seeds, refiner.dtype)
    return latents
