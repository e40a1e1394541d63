"""img2img and inpainting parity with diffusers (`img2img.sample_from_image`) on tiny random models.

Same random weights, image, mask, prompt and seeds (a batch of two, diffusers given one generator per
image): our latents must equal diffusers' `StableDiffusionImg2ImgPipeline`, `StableDiffusionInpaintPipeline`
(4- and 9-channel U-Nets) and `StableDiffusionXLImg2ImgPipeline` within sd_fixtures.LATENT_TOL, and the
PNGs within 1/255. Every case starts somewhere else in the schedule (strength), draws its numbers from
each image's generator in diffusers' order (posterior sample, noise, ...), and inpainting blends after
every step, so each of those is pinned here. All fp32.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldmcli import img2img, pipeline, vae_encode
from ldmcli.errors import CheckpointError
from ldmcli.request import ImageRequest
from ldmcli.samplers import first_step
from sd_fixtures import (
    SD15_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    TINY_UNET,
    _spread_norms,
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
SEEDS = [1234, 99]
STEPS = 12
CFG = 7.5

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler(name: str, config: dict):
    """The oracle's own configuration of each sampler (written here, not taken from our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "dpmpp_2m/karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "plms": (diffusers.PNDMScheduler, {}),
        "lcm": (diffusers.LCMScheduler, {}),
    }
    cls, kwargs = table[name]
    return cls.from_config(config, **kwargs)


def _image(n: int, height: int, width: int) -> torch.Tensor:
    """uint8 [n, H, W, 3]: smooth colour ramps plus a little noise, different per image."""
    g = torch.Generator().manual_seed(5)
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    rows = []
    for i in range(n):
        base = torch.cat([y.expand(-1, width, 1), x.expand(height, -1, 1), (x + y).expand(height, width, 1) / 2], -1)
        rows.append(((base.roll(i * 7, 1) * 0.8 + 0.2 * torch.rand(height, width, 3, generator=g)) * 255).round())
    return torch.stack(rows).to(torch.uint8)


def _mask(n: int, height: int, width: int) -> torch.Tensor:
    """float [n, 1, H, W]: a different rectangle per image, edges off the 8-pixel grid, soft values on both
    sides of 0.5 (binarised by both sides)."""
    mask = torch.zeros(n, 1, height, width)
    mask[0, :, 5:37, 3:height - 20] = 0.8
    mask[0, :, 40:44, 40:50] = 0.4  # below 0.5: kept
    mask[-1, :, 20:, 13:51] = 1.0
    return mask


def _for_diffusers(image: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1], which diffusers' image processor normalises."""
    return image.permute(0, 3, 1, 2).float() / 255


def _request(sampler: str, height: int = SIZE, width: int = SIZE, steps: int = STEPS) -> ImageRequest:
    name, _, spacing = sampler.partition("/")
    return ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=steps,
                        cfg_scale=CFG, sampler=name, schedule=spacing or None)


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def reference(tiny_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="module")
def ours(tiny_folder):
    return pipeline.load(tiny_folder)


def _diffusers(cls, reference, sampler: str, config: dict = SD15_SCHEDULER_CONFIG):
    parts = {k: v for k, v in reference.components.items() if k != "scheduler"}
    return cls(**parts, scheduler=_scheduler(sampler, config), requires_safety_checker=False)


# --- img2img -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m/karras"])
@torch.inference_mode()
def test_img2img_equals_diffusers(sampler, strength, reference, ours):
    from diffusers import StableDiffusionImg2ImgPipeline

    _check_img2img(_diffusers(StableDiffusionImg2ImgPipeline, reference, sampler), ours, sampler, strength)


@pytest.mark.parametrize("sampler, strength", [("heun", 0.6), ("lms", 1.0), ("dpmpp_2m_sde", 0.6), ("plms", 1.0), ("lcm", 0.5)])
@torch.inference_mode()
def test_img2img_other_samplers_equal_diffusers(sampler, strength, reference, ours):
    from diffusers import StableDiffusionImg2ImgPipeline

    _check_img2img(_diffusers(StableDiffusionImg2ImgPipeline, reference, sampler), ours, sampler, strength)


def _check_img2img(theirs, ours, sampler, strength, family="sd1", height=SIZE, width=SIZE):
    image = _image(len(SEEDS), height, width)
    expected, expected_pixels = diffusers_latents_and_pixels(
        theirs, [PROMPT] * len(SEEDS), negative_prompt=[NEGATIVE] * len(SEEDS),
        image=_for_diffusers(image), strength=strength, num_inference_steps=STEPS, guidance_scale=CFG,
        generator=_generators(), **({"height": height, "width": width} if family == "sdxl" else {}),
    )
    latents = img2img.sample_from_image(ours, _request(sampler, height, width), SEEDS, image, strength=strength)
    label = f"img2img {sampler} strength {strength}"
    assert_latents_match(latents, expected, family, label)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, label)


