"""Hires fix parity (`hires.generate_hires`) with the same two passes composed from diffusers' pipelines.

The oracle, per case, written here from diffusers and A1111 alone (its tables below, not our registries):

1. `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`) at the first size, output_type="latent",
   one generator per image seeded with its seed;
2. a latent upscaler: ``F.interpolate(latents, size=(target_h // 8, target_w // 8), mode, antialias)`` with
   A1111's `latent_upscale_modes` entry; a pixel upscaler: the latents decoded and rounded to uint8 by
   diffusers' own `VaeImageProcessor.postprocess`, each image resized with PIL LANCZOS;
3. `StableDiffusionImg2ImgPipeline` (SDXL: `StableDiffusionXLImg2ImgPipeline`) at the target size given
   those latents (a 4-channel `image` is taken as latents: no encode) or those PIL images, with the hires
   steps and strength and FRESH generators seeded with the same seeds.

Our final latents must equal the img2img pipeline's within sd_fixtures.LATENT_TOL and the PNGs within
1/255. A pixel upscaler's intermediate uint8 image is compared first (within 1/255, as every PNG): where
a value at a .5 boundary rounds the other way on the two sides (float noise; measured: 1 value of the
SDXL case's 9216, none in the SD1 cases), the encode would carry that 1/255 into the latents and the
second pass would move them past the latent tolerance, so that case's second pass is then run from
diffusers' intermediate (handed to the engine in place of its decode) and the rest compared as before.
All fp32, batch of two seeds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ldmcli import hires, pipeline
from ldmcli.request import ImageRequest
from sd_fixtures import (
    SD15_SCHEDULER_CONFIG,
    SDXL_SCHEDULER_CONFIG,
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SEEDS = [1234, 99]
STEPS = 8
CFG = 7.5

pytestmark = pytest.mark.usefixtures("one_thread")

# A1111's modules/shared_items.py `latent_upscale_modes` (name -> interpolate mode, antialias), copied.
A1111_LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


def _scheduler(name: str, config: dict):
    """The oracle's own configuration of each sampler (written here, not taken from our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m/karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }
    cls, kwargs = table[name]
    return cls.from_config(config, **kwargs)


def _target(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's hr_upscale_to_x/y = int(side * scale), its latent upscale to // 8 latent pixels."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def _generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _request(sampler: str, width: int, height: int) -> ImageRequest:
    name, _, spacing = sampler.partition("/")
    return ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=STEPS,
                        cfg_scale=CFG, sampler=name, schedule=spacing or None)


@pytest.fixture(scope="module")
def sd1(tiny_folder):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)
    parts = {k: v for k, v in reference.components.items() if k != "scheduler"}

    def make(cls, sampler):
        return cls(**parts, scheduler=_scheduler(sampler, SD15_SCHEDULER_CONFIG), requires_safety_checker=False)

    return {"first": lambda s: make(StableDiffusionPipeline, s), "second": lambda s: make(StableDiffusionImg2ImgPipeline, s),
            "ours": pipeline.load(tiny_folder), "family": "sd1"}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl-hires")
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    parts = {k: v for k, v in reference.components.items() if k != "scheduler"}

    def first(sampler):
        return StableDiffusionXLPipeline(**parts, scheduler=_scheduler(sampler, SDXL_SCHEDULER_CONFIG), add_watermarker=False)

    def second(sampler):
        return StableDiffusionXLImg2ImgPipeline(**parts, scheduler=_scheduler(sampler, SDXL_SCHEDULER_CONFIG),
                                                requires_aesthetics_score=False, add_watermarker=False)

    return {"first": first, "second": second, "ours": pipeline.load(folder), "family": "sdxl"}


