"""SDXL's vector conditioning `y` (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", sec. 2.2 "micro-conditioning").

Besides the text context, the SDXL U-Net adds to its timestep embedding `label_emb(y)` with

    y = [pooled bigG text embedding | f(h_orig) f(w_orig) | f(crop_top) f(crop_left) | f(h_target) f(w_target)]

where f is the same sinusoidal embedding as the timestep's (256 wide in SDXL base), as Stability's
`ConcatTimestepEmbedderND` builds it and diffusers' `add_time_ids` / `add_time_proj` reproduce it.
Text-to-image asks for an uncropped image of the size it generates: original = target = (H, W),
crop = (0, 0) (diffusers' defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldmcli.models.unet import timestep_embedding


@dataclass(frozen=True)
class SizeConditioning:
    """The six micro-conditioning numbers, in pixels, in the order the U-Net was trained with."""

    original_size: tuple[int, int]  # (height, width) of the training image before any resizing
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop taken from it
    target_size: tuple[int, int] | None = None  # (height, width) asked for; None = original_size

    @classmethod
    def for_image(cls, height: int, width: int) -> "SizeConditioning":
        """What text-to-image of a height x width image conditions on (diffusers' defaults)."""
        return cls(original_size=(height, width), target_size=(height, width))

    def ids(self) -> list[int]:
        target = self.target_size or self.original_size
        return [*self.original_size, *self.crop_top_left, *target]


def size_embedding(sizes: SizeConditioning, batch: int, dim: int) -> Tensor:
    """[batch, 6 * dim] float32: the sinusoid of each of the six numbers, concatenated."""
    ids = torch.tensor(sizes.ids(), dtype=torch.float32)
    return timestep_embedding(ids, dim).reshape(1, -1).expand(batch, -1)


def sdxl_vector(pooled: Tensor, sizes: SizeConditioning, dim: int) -> Tensor:
    """y = [pooled text embedding | size/crop sinusoids]: [B, projection_dim + 6 * dim], pooled's dtype."""
    emb = size_embedding(sizes, pooled.shape[0], dim).to(device=pooled.device, dtype=pooled.dtype)
    return torch.cat([pooled, emb], dim=1)