@pytest.mark.parametrize("sampler, strength", [("euler", 0.5), ("heun", 0.5), ("dpmpp_2m/karras", 0.75)])
@torch.inference_mode()
def test_unet_calls_for_a_strength(sampler, strength, reference, ours):
    """The U-Net runs int(steps * strength) steps (twice a step but the last for Heun), as in diffusers."""
    from diffusers import StableDiffusionImg2ImgPipeline

    theirs = _diffusers(StableDiffusionImg2ImgPipeline, reference, sampler)
    counted = _count_calls(theirs.unet, lambda: theirs(
        PROMPT, image=_for_diffusers(_image(1, SIZE, SIZE)), strength=strength, num_inference_steps=STEPS,
        generator=_generators(SEEDS[:1]), output_type="latent"))
    ours_counted = _count_calls(ours.unet, lambda: img2img.sample_from_image(
        ours, _request(sampler), SEEDS[:1], _image(1, SIZE, SIZE), strength=strength))
    walked = int(STEPS * strength)
    assert ours_counted == counted == (2 * walked - 1 if sampler == "heun" else walked)


def _count_calls(module: torch.nn.Module, run) -> int:
    calls = []
    handle = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


@torch.inference_mode()
def test_plms_below_full_strength_walks_pndm_from_the_start_step(reference, ours):
    """Our deliberate difference (samplers.sample): diffusers' img2img cuts PNDM's timestep list, whose
    second entry is repeated for the first step's corrector, as if it had one entry per step: its walk
    starts a timestep higher (501 for the 5 last of 10 steps), and from the third call on evaluates the
    latent (then at 401) at the next timestep down. We walk PNDM from the start step, as at strength 1."""
    from diffusers import StableDiffusionImg2ImgPipeline

    theirs = _diffusers(StableDiffusionImg2ImgPipeline, reference, "plms")
    seen_theirs, seen_ours = [], []
    hook = theirs.unet.register_forward_pre_hook(lambda m, args: seen_theirs.append(int(args[1])))
    try:
        theirs(PROMPT, image=_for_diffusers(_image(1, SIZE, SIZE)), strength=0.5, num_inference_steps=10,
               generator=_generators(SEEDS[:1]), output_type="latent")
    finally:
        hook.remove()
    hook = ours.unet.register_forward_pre_hook(lambda m, args: seen_ours.append(int(args[1][0])))
    try:
        img2img.sample_from_image(ours, _request("plms", steps=10), SEEDS[:1], _image(1, SIZE, SIZE), strength=0.5)
    finally:
        hook.remove()
    assert seen_theirs == [501, 401, 301, 201, 101, 1]
    assert seen_ours == [401, 301, 301, 201, 101, 1]


def test_lms_below_full_strength_starts_at_first_order():
    """Our deliberate difference (samplers.sample): diffusers' LMS takes its order from the step's index in
    the whole schedule, so a walk cut at step 5 starts with 4th-order coefficients and one derivative; we
    start at order 1 as k-diffusion's sample_lms does on the cut sigmas."""
    from diffusers import LMSDiscreteScheduler

    from ldmcli.samplers import lms

    scheduler = LMSDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(5)
    orders, coefficient = [], scheduler.get_lms_coefficient
    scheduler.get_lms_coefficient = lambda order, t, current: orders.append(order) or coefficient(order, t, current)
    x = torch.ones(1, 1, 1, 1)
    scheduler.step(torch.zeros_like(x), scheduler.timesteps[5], x)
    assert set(orders) == {4}

    sigmas = scheduler.sigmas[5:].float()  # ours: a first step of order 1 is Euler's
    ours = lms(lambda x, sigma: x * 0.5, x, sigmas[:2], noise=None)
    torch.testing.assert_close(ours, x + (x - x * 0.5) / sigmas[0] * (sigmas[1] - sigmas[0]))


def test_start_step_is_diffusers_get_timesteps():
    assert [first_step(12, s) for s in (0.3, 0.75, 1.0, 0.99)] == [9, 3, 0, 1]
    assert first_step(10, 0.58) == 5  # int(5.8) = 5 steps walked
    with pytest.raises(ValueError, match="runs no step"):
        first_step(12, 0.05)
    with pytest.raises(ValueError, match="strength"):
        first_step(12, 0.0)


