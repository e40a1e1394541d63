"""What model is this? Family recognition from key names, configs from tensor shapes.

Shapes give widths, depths and attention levels; what they cannot give (head counts, latent
scale factor, noise schedule) comes from the family's constants — the approach of ComfyUI's
`model_detection.py`. `ModelSpec` is the single source of truth about a loaded model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ldmcli.errors import UnsupportedModelError
from ldmcli.models.clip import CLIPTextConfig, clip_config_from_shapes
from ldmcli.models.unet import UNetConfig, unet_config_from_shapes
from ldmcli.models.vae import VAEConfig, vae_config_from_shapes
from ldmcli.schedule import DiffusionSchedule

if TYPE_CHECKING:
    from ldmcli.layout import Components


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model that is not a weight."""

    family: str  # "sd1"
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig
    schedule: DiffusionSchedule
    schedule_source: str  # where the schedule (and prediction type) came from, said to the user
    scale_factor: float  # latents are divided by this before decoding (not stored in weights)
    clip_skip: int  # text-encoder blocks skipped at the end: SD1 uses the last block's output
    pad_token_id: int  # SD1 (OpenAI CLIP tokenizer) pads with <|endoftext|>
    native_size: int  # the image side the family was trained at


@dataclass(frozen=True)
class Family:
    """Constants of a model family that no tensor shape reveals."""

    name: str
    display: str
    unet_num_heads: int | None  # SD1: always 8 heads, whatever the width
    unet_head_dim: int | None  # SD2/SDXL: 64-channel heads
    text_activation: str
    scale_factor: float
    clip_skip: int
    pad_token_id: int
    native_size: int


SD1 = Family(
    name="sd1",
    display="Stable Diffusion 1.x",
    unet_num_heads=8,
    unet_head_dim=None,
    text_activation="quick_gelu",
    scale_factor=0.18215,
    clip_skip=0,
    pad_token_id=49407,
    native_size=512,
)

# Key markers of architectures we recognise but cannot run (yet), checked in order.
_UNSUPPORTED_MARKERS = (
    ("model.diffusion_model.joint_blocks.", "Stable Diffusion 3"),
    ("double_blocks.", "Flux"),
    ("conditioner.embedders.", "SDXL"),
    ("cond_stage_model.model.", "Stable Diffusion 2.x (OpenCLIP text encoder)"),
)


def check_supported_single_file(keys: Iterable[str], path: Path) -> None:
    """Raise UnsupportedModelError naming what the file is, when it is not an SD 1.x checkpoint."""
    keys = list(keys)
    for marker, name in _UNSUPPORTED_MARKERS:
        if any(k.startswith(marker) or f".{marker}" in k for k in keys):  # bare or prefixed
            raise UnsupportedModelError(f"{path}: looks like a {name} checkpoint; this version runs SD 1.x only")
    if any("lora_" in k or ".lora." in k or "lora_A" in k for k in keys):
        raise UnsupportedModelError(f"{path}: a LoRA, not a full model: pass a Stable Diffusion checkpoint as -m")
    if keys and all(k.split(".")[0] in {"encoder", "decoder", "quant_conv", "post_quant_conv"} for k in keys):
        raise UnsupportedModelError(f"{path}: a VAE alone, not a full model: pass a Stable Diffusion checkpoint as -m")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UnsupportedModelError(f"{path}: no U-Net (no keys under 'model.diffusion_model.'): not a Stable Diffusion checkpoint")


def detect_spec(components: Components) -> ModelSpec:
    """Build the ModelSpec of an SD 1.x model from its tensors' shapes and the family constants."""
    family = SD1
    meta = components.metadata
    # A safetensors header may state what shapes cannot (our demo model does); the family rule otherwise.
    num_heads, head_dim = family.unet_num_heads, family.unet_head_dim
    if "ldm.unet.num_heads" in meta or "ldm.unet.head_dim" in meta:
        num_heads = _int_or_none(meta.get("ldm.unet.num_heads"))
        head_dim = _int_or_none(meta.get("ldm.unet.head_dim"))
    unet = unet_config_from_shapes(_shapes(components.unet), num_heads=num_heads, head_dim=head_dim)
    where = components.path
    if unet.in_channels != 4:
        kind = "an inpainting" if unet.in_channels == 9 else f"a {unet.in_channels}-channel"
        raise UnsupportedModelError(f"{where}: {kind} U-Net; this version runs text-to-image models (4 latent channels)")
    text = clip_config_from_shapes(_shapes(components.text_encoder), activation=family.text_activation)
    if text.width != unet.context_dim:
        raise UnsupportedModelError(
            f"{where}: text encoder width {text.width} does not match the U-Net's context width {unet.context_dim}"
        )
    schedule, source = _schedule(components)
    return ModelSpec(
        family=family.name,
        unet=unet,
        vae=vae_config_from_shapes(_shapes(components.vae)),
        text_encoder=text,
        schedule=schedule,
        schedule_source=source,
        scale_factor=_float_metadata(components, "ldm.scale_factor", family.scale_factor),
        clip_skip=family.clip_skip,
        pad_token_id=family.pad_token_id,
        native_size=int(_float_metadata(components, "ldm.native_size", family.native_size)),
    )


def _schedule(components: Components) -> tuple[DiffusionSchedule, str]:
    if components.scheduler_config is not None:
        return DiffusionSchedule.from_diffusers_config(components.scheduler_config), "scheduler/scheduler_config.json"
    return DiffusionSchedule(), "SD 1.x defaults (epsilon prediction, scaled_linear betas)"


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "none") else None


def _float_metadata(components: Components, key: str, default: float) -> float:
    value = components.metadata.get(key)
    return float(value) if value is not None else default


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}
