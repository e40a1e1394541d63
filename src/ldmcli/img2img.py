"""Image-to-image and inpainting: sampling that starts from an image, as diffusers' pipelines do.

One entry point, `sample_from_image`, reproduces

- `StableDiffusionImg2ImgPipeline` / `StableDiffusionXLImg2ImgPipeline` (no mask): the image's latents
  noised to the level `strength` starts at, then the last ``int(steps * strength)`` steps;
- `StableDiffusionInpaintPipeline` with a 4-channel U-Net (a mask, an ordinary checkpoint): the same walk,
  starting from pure noise at strength 1, with the kept part of the latents replaced after every step by
  the image noised to that step's level (`samplers.StartImage.mask`);
- `StableDiffusionInpaintPipeline` with a 9-channel inpainting U-Net: no blending; the U-Net sees the mask
  and the masked image's latents beside the latents (`denoiser.InpaintingNetwork`).

The random numbers follow diffusers' draws from each image's generator (`pipeline.noise_source`, seeded
per image), in its order:

    img2img                 posterior(image), noise, [sampler's noise ...]
    inpaint, 4-channel      posterior(image), noise, posterior(masked image) (unused), [sampler's ...]
    inpaint, 9-channel      [posterior(image) if strength < 1], noise, posterior(masked image), [...]

so a seed means the same image here as in diffusers. The inputs are tensors already at the target size
(`image_input` resizes, pads and blurs): the image float [N, 3, H, W] in [-1, 1] (or uint8 [N, H, W, 3]),
the mask float [N, 1, H, W] in [0, 1], 1 = repaint. The mask is binarised at 0.5 and taken to latent size
by nearest-neighbour sampling, as diffusers' mask processor and `prepare_mask_latents` do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmcli import pipeline, vae_encode
from ldmcli.denoiser import InpaintingNetwork
from ldmcli.request import ImageRequest
from ldmcli.samplers import StartImage, first_step, sample

__all__ = ["InpaintMask", "latent_mask", "sample_from_image"]


@dataclass(frozen=True, eq=False)
class InpaintMask:
    """A mask as diffusers uses it: ``image`` binarised at full size (1 = repaint), ``latent`` at latent size."""

    image: Tensor  # [N, 1, H, W] of 0.0 / 1.0
    latent: Tensor  # [N, 1, H/f, W/f] of 0.0 / 1.0


def latent_mask(mask: Tensor, factor: int) -> InpaintMask:
    """Binarise a [N, 1, H, W] mask in [0, 1] at 0.5 (`VaeImageProcessor(do_binarize=True)`: values >= 0.5
    repaint) and sample it down by `factor` (`prepare_mask_latents`: ``F.interpolate(mask, size=...)``, nearest)."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"the mask must be [N, 1, H, W], got {list(mask.shape)}")
    binary = (mask.float() >= 0.5).float()
    h, w = mask.shape[-2:]
    return InpaintMask(binary, F.interpolate(binary, size=(h // factor, w // factor)))


@torch.inference_mode()
def sample_from_image(
    model: pipeline.StableDiffusion,
    request: ImageRequest,
    seeds: Sequence[int],
    init_image: Tensor,
    *,
    strength: float,
    mask: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
    vae_fp32: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """Denoised latents for `request` started from `init_image`, one per seed (as `pipeline.sample_latents`:
    decode them with `pipeline.decode_latents`).

    init_image: [N, 3, H, W] float in [-1, 1] or [N, H, W, 3] uint8, N = len(seeds) (one image per seed),
        H x W = the request's size. strength: in (0, 1], the part of the `request.steps` steps run
        (diffusers' ``strength``). mask: [N, 1, H, W] in [0, 1], 1 = repaint; None is img2img.
    vae_fp32: encode in float32 whatever the VAE is held in (diffusers upcasts an SDXL VAE to encode).
    match "a1111" is refused: A1111's img2img is not reproduced yet.
    """
    if model.unet is None:
        raise RuntimeError("the U-Net was released after the run's last image (release_unet)")
    n, factor = len(seeds), model.spec.vae.downsample_factor
    image = vae_encode.to_vae_input(init_image)
    if image.shape != (n, 3, request.height, request.width):
        raise ValueError(f"init image {list(image.shape)}: expected {[n, 3, request.height, request.width]} "
                         "(one image per seed, at the request's size)")
    # Refused before anything is encoded: a strength that runs no step, A1111's numerics.
    first_step(request.steps, strength)
    if request.match != "diffusers":
        raise ValueError(f"match {request.match!r}: A1111's img2img is not reproduced yet (its step count, the "
                         "order of its noise, its inpainting that blends the denoised image); use match 'diffusers'")
    inpainting_unet = model.spec.unet.in_channels == 9
    if inpainting_unet and mask is None:
        raise ValueError("an inpainting U-Net (9 input channels) needs a mask")

    latent_shape = (model.spec.vae.embed_dim, request.height // factor, request.width // factor)
    noise = pipeline.noise_source(seeds, latent_shape, model.device, torch.float32, request.rng, request.ensd)

    def encode(pixels: Tensor) -> Tensor:
        return vae_encode.encode(model.vae, pixels, noise=noise, scale_factor=model.spec.scale_factor,
                                 dtype=torch.float32 if vae_fp32 else None)

    network = model.unet
    if mask is None:
        start = StartImage(encode(image), noise(), strength)
    else:
        masks = latent_mask(mask, factor)
        full = strength == 1.0  # diffusers' is_strength_max: start from pure noise, not the noised image
        # A 4-channel U-Net's pipeline always encodes the image (it blends with it); a 9-channel one only
        # when the walk starts from it.
        latents = None if inpainting_unet and full else encode(image)
        eps = noise()
        masked = image * (masks.image < 0.5)  # the kept part; the repainted part 0 (grey), as diffusers
        if inpainting_unet:
            network = InpaintingNetwork(model.unet, masks.latent.to(model.device), encode(masked))
            start = StartImage(latents, eps, strength, noise_at_full_strength=True)
        else:
            noise()  # diffusers encodes the masked image for a 4-channel U-Net too, and ignores it: one draw
            start = StartImage(latents, eps, strength, mask=masks.latent.to(model.device), noise_at_full_strength=True)

    cond, uncond = pipeline.guidance_conditioning(model, request, n)
    denoiser = pipeline.guided_denoiser(network, model.spec.schedule, cond, uncond, request)
    latents = sample(request.sampler, model.spec.schedule, request.steps, denoiser, noise,
                     spacing=request.schedule, match=request.match, callback=callback, start=start)
    if check_finite:
        pipeline.check_finite_latents(latents, seeds, model.dtype)
    return latents
