"""What an inpainting U-Net takes besides the latents, and text-to-image with one.

An inpainting model (runwayml/stable-diffusion-inpainting, stabilityai/stable-diffusion-2-inpainting,
diffusers/stable-diffusion-xl-1.0-inpainting-0.1; `ModelSpec.inpainting`) has a U-Net whose first
convolution takes 9 channels, in this order (LDM's "hybrid" conditioning concatenates `c_concat` after
`x`; diffusers' StableDiffusionInpaintPipeline builds `torch.cat([latents, mask, masked_image_latents])`):

    [latents (4) | mask (1: 1 = paint here, 0 = keep) | masked-image latents (4)]

where the masked-image latents are the VAE encoding, times the scale factor, of the image with the
region to repaint set to 0 in the VAE's [-1, 1] range (mid-gray).

Text-to-image on such a model repaints everything: the mask is 1 everywhere and the masked image is all
mid-gray. This is A1111's `txt2img_image_conditioning` (modules/processing.py) for inpainting models
("conditioning_key in {'hybrid', 'concat'}", and `is_sdxl_inpaint`):

    image_conditioning = torch.ones(B, 3, H, W) * 0.5                     # gray, in [0, 1]
    image_conditioning = images_tensor_to_samples(image_conditioning)     # x * 2 - 1 = 0, VAE-encoded, scaled
    image_conditioning = F.pad(image_conditioning, (0, 0, 0, 0, 1, 0), value=1.0)   # a ones mask in front

and what diffusers' StableDiffusionInpaintPipeline / StableDiffusionXLInpaintPipeline compute from a
white (all-1) mask over any image: `masked_image = image * (mask < 0.5)` is 0 everywhere (both encode an
all-zero [-1, 1] image). A1111 and diffusers draw the latent from the encoder's distribution
(`DiagonalGaussianDistribution.sample()`, `retrieve_latents(..., sample_mode="sample")`); its standard
deviation is small, and `noise` reproduces such a draw exactly where wanted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ldmcli.models.vae import AutoencoderKL

MASK_CHANNELS = 1  # the mask: 1 where the model paints, 0 where the image is kept


@torch.inference_mode()
def inpaint_txt2img_conditioning(
    vae: AutoencoderKL,
    scale_factor: float,
    batch: int,
    height: int,
    width: int,
    *,
    noise: Tensor | None = None,
) -> Tensor:
    """The 5 extra channels of an inpainting U-Net for text-to-image of height x width images:
    [batch, 1 + latent channels, height / f, width / f] float32, the mask (all ones) first, then the
    latents of an all-gray image (0 in the VAE's [-1, 1] range) times `scale_factor` (`vae_encode.encode`,
    so a packed CPU VAE encodes too).

    vae: the model's VAE, with its encoder (`drop_encoder` not called).
    noise: None takes the encoder's mean (its mode: deterministic; the gray image is encoded once). A
    [batch, latent channels, h, w] standard-normal tensor draws `mean + exp(logvar / 2) * noise` instead,
    as A1111's and diffusers' `.sample()` do (diffusers draws it with `randn_tensor(mean.shape, generator)`).
    """
    from ldmcli.vae_encode import encode

    rows = 1 if noise is None else batch
    gray = torch.zeros(rows, 3, height, width)
    latents = encode(vae, gray, noise=None if noise is None else (lambda: noise), scale_factor=scale_factor)
    latents = latents.expand(batch, -1, -1, -1)
    mask = torch.ones(batch, MASK_CHANNELS, *latents.shape[2:], device=latents.device)
    return torch.cat([mask, latents], dim=1)
