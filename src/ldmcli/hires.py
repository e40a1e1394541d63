"""Hires fix: A1111's two-pass text-to-image, with diffusers' numerics.

A1111 (modules/processing.py, `StableDiffusionProcessingTxt2Img.sample` and `sample_hr_pass`) makes an
image at the request's size, upscales it by "Hires upscale", and runs img2img on the result at the larger
size with "Denoising strength" and "Hires steps". `generate_hires` does the same three things, each as
diffusers computes it, so the result equals the composition of diffusers' own pipelines:

1. first pass: `pipeline.sample_latents` at request.width x request.height (diffusers'
   `StableDiffusionPipeline(..., output_type="latent")`, each image's generator seeded with its seed);
2. upscale to `hires_size(width, height, scale)`:
   - a latent upscaler ("Latent", "Latent (bicubic)", ... : A1111's `shared.latent_upscale_modes`):
     ``torch.nn.functional.interpolate(latents, size=(h / 8, w / 8), mode=..., antialias=...)`` on the
     first pass's latents, as `sample_hr_pass` does. These ARE the second pass's init latents: no decode,
     no encode, no posterior draw (diffusers' img2img given a 4-channel `image` takes it as latents);
   - a pixel upscaler ("Lanczos", "Nearest", "None"): the first pass decoded to uint8 as diffusers
     rounds it (`pipeline.decode_latents`, `VaeImageProcessor.postprocess` -> `numpy_to_pil`), resized
     with PIL as A1111's `images.resize_image(0, ..., upscaler_name=...)` does, then encoded like any
     img2img init image (`vae_encode.encode`: a posterior sample from each image's generator);
3. second pass: img2img from those latents at the target size (`samplers.sample(start=StartImage(...))`:
   diffusers' `StableDiffusionImg2ImgPipeline` / `StableDiffusionXLImg2ImgPipeline`), with `steps`
   (0: the request's, A1111's ``hr_second_pass_steps or steps``) and `strength`; the same prompt, negative
   prompt, CFG scale, sampler and schedule, the conditioning recomputed at the target size (SDXL's
   original_size and target_size are the image's size in diffusers' SDXL img2img, as in A1111's
   `calculate_hr_conds`, whose SdConditioning carries hr_upscale_to_x/y), and a prompt's editing
   schedule laid over the second pass's steps (A1111's ``total_steps(hr_second_pass_steps or steps)``).

Random numbers. Each pass draws from its own per-image generators, both seeded with the image's seeds
(`pipeline.noise_source`): A1111 re-creates its RNG for the hires pass (``rng.ImageRNG(..., self.seeds)``),
and a diffusers user composing the two pipelines hands the second one fresh generators. Per image, in order:

    first pass      initial noise, [the sampler's noise per step (ancestral / SDE samplers)]
    second pass     latent upscaler:  noise (add_noise), [sampler's noise ...]
                    pixel upscaler:   posterior sample (encode), noise (add_noise), [sampler's noise ...]

With ``rng="nv"`` the same draws come from A1111's NV generator; with ``ensd`` each pass's source restarts
at seed + ensd after its first draw, as `noise_source` does for one pass. A1111 itself samples a pixel
upscaler's posterior from its global torch generator and takes the add_noise noise as the hires RNG's
first draw, so its pixel-upscaler images differ from these by that order (and by its truncated rather
than rounded uint8 intermediate); its latent-upscaler order is the one above.

Sizes. A1111's target is ``(int(width * scale), int(height * scale))`` with Python floats
(`calculate_target_resolution`); the latent upscalers interpolate to ``target // 8`` latent pixels
(``target_height // opt_f``), so its image comes out ``int(side * scale) // 8 * 8``: that is
`hires_size`. For a pixel upscaler A1111 resizes to the unrounded target and lets its VAE encoder drop the
remainder (each of its stride-2 convolutions floors the size: 772 px -> 96 latent px);
we resize to the rounded size directly, as a diffusers user must (its image processor takes multiples
of 8). The two agree whenever ``int(side * scale)`` is a multiple of 8 (512 x 1.5 = 768, 512 x 2, ...).

Not here: A1111's "Hires resize" (a target width/height instead of a scale, with its crop), a hires
checkpoint, sampler or prompt of its own, and its neural upscalers (ESRGAN, SwinIR, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmcli.limits import DEFAULT_MAX_PIXELS, MAX_STEPS
from ldmcli.request import LCM_MAX_STEPS, ImageRequest

__all__ = [
    "HIRES_UPSCALERS", "MAX_SCALE", "MIN_SCALE", "HiresUpscaler", "check_hires", "check_scale", "check_steps",
    "check_strength", "generate_hires", "hires_request", "hires_size", "parse_upscaler", "second_pass_steps",
    "total_steps", "upscale_latents", "upscale_pixels",
]

# A1111's "Upscale by" slider (modules/ui.py, hr_scale): 1 to 4. Scale 1 is a second img2img pass at the
# same size (people use it as a refiner pass), so it is accepted.
MIN_SCALE, MAX_SCALE = 1.0, 4.0
# A1111's defaults: Hires upscale 2, Denoising strength 0.7 (the txt2img tab's slider), Hires steps 0
# (= the first pass's), upscaler "Latent" (`shared.latent_upscale_default_mode`).
DEFAULT_SCALE, DEFAULT_STRENGTH, DEFAULT_STEPS, DEFAULT_UPSCALER = 2.0, 0.7, 0, "latent"


@dataclass(frozen=True)
class HiresUpscaler:
    """One upscaler: ldm's name, A1111's ("Hires upscaler" in its infotext), and what it does.

    latent_mode / antialias: `F.interpolate`'s arguments for a latent upscaler (A1111's
    `latent_upscale_modes` entry); None for a pixel upscaler, whose PIL filter is `pil_filter`.
    """

    name: str
    a1111: str
    latent_mode: str | None = None
    antialias: bool = False
    pil_filter: str | None = None  # PIL.Image.Resampling member name: "LANCZOS", "NEAREST"
    description: str = ""

    @property
    def latent(self) -> bool:
        return self.latent_mode is not None


HIRES_UPSCALERS: dict[str, HiresUpscaler] = {
    u.name: u
    for u in (
        # modules/shared_items.py (A1111 1.6+; modules/shared.py before): latent_upscale_modes
        HiresUpscaler("latent", "Latent", "bilinear", False, description="the latents, bilinear (A1111's default)"),
        HiresUpscaler("latent-antialiased", "Latent (antialiased)", "bilinear", True,
                      description="the latents, bilinear with torch's antialias kernel"),
        HiresUpscaler("latent-bicubic", "Latent (bicubic)", "bicubic", False, description="the latents, bicubic"),
        HiresUpscaler("latent-bicubic-antialiased", "Latent (bicubic antialiased)", "bicubic", True,
                      description="the latents, bicubic with torch's antialias kernel"),
        HiresUpscaler("latent-nearest", "Latent (nearest)", "nearest", False,
                      description="the latents, nearest neighbour (torch's 'nearest': floor of the scaled index)"),
        HiresUpscaler("latent-nearest-exact", "Latent (nearest-exact)", "nearest-exact", False,
                      description="the latents, nearest neighbour at pixel centres"),
        # modules/upscaler.py: UpscalerLanczos, UpscalerNearest; "None" is resize_image's plain LANCZOS resize
        HiresUpscaler("lanczos", "Lanczos", pil_filter="LANCZOS",
                      description="the decoded image, PIL Lanczos, encoded again"),
        HiresUpscaler("nearest", "Nearest", pil_filter="NEAREST",
                      description="the decoded image, PIL nearest neighbour, encoded again"),
        HiresUpscaler("none", "None", pil_filter=None,
                      description="the decoded image resized with PIL Lanczos (A1111's 'None': no upscaler model)"),
    )
}


def _norm(name: str) -> str:
    """Case, spaces, hyphens, underscores and parentheses do not matter: "Latent (nearest-exact)",
    "latent-nearest-exact" and "LATENT_NEAREST_EXACT" are one name."""
    return re.sub(r"[\s_\-()]+", " ", name).strip().lower()


_BY_NAME = {_norm(key): u.name for u in HIRES_UPSCALERS.values() for key in (u.name, u.a1111)}


def parse_upscaler(name: str) -> str:
    """ldm's name of a hires upscaler given by ldm's or A1111's name, case-insensitively
    ("Latent" -> "latent", "Latent (bicubic antialiased)" -> "latent-bicubic-antialiased", "Lanczos" ->
    "lanczos"). Anything else raises ValueError listing the names."""
    hit = _BY_NAME.get(_norm(name)) if isinstance(name, str) else None
    if hit is None:
        valid = ", ".join(f"{u.name} ({u.a1111!r})" for u in HIRES_UPSCALERS.values())
        raise ValueError(f"unknown hires upscaler {str(name)[:60]!r}; valid: {valid} "
                         "(A1111's model upscalers, ESRGAN and the like, are not available)")
    return hit


def check_scale(scale: float) -> float:
    """A hires scale: a finite number from 1 to 4 (A1111's slider). Returns it as a float."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"hires scale must be a number from {MIN_SCALE:g} to {MAX_SCALE:g} (A1111's range), got {scale!r}")
    return float(scale)


