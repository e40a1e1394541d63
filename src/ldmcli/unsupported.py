"""Refusing files this version cannot run, each with a one-line message naming what the file is.

Every check that turns away a readable file because it is not a model we run lives here, so the
list of what is refused, and why, is in one place:

- weights formats other than safetensors and pickled checkpoints (`refuse_unknown_format`);
- diffusers folders of other pipeline classes (`check_supported_folder`);
- single files of other architectures (SD3, Flux, unCLIP, Playground v2.5, zero-terminal-SNR), LoRAs,
  a VAE alone, files without a U-Net (`check_supported_single_file`, from key names);
- given as `--vae`: what is not a VAE file (a whole checkpoint, a LoRA, a pipeline folder) and VAEs of
  other architectures (SD3/Flux: 16 latent channels, no quant_conv) (`check_supported_vae`, ...);
- U-Nets that take other inputs than a text-to-image or inpainting U-Net: channel counts other than 4
  (latents) and 9 (inpainting: latents + mask + masked-image latents), such as InstructPix2Pix's 8 or
  depth-to-image's 5, and vector conditioning beside one text encoder that is not an SDXL refiner's bigG
  (`check_unet_input_channels`, `check_single_encoder_unet`, from the U-Net's config).

`checkpoint`, `layout` and `detect` call these at the point where the evidence is at hand (the suffix,
the key names, the shapes); this module depends on nothing but `errors`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ldmcli.errors import CheckpointError, UnsupportedModelError

if TYPE_CHECKING:
    from ldmcli.models.unet import UNetConfig

SUPPORTED = "SD 1.x, SD 2.x and SDXL (base, Turbo, refiner), and their inpainting models"

# diffusers pipeline classes whose folders we read: SD 1.x/2.x, SDXL base and Turbo; an LCM model's folder
# (SimianLuo/LCM_Dreamshaper_v7's names the SD 1.x pipeline it is run by, LatentConsistencyModelPipeline);
# inpainting models (runwayml/stable-diffusion-inpainting, stabilityai/stable-diffusion-2-inpainting,
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1: 9-channel U-Nets); the SDXL refiner
# (stabilityai/stable-diffusion-xl-refiner-1.0 names the img2img pipeline, its only use in diffusers).
SUPPORTED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLImg2ImgPipeline",
)

# U-Net input channels we run: latents alone (text-to-image), or latents + mask + masked-image latents
# (inpainting: 4 + 1 + 4, the "hybrid" conditioning of LDM's inpainting configs).
LATENT_CHANNELS = 4
INPAINTING_CHANNELS = 9
# What other channel counts are, to name them in the refusal.
_OTHER_INPUTS = {5: "a depth-to-image", 7: "an x4-upscaler", 8: "an InstructPix2Pix"}

# Key markers of architectures we recognise but cannot run, checked in order.
_UNSUPPORTED_MARKERS = (
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "Flux"),
    ("embedder.model.visual.", "Stable Diffusion 2.x unCLIP"),
    ("edm_mean", "Playground v2.5 (EDM)"),
    ("ztsnr", "zero-terminal-SNR (ztsnr marker, needs rescaled betas)"),  # ComfyUI's marker key
)


def refuse_unknown_format(path: Path) -> NoReturn:
    """Raise the CheckpointError for a weights file whose suffix no reader handles."""
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors or .ckpt)")


def check_supported_folder(folder: Path, index: dict) -> None:
    """Refuse pipeline classes we cannot run, naming them, before reading gigabytes."""
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if cls not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(
            f"{folder}: a {cls} folder; this version runs {' and '.join(SUPPORTED_PIPELINES)} folders"
        )


def check_supported_single_file(keys: Iterable[str], path: Path) -> None:
    """Raise UnsupportedModelError naming what the file is, when it is not a model we run."""
    keys = list(keys)
    for marker, name in _UNSUPPORTED_MARKERS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):  # bare or prefixed
            raise UnsupportedModelError(f"{path}: looks like a {name} checkpoint; this version runs {SUPPORTED}")
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        raise UnsupportedModelError(f"{path}: a LoRA, not a full model: pass a Stable Diffusion checkpoint as -m")
    if is_vae_alone(keys):
        refuse_vae_alone(path)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UnsupportedModelError(f"{path}: no U-Net (no keys under 'model.diffusion_model.'): not a Stable Diffusion checkpoint")


def check_unet_input_channels(where: Path, unet: UNetConfig) -> None:
    """Refuse a U-Net that takes neither 4 latent channels (text-to-image) nor 9 (inpainting)."""
    if unet.in_channels not in (LATENT_CHANNELS, INPAINTING_CHANNELS):
        kind = _OTHER_INPUTS.get(unet.in_channels, f"a {unet.in_channels}-channel")
        raise UnsupportedModelError(f"{where}: {kind} U-Net ({unet.in_channels} input channels); this version runs "
                                    f"text-to-image (4) and inpainting (9) U-Nets")


def check_single_encoder_unet(where: Path, unet: UNetConfig) -> None:
    """Refuse vector conditioning (label_emb) beside one SD 1.x/2.x text encoder: of the models we run,
    only SDXL's (bigG, with or without CLIP-L) have it."""
    if unet.adm_in_channels is not None:
        raise UnsupportedModelError(
            f"{where}: a U-Net with vector conditioning (label_emb) but one CLIP ViT-L/ViT-H text encoder "
            f"(SD 2.x unCLIP?); this version runs {SUPPORTED}"
        )


