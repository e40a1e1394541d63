"""Load a checkpoint into our networks, and turn prompts into images.

Modules are built on the meta device and receive the checkpoint's tensors with
`load_state_dict(strict=True, assign=True)`: no random initialisation that is then overwritten,
no second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmcli.detect import ModelSpec, detect_spec
from ldmcli.errors import CheckpointError, name_keys
from ldmcli.layout import Components, read_components
from ldmcli.models.clip import CLIPTextModel
from ldmcli.models.unet import UNetModel
from ldmcli.models.vae import AutoencoderKL
from ldmcli.tokenizer import PromptTokenizer


@dataclass
class StableDiffusion:
    """A loaded model: spec, tokenizer and the three networks, on one device."""

    spec: ModelSpec
    path: Path
    tokenizer: PromptTokenizer
    text_encoder: CLIPTextModel
    unet: UNetModel
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype
    hash: str | None = None  # A1111's short file hash, filled in by whoever needs it (hashing costs seconds)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name


@dataclass(frozen=True)
class ImageRequest:
    """What one image needs but its seed (a batch of seeds shares one request)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    cfg_scale: float = 7.5
    sampler: str = "euler"
    spacing: str | None = None  # None: the model's own timestep spacing (diffusers' default)


def load(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Read, detect and load a single file or diffusers folder."""
    components = read_components(Path(path))
    return load_components(components, device=torch.device(device), dtype=dtype)


def load_components(components: Components, *, device: torch.device, dtype: torch.dtype) -> StableDiffusion:
    spec = detect_spec(components)
    tokenizer = PromptTokenizer(components.tokenizer_dir, pad_token_id=spec.pad_token_id)
    return StableDiffusion(
        spec=spec,
        path=components.path,
        tokenizer=tokenizer,
        text_encoder=_build(CLIPTextModel, spec.text_encoder, components.text_encoder, "text encoder", components.path, device, dtype),
        unet=_build(UNetModel, spec.unet, components.unet, "U-Net", components.path, device, dtype),
        vae=_build(AutoencoderKL, spec.vae, components.vae, "VAE", components.path, device, dtype),
        device=device,
        dtype=dtype,
    )


def _build(cls: type[nn.Module], config, tensors: dict, what: str, path: Path, device, dtype) -> nn.Module:
    """Build on meta, adopt the checkpoint's tensors strictly, then move and cast once."""
    with torch.device("meta"):
        module = cls(config)
    expected = set(module.state_dict())
    missing, unexpected = expected - tensors.keys(), tensors.keys() - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {name_keys(unexpected)}")
        raise CheckpointError(f"{path}: {what} keys do not match the detected architecture: {'; '.join(parts)}")
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{path}: {what}: {str(exc).splitlines()[-1].strip()}") from exc
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.inference_mode()
def encode_prompts(model: StableDiffusion, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> cross-attention context [B, 77, width]."""
    ids = model.tokenizer(list(prompts)).to(model.device)
    return model.text_encoder(ids, skip_last_layers=model.spec.clip_skip).hidden_states


def noise_source(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> Callable[[], torch.Tensor]:
    """Standard-normal noise for a batch, image i drawn from its own CPU generator seeded `seeds[i]`.

    The first call gives the initial latents, later calls the samplers' ancestral noise, in the order
    diffusers draws them from `generator=`. Drawing on the CPU in fp32 makes a seed mean the same image
    whatever the device, dtype, batch size or position in the batch.
    """
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def draw() -> torch.Tensor:
        return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(device=device, dtype=dtype)

    return draw


def generate(
    model: StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Images for `request`, one per seed, as uint8 [N, H, W, 3]."""
    return decode_latents(model, sample_latents(model, request, seeds, callback=callback))


@torch.inference_mode()
def sample_latents(
    model: StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Denoised latents for `request`, one per seed (what diffusers returns with output_type="latent")."""
    from ldmcli.denoiser import CFGDenoiser, Denoiser
    from ldmcli.samplers import sample

    n = len(seeds)
    cond = encode_prompts(model, [request.prompt] * n)
    uncond = encode_prompts(model, [request.negative_prompt] * n) if request.cfg_scale != 1 else None
    factor = model.spec.vae.downsample_factor
    latent_shape = (model.spec.vae.embed_dim, request.height // factor, request.width // factor)
    denoiser = CFGDenoiser(Denoiser(model.unet, model.spec.schedule), cond, uncond, request.cfg_scale)
    return sample(
        request.sampler,
        model.spec.schedule,
        request.steps,
        denoiser,
        noise_source(seeds, latent_shape, model.device, model.dtype),
        spacing=request.spacing,
        callback=callback,
    )


@torch.inference_mode()
def decode_latents(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 [N, H, W, 3], rounded the way diffusers' `numpy_to_pil` rounds."""
    images = model.vae.decode(latents / model.spec.scale_factor)
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu()
