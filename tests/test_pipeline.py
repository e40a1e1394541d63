"""Whole-pipeline parity with diffusers' StableDiffusionPipeline on a tiny SD1-structured model.

Same random weights, same prompt, same seed: our latents and PNG pixels must equal diffusers'
for every sampler, configured the way a diffusers user configures it from SD 1.5's
scheduler config. The single-file path is checked against diffusers' own LDM converter.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline
from sd_fixtures import SD15_SCHEDULER_CONFIG, ldm_single_file_state_dict

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


def _reference_pixels(reference, latents: torch.Tensor) -> torch.Tensor:
    vae = reference.vae
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)


@pytest.mark.parametrize(
    "sampler_schedule", ["euler", "euler_a", "heun", "ddim", "dpmpp_2m/karras", "dpmpp_2m", "dpmpp_2m_sde", "lms", "plms"]
)
@torch.inference_mode()
def test_images_equal_diffusers(sampler_schedule, reference, ours):
    sampler, _, spacing = sampler_schedule.partition("/")
    steps, cfg = 12, 7.5
    reference.scheduler = _diffusers_scheduler(sampler_schedule)
    expected = _reference_latents(reference, steps, cfg)
    request = pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, steps, cfg, sampler, spacing or None)
    latents = pipeline.sample_latents(ours, request, [SEED])
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    pixels = pipeline.decode_latents(ours, latents)
    diff = (pixels.int() - _reference_pixels(reference, expected).int()).abs().max().item()
    assert diff <= 1, f"{sampler_schedule}: PNG pixels differ by {diff}/255"


@torch.inference_mode()
def test_cfg_one_skips_negative_and_matches(reference, ours):
    reference.scheduler = _diffusers_scheduler("euler")
    expected = _reference_latents(reference, 6, 1.0)
    latents = pipeline.sample_latents(ours, pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, 6, 1.0, "euler"), [SEED])
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_batch_of_seeds_equals_diffusers_generator_list(reference, ours):
    """A batch with one generator per image (diffusers' list form) equals ours seed by seed."""
    reference.scheduler = _diffusers_scheduler("euler_a")
    seeds = [7, 8, 9]
    expected = reference(
        [PROMPT] * 3, negative_prompt=[NEGATIVE] * 3, height=SIZE, width=SIZE, num_inference_steps=5,
        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
    ).images
    request = pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, 5, 7.5, "euler_a")
    torch.testing.assert_close(pipeline.sample_latents(ours, request, seeds), expected, atol=1e-4, rtol=1e-4)
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
    request = pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, 10, 7.5, "dpmpp_2m", "karras")
    latents = pipeline.sample_latents(single, request, [SEED])
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(latents, pipeline.sample_latents(ours, request, [SEED]), atol=0, rtol=0)


@torch.inference_mode()
def test_ckpt_equals_safetensors(tmp_path, ours):
    path = tmp_path / "tiny-sd1.ckpt"
    torch.save({"state_dict": ldm_single_file_state_dict(ours), "global_step": 10}, path)
    loaded = pipeline.load(path)
    for a, b in zip(loaded.unet.state_dict().values(), ours.unet.state_dict().values()):
        assert torch.equal(a, b)


@torch.inference_mode()
def test_prompts_encoded_up_front_give_the_same_images(tiny_folder):
    """`ldm generate` encodes a run's prompts first and frees the text encoder: same pixels, and each
    prompt's embedding is computed alone, so it does not depend on the others in its batch."""
    model = pipeline.load(tiny_folder)
    mixed = pipeline.encode_text(model, [PROMPT, NEGATIVE, PROMPT]).context
    alone = pipeline.encode_text(model, [NEGATIVE]).context
    assert torch.equal(mixed[1:2], alone) and torch.equal(mixed[0], mixed[2])
    request = pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, steps=3, cfg_scale=5.0, sampler="euler")
    before = pipeline.generate(model, request, [SEED, SEED + 1])
    pipeline.encode_up_front(model, [PROMPT, NEGATIVE])
    assert model.text_encoder is None
    assert torch.equal(pipeline.generate(model, request, [SEED, SEED + 1]), before)
    with pytest.raises(RuntimeError, match="not encoded up front"):
        pipeline.encode_text(model, ["a prompt nobody encoded"])


@torch.inference_mode()
def test_decode_after_releasing_the_unet(tiny_folder):
    """`release_unet` frees the U-Net for a run's last decode: the decode is unchanged, sampling refuses."""
    model = pipeline.load(tiny_folder)
    request = pipeline.ImageRequest(PROMPT, NEGATIVE, SIZE, SIZE, steps=2, cfg_scale=5.0, sampler="euler")
    latents = pipeline.sample_latents(model, request, [SEED])
    before = pipeline.decode_latents(model, latents)
    unet = weakref.ref(model.unet)
    pipeline.release_unet(model)
    assert model.unet is None and unet() is None  # nothing else holds it: its memory is freed
    assert torch.equal(pipeline.decode_latents(model, latents), before)
    with pytest.raises(RuntimeError, match="released"):
        pipeline.sample_latents(model, request, [SEED])