def check_steps(steps: int) -> int:
    """Hires steps: 0 (the first pass's steps, A1111's default) to MAX_STEPS."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"hires steps must be a whole number from 0 (the first pass's steps) to {MAX_STEPS}, got {steps!r}")
    return steps


def check_strength(strength: float) -> float:
    """The hires pass's denoising strength: in (0, 1] (diffusers' img2img strength; A1111's default 0.7)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise ValueError(f"hires denoising strength must be in (0, 1], got {strength!r}")
    return float(strength)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's (width, height): A1111's ``int(side * scale)`` (Python floats: 520 x 1.25 = 650),
    rounded down to a multiple of 8 (its latent upscale's ``target // opt_f``; the VAE's factor)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def second_pass_steps(request_steps: int, steps: int) -> int:
    """The step count the second pass's schedule has: `steps`, or the first pass's when 0
    (A1111's ``hr_second_pass_steps or steps``)."""
    return steps or request_steps


def total_steps(request_steps: int, steps: int, strength: float) -> int:
    """Steps both passes take, as `generate_hires` numbers them for its callback: the first pass's, then
    the ``int(n * strength)`` (at most n) the second walks of its n = `second_pass_steps`."""
    n = second_pass_steps(request_steps, steps)
    return request_steps + min(int(n * strength), n)


