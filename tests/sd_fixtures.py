"""Tiny Stable Diffusion 1.x models built in diffusers/transformers with random weights.

Same block structure and family rules as SD 1.5 (8 U-Net heads, 64-channel CLIP heads, a
4-level VAE that downsamples by 8), small widths, so whole pipelines run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "src" / "ldmcli" / "data"

# SD 1.5's scheduler/scheduler_config.json (from ../shared/fixtures/sd15-diffusers-folder.json).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,  # diffusers' name for SD1's 8 heads
    norm_num_groups=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)

TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,  # one 64-channel head, the CLIP rule
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
)


def build_tiny_sd1_pipeline(seed: int = 0):
    """A diffusers StableDiffusionPipeline with random weights in the tiny SD1 structure."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    _spread_norms(unet, vae, text_encoder)
    tokenizer = CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77)
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float32)


def _spread_norms(*modules: torch.nn.Module) -> None:
    """Randomise norm affine parameters and zero-initialised convs so no path is trivially identity."""
    g = torch.Generator().manual_seed(1234)
    for module in modules:
        for name, p in module.named_parameters():
            if p.abs().sum() == 0 or (p == 1).all():  # zero-init out convs, unit norm weights
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if (p == 1).all() else 0.0))


def save_tiny_sd1_folder(folder: Path, seed: int = 0) -> Path:
    pipe = build_tiny_sd1_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["timestep_spacing"] == "leading"
    return folder


def ldm_single_file_state_dict(model) -> dict[str, torch.Tensor]:
    """Our loaded networks (an `ldmcli.pipeline.StableDiffusion`) under the original LDM single-file prefixes."""
    parts = {"model.diffusion_model.": model.unet, "first_stage_model.": model.vae,
             "cond_stage_model.transformer.": model.text_encoder}
    return {prefix + k: v.contiguous() for prefix, net in parts.items() for k, v in net.state_dict().items()}
