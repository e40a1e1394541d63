"""SDXL's vector conditioning `y` (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for
High-Resolution Image Synthesis", sec. 2.2 "micro-conditioning", and sec. 2.5 for the refiner).

Besides the text context, the SDXL U-Net adds to its timestep embedding `label_emb(y)` with

    y = [pooled bigG text embedding | f(h_orig) f(w_orig) | f(crop_top) f(crop_left) | f(h_target) f(w_target)]

where f is the same sinusoidal embedding as the timestep's (256 wide in SDXL base), as Stability's
`ConcatTimestepEmbedderND` builds it and diffusers' `add_time_ids` / `add_time_proj` reproduce it.
Text-to-image asks for an uncropped image of the size it generates: original = target = (H, W),
crop = (0, 0) (diffusers' defaults).

The SDXL refiner (sd_xl_refiner.yaml's conditioner: original_size_as_tuple, crop_coords_top_left,
aesthetic_score) has no target size and ends with an aesthetic score instead:

    y = [pooled bigG | f(h_orig) f(w_orig) | f(crop_top) f(crop_left) | f(aesthetic_score)]

diffusers' StableDiffusionXLImg2ImgPipeline (`_get_add_time_ids` with `requires_aesthetics_score`)
conditions the prompt on `aesthetic_score=6.0` and the negative prompt on `negative_aesthetic_score=2.5`,
so a refiner's cond and uncond `y` differ in that one number (sizes and crop are the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldmcli.models.unet import timestep_embedding

if TYPE_CHECKING:
    from ldmcli.detect import ModelSpec

# diffusers' StableDiffusionXLImg2ImgPipeline.__call__ defaults (aesthetic_score, negative_aesthetic_score);
# the refiner was trained on LAION aesthetic scores, so the negative prompt steers away from "less aesthetic".
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SizeConditioning:
    """The micro-conditioning numbers, in pixels, in the order the U-Net was trained with.

    SDXL base: original size, crop, target size (6 numbers). The refiner: original size, crop, aesthetic
    score (5 numbers), when `aesthetic_score` is set.
    """

    original_size: tuple[int, int]  # (height, width) of the training image before any resizing
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop taken from it
    target_size: tuple[int, int] | None = None  # (height, width) asked for; None = original_size
    aesthetic_score: float | None = None  # the refiner's: in place of the target size

    @classmethod
    def for_image(cls, height: int, width: int) -> "SizeConditioning":
        """What text-to-image of a height x width image conditions on (diffusers' defaults)."""
        return cls(original_size=(height, width), target_size=(height, width))

    @classmethod
    def for_refiner(cls, height: int, width: int, aesthetic_score: float = AESTHETIC_SCORE) -> "SizeConditioning":
        """What the refiner conditions a height x width image on (StableDiffusionXLImg2ImgPipeline's
        defaults: original size = the image's, no crop)."""
        return cls(original_size=(height, width), aesthetic_score=aesthetic_score)

    def ids(self) -> list[float]:
        if self.aesthetic_score is not None:
            return [*self.original_size, *self.crop_top_left, self.aesthetic_score]
        target = self.target_size or self.original_size
        return [*self.original_size, *self.crop_top_left, *target]


def size_embedding(sizes: SizeConditioning, batch: int, dim: int) -> Tensor:
    """[batch, len(ids) * dim] float32: the sinusoid of each micro-conditioning number, concatenated."""
    ids = torch.tensor(sizes.ids(), dtype=torch.float32)
    return timestep_embedding(ids, dim).reshape(1, -1).expand(batch, -1)


def sdxl_vector(pooled: Tensor, sizes: SizeConditioning, dim: int) -> Tensor:
    """y = [pooled text embedding | micro-conditioning sinusoids]: [B, projection_dim + n * dim], pooled's dtype."""
    emb = size_embedding(sizes, pooled.shape[0], dim).to(device=pooled.device, dtype=pooled.dtype)
    return torch.cat([pooled, emb], dim=1)


def vector_conditioning(spec: ModelSpec, pooled: Tensor, height: int, width: int, *, negative: bool = False) -> Tensor:
    """The U-Net's `y` for text-to-image of a height x width image: SDXL base's sizes, or for the refiner
    its sizes and the aesthetic score of the prompt (6.0) or, `negative`, of the negative prompt (2.5)."""
    assert spec.addition_time_embed_dim is not None, "a model without vector conditioning"
    if spec.refiner:
        sizes = SizeConditioning.for_refiner(height, width, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE)
    else:
        sizes = SizeConditioning.for_image(height, width)
    return sdxl_vector(pooled, sizes, spec.addition_time_embed_dim)