def _diffusers_hires(models, sampler, upscaler, *, width, height, scale, hr_steps, strength):
    """The oracle: (final latents, PNG pixels, the uint8 intermediate or None) from diffusers' pipelines."""
    import numpy as np
    from PIL import Image

    n = len(SEEDS)
    first = models["first"](sampler)
    latents = first([PROMPT] * n, negative_prompt=[NEGATIVE] * n, width=width, height=height,
                    num_inference_steps=STEPS, guidance_scale=CFG, generator=_generators(), output_type="latent").images
    tw, th = _target(width, height, scale)
    intermediate = None
    if upscaler in A1111_LATENT_MODES:
        mode, antialias = A1111_LATENT_MODES[upscaler]
        image = F.interpolate(latents, size=(th // 8, tw // 8), mode=mode, antialias=antialias)
    else:
        assert upscaler == "Lanczos"
        decoded = first.vae.decode(latents / first.vae.config.scaling_factor, return_dict=False)[0]
        pil = first.image_processor.postprocess(decoded, output_type="pil")
        intermediate = torch.from_numpy(np.stack([np.asarray(im) for im in pil]))
        image = [im.resize((tw, th), resample=Image.Resampling.LANCZOS) for im in pil]
    expected, pixels = diffusers_latents_and_pixels(
        models["second"](sampler), [PROMPT] * n, negative_prompt=[NEGATIVE] * n, image=image, strength=strength,
        num_inference_steps=hr_steps or STEPS, guidance_scale=CFG, generator=_generators(),
    )
    return expected, pixels, intermediate


def _check(models, sampler, upscaler, *, width=32, height=32, scale, hr_steps, strength):
    ours = models["ours"]
    expected, expected_pixels, intermediate = _diffusers_hires(
        models, sampler, upscaler, width=width, height=height, scale=scale, hr_steps=hr_steps, strength=strength)
    request = _request(sampler, width, height).checked()
    label = f"hires {models['family']} {upscaler} {sampler} x{scale} strength {strength} steps {hr_steps}"
    decode = pipeline.decode_latents
    if intermediate is not None:
        first = pipeline.decode_latents(ours, pipeline.sample_latents(ours, request, SEEDS))
        assert_pixels_match(first, intermediate, f"{label} first pass")
        if not torch.equal(first, intermediate):
            # A value at a .5 boundary rounded the other way (float noise): the second pass is compared from
            # diffusers' intermediate, handed to the engine in place of its decode, since an encoded pixel
            # 1/255 off moves the latents past the tolerance (module docstring).
            print(f"\n{label}: second pass compared from diffusers' first-pass pixels", end="")
            decode = lambda *args, **kwargs: intermediate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "decode_latents", decode)
        latents = hires.generate_hires(ours, request, SEEDS, scale=scale, steps=hr_steps, strength=strength,
                                       upscaler=upscaler)
    tw, th = _target(width, height, scale)
    assert latents.shape == (len(SEEDS), 4, th // 8, tw // 8)
    assert_latents_match(latents, expected, models["family"], label)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, label)


@pytest.mark.parametrize("upscaler, sampler, scale, strength, hr_steps", [
    ("Latent", "euler", 2, 0.7, 0),
    ("Latent", "dpmpp_2m/karras", 1.5, 0.5, 6),
    ("Lanczos", "euler", 1.5, 0.7, 0),
    ("Lanczos", "dpmpp_2m/karras", 2, 0.5, 6),
    # ancestral: the second pass's sampler noise continues each fresh generator after add_noise's draw
    # (after the posterior's, for a pixel upscaler)
    ("Latent (bicubic antialiased)", "euler_a", 2, 0.7, 5),
    ("Lanczos", "euler_a", 1.5, 0.5, 0),
    ("Latent (nearest-exact)", "euler", 1.5, 0.5, 0),
])
@torch.inference_mode()
def test_hires_equals_diffusers_composed(upscaler, sampler, scale, strength, hr_steps, sd1):
    _check(sd1, sampler, upscaler, scale=scale, hr_steps=hr_steps, strength=strength)


@pytest.mark.parametrize("upscaler, sampler", [("Latent", "euler"), ("Lanczos", "euler_a")])
@torch.inference_mode()
def test_sdxl_hires_equals_diffusers_composed(upscaler, sampler, sdxl):
    """SDXL's size conditioning is the target size in the second pass (diffusers' SDXL img2img: the image's
    size); not square, so width and height cannot be swapped unnoticed."""
    _check(sdxl, sampler, upscaler, width=48, height=32, scale=2, hr_steps=0, strength=0.7)


# --- sizes, names, checks -----------------------------------------------------------------------------------


def test_hires_size_is_a1111s_int_then_multiple_of_8():
    assert hires.hires_size(512, 512, 2) == (1024, 1024)
    assert hires.hires_size(512, 768, 1.5) == (768, 1152)
    assert hires.hires_size(520, 512, 1.25) == (648, 640)  # int(650.0) = 650 -> 648
    assert hires.hires_size(512, 512, 1.15) == (584, 584)  # int(588.8) = 588 -> 584
    assert hires.hires_size(512, 512, 1) == (512, 512)
    for w, h, s in [(512, 512, 1.15), (640, 448, 1.35), (1000, 8, 3.95)]:
        assert hires.hires_size(w, h, s) == _target(w, h, s)


def test_upscaler_names_are_a1111s_case_insensitive():
    for name, (mode, antialias) in A1111_LATENT_MODES.items():
        for spelling in (name, name.lower(), name.upper()):
            u = hires.HIRES_UPSCALERS[hires.parse_upscaler(spelling)]
            assert (u.latent_mode, u.antialias) == (mode, antialias), spelling
    assert hires.parse_upscaler("Latent") == hires.parse_upscaler("latent") == "latent"
    assert hires.parse_upscaler("LANCZOS") == "lanczos"
    assert hires.parse_upscaler("latent-bicubic-antialiased") == "latent-bicubic-antialiased"
    assert hires.parse_upscaler("Nearest") == "nearest"
    assert not hires.HIRES_UPSCALERS["lanczos"].latent
    for bad in ("R-ESRGAN 4x+", "", "latent (linear)"):
        with pytest.raises(ValueError, match="unknown hires upscaler") as info:
            hires.parse_upscaler(bad)
        assert "\n" not in str(info.value)


def test_checks_refuse_with_one_line():
    assert hires.check_scale(1) == 1.0 and hires.check_scale(4) == 4.0
    for bad in (0.99, 4.01, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="hires scale"):
            hires.check_scale(bad)
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="strength"):
            hires.check_strength(bad)
    for bad in (-1, 1001, 2.5, True):
        with pytest.raises(ValueError, match="hires steps"):
            hires.check_steps(bad)
    assert hires.check_hires(512, 512, 20, scale=2) == (1024, 1024)
    with pytest.raises(ValueError, match="runs no step"):
        hires.check_hires(512, 512, 20, scale=2, strength=0.04)  # int(20 * 0.04) = 0
    assert hires.check_hires(512, 512, 20, scale=2, steps=30, strength=0.04) == (1024, 1024)  # int(1.2) = 1
    with pytest.raises(ValueError, match="2048x2048 .* more than the limit"):
        hires.check_hires(1024, 1024, 20, scale=2, max_pixels=2048 * 2047)
    with pytest.raises(ValueError, match="lcm"):
        hires.check_hires(512, 512, 8, scale=2, steps=60, sampler="lcm")
    with pytest.raises(ValueError, match="unknown hires upscaler"):
        hires.check_hires(512, 512, 20, scale=2, upscaler="ESRGAN_4x")