# --- a VAE on its own (`--vae`, `vae_file.py`) ----------------------------------------------------------

# The top-level modules of an AutoencoderKL, in LDM and diffusers names alike.
VAE_ROOTS = frozenset({"encoder", "decoder", "quant_conv", "post_quant_conv"})
# Training leftovers that released VAE files carry beside the weights, used by no decoder: the loss
# modules (`loss.*`: LPIPS, discriminator, logvar) and the EMA bookkeeping (`model_ema.decay`,
# `model_ema.num_updates`, or a whole EMA copy). A1111 drops the same before loading a VAE
# (`sd_vae.load_vae_dict`: `k[0:4] != "loss"` and `vae_ignore_keys`).
VAE_TRAINING_LEFTOVERS = ("loss.", "model_ema.")
VAE_PREFIX = "first_stage_model."
# Keys of networks other than the VAE: a whole checkpoint, not a VAE file.
_OTHER_NETWORKS = ("model.diffusion_model.", "cond_stage_model.", "conditioner.")


def is_vae_alone(keys: Iterable[str]) -> bool:
    """Whether a single file's keys are those of one VAE and nothing more (training leftovers aside):
    bare LDM or diffusers names (`encoder.`, `decoder.`, `quant_conv`, `post_quant_conv`), or all under
    `first_stage_model.` (a VAE cut out of a checkpoint)."""
    weights = [k for k in keys if not k.startswith(VAE_TRAINING_LEFTOVERS)]
    weights = [k.removeprefix(VAE_PREFIX) for k in weights] if all(k.startswith(VAE_PREFIX) for k in weights) else weights
    return bool(weights) and all(k.split(".")[0] in VAE_ROOTS for k in weights)


def refuse_vae_alone(path: Path) -> NoReturn:
    """A VAE file or folder given where a whole model belongs (-m)."""
    raise UnsupportedModelError(f"{path}: a VAE alone, not a full model: give it as --vae, beside a Stable Diffusion "
                                "checkpoint as -m")


def check_supported_vae(keys: Iterable[str], path: Path) -> None:
    """Refuse, by its key names, a single file given as --vae that is not a VAE file.

    A whole checkpoint is refused rather than its VAE taken out: A1111 refuses it too (it loads a VAE
    file strictly into first_stage_model), ComfyUI finds no VAE in it, and a checkpoint given as --vae
    by mistake would otherwise swap a VAE silently. (diffusers' from_single_file and kohya's scripts do
    take the first_stage_model part.)
    """
    keys = list(keys)
    for marker, name in _UNSUPPORTED_MARKERS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):
            raise UnsupportedModelError(f"{path}: looks like a {name} checkpoint, not a VAE file")
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        raise UnsupportedModelError(f"{path}: a LoRA, not a VAE file")
    if any(k.startswith(_OTHER_NETWORKS) for k in keys):
        raise UnsupportedModelError(
            f"{path}: a whole Stable Diffusion checkpoint, not a VAE file: give it as -m, and as --vae a VAE file "
            "(ldm does not take the VAE out of a checkpoint, as A1111 does not)"
        )


def refuse_pipeline_folder_as_vae(folder: Path) -> NoReturn:
    raise UnsupportedModelError(f"{folder}: a whole diffusers pipeline folder, not a VAE: give its VAE folder, "
                                f"{folder / 'vae'}, as --vae")


def check_supported_vae_class(folder: Path, cls: object) -> None:
    """Refuse a diffusers VAE folder of another class (AutoencoderTiny, AutoencoderKLWan, ...)."""
    if cls not in (None, "AutoencoderKL"):
        raise UnsupportedModelError(f"{folder}: a {cls} folder; --vae takes the AutoencoderKL VAEs of {SUPPORTED}")


def refuse_vae_without_quant_convs(path: Path, latent_channels: int | None) -> NoReturn:
    """A VAE without quant_conv/post_quant_conv: SD3's and Flux's (16 latent channels) are built so."""
    channels = f"{latent_channels} latent channels, " if latent_channels else ""
    guess = " (an SD3 or Flux VAE?)" if latent_channels == 16 else ""
    raise UnsupportedModelError(f"{path}: a VAE with {channels}no quant_conv/post_quant_conv{guess}; this version runs "
                                f"the 4-channel VAEs of {SUPPORTED}")
