"""One image request's denoising, whatever it starts from: text to image, an init image (img2img,
inpainting, outpainting), a hires fix's two passes, an SDXL refiner's finish. The CLI's run loop (`run.py`)
and a server call the same `latents_for`; decode its latents with `pipeline.decode_latents` (a refiner's with
the refiner: `decoder_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ldmcli.limits import DEFAULT_MAX_PIXELS
from ldmcli.request import ImageRequest


def image_inputs(request: ImageRequest, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The request's init image and mask read, padded, blurred and fitted to its size (`image_input.check_inputs`)."""
    from ldmcli.image_input import check_inputs

    return check_inputs(Path(request.init_image), None if request.mask is None else Path(request.mask),
                        request.width, request.height, resize_mode=request.resize_mode, pad=request.pad,
                        mask_blur=request.mask_blur, invert_mask=request.invert_mask, max_pixels=max_pixels)


def latents_for(model, request: ImageRequest, seeds: Sequence[int], *, callback: Callable | None = None,
                tile: tuple[int, int] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
    """Latents for one batch of `request`, one image per seed: from noise (`pipeline.sample_latents`), from
    its init image (`img2img.sample_from_image`), with a hires fix's second pass (`hires.generate_hires`), or
    finished by the refiner loaded in `model.refiners` (`refiner.sample_with_refiner`). Non-finite rows are
    the caller's to find (`pipeline.finite_rows`). tile: the VAE tiling a hires fix's pixel upscaler decodes with."""
    import torch

    from ldmcli import pipeline

    if request.hires_scale is not None:
        from ldmcli.hires import generate_hires

        return generate_hires(model, request, seeds, scale=request.hires_scale, steps=request.hires_steps,
                              strength=request.hires_strength, upscaler=request.hires_upscaler, callback=callback,
                              vae_tile=tile, vae_fp32=model.dtype == torch.float16, check_finite=False)
    if request.refiner is not None:
        from ldmcli.refiner import sample_with_refiner

        return sample_with_refiner(model, model.refiners[request.refiner], request, seeds,
                                   switch=request.refiner_switch, callback=callback, check_finite=False)
    if not request.from_image:
        return pipeline.sample_latents(model, request, seeds, callback=callback, check_finite=False)

    from ldmcli.image_input import mask_to_model, to_model_input
    from ldmcli.img2img import sample_from_image

    inputs = image_inputs(request, max_pixels)
    image = torch.from_numpy(to_model_input(inputs.image))[None].expand(len(seeds), -1, -1, -1)
    mask = None
    if inputs.mask is not None:
        mask = torch.from_numpy(mask_to_model(inputs.mask, binarize=False))[None].expand(len(seeds), -1, -1, -1)
    # Encoded in fp32 under fp16 (an SDXL VAE overflows in fp16: diffusers' `force_upcast`)
    return sample_from_image(model, request, seeds, image, strength=request.strength, mask=mask, callback=callback,
                             vae_fp32=model.dtype == torch.float16, check_finite=False)


def decoder_for(model, request: ImageRequest):
    """The model whose VAE decodes `request`'s latents: a refiner's own (diffusers' refiner pipeline decodes
    with its VAE), else `model`."""
    return model.refiners[request.refiner] if request.refiner is not None else model


def output_size(request: ImageRequest) -> tuple[int, int]:
    """(width, height) of the image a request makes: a hires fix's target, else the request's."""
    if request.hires_scale is None:
        return request.width, request.height
    from ldmcli.hires import hires_size

    return hires_size(request.width, request.height, request.hires_scale)


def total_steps(model, request: ImageRequest) -> int:
    """The denoising steps one batch of `request` takes (its callback's calls), for a progress bar."""
    if request.hires_scale is not None:
        from ldmcli.hires import total_steps as hires_steps

        return hires_steps(request.steps, request.hires_steps, request.hires_strength)
    if request.refiner is not None:
        from ldmcli.refiner import split_steps

        return sum(split_steps(model, model.refiners[request.refiner], request, request.refiner_switch))
    return max(1, int(request.steps * request.strength)) if request.from_image else request.steps


def encodes(request: ImageRequest) -> bool:
    """Whether making `request` encodes an image (keep the VAE's encoder): an init image, or a hires fix
    that upscales pixels."""
    if request.from_image:
        return True
    if request.hires_scale is None:
        return False
    from ldmcli.hires import HIRES_UPSCALERS

    return not HIRES_UPSCALERS[request.hires_upscaler].latent
