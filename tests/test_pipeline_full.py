"""Full SD 1.5 size (random weights): whole-pipeline parity with diffusers. Minutes; run with -m slow."""

from __future__ import annotations

import ast
import json
import time

import pytest
import torch

from ldmcli import pipeline
from ldmcli.request import ImageRequest
from sd_fixtures import MANIFESTS, DATA, SD15_SCHEDULER_CONFIG, _spread_norms

pytestmark = pytest.mark.slow



def _sd15_config(component: str) -> dict:
    with open(MANIFESTS / "sd15-diffusers-folder.json") as f:
        config = json.load(f)[component]["config"]
    config = config if isinstance(config, dict) else ast.literal_eval(config)
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    text = {k: v for k, v in _sd15_config("text_encoder").items() if k not in ("architectures", "transformers_version", "dtype")}
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**_sd15_config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77),
        unet=UNet2DConditionModel(**_sd15_config("unet")),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    _spread_norms(pipe.unet, pipe.vae, pipe.text_encoder)
    folder = tmp_path_factory.mktemp("sd15-random")
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    return folder


@pytest.mark.parametrize("sampler, spacing, size, steps", [("euler", None, 256, 3), ("dpmpp_2m", "karras", 256, 3), ("euler_a", None, 512, 2)])
@torch.inference_mode()
def test_full_size_images_equal_diffusers(sd15_folder, sampler, spacing, size, steps):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd15_folder, local_files_only=True, safety_checker=None)
    cls = {"euler": diffusers.EulerDiscreteScheduler, "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
           "euler_a": diffusers.EulerAncestralDiscreteScheduler}[sampler]
    reference.scheduler = cls.from_config(SD15_SCHEDULER_CONFIG, **({"use_karras_sigmas": True} if spacing else {}))
    started = time.perf_counter()
    expected = reference("a cat", negative_prompt="blurry", height=size, width=size, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(5), output_type="latent").images
    ref_pixels = reference.vae.decode(expected / 0.18215).sample
    ref_pixels = (ref_pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
    diffusers_seconds = time.perf_counter() - started
    del reference

    ours = pipeline.load(sd15_folder)
    started = time.perf_counter()
    request = ImageRequest(prompt="a cat", negative_prompt="blurry", width=size, height=size, steps=steps, cfg_scale=7.5, sampler=sampler, schedule=spacing)
    latents = pipeline.sample_latents(ours, request, [5])
    pixels = pipeline.decode_latents(ours, latents)
    ours_seconds = time.perf_counter() - started
    latent_err = (latents - expected).abs().max().item()
    pixel_err = (pixels.int() - ref_pixels.int()).abs().max().item()
    print(f"\n{sampler}/{spacing} {size}px {steps} steps: latent max|d| {latent_err:.2e}, pixels max|d| {pixel_err}/255, "
          f"ours {ours_seconds:.1f} s, diffusers {diffusers_seconds:.1f} s")
    torch.testing.assert_close(latents, expected, atol=1e-3, rtol=1e-3)
    assert pixel_err <= 1