@torch.inference_mode()
def test_match_a1111_is_refused_before_encoding(ours):
    request = replace(_request("euler"), match="a1111")
    with pytest.raises(ValueError, match="A1111's img2img is not reproduced"):
        img2img.sample_from_image(ours, request, SEEDS[:1], _image(1, SIZE, SIZE), strength=0.5)


@torch.inference_mode()
def test_vae_posterior_sample_equals_diffusers(reference, ours):
    """Per image, its own generator, mean + std * randn, times the scale factor (retrieve_latents)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        retrieve_latents,
    )

    image = _image(2, SIZE, SIZE)
    x = vae_encode.to_vae_input(image)
    generators = _generators()
    expected = torch.cat([retrieve_latents(reference.vae.encode(x[i:i + 1]), generator=generators[i])
                          for i in range(2)]) * reference.vae.config.scaling_factor
    noise = pipeline.noise_source(SEEDS, (4, SIZE // 8, SIZE // 8), "cpu", torch.float32)
    ours_latents = vae_encode.encode(ours.vae, image, noise=noise, scale_factor=ours.spec.scale_factor)
    torch.testing.assert_close(ours_latents, expected, atol=2e-5, rtol=1e-5)
    mode = vae_encode.encode(ours.vae, image, noise=None, scale_factor=ours.spec.scale_factor)
    torch.testing.assert_close(mode, torch.cat([reference.vae.encode(x[i:i + 1]).latent_dist.mode() for i in range(2)])
                               * reference.vae.config.scaling_factor, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_encode_in_float32_on_a_bf16_vae(tiny_folder, ours):
    """dtype=float32 encodes a bf16 VAE in fp32 and leaves it bf16; bf16 itself is close (its rounding)."""
    image = _image(1, SIZE, SIZE)
    half = pipeline.load(tiny_folder, dtype=torch.bfloat16)
    in_fp32 = vae_encode.encode(half.vae, image, noise=None, scale_factor=half.spec.scale_factor, dtype=torch.float32)
    assert {p.dtype for p in half.vae.parameters()} == {torch.bfloat16}
    in_bf16 = vae_encode.encode(half.vae, image, noise=None, scale_factor=half.spec.scale_factor)
    full = vae_encode.encode(ours.vae, image, noise=None, scale_factor=ours.spec.scale_factor)
    scale = full.abs().max().item()
    assert (in_fp32 - full).abs().max().item() < 0.02 * scale  # the weights' bf16 rounding only
    assert (in_bf16 - full).abs().max().item() < 0.05 * scale
    assert in_fp32.dtype == in_bf16.dtype == torch.float32


# --- inpainting with a 4-channel U-Net --------------------------------------------------------------------


@pytest.mark.parametrize("sampler, strength", [
    ("euler", 1.0), ("euler", 0.75), ("euler_a", 0.75), ("ddim", 1.0), ("dpmpp_2m/karras", 0.75), ("heun", 0.6),
    ("lms", 1.0), ("plms", 1.0), ("dpmpp_2m_sde", 0.6), ("lcm", 0.75),
])
@torch.inference_mode()
def test_inpainting_equals_diffusers(sampler, strength, reference, ours):
    from diffusers import StableDiffusionInpaintPipeline

    image, mask = _image(len(SEEDS), SIZE, SIZE), _mask(len(SEEDS), SIZE, SIZE)
    expected, expected_pixels = diffusers_latents_and_pixels(
        _diffusers(StableDiffusionInpaintPipeline, reference, sampler), [PROMPT] * len(SEEDS),
        negative_prompt=[NEGATIVE] * len(SEEDS),
        image=_for_diffusers(image), mask_image=mask, strength=strength, num_inference_steps=STEPS,
        guidance_scale=CFG, generator=_generators(), height=SIZE, width=SIZE,
    )
    latents = img2img.sample_from_image(ours, _request(sampler), SEEDS, image, strength=strength, mask=mask)
    label = f"inpaint {sampler} strength {strength}"
    assert_latents_match(latents, expected, "sd1", label)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, label)


@torch.inference_mode()
def test_inpainting_keeps_the_unmasked_image(ours):
    """Where the mask keeps the image, the final latents ARE the image's latents (the last blend takes the
    clean ones), and the decoded pixels there stay within the VAE round trip's error of the original."""
    image, mask = _image(len(SEEDS), SIZE, SIZE), _mask(len(SEEDS), SIZE, SIZE)
    latents = img2img.sample_from_image(ours, _request("euler_a"), SEEDS, image, strength=1.0, mask=mask)
    noise = pipeline.noise_source(SEEDS, (4, SIZE // 8, SIZE // 8), "cpu", torch.float32)
    image_latents = vae_encode.encode(ours.vae, image, noise=noise, scale_factor=ours.spec.scale_factor)
    keep = img2img.latent_mask(mask, 8).latent.expand_as(latents) == 0
    assert torch.equal(latents[keep], image_latents[keep])

    kept_pixels = (img2img.latent_mask(mask, 8).image == 0).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    # away from the repainted region by the decoder's 3x3 convolutions' reach at full resolution
    kept_pixels = kept_pixels & (torch.nn.functional.max_pool2d((~kept_pixels).permute(0, 3, 1, 2).float(), 9, 1, 4)
                                 == 0).permute(0, 2, 3, 1)
    round_trip = pipeline.decode_latents(ours, image_latents).int()
    inpainted = pipeline.decode_latents(ours, latents).int()
    original = image.int()
    round_trip_error = (round_trip - original).abs()[kept_pixels].float()
    inpainted_error = (inpainted - original).abs()[kept_pixels].float()
    from_round_trip = (inpainted - round_trip).abs()[kept_pixels].float()
    print(f"\nkept pixels: round trip error mean {round_trip_error.mean():.2f} max {round_trip_error.max():.0f}; "
          f"inpainted mean {inpainted_error.mean():.2f} max {inpainted_error.max():.0f}; "
          f"inpainted - round trip mean {from_round_trip.mean():.2f} max {from_round_trip.max():.0f}", end="")
    assert inpainted_error.max() <= round_trip_error.max()
    assert inpainted_error.mean() <= round_trip_error.mean() * 1.1


# --- inpainting with a 9-channel U-Net --------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_reference(reference):
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9})
    _spread_norms(unet)
    parts = {k: v for k, v in reference.components.items() if k != "unet"}
    return StableDiffusionInpaintPipeline(**{**parts, "unet": unet.eval()}, requires_safety_checker=False)


