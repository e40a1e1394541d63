"""A full-size SD1.5-structured diffusers folder with random weights: the benchmark's shared model.

The configs are the real runwayml/stable-diffusion-v1-5 ones (from tests/data); weights are
diffusers'/transformers' default random init with a fixed seed, saved once as fp32 safetensors (about
4.3 GB). ldm reads the same folder, so both tools run exactly the same weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "sd15-diffusers-folder.json"
DATA = Path(__file__).resolve().parents[1] / "src" / "ldmcli" / "data"
DEFAULT_FOLDER = Path(tempfile.gettempdir()) / "ldm-bench" / "sd15-diffusers"


def _config(component: str) -> dict:
    config = json.loads(FIXTURE.read_text())[component]["config"]
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_sd15_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_config("unet"))
    vae = AutoencoderKL(**_config("vae"))
    text = _config("text_encoder")
    text.pop("architectures", None)
    text.pop("transformers_version", None)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = PNDMScheduler.from_config(json.loads(FIXTURE.read_text())["scheduler/scheduler_config.json"])
    tokenizer = CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_sd15_folder(folder: Path = DEFAULT_FOLDER, seed: int = 0) -> Path:
    """Write (once) and return the folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    build_sd15_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def _components(folder: Path):
    from ldmcli.layout import read_components

    return read_components(Path(folder))


def unet_state_dict(folder: Path = DEFAULT_FOLDER) -> dict[str, torch.Tensor]:
    """The folder's U-Net under ldm's (LDM) names."""
    return _components(folder).unet


def vae_state_dict(folder: Path = DEFAULT_FOLDER, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The folder's VAE under ldm's (LDM) names, read alone (peak memory: the VAE, not the pipeline)."""
    from ldmcli.checkpoint import read_state_dict
    from ldmcli.keymap.vae import vae_diffusers_to_ldm
    from ldmcli.models.vae import VAEConfig

    return vae_diffusers_to_ldm(read_state_dict(Path(folder) / "vae" / "diffusion_pytorch_model.safetensors", dtype=dtype), VAEConfig())


if __name__ == "__main__":
    print(write_sd15_folder())
