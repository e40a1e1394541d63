"""The images a request starts from (img2img, inpainting, outpainting), read and prepared as A1111 does.

No torch here: ldm checks a request's inputs before it imports torch, so this module is numpy and PIL
only, and hands the engine numpy arrays (`to_model_input`, `mask_to_model`).

Images are uint8 HxWx3 arrays. Masks are float32 HxW arrays in [0, 1], 1 = repaint (A1111's white).
A1111 keeps a mask as an 8-bit "L" image through every step (alpha, invert, blur, resize), and so does
this module inside each function: a mask's values are multiples of 1/255 (`uint8 / 255` in float32,
as diffusers' `VaeImageProcessor.pil_to_numpy` makes them), and each step rounds to 8 bits where A1111's
does.

The order of A1111's `StableDiffusionProcessingImg2Img.init` (modules/processing.py, 1.6-1.10):
    image: images.fix_image (EXIF orientation) -> images.flatten (alpha over white) -> resize_image
    mask:  images.fix_image -> create_binary_mask -> invert -> blur x -> blur y -> resize_image
`check_inputs` runs both, with ldm's outpainting padding between reading and blurring.
"""

from __future__ import annotations

import enum
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ldmcli.errors import LdmError
from ldmcli.files import check_regular_file
from ldmcli.limits import DEFAULT_MAX_PIXELS


class ImageInputError(LdmError, ValueError):
    """An init image, mask or image option ldm cannot use; the message names the file or value.

    Also a ValueError, so that a Click parameter type converting a flag with `parse_pad` or
    `parse_resize_mode` reports it as a bad value like every other flag's."""


# Formats Pillow may open: what people start img2img from (A1111's batch tab takes .png .jpg .jpeg
# .webp); JPEG includes the MPO files of many phones (Pillow's JPEG opener returns them). Formats that
# run other programs (EPS runs Ghostscript) or that nobody draws masks in are never tried.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")

# The largest image read, in pixels: 16 x DEFAULT_MAX_PIXELS, an 8192 x 8192 photo (a 12 MP phone
# photo is well within). An init image is usually resized down to the generation size, so it may be
# larger than the largest generation; this bounds what a decompression bomb (a tiny PNG declaring a
# huge size) can make ldm allocate: 64 Mi pixels are 256 MB as RGBA. Pillow's own bound (about 179 M
# pixels, DecompressionBombError) stays in force above it.
MAX_INPUT_PIXELS = 16 * DEFAULT_MAX_PIXELS

# A1111's "Mask blur" slider goes from 0 to 64. The blur costs a multiply-add per kernel tap and
# pixel (kernel width 2 * int(2.5 * blur + 0.5) + 1: 321 taps at 64), so it is bounded.
MAX_MASK_BLUR = 64

# The most pixels one side of an image may be padded by; the padded canvas is also bounded by the
# generation's pixel bound (check_inputs' max_pixels).
MAX_PAD = 1 << 16

# A1111 images.LANCZOS: every resize of an init image or mask (no upscaler is configured by default:
# opts.upscaler_for_img2img is None, and masks, mode "L", never go through one).
LANCZOS = Image.Resampling.LANCZOS

# "Crop and resize" scales the image to cover the target, then crops. For an aspect ratio far from the
# target's, A1111's intermediate image is huge (300x1 into 512x512: 153600x512). Past this many
# pixels the crop is resized directly from the source region (PIL's resize(box=)): the same filter
# and centres, but the centres are computed in another order, so a few pixels differ by 1 from A1111.
_MAX_CROP_INTERMEDIATE = 4 * DEFAULT_MAX_PIXELS


# --- reading ------------------------------------------------------------------------------------------


def _open(path: Path, max_pixels: int) -> Image.Image:
    """The decoded first frame of an image file with its EXIF orientation applied, or ImageInputError."""
    path = check_regular_file(Path(path), ImageInputError)  # a FIFO would block open() forever
    try:
        with open(path, "rb") as stream:
            image = _decode(stream, path, max_pixels)
    except OSError as exc:  # open() or a read; Pillow's own errors are ImageInputError by now
        raise ImageInputError(f"{path}: cannot read ({exc.strerror or _one_line(exc)})") from exc
    if image.mode in ("I", "F") or (image.mode.startswith("I;") and not image.mode.startswith("I;16")):
        # 32-bit integer or float pixels have no agreed range: A1111 (Pillow's convert) clips them to 255.
        raise ImageInputError(f"{path}: {image.mode} pixels (32-bit integer or float) are not supported; "
                              "save it as an 8-bit image")
    if image.mode.startswith("I;16"):
        # 16-bit greyscale (a 16-bit PNG mask): Pillow's convert clips it to 255, which would turn a mask
        # white (repaint everything). Scaled to 8 bits instead, rounding: round(v * 255 / 65535).
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    # A1111 images.fix_image: EXIF orientation (phones store photos sideways), any failure ignored.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001, S110 - as A1111's fix_image: a damaged EXIF block leaves the image as it is
        pass
    return image