@pytest.fixture(scope="module")
def inpainting_ours(inpainting_reference, ours, tmp_path_factory):
    """The 9-channel model loaded by ldm; built by hand from our keymap while the loader refuses it."""
    folder = tmp_path_factory.mktemp("tiny-sd1-inpainting")
    inpainting_reference.save_pretrained(folder, safe_serialization=True)
    try:
        return pipeline.load(folder)
    except CheckpointError:
        pass
    from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from ldmcli.models.unet import UNetModel

    config = unet_config_from_diffusers(inpainting_reference.unet.config)
    unet = UNetModel(config)
    unet.load_state_dict(unet_diffusers_to_ldm(inpainting_reference.unet.state_dict(), config), strict=True)
    return replace(ours, unet=unet.eval(), spec=replace(ours.spec, unet=config))


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("euler_a", 0.75), ("ddim", 0.6)])
@torch.inference_mode()
def test_inpainting_unet_equals_diffusers(sampler, strength, inpainting_reference, inpainting_ours):
    assert inpainting_ours.spec.unet.in_channels == 9
    image, mask = _image(len(SEEDS), SIZE, SIZE), _mask(len(SEEDS), SIZE, SIZE)
    inpainting_reference.scheduler = _scheduler(sampler, SD15_SCHEDULER_CONFIG)
    expected, expected_pixels = diffusers_latents_and_pixels(
        inpainting_reference, [PROMPT] * len(SEEDS), negative_prompt=[NEGATIVE] * len(SEEDS), image=_for_diffusers(image), mask_image=mask,
        strength=strength, num_inference_steps=STEPS, guidance_scale=CFG, generator=_generators(),
        height=SIZE, width=SIZE,
    )
    latents = img2img.sample_from_image(inpainting_ours, _request(sampler), SEEDS, image, strength=strength, mask=mask)
    label = f"9-channel inpaint {sampler} strength {strength}"
    assert_latents_match(latents, expected, "sd1", label)
    assert_pixels_match(pipeline.decode_latents(inpainting_ours, latents), expected_pixels, label)


# --- SDXL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_reference(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl-img2img")
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder, StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)


@pytest.mark.parametrize("sampler, strength", [("euler", 0.3), ("euler_a", 0.75)])
@torch.inference_mode()
def test_sdxl_img2img_equals_diffusers(sampler, strength, sdxl_reference):
    """StableDiffusionXLImg2ImgPipeline (base: no aesthetic score; size conditioning = the image's size,
    denoising_start None), at a size that is not square."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder, reference = sdxl_reference
    ours = pipeline.load(folder)
    parts = {k: v for k, v in reference.components.items() if k != "scheduler"}
    theirs = StableDiffusionXLImg2ImgPipeline(**parts, scheduler=_scheduler(sampler, SDXL_SCHEDULER_CONFIG),
                                              requires_aesthetics_score=False, add_watermarker=False)
    _check_img2img(theirs, ours, sampler, strength, family="sdxl", height=64, width=96)