def check_hires(width: int, height: int, request_steps: int, *, scale: float, steps: int = DEFAULT_STEPS,
                strength: float = DEFAULT_STRENGTH, upscaler: str = DEFAULT_UPSCALER, sampler: str | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check a hires fix before any model loads; returns the target (width, height). ValueError (one line)
    for: a scale, steps, strength or upscaler out of range or unknown; a strength that walks no step of
    the second pass (int(n * strength) = 0); a target beyond `max_pixels`; more than LCM's 50 steps for
    the lcm sampler (`sampler`: ldm's resolved name, if known)."""
    from ldmcli.samplers import first_step

    scale, steps, strength = check_scale(scale), check_steps(steps), check_strength(strength)
    parse_upscaler(upscaler)
    n = second_pass_steps(request_steps, steps)
    try:
        first_step(n, strength)
    except ValueError as exc:
        raise ValueError(f"hires pass: {exc}") from None
    if sampler == "lcm" and n > LCM_MAX_STEPS:
        raise ValueError(f"hires steps {n}: the lcm sampler walks at most {LCM_MAX_STEPS} steps")
    w, h = hires_size(width, height, scale)
    if w * h > max_pixels:
        raise ValueError(f"hires target {w}x{h} ({width}x{height} x {scale:g}) is {w * h:,} pixels, more than the "
                         f"limit of {max_pixels:,} (--max-pixels raises it)")
    return w, h


def hires_request(request: ImageRequest, *, scale: float, steps: int = DEFAULT_STEPS) -> ImageRequest:
    """The second pass's request: `request` at the target size with the second pass's steps; everything
    else (prompts, CFG, sampler, schedule, rng, ensd, clip skip) the same, as A1111's hires pass keeps them."""
    width, height = hires_size(request.width, request.height, scale)
    return replace(request, width=width, height=height, steps=second_pass_steps(request.steps, steps))


# --- the upscalers -----------------------------------------------------------------------------------------


def upscale_latents(latents: Tensor, width: int, height: int, upscaler: str = "latent", factor: int = 8) -> Tensor:
    """Latents [N, C, h, w] resized to the latent size of a `width` x `height` image, as A1111's
    `sample_hr_pass`: ``F.interpolate(samples, size=(target_height // opt_f, target_width // opt_f),
    mode=..., antialias=...)`` with the upscaler's `latent_upscale_modes` entry. Computed in float32."""
    u = HIRES_UPSCALERS[parse_upscaler(upscaler)]
    if not u.latent:
        raise ValueError(f"{u.name} is a pixel upscaler, not a latent one")
    return F.interpolate(latents.float(), size=(height // factor, width // factor), mode=u.latent_mode,
                         antialias=u.antialias)


def upscale_pixels(images: Tensor, width: int, height: int, upscaler: str = "lanczos") -> Tensor:
    """uint8 images [N, H, W, 3] resized to `width` x `height` with PIL as A1111's
    ``images.resize_image(0, im, width, height, upscaler_name=...)`` does for its Lanczos, Nearest and None
    upscalers (modules/images.py `resize`, modules/upscaler.py `Upscaler.upscale`):

        "None":   im.resize((width, height), LANCZOS)
        others:   scale = max(width / W, height / H); if scale > 1: the upscaler's one step,
                  im.resize((int(W * scale), int(H * scale)), filter), then LANCZOS to
                  (int(W * scale // 8 * 8), int(H * scale // 8 * 8)) if it is not that size;
                  then LANCZOS to (width, height) if it is not that size.

    For a target `hires_size` gives from an exact scale, "Lanczos" is one LANCZOS resize and "Nearest"
    one NEAREST resize. Returns uint8 [N, height, width, 3] on the CPU.
    """
    import numpy as np
    from PIL import Image

    u = HIRES_UPSCALERS[parse_upscaler(upscaler)]
    if u.latent:
        raise ValueError(f"{u.name} is a latent upscaler, not a pixel one")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    lanczos = Image.Resampling.LANCZOS
    out = []
    for array in images.cpu().numpy():
        im = Image.fromarray(array, "RGB")
        if u.pil_filter is None:
            im = im.resize((width, height), resample=lanczos)
        else:
            scale = max(width / im.width, height / im.height)
            if scale > 1.0:
                dest = (int(im.width * scale // 8 * 8), int(im.height * scale // 8 * 8))
                # One step of `Upscaler.upscale`'s loop: a PIL upscaler reaches dest in one step.
                im = im.resize((int(im.width * scale), int(im.height * scale)),
                               resample=getattr(Image.Resampling, u.pil_filter))
                if im.size != dest:
                    im = im.resize(dest, resample=lanczos)
            if im.size != (width, height):
                im = im.resize((width, height), resample=lanczos)
        out.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(out))


# --- the two passes ----------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_hires(
    model,
    request: ImageRequest,
    seeds: Sequence[int],
    *,
    scale: float = DEFAULT_SCALE,
    steps: int = DEFAULT_STEPS,
    strength: float = DEFAULT_STRENGTH,
    upscaler: str = DEFAULT_UPSCALER,
    callback: Callable[[int, Tensor], None] | None = None,
    vae_tile: tuple[int, int] | None = None,
    vae_fp32: bool = False,
    check_finite: bool = True,
) -> Tensor:
    """Denoised latents of the hires fix for `request`, one per seed, at `hires_size(request.width,
    request.height, scale)` (decode them with `pipeline.decode_latents`, as `pipeline.sample_latents`'s).

    model: a loaded `pipeline.StableDiffusion`; a pixel upscaler needs the VAE's encoder (not dropped).
    request: resolved (`ImageRequest.checked`), text-to-image, match "diffusers"; its size is the first pass's.
    scale, steps, strength, upscaler: A1111's Hires upscale, Hires steps (0: request.steps), Denoising
        strength and Hires upscaler (ldm's or A1111's name, `HIRES_UPSCALERS`).
    callback(i, denoised): per step of both passes, numbered on: the first pass 0 .. request.steps - 1,
        then the second pass's from request.steps on (`total_steps` counts them all).
    vae_tile: the first pass's decode for a pixel upscaler, tiled (`pipeline.decode_latents`).
    vae_fp32: a pixel upscaler's encode in float32 (diffusers upcasts an SDXL VAE: `force_upcast`).
    check_finite: raise `NonFiniteError` for NaN/Inf latents after each pass; False leaves the check of
        the final latents to the caller (`pipeline.finite_rows`; a NaN image stays NaN in its own row).
    """
    from ldmcli import pipeline

    if request.from_image:
        raise ValueError("the hires fix is a second pass of text-to-image; it does not start from an init image")
    if request.match != "diffusers":
        raise ValueError(f"match {request.match!r}: the hires pass is img2img, whose A1111 numerics are not "
                         "reproduced yet; use match 'diffusers'")
    name = parse_upscaler(upscaler)
    check_hires(request.width, request.height, request.steps, scale=scale, steps=steps, strength=strength,
                upscaler=name, sampler=request.sampler, max_pixels=math.inf)
    if model.unet is None:
        raise RuntimeError("the U-Net was released after the run's last image (release_unet)")
    if not HIRES_UPSCALERS[name].latent and getattr(model.vae, "encoder", None) is None:
        # refused before the first pass runs, not after it
        raise RuntimeError(f"the {name} upscaler encodes the upscaled image: keep the VAE's encoder (drop_encoder)")
    second = hires_request(request, scale=scale, steps=steps)

    latents = pipeline.sample_latents(model, request, seeds, callback=callback, check_finite=check_finite)
    if HIRES_UPSCALERS[name].latent:
        init = upscale_latents(latents, second.width, second.height, name, model.spec.vae.downsample_factor)
        pixels = None
    else:
        init = None
        first = pipeline.decode_latents(model, latents, tile=vae_tile, match=request.match)
        pixels = upscale_pixels(first, second.width, second.height, name)
    del latents

    offset = request.steps
    shifted = None if callback is None else (lambda i, denoised: callback(offset + i, denoised))
    return _second_pass(model, second, seeds, strength, latents=init, pixels=pixels, callback=shifted,
                        vae_fp32=vae_fp32, check_finite=check_finite)


def _second_pass(model, request: ImageRequest, seeds: Sequence[int], strength: float, *, latents: Tensor | None,
                 pixels: Tensor | None, callback, vae_fp32: bool, check_finite: bool) -> Tensor:
    """img2img at `request`'s (the target's) size from init `latents` or from uint8 `pixels` (encoded here),
    drawing from fresh per-image generators seeded with `seeds`: diffusers' img2img pipeline given
    ``image=latents`` (no encode, first draw = add_noise's noise) or ``image=pixels`` (first draw = the
    posterior sample, then the noise). `img2img.sample_from_image` is the pixel case for an ordinary U-Net;
    this also runs an inpainting U-Net, on the planes text-to-image gives it (a grey image, all repainted:
    A1111's hires pass conditions it so, via txt2img_image_conditioning for a latent upscaler and
    img2img_image_conditioning at inpainting_mask_weight 1 for a pixel one)."""
    from ldmcli import pipeline, vae_encode
    from ldmcli.samplers import StartImage, sample

    n, factor = len(seeds), model.spec.vae.downsample_factor
    latent_shape = (model.spec.vae.embed_dim, request.height // factor, request.width // factor)
    noise = pipeline.noise_source(seeds, latent_shape, model.device, torch.float32, request.rng, request.ensd)
    if latents is None:
        latents = vae_encode.encode(model.vae, pixels, noise=noise, scale_factor=model.spec.scale_factor,
                                    dtype=torch.float32 if vae_fp32 else None)
    latents = latents.to(model.device, torch.float32)
    if tuple(latents.shape) != (n, *latent_shape):
        raise ValueError(f"init latents {list(latents.shape)}: expected {[n, *latent_shape]}")
    start = StartImage(latents, noise(), strength)

    cond, uncond = pipeline.guidance_conditioning(model, request, n)
    network = pipeline.text_to_image_network(model, n, request)
    denoiser = pipeline.guided_denoiser(network, model.spec.schedule, cond, uncond, request)
    out = sample(request.sampler, model.spec.schedule, request.steps, denoiser, noise, spacing=request.schedule,
                 match=request.match, callback=callback, start=start)
    if check_finite:
        pipeline.check_finite_latents(out, seeds, model.dtype)
    return out
