"""Whole-pipeline parity with diffusers' StableDiffusionPipeline on a tiny SD1-structured model.

Same random weights, same prompt, same seed: our latents and PNG pixels must equal diffusers'
for every sampler, configured the way a diffusers user configures it from SD 1.5's
scheduler config. The single-file path is checked against diffusers' own LDM converter.
Pixels are diffusers' own output (output_type="pil"), latents caught from the same call;
tolerances are measured (sd_fixtures: LATENT_TOL, PIXEL_MAX_FRACTION_DIFFERENT).
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline, text_conditioning
from ldmcli.request import ImageRequest
from sd_fixtures import (
    SD15_SCHEDULER_CONFIG,
    assert_latents_match,
    assert_pixels_match,
    assert_state_dicts_equal,
    diffusers_latents_and_pixels,
    ldm_single_file_state_dict,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
SEED = 1234


def _diffusers_scheduler(name: str):
    """The oracle's own configuration of each sampler (written here, not taken from our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "heun": (diffusers.HeunDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "dpmpp_2m/karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "lms": (diffusers.LMSDiscreteScheduler, {}),
        "plms": (diffusers.PNDMScheduler, {}),
    }
    cls, kwargs = table[name]
    return cls.from_config(SD15_SCHEDULER_CONFIG, **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tiny_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="module")
def ours(tiny_folder):
    return pipeline.load(tiny_folder)


def _reference_latents(reference, steps: int, cfg: float, seed: int = SEED) -> torch.Tensor:
    return reference(
        PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator().manual_seed(seed), output_type="latent",
    ).images


@pytest.mark.parametrize(
    "sampler_schedule, height, width",
    [(name, SIZE, SIZE) for name in
     ["euler", "euler_a", "heun", "ddim", "dpmpp_2m/karras", "dpmpp_2m", "dpmpp_2m_sde", "lms", "plms"]]
    + [("euler_a", 96, 64)],  # not square: height and width must not be swapped anywhere
)
@torch.inference_mode()
def test_images_equal_diffusers(sampler_schedule, height, width, reference, ours):
    sampler, _, spacing = sampler_schedule.partition("/")
    steps, cfg = 12, 7.5
    reference.scheduler = _diffusers_scheduler(sampler_schedule)
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=steps,
        guidance_scale=cfg, generator=torch.Generator().manual_seed(SEED),
    )
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=steps, cfg_scale=cfg, sampler=sampler, schedule=spacing or None)
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", sampler_schedule)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, sampler_schedule)


@torch.inference_mode()
def test_cfg_one_skips_negative_and_matches(reference, ours):
    reference.scheduler = _diffusers_scheduler("euler")
    expected = _reference_latents(reference, 6, 1.0)
    latents = pipeline.sample_latents(ours, ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, cfg_scale=1.0, sampler="euler"), [SEED])
    assert_latents_match(latents, expected, "sd1", "cfg 1")


@torch.inference_mode()
def test_batch_of_seeds_equals_diffusers_generator_list(reference, ours):
    """A batch with one generator per image (diffusers' list form) equals ours seed by seed."""
    reference.scheduler = _diffusers_scheduler("euler_a")
    seeds = [7, 8, 9]
    expected = reference(
        [PROMPT] * 3, negative_prompt=[NEGATIVE] * 3, height=SIZE, width=SIZE, num_inference_steps=5,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
    ).images
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=5, cfg_scale=7.5, sampler="euler_a")
    assert_latents_match(pipeline.sample_latents(ours, request, seeds), expected, "sd1", "batch of seeds")
    one_by_one = torch.cat([pipeline.sample_latents(ours, request, [s]) for s in seeds])
    # Batched BLAS kernels sum in a different order: equal to float rounding, not bitwise.
    torch.testing.assert_close(pipeline.sample_latents(ours, request, seeds), one_by_one, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_single_file_equals_diffusers_from_single_file(tmp_path, tiny_folder, ours):
    """diffusers' own LDM->diffusers converter reads our single file; both give the same image."""
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "tiny-sd1.safetensors"
    save_file(ldm_single_file_state_dict(ours), path)
    reference = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_folder), local_files_only=True, safety_checker=None
    )
    reference.scheduler = _diffusers_scheduler("dpmpp_2m/karras")
    expected = _reference_latents(reference, 10, 7.5)
    single = pipeline.load(path)
    assert replace(single.spec, schedule_source="") == replace(ours.spec, schedule_source="")
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=10, cfg_scale=7.5, sampler="dpmpp_2m", schedule="karras")
    latents = pipeline.sample_latents(single, request, [SEED])
    assert_latents_match(latents, expected, "sd1", "single file")
    torch.testing.assert_close(latents, pipeline.sample_latents(ours, request, [SEED]), atol=0, rtol=0)


@torch.inference_mode()
def test_ckpt_equals_safetensors(tmp_path, ours):
    path = tmp_path / "tiny-sd1.ckpt"
    torch.save({"state_dict": ldm_single_file_state_dict(ours), "global_step": 10}, path)
    loaded = pipeline.load(path)
    for net in ("unet", "vae", "text_encoder"):
        assert_state_dicts_equal(getattr(loaded, net).state_dict(), getattr(ours, net).state_dict())


@torch.inference_mode()
def test_prompts_encoded_up_front_give_the_same_images(tiny_folder):
    """`ldm generate` encodes a run's prompts first and frees the text encoder: same pixels, and each
    prompt's embedding is computed alone, so it does not depend on the others in its batch."""
    model = pipeline.load(tiny_folder)
    mixed = text_conditioning.encode_text(model, [PROMPT, NEGATIVE, PROMPT]).context
    alone = text_conditioning.encode_text(model, [NEGATIVE]).context
    assert torch.equal(mixed[1:2], alone) and torch.equal(mixed[0], mixed[2])
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=3, cfg_scale=5.0, sampler="euler")
    before = pipeline.generate(model, request, [SEED, SEED + 1])
    text_conditioning.encode_up_front(model, [request])
    assert model.text_encoder is None
    assert torch.equal(pipeline.generate(model, request, [SEED, SEED + 1]), before)
    with pytest.raises(RuntimeError, match="not encoded up front"):
        text_conditioning.encode_text(model, ["a prompt nobody encoded"])


@torch.inference_mode()
def test_decode_after_releasing_the_unet(tiny_folder):
    """`release_unet` frees the U-Net for a run's last decode: the decode is unchanged, sampling refuses."""
    model = pipeline.load(tiny_folder)
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=2, cfg_scale=5.0, sampler="euler")
    latents = pipeline.sample_latents(model, request, [SEED])
    before = pipeline.decode_latents(model, latents)
    unet = weakref.ref(model.unet)
    pipeline.release_unet(model)
    assert model.unet is None and unet() is None  # nothing else holds it: its memory is freed
    assert torch.equal(pipeline.decode_latents(model, latents), before)
    with pytest.raises(RuntimeError, match="released"):
        pipeline.sample_latents(model, request, [SEED])
