"""Full SD 2.1 size (random weights): the OpenCLIP ViT-H tower and the v-prediction pipeline
against diffusers. Minutes; run with -m slow. Peak memory ~6 GB (one pipeline copy at a time)."""

from __future__ import annotations

import ast
import json
import time

import pytest
import torch

from ldmcli import pipeline
from ldmcli.request import ImageRequest
from ldmcli.keymap.clip import clip_openclip_to_canonical
from ldmcli.models.clip import CLIPTextModel, clip_config_from_shapes
from ldmcli.tokenizer import PromptTokenizer
from sd_fixtures import (  # noqa: E402
    MANIFESTS,
    SD21_SCHEDULER_CONFIG,
    _spread_norms,
    _tokenizer,
    diffusers_scheduler,
    diffusers_text_model_from_openclip,
    random_openclip_tower,
)

pytestmark = pytest.mark.slow

PROMPTS = ["a photo of a cat", "", " ".join(f"word{i}" for i in range(100))]


def _sd21_config(component: str) -> dict:
    with open(MANIFESTS / "sd21-diffusers-folder.json") as f:
        config = json.load(f)[component]["config"]
    config = config if isinstance(config, dict) else ast.literal_eval(config)
    drop = ("architectures", "transformers_version", "dtype")
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in drop}


@torch.no_grad()
def test_full_vit_h_tower_parity():
    """The 24-block OpenCLIP ViT-H of an SD 2.x single file: penultimate block + ln_final, vs the
    23-layer CLIPTextModel diffusers makes of it (its converter drops block 23 for this prefix)."""
    tower = random_openclip_tower(1024, 24, seed=0)
    reference = diffusers_text_model_from_openclip(tower, "cond_stage_model.model.", layers=23, projection=False)
    sd = clip_openclip_to_canonical(tower, keep_projection=False)
    with torch.device("meta"):
        ours = CLIPTextModel(clip_config_from_shapes({k: v.shape for k, v in sd.items()}, activation="gelu"))
    ours.load_state_dict(sd, strict=True, assign=True)
    ids = PromptTokenizer(pad_token_id=0)(PROMPTS)
    ref = reference(ids, output_hidden_states=True)
    want = ref.last_hidden_state
    got = ours(ids, skip_last_layers=1).hidden_states
    print(f"\nViT-H (SD2 single file) penultimate+LN: max abs err {(got - want).abs().max().item():.2e}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def sd21_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel as HFCLIPTextModel

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**_sd21_config("vae")),
        text_encoder=HFCLIPTextModel(CLIPTextConfig(**_sd21_config("text_encoder"))),
        tokenizer=_tokenizer("!"),
        unet=UNet2DConditionModel(**_sd21_config("unet")),
        scheduler=DDIMScheduler.from_config(SD21_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    _spread_norms(pipe.unet, pipe.vae, pipe.text_encoder)
    folder = tmp_path_factory.mktemp("sd21-random")
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    return folder


@pytest.mark.parametrize("sampler, size, steps", [("ddim", 256, 3), ("euler_a", 256, 2), ("dpmpp_2m/karras", 256, 3)])
@torch.inference_mode()
def test_full_size_v_prediction_images_equal_diffusers(sd21_folder, sampler, size, steps):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(sd21_folder, local_files_only=True, safety_checker=None)
    reference.scheduler = diffusers_scheduler(sampler, SD21_SCHEDULER_CONFIG)
    started = time.perf_counter()
    expected = reference("a cat", negative_prompt="blurry", height=size, width=size, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(5), output_type="latent").images
    ref_pixels = reference.vae.decode(expected / 0.18215).sample
    ref_pixels = (ref_pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
    diffusers_seconds = time.perf_counter() - started
    del reference

    ours = pipeline.load(sd21_folder)
    assert ours.spec.family == "sd2" and ours.spec.schedule.prediction_type == "v_prediction"
    name, _, spacing = sampler.partition("/")
    started = time.perf_counter()
    request = ImageRequest(prompt="a cat", negative_prompt="blurry", width=size, height=size, steps=steps, cfg_scale=7.5, sampler=name, schedule=spacing or None)
    latents = pipeline.sample_latents(ours, request, [5])
    pixels = pipeline.decode_latents(ours, latents)
    ours_seconds = time.perf_counter() - started
    latent_err = (latents - expected).abs().max().item()
    pixel_err = (pixels.int() - ref_pixels.int()).abs().max().item()
    print(f"\nSD2.1 v {sampler} {size}px {steps} steps: latent max|d| {latent_err:.2e}, pixels max|d| {pixel_err}/255, "
          f"ours {ours_seconds:.1f} s, diffusers {diffusers_seconds:.1f} s")
    torch.testing.assert_close(latents, expected, atol=1e-3, rtol=1e-3)
    assert pixel_err <= 1