def test_upscale_pixels_is_pil():
    """Lanczos / Nearest at an exact scale are one PIL resize with that filter; "None" a LANCZOS resize."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 24, 40, 3), generator=g, dtype=torch.uint8)
    for name, pil_filter, (w, h) in [("Lanczos", Image.Resampling.LANCZOS, (80, 48)),
                                     ("Nearest", Image.Resampling.NEAREST, (80, 48)),
                                     ("None", Image.Resampling.LANCZOS, (64, 48))]:
        expected = np.stack([np.asarray(Image.fromarray(a).resize((w, h), resample=pil_filter)) for a in images.numpy()])
        assert torch.equal(hires.upscale_pixels(images, w, h, name), torch.from_numpy(expected)), name
    same = hires.upscale_pixels(images, 40, 24, "Lanczos")  # scale 1: A1111 resizes nothing
    assert torch.equal(same, images)
    # A target off the 8-pixel grid (never one of hires_size's): A1111's Upscaler.upscale goes on to
    # int(side * scale // 8 * 8) with LANCZOS, and resize_image back to the target
    a = Image.fromarray(images[0].numpy())
    odd = a.resize((60, 36), resample=Image.Resampling.NEAREST).resize((56, 32), resample=Image.Resampling.LANCZOS)
    odd = odd.resize((60, 36), resample=Image.Resampling.LANCZOS)
    assert torch.equal(hires.upscale_pixels(images[:1], 60, 36, "Nearest")[0], torch.from_numpy(np.array(odd)))


# --- the engine's contract ----------------------------------------------------------------------------------


@torch.inference_mode()
def test_steps_callback_and_second_pass_calls(sd1):
    """The callback numbers both passes' steps on (0 .. total_steps - 1); the U-Net runs request.steps
    times, then int(n * strength) times at the target size."""
    ours = sd1["ours"]
    request = _request("euler", 32, 32).checked()
    seen, sizes = [], []
    hook = ours.unet.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        hires.generate_hires(ours, request, SEEDS[:1], scale=1.5, steps=10, strength=0.55,
                             callback=lambda i, x: seen.append((i, tuple(x.shape[-2:]))))
    finally:
        hook.remove()
    walked = int(10 * 0.55)
    assert hires.total_steps(STEPS, 10, 0.55) == STEPS + walked
    assert [i for i, _ in seen] == list(range(STEPS + walked))
    assert [s for _, s in seen] == [(4, 4)] * STEPS + [(6, 6)] * walked
    assert sizes == [(4, 4)] * STEPS + [(6, 6)] * walked


@torch.inference_mode()
def test_each_image_depends_on_its_own_seed_only(sd1):
    """Fresh per-image generators in both passes: image i of a batch equals the image made alone."""
    ours = sd1["ours"]
    request = _request("euler_a", 32, 32).checked()
    both = hires.generate_hires(ours, request, SEEDS, scale=1.5, strength=0.6, upscaler="Lanczos")
    alone = hires.generate_hires(ours, request, SEEDS[1:], scale=1.5, strength=0.6, upscaler="Lanczos")
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=1e-5)


def test_refused_before_sampling(sd1, tiny_folder):
    ours = sd1["ours"]
    request = _request("euler", 32, 32).checked()
    without_encoder = pipeline.load(tiny_folder)
    without_encoder.vae.drop_encoder()  # as run.py loads for text-to-image
    calls = []
    without_encoder.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(RuntimeError, match="keep the VAE's encoder"):
        hires.generate_hires(without_encoder, request, SEEDS, scale=2, upscaler="Lanczos")
    assert not calls
    with pytest.raises(ValueError, match="A1111 numerics"):
        hires.generate_hires(ours, replace(request, match="a1111"), SEEDS, scale=2)
    with pytest.raises(ValueError, match="init image"):
        hires.generate_hires(ours, replace(request, init_image="x.png"), SEEDS, scale=2)
    with pytest.raises(ValueError, match="runs no step"):
        hires.generate_hires(ours, request, SEEDS, scale=2, strength=0.1)  # int(8 * 0.1) = 0