# What Pillow's decoders raise on damaged or hostile bytes (the exceptions Pillow's own fuzzers allow,
# and struct's and zlib's, which some plugins let through).
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
            struct.error, zlib.error)


def _decode(stream, path: Path, max_pixels: int) -> Image.Image:
    """Pillow's image in `stream`, its size checked before it is decoded (load), or ImageInputError."""
    try:
        with warnings.catch_warnings():
            # The size is checked below against max_pixels, and a damaged EXIF block is ignored as
            # A1111 ignores it: Pillow's warnings (DecompressionBombWarning, "Corrupt EXIF data")
            # would only be noise on ldm's stderr.
            warnings.simplefilter("ignore")
            image = Image.open(stream, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own bound, 2 x Image.MAX_IMAGE_PIXELS
        bound = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0) or max_pixels)
        raise ImageInputError(f"{path}: more than {bound:,} pixels, the most ldm reads of an image") from exc
    except UnidentifiedImageError as exc:
        raise ImageInputError(f"{path}: not an image ldm reads ({', '.join(IMAGE_FORMATS)})") from exc
    except _DAMAGED as exc:
        raise ImageInputError(f"{path}: damaged image ({_one_line(exc)})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(f"{path}: {width}x{height} is {width * height:,} pixels, more than "
                              f"{max_pixels:,}, the most ldm reads of an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()  # decoded while the file is open; a truncated file fails here
    except _DAMAGED as exc:
        raise ImageInputError(f"{path}: truncated or damaged image ({_one_line(exc)})") from exc
    return image


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _has_alpha(image: Image.Image) -> bool:
    """Whether `image` has transparency: an alpha band, or a PNG tRNS colour ("transparency")."""
    return "A" in image.getbands() or "a" in image.mode or "transparency" in image.info


def read_image(path: Path, *, max_pixels: int = MAX_INPUT_PIXELS, background: str = "#ffffff") -> np.ndarray:
    """An init image as uint8 HxWx3: A1111's `images.fix_image` then `images.flatten(img,
    opts.img2img_background_color)`.

    - only a regular file is opened (files.check_regular_file), then Pillow with IMAGE_FORMATS only;
    - more than `max_pixels` pixels is refused from the header, before decoding;
    - EXIF orientation applied (ImageOps.exif_transpose), as A1111 does for every uploaded image;
    - transparency composited over `background` (A1111's option, white by default): A1111's img2img
      image component converts every upload to RGBA, and `flatten` pastes it over the colour with its
      alpha as the paste mask; an opaque image is just converted to RGB (identical to pasting it);
    - the first frame of an animation.

    Errors are ImageInputError naming the file: missing, not a file, not an image, damaged or
    truncated, too large.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        if _has_alpha(image):
            rgba = image.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, background)
            flat.paste(rgba, mask=rgba)
            image = flat
        rgb = image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert (LAB, ...)
        raise ImageInputError(f"{path}: cannot convert {image.mode} pixels to RGB ({_one_line(exc)})") from exc
    return np.asarray(rgb, dtype=np.uint8).copy()


def read_mask(path: Path, *, invert: bool = False, round_alpha: bool = True,
              max_pixels: int = MAX_INPUT_PIXELS) -> np.ndarray:
    """An inpainting mask as float32 HxW in [0, 1], 1 (white) = repaint: A1111's `images.fix_image`,
    then `processing.create_binary_mask(mask, round=p.mask_round)`, then `inpainting_mask_invert`.

    create_binary_mask: A1111's mask upload converts the mask to RGBA; when some pixel is not opaque
    (alpha extrema != (255, 255)), the mask is the alpha channel (rounded to 0/255 at > 128 when
    `round_alpha`, A1111's default `mask_round`: a brush stroke on a transparent layer); otherwise it is
    the image's grey level (Pillow's "L" conversion: white repaints, black keeps).

    `invert` is A1111's "Inpaint not masked" (ImageOps.invert: 255 - v).
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        rgba = image.convert("RGBA")
    except ValueError as exc:
        raise ImageInputError(f"{path}: cannot read {image.mode} pixels as a mask ({_one_line(exc)})") from exc
    alpha = rgba.getchannel("A")
    if alpha.getextrema() != (255, 255):
        grey = alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    else:
        grey = rgba.convert("L")
    if invert:
        grey = ImageOps.invert(grey)
    return _mask_from_u8(np.asarray(grey, dtype=np.uint8))


# --- masks as 8-bit images -----------------------------------------------------------------------------


def _mask_from_u8(u8: np.ndarray) -> np.ndarray:
    # As diffusers' VaeImageProcessor.pil_to_numpy: uint8 -> float32 / 255.
    return u8.astype(np.float32) / 255.0


def _mask_to_u8(mask: np.ndarray) -> np.ndarray:
    """A float mask as A1111's 8-bit "L" image: round(v * 255). Exact for masks this module made."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is a 2-D array (H, W), got shape {mask.shape}")
    if mask.dtype == np.uint8:
        return mask
    if not np.all((mask >= 0) & (mask <= 1)):  # NaN fails this too
        raise ValueError("mask values must be in [0, 1]")
    return np.rint(mask.astype(np.float64) * 255).astype(np.uint8)


def _to_pil(array: np.ndarray) -> Image.Image:
    """An image (uint8 HxWx3) or mask (float HxW) as the PIL image A1111 would hold: RGB or L."""
    array = np.asarray(array)
    if array.ndim == 3:
        if array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"an image is a uint8 array (H, W, 3), got {array.dtype} {array.shape}")
        return Image.fromarray(array, "RGB")
    return Image.fromarray(_mask_to_u8(array), "L")


def _from_pil(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return _mask_from_u8(np.asarray(image, dtype=np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


# --- resize modes ----------------------------------------------------------------------------------------


class ResizeMode(enum.IntEnum):
    """A1111's img2img resize modes, by A1111's numbers. 3, "Just resize (latent upscale)", resizes the
    encoded latents instead of the image and is not supported."""

    RESIZE = 0  # "Just resize": stretch to the target size
    CROP = 1  # "Crop and resize": scale to cover the target, centre, crop the excess
    FILL = 2  # "Resize and fill": scale to fit inside, centre, fill the borders from the image's edges


RESIZE_MODE_NAMES = {
    "resize": ResizeMode.RESIZE, "just resize": ResizeMode.RESIZE, "0": ResizeMode.RESIZE,
    "crop": ResizeMode.CROP, "crop and resize": ResizeMode.CROP, "1": ResizeMode.CROP,
    "fill": ResizeMode.FILL, "resize and fill": ResizeMode.FILL, "2": ResizeMode.FILL,
}
_LATENT_UPSCALE_NAMES = ("3", "just resize (latent upscale)", "latent upscale", "latent")


def parse_resize_mode(value: str | int) -> ResizeMode:
    """A resize mode from ldm's names ("resize", "crop", "fill"), A1111's labels ("Just resize",
    "Crop and resize", "Resize and fill") or numbers (0, 1, 2), case-insensitive. A1111's mode 3
    (latent upscale) and anything else: ImageInputError."""
    if isinstance(value, bool):
        raise ImageInputError(f"resize mode must be a name or 0, 1, 2, got {value!r}")
    key = " ".join(str(value).split()).lower() if isinstance(value, (str, int)) else None
    if key in RESIZE_MODE_NAMES:
        return RESIZE_MODE_NAMES[key]
    if key in _LATENT_UPSCALE_NAMES:
        raise ImageInputError("resize mode 3 (Just resize (latent upscale)) is not supported: "
                              "use resize, crop or fill")
    raise ImageInputError(f"unknown resize mode {str(value)[:40]!r}: use resize, crop or fill "
                          "(A1111: Just resize, Crop and resize, Resize and fill, or 0, 1, 2)")


def resize_image(image: np.ndarray, width: int, height: int, mode: ResizeMode | str | int = ResizeMode.RESIZE) -> np.ndarray:
    """An image (uint8 HxWx3) or mask (float32 HxW) resized to `width` x `height` as A1111's
    `modules/images.py resize_image(resize_mode, im, width, height)` with no upscaler (LANCZOS).

    A1111's arithmetic, kept exactly (Python floats for the ratios, floor division for sizes and offsets):
        ratio = width / height;  src_ratio = im.width / im.height
        crop: src_w = width if ratio > src_ratio else im.width * height // im.height
              src_h = height if ratio <= src_ratio else im.height * width // im.width
        fill: src_w = width if ratio < src_ratio else im.width * height // im.height
              src_h = height if ratio >= src_ratio else im.height * width // im.width
        the resized image is pasted at (width // 2 - src_w // 2, height // 2 - src_h // 2) on black;
        fill then pastes two strips of fill_height = height // 2 - src_h // 2 rows (or fill_width
        columns) each, resized from a zero-height (zero-width) box at the image's first and last row
        with PIL's default filter, BICUBIC (A1111 names none there): every strip row is
        1.125 * edge row - 0.125 * the row inside it, a slightly sharpened copy of the edge.

    Where A1111 fails, this does not: a "fill" image so wide (or tall) that src_h (src_w) rounds to 0
    keeps one row (A1111's PIL resize refuses a zero size), and a zero-width strip is skipped (as
    diffusers' `VaeImageProcessor._resize_and_fill`, which mirrors A1111's, does). A "crop" whose
    intermediate image would exceed 16 M pixels is resized from the source region directly
    (_MAX_CROP_INTERMEDIATE). A mask is resized as A1111 resizes it: an 8-bit "L" image.
    """
    mode = parse_resize_mode(mode) if not isinstance(mode, ResizeMode) else mode
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    return _from_pil(_resize_pil(_to_pil(image), width, height, mode))


def _resize_pil(im: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    if mode == ResizeMode.RESIZE:
        return im.resize((width, height), resample=LANCZOS)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == ResizeMode.CROP:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        if src_w * src_h > _MAX_CROP_INTERMEDIATE:
            # The window of A1111's intermediate that survives the crop, in source coordinates.
            left, top = src_w // 2 - width // 2, src_h // 2 - height // 2
            sx, sy = im.width / src_w, im.height / src_h
            box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
            return im.resize((width, height), resample=LANCZOS, box=box)
        resized = im.resize((src_w, src_h), resample=LANCZOS)
        res = Image.new(im.mode, (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    src_w, src_h = max(src_w, 1), max(src_h, 1)  # A1111 raises on a zero size (see the docstring)
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new(im.mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:  # resize() without a filter, as A1111's: BICUBIC
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


# --- mask blur --------------------------------------------------------------------------------------------


def blur_kernel_size(sigma: int) -> int:
    """A1111's kernel width for a mask blur of `sigma` pixels: 2 * int(2.5 * sigma + 0.5) + 1."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def gaussian_kernel_q8(size: int, sigma: float) -> list[int]:
    """The integer taps (summing to 256) cv2.GaussianBlur applies to 8-bit images.

    OpenCV's 8-bit GaussianBlur is bit-exact fixed point (modules/imgproc/src/smooth.dispatch.cpp):
    getGaussianKernelBitExact computes the normalised Gaussian in (soft)double:
        t_i = exp(x_i^2 * (-0.125 / sigma^2)) for x_i = 1 - n, 3 - n, ... (twice the offset), centre 1,
        each divided by their sum;
    getGaussianKernelFixedPoint_ED turns the outer taps into Q8 integers with error diffusion
    (v = round-half-even(k_i * 256 + err); err = k_i * 256 + err - v), mirrored, and gives the centre
    what is left of 256. The result is then (sum(tap * pixel) + 128) >> 8.
    """
    if size % 2 != 1 or sigma <= 0:
        raise ValueError(f"kernel size must be odd and sigma positive, got {size}, {sigma}")
    scale = -0.125 / (sigma * sigma)
    half = (size - 1) // 2
    values = [math.exp(float(x * x) * scale) for x in range(1 - size, 0, 2)]  # the outer taps, left half
    total = 0.0
    for value in values:  # OpenCV's order of additions (Python's sum() compensates, which rounds differently)
        total += value
    total = total * 2.0 + 1.0
    inverse = 1.0 / total
    taps = [0] * size
    error = 0.0
    fixed_sum = 0
    for i, value in enumerate(values):
        adjusted = value * inverse * 256.0 + error
        rounded = round(adjusted)  # Python's round is half-to-even, as OpenCV's cvRound(softdouble)
        error = adjusted - rounded
        taps[i] = taps[size - 1 - i] = rounded
        fixed_sum += rounded
    taps[half] = 256 - 2 * fixed_sum
    return taps


def _reflect_101(index: np.ndarray, n: int) -> np.ndarray:
    """cv2.borderInterpolate(p, n, BORDER_REFLECT_101), GaussianBlur's default border: gfedcb|abcdefgh|gfedcba,
    reflected again as often as a kernel wider than the image needs."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.abs(index) % period
    return np.where(folded >= n, period - folded, folded)


# Kernels wider than this are applied through the FFT (time independent of the width); narrower ones
# tap by tap, which is faster for them. Both give the same integers (see _blur_rows_u8).
_DIRECT_TAPS = 41
# Rows blurred at a time: bounds the temporary arrays (int and complex copies of the rows) to a few
# tens of MB whatever the mask's size.
_CHUNK_ELEMENTS = 1 << 21


def _blur_rows_u8(u8: np.ndarray, sigma: int) -> np.ndarray:
    """cv2.GaussianBlur(u8, (k, 1), sigma) on a 2-D uint8 array, bit for bit: each output pixel is
    (sum(taps[j] * padded[x + j]) + 128) >> 8 with gaussian_kernel_q8's taps and reflect-101 padding.

    The sum is an integer below 2^16. Tap by tap it is computed exactly in uint16 (no partial sum
    exceeds the final one); through the FFT in float64, whose error on integers this small (~1e-9)
    is far below the 0.5 that np.rint removes, so both give cv2's integers."""
    taps = gaussian_kernel_q8(blur_kernel_size(sigma), sigma)
    size = len(taps)
    radius = size // 2
    rows, n = u8.shape
    index = _reflect_101(np.arange(-radius, n + radius), n)
    out = np.empty_like(u8)
    if size <= _DIRECT_TAPS:
        step = max(1, _CHUNK_ELEMENTS // (n + 2 * radius))
        for start in range(0, rows, step):
            padded = u8[start:start + step][:, index].astype(np.uint16)
            total = np.full((padded.shape[0], n), 128, dtype=np.uint16)  # + 128: round half up on the >> 8
            for i in range(radius):
                if taps[i]:  # the taps are symmetric: one multiply for both
                    total += taps[i] * (padded[:, i:i + n] + padded[:, size - 1 - i:size - 1 - i + n])
            total += taps[radius] * padded[:, radius:radius + n]
            out[start:start + step] = (total >> 8).astype(np.uint8)
        return out
    length = _fft_size(n + 2 * radius + size - 1)  # linear convolution, no wrap-around
    spectrum = np.fft.rfft(np.array(taps, dtype=np.float64), length)
    step = max(1, _CHUNK_ELEMENTS // length)
    for start in range(0, rows, step):
        padded = u8[start:start + step][:, index].astype(np.float64)
        full = np.fft.irfft(np.fft.rfft(padded, length, axis=1) * spectrum, length, axis=1)
        total = np.rint(full[:, size - 1:size - 1 + n]).astype(np.int64)  # symmetric taps: convolution = correlation
        out[start:start + step] = ((total + 128) >> 8).astype(np.uint8)
    return out


def _fft_size(minimum: int) -> int:
    """The smallest 2^a 3^b 5^c at least `minimum` (pocketfft is fastest on those)."""
    best = 1 << (minimum - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            size = power35
            while size < minimum:
                size *= 2
            best = min(best, size)
            power35 *= 3
        power5 *= 5
    return best


def _blur_axis_u8(u8: np.ndarray, sigma: int, axis: int) -> np.ndarray:
    """cv2.GaussianBlur along one axis of a 2-D uint8 array: (k, 1) blurs each row (axis 1), (1, k) each
    column (axis 0, done on the transpose so that the rows stay contiguous)."""
    if axis == 1:
        return _blur_rows_u8(np.ascontiguousarray(u8), sigma)
    return np.ascontiguousarray(_blur_rows_u8(np.ascontiguousarray(u8.T), sigma).T)


def blur_mask(mask: np.ndarray, blur_x: int, blur_y: int | None = None) -> np.ndarray:
    """A mask blurred as A1111's inpainting blurs it (processing.py, StableDiffusionProcessingImg2Img.init,
    A1111 >= 1.6 `mask_blur_x` / `mask_blur_y`; one "Mask blur" value sets both):

        np_mask = cv2.GaussianBlur(np_mask, (2 * int(2.5 * blur_x + 0.5) + 1, 1), blur_x)   # if blur_x > 0
        np_mask = cv2.GaussianBlur(np_mask, (1, 2 * int(2.5 * blur_y + 0.5) + 1), blur_y)   # if blur_y > 0

    on the 8-bit mask, border BORDER_REFLECT_101. cv2 is not a dependency: its 8-bit fixed-point
    arithmetic is reproduced with numpy (gaussian_kernel_q8), equal to cv2 4.10 and 5.1 for every blur
    from 1 to 64 (tests/test_image_input.py). diffusers' `VaeImageProcessor.blur` blurs differently:
    PIL's `ImageFilter.GaussianBlur(blur_factor)`, an extended box-blur approximation.
    """
    blur_y = blur_x if blur_y is None else blur_y
    for value in (blur_x, blur_y):
        check_mask_blur(value)
    u8 = _mask_to_u8(mask)
    if blur_x > 0:
        u8 = _blur_axis_u8(u8, blur_x, axis=1)
    if blur_y > 0:
        u8 = _blur_axis_u8(u8, blur_y, axis=0)
    return _mask_from_u8(u8)


def check_mask_blur(value: object) -> int:
    """A mask blur: an int from 0 to MAX_MASK_BLUR (A1111's slider), else ImageInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_MASK_BLUR:
        raise ImageInputError(f"mask blur must be a whole number from 0 to {MAX_MASK_BLUR}, got {value!r}")
    return int(value)


# --- outpainting ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Padding:
    """Pixels added on each side of an image (outpainting)."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0

    def __iter__(self):
        return iter((self.left, self.top, self.right, self.bottom))

    @property
    def any(self) -> bool:
        return any(self)


_PAD_NUMBER = re.compile(r"[ \t]*([0-9]{1,9})[ \t]*")


def parse_pad(text: str) -> Padding:
    """Outpainting padding from "LEFT,TOP,RIGHT,BOTTOM" or one number for every side ("64"), each a
    whole number of pixels from 0 to MAX_PAD. Anything else: ImageInputError."""
    if not isinstance(text, str):
        raise ImageInputError(f"padding must be text like 64 or 64,0,64,0, got {type(text).__name__}")
    parts = text.split(",")
    matches = [_PAD_NUMBER.fullmatch(part) for part in parts]
    if len(parts) not in (1, 4) or None in matches:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ImageInputError(f"padding {shown!r} is not a number of pixels or LEFT,TOP,RIGHT,BOTTOM "
                              "(whole numbers, at least 0)")
    numbers = [int(match.group(1)) for match in matches]
    return check_padding(Padding(*numbers * 4) if len(numbers) == 1 else Padding(*numbers))


def check_padding(padding: Padding | tuple[int, int, int, int]) -> Padding:
    """Padding with each side a whole number from 0 to MAX_PAD, else ImageInputError."""
    values = tuple(padding)
    if len(values) != 4:
        raise ImageInputError(f"padding needs 4 sides (left, top, right, bottom), got {len(values)}")
    for name, value in zip(("left", "top", "right", "bottom"), values):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_PAD:
            raise ImageInputError(f"padding {name} must be a whole number of pixels from 0 to {MAX_PAD:,}, "
                                  f"got {value!r}")
    return Padding(*(int(v) for v in values))


def padded_size(width: int, height: int, padding: Padding, multiple: int = 8) -> tuple[Padding, int, int]:
    """The padding actually applied and the canvas size: the canvas rounded up to `multiple`.

    The rounding is split as A1111's poor man's outpainting splits its (to 64): on an axis padded on
    both sides, left = left * extra // (left + right) and right gets the rest of `extra` (the padding
    plus the rounding); padded on one side, that side takes it all. On an axis not padded at all the
    rounding goes to the right (bottom), as A1111's outpainting mk2 does (its image at (0, 0) of a
    canvas rounded up to 64), and is repainted like any new area.
    """
    left, top, right, bottom = padding
    out = []
    for size, before, after in ((width, left, right), (height, top, bottom)):
        target = -(-(size + before + after) // multiple) * multiple
        extra = target - size
        if before and after:
            before = before * extra // (before + after)
            after = extra - before
        elif before:
            before = extra
        else:
            after = extra
        out.append((before, after, target))
    (left, right, canvas_w), (top, bottom, canvas_h) = out
    return Padding(left, top, right, bottom), canvas_w, canvas_h


PAD_FILLS = ("edge", "black")


def pad_canvas(image: np.ndarray, left: int, top: int, right: int, bottom: int, *, fill: str = "edge",
               multiple: int = 8, overlap: int = 0, mask_blur: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outpainting: (canvas uint8 HxWx3, mask float32 HxW), the image padded on each side and the mask
    white (1) over everything new.

    The canvas is rounded up to a multiple of `multiple` (padded_size says where the rounding goes).
    The new area is filled with
      - "edge": each new pixel a copy of the nearest edge pixel of the image (numpy's pad mode "edge").
        Not what A1111 does, but a start that the sampler at a denoising strength below 1 blends from;
      - "black": A1111's canvas in both outpainting scripts (scripts/poor_mans_outpainting.py,
        scripts/outpainting_mk_2.py: Image.new("RGB", ...) with the image pasted on it), which A1111 then
        paints over: poor man's outpainting with its "Masked content: fill" (`fill_masked` here),
        mk2 with noise matched to the image's spectrum.
    The mask also covers `overlap` pixels of the image along each padded side (A1111's poor man's
    outpainting: 2 x its blur slider, with the blur doubled too, so the blurred mask still repaints all
    of the new area). `mask_blur` then blurs the mask (blur_mask). A1111's mask rectangle is drawn with
    PIL's inclusive corner, leaving one new column or row unmasked; this mask is exact.
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image is a uint8 array (H, W, 3), got {array.dtype} {array.shape}")
    if fill not in PAD_FILLS:
        raise ImageInputError(f"unknown padding fill {fill!r}: use {' or '.join(PAD_FILLS)}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ImageInputError(f"mask overlap must be a whole number of pixels, at least 0, got {overlap!r}")
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    height, width = array.shape[:2]
    padding, canvas_w, canvas_h = padded_size(width, height, check_padding((left, top, right, bottom)), multiple)
    left, top, right, bottom = padding
    widths = ((top, bottom), (left, right), (0, 0))
    canvas = np.pad(array, widths, mode="edge") if fill == "edge" else np.pad(array, widths)
    mask = np.ones((canvas_h, canvas_w), dtype=np.uint8) * 255
    # The kept part: the image, less `overlap` on each padded side (never less than nothing).
    x0 = left + (overlap if left else 0)
    y0 = top + (overlap if top else 0)
    x1 = left + width - (overlap if right else 0)
    y1 = top + height - (overlap if bottom else 0)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = 0
    soft = _mask_from_u8(mask)
    return canvas, blur_mask(soft, mask_blur) if mask_blur else soft


def pad_mask(mask: np.ndarray, padding: Padding, multiple: int = 8) -> np.ndarray:
    """A user's mask padded like its image (padded_size): white (repaint) over everything new."""
    u8 = _mask_to_u8(mask)
    padding, _, _ = padded_size(u8.shape[1], u8.shape[0], padding, multiple)
    left, top, right, bottom = padding
    return _mask_from_u8(np.pad(u8, ((top, bottom), (left, right)), constant_values=255))


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A1111's "Masked content: fill" (modules/masking.py `fill(image, mask)`): the masked area painted
    with the colours around it, by alpha-compositing the kept pixels blurred at radii 256, 64, 16, 4, 2
    and 0 (PIL's GaussianBlur on premultiplied RGBa), each over the last. Returns uint8 HxWx3."""
    im = _to_pil(image)
    m = Image.fromarray(_mask_to_u8(mask), "L")
    image_mod = Image.new("RGBA", im.size)
    image_masked = Image.new("RGBa", im.size)
    image_masked.paste(im.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(m))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return np.asarray(image_mod.convert("RGB"), dtype=np.uint8).copy()


# --- to the model ----------------------------------------------------------------------------------------------


def to_model_input(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 [3, H, W] in [-1, 1]: (x / 255) * 2 - 1 in float32, the formula (and the
    rounding) of both diffusers' `VaeImageProcessor.preprocess` (pil_to_numpy: / 255.0; normalize:
    2.0 * x - 1.0) and A1111 (`np.array(image).astype(np.float32) / 255.0`, then `image * 2 - 1` in
    images_tensor_to_samples). Stack these for the engine's [N, 3, H, W]."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"an image is a uint8 array (H, W, 3), got {array.dtype} {array.shape}")
    unit = array.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((np.float32(2.0) * unit - np.float32(1.0)).transpose(2, 0, 1))


def mask_to_model(mask: np.ndarray, *, binarize: bool = True) -> np.ndarray:
    """float32 HxW mask -> float32 [1, H, W] in [0, 1], 1 = repaint. Stack these for [N, 1, H, W].

    binarize=True: diffusers' inpainting mask (`VaeImageProcessor(do_binarize=True)`: v < 0.5 -> 0,
    else 1, on uint8 / 255 in float32: grey levels 128 and up repaint). What an inpainting pipeline
    feeds the U-Net and blends latents with in diffusers.
    binarize=False: the soft mask as it is (blurred edges kept), for blending the result with the
    original image or a soft latent blend."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask is a 2-D array (H, W), got shape {m.shape}")
    m = m.astype(np.float32)
    if not np.all((m >= 0) & (m <= 1)):
        raise ValueError("mask values must be in [0, 1]")
    if binarize:
        m = np.where(m < 0.5, np.float32(0), np.float32(1))
    return np.ascontiguousarray(m[None])


def latent_mask_a1111(mask: np.ndarray, factor: int = 8, *, round: bool = True) -> np.ndarray:
    """A1111's latent-resolution inpainting mask, float32 [H / factor, W / factor], 1 = repaint
    (processing.py: `latmask = init_mask.convert('RGB').resize((w, h))`, PIL's default BICUBIC; / 255;
    `np.around` when `mask_round`, A1111's default; its `nmask`). For `--match a1111` blending:
    x = init_latent * (1 - m) + x * m after each step."""
    u8 = _mask_to_u8(mask)
    height, width = u8.shape
    if height % factor or width % factor:
        raise ValueError(f"mask size {width}x{height} is not a multiple of {factor}")
    small = Image.fromarray(u8, "L").convert("RGB").resize((width // factor, height // factor))
    latmask = np.moveaxis(np.array(small, dtype=np.float32), 2, 0) / 255
    latmask = latmask[0]
    return np.around(latmask) if round else latmask


# --- a request's inputs, checked before the model loads ----------------------------------------------------------


def natural_size(init_path: Path, pad: Padding | str | None = None, *, max_pixels: int = MAX_INPUT_PIXELS,
                 multiple: int = 8) -> tuple[int, int]:
    """(width, height) an image makes when no size is given: its own (EXIF-oriented, padded), each side
    rounded down to `multiple` (at least `multiple`), as diffusers' `VaeImageProcessor.get_default_height_width`."""
    image = read_image(init_path, max_pixels=max_pixels)
    height, width = image.shape[:2]
    padding = parse_pad(pad) if isinstance(pad, str) else pad
    if padding is not None and padding.any:
        _, width, height = padded_size(width, height, padding, multiple)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


@dataclass(frozen=True, eq=False)
class PreparedInputs:
    """What a request starts from, ready for the engine: the init image (uint8 HxWx3) and the mask
    (float32 HxW in [0, 1], 1 = repaint; None for plain img2img), both at the generation size."""

    image: np.ndarray
    mask: np.ndarray | None

    @property
    def width(self) -> int:
        return self.image.shape[1]

    @property
    def height(self) -> int:
        return self.image.shape[0]


def check_inputs(init_path: Path, mask_path: Path | None = None, width: int | None = None,
                 height: int | None = None, *, resize_mode: ResizeMode | str | int = ResizeMode.RESIZE,
                 pad: Padding | str | tuple[int, int, int, int] | None = None, pad_fill: str = "edge",
                 mask_blur: int | tuple[int, int] = 0, invert_mask: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_input_pixels: int = MAX_INPUT_PIXELS) -> PreparedInputs:
    """Read, check and prepare a request's init image (and mask), before any model loads: every
    problem is one ImageInputError line naming the file or value. The files are decoded here (a few
    milliseconds to a few hundred for a large photo), so a truncated file is found now, not after the
    model has loaded; keep the result rather than reading again.

    Steps (A1111's order, StableDiffusionProcessingImg2Img.init):
      1. read_image(init_path); read_mask(mask_path, invert=invert_mask): the mask must have the
         image's size (after EXIF orientation), as nothing else lines them up;
      2. `pad` (outpainting: "L,T,R,B", one number, or a Padding): the canvas of pad_canvas(fill=pad_fill),
         rounded up to a multiple of 8; the mask is white over the new area and, when there is a blur,
         `blur` pixels into the image on padded sides (pad_canvas `overlap`); a user's mask is padded
         with white and combined (the brighter of the two);
      3. the mask blurred (blur_mask; `mask_blur` one value or (x, y));
      4. both resized to width x height with `resize_mode` (resize_image); width/height None: the
         (padded) image's own size, which must then be a positive multiple of 8.
    The generation size is bounded by `max_pixels` (--max-pixels), the files by `max_input_pixels`.
    """
    mode = resize_mode if isinstance(resize_mode, ResizeMode) else parse_resize_mode(resize_mode)
    blurs = tuple(mask_blur) if isinstance(mask_blur, (tuple, list)) else (mask_blur, mask_blur)
    if len(blurs) != 2:
        raise ImageInputError(f"mask blur is one number or two (x, y), got {len(blurs)}")
    blur_x, blur_y = check_mask_blur(blurs[0]), check_mask_blur(blurs[1])
    padding = None
    if pad is not None:
        padding = parse_pad(pad) if isinstance(pad, str) else check_padding(pad)
        if not padding.any:
            padding = None
    if pad_fill not in PAD_FILLS:
        raise ImageInputError(f"unknown padding fill {pad_fill!r}: use {' or '.join(PAD_FILLS)}")
    for name, side in (("width", width), ("height", height)):
        if side is not None and (isinstance(side, bool) or not isinstance(side, (int, np.integer))
                                 or side < 8 or side % 8):
            raise ImageInputError(f"{name} {side!r} is not a positive multiple of 8")
    if (width is None) != (height is None):
        raise ImageInputError("give both a width and a height, or neither (the image's own size)")

    image = read_image(init_path, max_pixels=max_input_pixels)
    mask = None
    if mask_path is not None:
        mask = read_mask(mask_path, invert=invert_mask, max_pixels=max_input_pixels)
        if mask.shape != image.shape[:2]:
            raise ImageInputError(f"the mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but the image "
                                  f"{init_path} is {image.shape[1]}x{image.shape[0]}: a mask must have its image's size")
    if padding is not None:
        canvas_size = padded_size(image.shape[1], image.shape[0], padding)[1:]
        if canvas_size[0] * canvas_size[1] > max_pixels:
            raise ImageInputError(f"{init_path} padded is {canvas_size[0]}x{canvas_size[1]}, "
                                  f"{canvas_size[0] * canvas_size[1]:,} pixels, more than the limit of {max_pixels:,} "
                                  "(--max-pixels raises it)")
        image_padded, new_area = pad_canvas(image, *padding, fill=pad_fill, overlap=max(blur_x, blur_y))
        mask = new_area if mask is None else np.maximum(new_area, pad_mask(mask, padding))
        image = image_padded
    if mask is not None and (blur_x or blur_y):
        mask = blur_mask(mask, blur_x, blur_y)

    if width is None:
        height, width = image.shape[:2]
        if width % 8 or height % 8:
            raise ImageInputError(f"{init_path} is {width}x{height}, not a multiple of 8: give a width and "
                                  "height to resize it to")
    if width * height > max_pixels:
        raise ImageInputError(f"{width}x{height} is {width * height:,} pixels, more than the limit of "
                              f"{max_pixels:,} (--max-pixels raises it)")
    if image.shape[:2] != (height, width):
        image = resize_image(image, width, height, mode)
        if mask is not None:
            mask = resize_image(mask, width, height, mode)
    return PreparedInputs(image, mask)
