"""Images -> latents, as diffusers' img2img and inpainting pipelines compute them.

diffusers (`StableDiffusionImg2ImgPipeline.prepare_latents`, `StableDiffusionInpaintPipeline._encode_vae_image`,
`StableDiffusionXLImg2ImgPipeline.prepare_latents`) encodes each image of a batch ALONE,
``vae.encode(image[i : i + 1])``, and samples the posterior with that image's own generator
(`retrieve_latents` -> `DiagonalGaussianDistribution.sample(generator)`)::

    mean, logvar = moments.chunk(2);  logvar = logvar.clamp(-30, 20)
    z = mean + exp(0.5 * logvar) * randn(mean.shape, generator=generator[i])
    latents = scaling_factor * z                                   (SD1, SD2, SDXL)
    latents = (z - latents_mean) * scaling_factor / latents_std    (VAE configs that declare them)

The posterior draw is the first number each image's generator gives in img2img; what the pipeline
draws next (the noise that `add_noise` mixes in) continues the same generator. So the caller hands us
its per-image noise source (`pipeline.noise_source`), and we take exactly one draw from it here.

Encoding one image at a time also bounds memory: the encoder's activations at full resolution are the
largest tensors of the whole run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["encode", "to_vae_input"]

Noise = Callable[[], Tensor]
"""Standard-normal noise for the batch, one row per image ([N, C, h, w]), e.g. `pipeline.noise_source`."""


def to_vae_input(images: Tensor) -> Tensor:
    """uint8 [N, H, W, 3] (0..255) or float [N, 3, H, W] in [-1, 1] -> float32 [N, 3, H, W] in [-1, 1].

    The uint8 mapping is diffusers' `VaeImageProcessor` (`to_tensor` / 255, then `normalize`: 2x - 1).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, 3] uint8 or [N, 3, H, W] float, got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3], got shape {list(images.shape)}")
        return 2.0 * (images.permute(0, 3, 1, 2).float() / 255.0) - 1.0
    if not images.is_floating_point() or images.shape[1] != 3:
        raise ValueError(f"float images must be [N, 3, H, W] in [-1, 1], got {images.dtype} {list(images.shape)}")
    return images.float()


@torch.inference_mode()
def encode(
    vae: nn.Module,
    images: Tensor,
    *,
    noise: Noise | None,
    scale_factor: float,
    dtype: torch.dtype | None = None,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
) -> Tensor:
    """Latents of `images` (see `to_vae_input` for the formats) in the U-Net's (VP) space, float32.

    vae: our `AutoencoderKL` with its encoder kept (`run.py` drops it for text-to-image).
    noise: one draw per call for the whole batch, image i's row from image i's generator (diffusers'
        ``latent_dist.sample(generator[i])``); None takes the posterior mean (diffusers' ``sample_mode="argmax"``).
        The draw is float32 and the sample is formed in float32, whatever the VAE computes in.
    scale_factor: the VAE config's ``scaling_factor`` (`ModelSpec.scale_factor`).
    dtype: what the encoder computes in; None is the VAE's own dtype. float32 on a VAE held in another
        dtype runs an fp32 copy (diffusers upcasts an SDXL VAE, ``force_upcast``, because fp16 overflows;
        bf16 has fp32's range and is fine, to bf16 rounding of the latents).
    latents_mean / latents_std: per-channel statistics from a VAE config that has them (diffusers then
        standardises instead of only scaling); None for SD1/SD2/SDXL.
    """
    x = to_vae_input(images)
    with _encoder_in(vae, dtype) as (encoder, compute_dtype):
        rows = [encoder.encode(x[i : i + 1].to(_device(vae), compute_dtype)) for i in range(len(x))]
    mean = torch.cat([m for m, _ in rows]).float()
    logvar = torch.cat([lv for _, lv in rows]).float()
    if noise is None:
        z = mean
    else:
        eps = noise().to(mean.device, torch.float32)
        if eps.shape != mean.shape:
            raise ValueError(f"the noise source draws {list(eps.shape)}, the posterior is {list(mean.shape)}")
        z = mean + torch.exp(0.5 * logvar) * eps  # DiagonalGaussianDistribution.sample, op for op
    if latents_mean is None or latents_std is None:
        return scale_factor * z
    shape = (1, -1, 1, 1)
    return (z - z.new_tensor(latents_mean).view(shape)) * scale_factor / z.new_tensor(latents_std).view(shape)


def _device(module: nn.Module) -> torch.device:
    return next(p.device for p in module.parameters() if not p.is_meta)


@contextmanager
def _encoder_in(vae: nn.Module, dtype: torch.dtype | None) -> Iterator[tuple[nn.Module, torch.dtype]]:
    """(a VAE that encodes in `dtype`, that dtype): the VAE itself when it already computes in `dtype` (None:
    its own); else, unpacked, the VAE cast to float32 in place and cast back after (exact: its values came
    from the narrower dtype); packed (oneDNN records cannot be cast), the fp32 twin `vae_decode` keeps for
    its redos (one copy for both)."""
    from ldmcli.kernels import packed_dtype
    from ldmcli.vae_decode import _fp32_twin, _module_dtype

    if getattr(vae, "encoder", None) is None:
        raise RuntimeError("this VAE's encoder was dropped (drop_encoder): keep it to encode an image")
    own = _module_dtype(vae)
    dtype = dtype or own
    if dtype == own:
        yield vae, dtype
        return
    if dtype != torch.float32:
        raise ValueError(f"a VAE held in {own} encodes in it or in float32, not {dtype}")
    if packed_dtype(vae) is not None:
        yield _fp32_twin(vae), torch.float32
        return
    vae.to(torch.float32)
    try:
        yield vae, torch.float32
    finally:
        vae.to(own)
