"""The images a request starts from (issue 18, image input): `ldmcli.image_input` against A1111's code,
written out here from AUTOMATIC1111/stable-diffusion-webui 1.10 (modules/images.py resize_image and
flatten, modules/processing.py create_binary_mask and the img2img mask steps, modules/masking.py fill,
scripts/poor_mans_outpainting.py), against diffusers' VaeImageProcessor (the [-1, 1] conversion, mask
binarisation, and its copies of A1111's crop and fill), and against cv2.GaussianBlur: golden values it
computed (always run) and cv2 itself when it is installed (not a dependency: the test then skips).
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from ldmcli import image_input as ii
from ldmcli.errors import LdmError
from ldmcli.image_input import ImageInputError, Padding, ResizeMode

LANCZOS = Image.Resampling.LANCZOS
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- A1111's code, written out (the functions named in each docstring) ----------------------------------


def a1111_resize_image(resize_mode, im, width, height):
    """modules/images.py resize_image with upscaler_name None: resize(im, w, h) = im.resize((w, h), LANCZOS)."""
    def resize(im, w, h):
        return im.resize((w, h), resample=LANCZOS)

    if resize_mode == 0:
        res = resize(im, width, height)
    elif resize_mode == 1:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    else:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)), box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)), box=(fill_width + src_w, 0))
    return res


def a1111_would_crash(mode, w, h, width, height):
    """Whether A1111's fill mode asks PIL for a zero-sized image (src or strip): it raises there."""
    if mode != 2:
        return False
    ratio, src_ratio = width / height, w / h
    src_w = width if ratio < src_ratio else w * height // h
    src_h = height if ratio >= src_ratio else h * width // w
    if src_w == 0 or src_h == 0:
        return True
    return (ratio < src_ratio and height // 2 - src_h // 2 == 0) or (ratio > src_ratio and width // 2 - src_w // 2 == 0)


def a1111_crop_intermediate(w, h, width, height):
    ratio, src_ratio = width / height, w / h
    src_w = width if ratio > src_ratio else w * height // h
    src_h = height if ratio <= src_ratio else h * width // w
    return src_w * src_h


def a1111_flatten(img, bgcolor="#ffffff"):
    """modules/images.py flatten, after the img2img image component's conversion to RGBA."""
    img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def a1111_create_binary_mask(image, round=True):
    """modules/processing.py create_binary_mask, after the mask component's conversion to RGBA."""
    image = image.convert("RGBA")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        if round:
            image = image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
        else:
            image = image.split()[-1].convert("L")
    else:
        image = image.convert("L")
    return image


def a1111_fill(image, mask):
    """modules/masking.py fill."""
    from PIL import ImageFilter

    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def a1111_latent_mask(init_mask, shape):
    """processing.py: latmask from the mask at the latent's size, rounded (mask_round)."""
    latmask = init_mask.convert("RGB").resize((shape[1], shape[0]))
    latmask = np.moveaxis(np.array(latmask, dtype=np.float32), 2, 0) / 255
    latmask = latmask[0]
    return np.around(latmask)


def poor_mans_canvas(w, h, left, right, up, down, multiple=64):
    """scripts/poor_mans_outpainting.py: the canvas rounded up to 64 and the padding re-split."""
    target_w = math.ceil((w + left + right) / multiple) * multiple
    target_h = math.ceil((h + up + down) / multiple) * multiple
    if left > 0:
        left = left * (target_w - w) // (left + right)
    if right > 0:
        right = target_w - w - left
    if up > 0:
        up = up * (target_h - h) // (up + down)
    if down > 0:
        down = target_h - h - up
    return target_w, target_h, left, up, right, down


# --- helpers -----------------------------------------------------------------------------------------------


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(array_or_image, path, **kwargs):
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path, **kwargs)
    return path


def refused(call, *fragments):
    """`call` raises ImageInputError (an LdmError) with one line holding every fragment."""
    with pytest.raises(ImageInputError) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, LdmError) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def png_header_only(path, width, height):
    """A PNG that declares width x height and has no image data: what a decompression bomb's header says."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --- reading images ------------------------------------------------------------------------------------------


def test_read_image_round_trips_rgb(tmp_path):
    pixels = random_image(21, 34)
    got = ii.read_image(save(pixels, tmp_path / "a.png"))
    assert got.dtype == np.uint8 and got.shape == (21, 34, 3) and np.array_equal(got, pixels)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-trns", "L-trns", "RGB-trns"])
def test_transparency_is_flattened_over_white_as_a1111(tmp_path, mode):
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "RGBA")
    if mode in ("RGBA", "LA"):
        image = rgba.convert(mode)
    elif mode == "P-trns":
        image = rgba.convert("RGB").quantize(16)
        image.info["transparency"] = bytes(range(0, 256, 16))
    else:
        image = rgba.convert(mode[:-5] if mode != "RGB-trns" else "RGB")
        image.info["transparency"] = 0 if mode == "L-trns" else (0, 0, 0)
    path = tmp_path / "a.png"
    image.save(path, **({"transparency": image.info["transparency"]} if "trns" in mode else {}))
    expected = np.array(a1111_flatten(Image.open(path)))
    got = ii.read_image(path)
    assert np.array_equal(got, expected)
    if mode == "RGBA":  # fully transparent pixels are white, opaque ones themselves
        alpha = np.array(rgba)[..., 3]
        assert (got[alpha == 0] == 255).all()
        assert np.array_equal(got[alpha == 255], np.array(rgba)[..., :3][alpha == 255])


def test_background_colour_is_a1111_option(tmp_path):
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    got = ii.read_image(save(clear, tmp_path / "a.png"), background="#ff0000")
    assert (got == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:6, :6] = [255, 0, 0]  # the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for name in ("a.png", "a.jpg"):
        path = save(stored, tmp_path / name, exif=exif, **({"quality": 100} if name.endswith("jpg") else {}))
        got = ii.read_image(path)
        assert got.shape == (30, 20, 3)
        assert got[0, -1, 0] > 200 and got[0, -1, 1:].max() < 60, name  # now the top-right corner


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "m.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert np.array_equal(ii.read_mask(path) * 255, [[0, 1, 128, 255]])


def test_float_pixels_are_refused(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(path)
    refused(lambda: ii.read_image(path), str(path), "8-bit")


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "folder", "fifo", "eps", "empty", "damaged"])
def test_bad_files_are_one_line_errors(tmp_path, kind):
    path = tmp_path / "in.png"
    good = random_image(64, 64, seed=2)
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "truncated":
        data = (save(good, tmp_path / "good.png")).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "eps":  # Pillow would run Ghostscript on it: never opened
        path = tmp_path / "in.eps"
        path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "damaged":
        data = bytearray((save(good, tmp_path / "good.png")).read_bytes())
        data[60:80] = b"\x00" * 20  # inside the image data: its CRC and deflate stream are broken
        path.write_bytes(bytes(data))
    expected = {"missing": "no such file", "text": "not an image", "truncated": "truncated or damaged",
                "folder": "not a file but a folder", "fifo": "not a file but a FIFO", "eps": "not an image",
                "empty": "not an image", "damaged": "damaged"}[kind]
    for read in (ii.read_image, ii.read_mask, lambda p: ii.check_inputs(p, width=64, height=64)):
        refused(lambda read=read: read(path), str(path), expected)


HEADS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from(HEADS), body=st.binary(max_size=300), cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_hostile_bytes_are_read_or_refused(tmp_path, head, body, cut, flip):
    """Whatever the bytes after a format's signature (or a real small PNG cut or with a byte changed),
    a read returns an image or raises ImageInputError: never another exception."""
    real = bytearray((save(random_image(9, 7, seed=cut), tmp_path / "real.png")).read_bytes())
    real[flip % len(real)] ^= 0x5A
    for data in (head + body, bytes(real[: max(cut, 8)])):
        path = tmp_path / "fuzz.img"
        path.write_bytes(data)
        for read in (ii.read_image, ii.read_mask):
            try:
                result = read(path)
            except ImageInputError as exc:
                assert "\n" not in str(exc)
            else:
                assert result.ndim in (2, 3) and result.size


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    # Above Pillow's own bound (DecompressionBombError) and between ours and Pillow's.
    for side, fragment in ((100_000, "more than"), (9000, "9000x9000")):
        path = png_header_only(tmp_path / f"bomb{side}.png", side, side)
        refused(lambda path=path: ii.read_image(path), str(path), fragment, f"{ii.MAX_INPUT_PIXELS:,}")
    small = save(random_image(10, 10), tmp_path / "small.png")
    refused(lambda: ii.read_image(small, max_pixels=99), "10x10", "99")


# --- masks -------------------------------------------------------------------------------------------------------


def test_mask_from_grey_levels_and_colour(tmp_path):
    rng = np.random.default_rng(3)
    for mode in ("L", "RGB", "1", "P"):
        image = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).convert(mode)
        path = save(image, tmp_path / f"m{mode}.png")
        got = ii.read_mask(path)
        expected = np.array(a1111_create_binary_mask(Image.open(path)), dtype=np.float32) / 255
        assert got.dtype == np.float32 and got.shape == (12, 9) and np.array_equal(got, expected), mode


def test_mask_from_alpha_when_not_opaque(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere: the grey level would repaint everything
    rgba[..., 3] = np.arange(100, dtype=np.uint8).reshape(10, 10) * 2 + 30  # alpha 30..228
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "m.png")
    rounded = ii.read_mask(path)
    assert np.array_equal(rounded, (rgba[..., 3] > 128).astype(np.float32))
    assert np.array_equal(rounded, np.array(a1111_create_binary_mask(Image.open(path)), np.float32) / 255)
    raw = ii.read_mask(path, round_alpha=False)
    assert np.array_equal(raw, rgba[..., 3].astype(np.float32) / 255)
    # Opaque RGBA: the grey level, not the alpha.
    rgba[..., 3] = 255
    rgba[:5, :, :3] = 0
    path = save(Image.fromarray(rgba, "RGBA"), tmp_path / "opaque.png")
    assert np.array_equal(ii.read_mask(path)[:, 0], [0] * 5 + [1] * 5)


def test_invert_is_a1111_inpaint_not_masked(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = save(Image.fromarray(grey, "L"), tmp_path / "m.png")
    assert np.array_equal(ii.read_mask(path, invert=True) * 255, 255 - grey.astype(np.float32))


# --- resize modes --------------------------------------------------------------------------------------------------


def test_parse_resize_mode_names():
    for names, mode in ((("resize", "Just resize", "JUST RESIZE", "0", 0), ResizeMode.RESIZE),
                        (("crop", "Crop and resize", "crop AND resize", "1", 1), ResizeMode.CROP),
                        (("fill", "Resize and fill", " Fill ", "2", 2), ResizeMode.FILL)):
        for name in names:
            assert ii.parse_resize_mode(name) is mode
    for name in (3, "3", "Just resize (latent upscale)"):
        refused(lambda name=name: ii.parse_resize_mode(name), "latent upscale", "not supported")
    for name in ("stretch", "", "-1", 4, True, None, 1.0):
        refused(lambda name=name: ii.parse_resize_mode(name), "resize mode")


SIZES = [(1, 1), (1, 300), (300, 1), (7, 13), (64, 48), (200, 100), (100, 200), (255, 256), (33, 97)]
TARGETS = [(8, 8), (64, 64), (512, 64), (64, 512), (96, 64), (64, 96), (128, 120)]


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_resize_modes_equal_a1111(mode):
    checked = 0
    for (w, h) in SIZES:
        image = random_image(h, w, seed=w * 1000 + h)
        for (width, height) in TARGETS:
            if a1111_would_crash(mode, w, h, width, height):
                continue
            if mode == 1 and a1111_crop_intermediate(w, h, width, height) > ii._MAX_CROP_INTERMEDIATE:
                continue
            expected = np.array(a1111_resize_image(mode, Image.fromarray(image), width, height))
            got = ii.resize_image(image, width, height, ResizeMode(mode))
            assert np.array_equal(got, expected), (w, h, width, height)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("mode, name", [(1, "crop"), (2, "fill"), (0, "default")])
def test_resize_modes_equal_diffusers(mode, name):
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor()  # resample "lanczos": A1111's
    for (w, h) in [(64, 48), (200, 100), (100, 200), (33, 97)]:
        image = random_image(h, w, seed=w + h)
        for (width, height) in TARGETS:
            expected = np.array(processor.resize(Image.fromarray(image), height, width, resize_mode=name))
            assert np.array_equal(ii.resize_image(image, width, height, mode), expected), (w, h, width, height)


def test_fill_arithmetic_by_hand():
    """A 4x2 image into 8x8: ratio 1 < src_ratio 2, so src_w = 8, src_h = 2 * 8 // 4 = 4, pasted at
    y = 8 // 2 - 4 // 2 = 2; fill_height = 2: rows 0-1 one strip (every row alike), rows 6-7 the other."""
    image = random_image(2, 4, seed=5)
    got = ii.resize_image(image, 8, 8, "fill")
    middle = np.array(Image.fromarray(image).resize((8, 4), LANCZOS))
    assert np.array_equal(got[2:6], middle)
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[6], got[7])
    # The strips come from zero-height boxes at the first and last row, resized with PIL's default
    # filter (BICUBIC, a = -0.5: weights f(0.5) = 0.5625 and f(-1.5) = -0.0625, normalised): each strip
    # row is 1.125 * the edge row - 0.125 * the next row in, up to PIL's fixed-point rounding.
    top = np.clip(np.rint(1.125 * middle[0].astype(float) - 0.125 * middle[1]), 0, 255)
    bottom = np.clip(np.rint(1.125 * middle[3].astype(float) - 0.125 * middle[2]), 0, 255)
    assert np.abs(got[0] - top).max() <= 1 and np.abs(got[7] - bottom).max() <= 1


def test_crop_arithmetic_by_hand():
    """200x100 into 64x64: ratio 1 > src_ratio 2 is false, so src_w = 200 * 64 // 100 = 128, src_h = 64,
    pasted at x = 32 - 64 = -32: the middle 64 columns of the 128x64 resize."""
    image = random_image(100, 200, seed=6)
    full = np.array(Image.fromarray(image).resize((128, 64), LANCZOS))
    assert np.array_equal(ii.resize_image(image, 64, 64, "crop"), full[:, 32:96])


def test_masks_resize_like_a1111_l_images():
    mask = (np.random.default_rng(7).integers(0, 256, (50, 70), dtype=np.uint8)).astype(np.float32) / 255
    for mode in (0, 1, 2):
        expected = a1111_resize_image(mode, Image.fromarray(np.rint(mask * 255).astype(np.uint8), "L"), 64, 96)
        got = ii.resize_image(mask, 64, 96, mode)
        assert got.dtype == np.float32 and got.shape == (96, 64)
        assert np.array_equal(np.rint(got * 255), np.array(expected.convert("L"), np.float32))


@FUZZ
@given(w=st.integers(1, 300), h=st.integers(1, 300), width=st.integers(1, 64).map(lambda v: 8 * v),
       height=st.integers(1, 64).map(lambda v: 8 * v), mode=st.sampled_from([0, 1, 2]), seed=st.integers(0, 9))
@example(w=300, h=1, width=8, height=512, mode=2, seed=0)  # A1111: src_h = 0, PIL refuses
@example(w=1, h=300, width=512, height=8, mode=1, seed=0)  # A1111: a 512x153600 intermediate
@example(w=299, h=1, width=512, height=512, mode=2, seed=0)
def test_resize_fuzz(w, h, width, height, mode, seed):
    image = random_image(h, w, seed)
    got = ii.resize_image(image, width, height, mode)
    assert got.shape == (height, width, 3) and got.dtype == np.uint8
    mask = ii.resize_image(image[..., 0].astype(np.float32) / 255, width, height, mode)
    assert mask.shape == (height, width) and mask.dtype == np.float32
    if a1111_would_crash(mode, w, h, width, height):
        return
    expected = np.array(a1111_resize_image(mode, Image.fromarray(image), width, height))
    if mode == 1 and a1111_crop_intermediate(w, h, width, height) > ii._MAX_CROP_INTERMEDIATE:
        assert np.abs(got.astype(int) - expected).max() <= 1
    else:
        assert np.array_equal(got, expected)


# --- mask blur -------------------------------------------------------------------------------------------------------

# cv2.GaussianBlur's output (4.10.0 and 5.1.0 agree), A1111's calls: (ksize, 1) then (1, ksize).
CV2_ROW = [211, 227, 194, 228, 35, 231, 56, 102, 127, 97, 149, 54, 9, 125, 168, 183, 241, 252, 86, 222, 161, 9, 228,
           71, 148, 189, 190, 93, 209, 117, 45, 21, 238, 220, 43, 246, 228, 238, 66, 248, 166]
CV2_STEP_BLUR4 = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 7, 12, 21, 32, 48, 67, 90, 115, 140, 165, 188, 207, 223, 234, 243,
                  248, 252, 254, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255]
CV2_ROW_BLUR4 = [173, 174, 167, 162, 152, 144, 135, 129, 122, 121, 119, 123, 126, 134, 141, 147, 153, 155, 157, 155, 154,
                 150, 148, 146, 145, 142, 142, 140, 140, 140, 142, 146, 150, 157, 162, 169, 173, 178, 180, 184, 182]
CV2_SQUARE_BLUR_X2_Y3 = [
    [6, 9, 19, 34, 51, 63, 68, 63, 51, 35, 22, 17], [6, 10, 20, 36, 53, 66, 71, 66, 53, 37, 23, 18],
    [7, 11, 21, 38, 57, 71, 76, 71, 57, 39, 25, 20], [7, 11, 23, 41, 61, 76, 82, 76, 61, 42, 27, 21],
    [7, 11, 23, 41, 61, 77, 82, 77, 61, 42, 27, 21], [7, 11, 23, 41, 61, 76, 82, 76, 61, 42, 27, 21],
    [7, 11, 21, 38, 57, 71, 76, 71, 57, 39, 25, 20], [6, 10, 20, 36, 53, 66, 71, 66, 53, 37, 23, 18],
    [6, 9, 19, 34, 51, 63, 68, 63, 51, 35, 22, 17]]


def u8(mask):
    return np.rint(np.asarray(mask) * 255).astype(np.uint8)


def test_blur_equals_cv2_golden_values():
    step = np.array([[0] * 20 + [255] * 21], np.float32) / 255
    row = np.array([CV2_ROW], np.float32) / 255
    # blur_y acts on a 1-row image as cv2 does: reflect-101 of one row is the row itself.
    assert u8(ii.blur_mask(step, 4, 0)).tolist() == [CV2_STEP_BLUR4]
    assert u8(ii.blur_mask(row, 4, 0)).tolist() == [CV2_ROW_BLUR4]
    assert u8(ii.blur_mask(row, 4)).tolist() == [CV2_ROW_BLUR4]
    assert u8(ii.blur_mask(row.T, 0, 4)).T.tolist() == [CV2_ROW_BLUR4]
    square = np.zeros((9, 12), np.float32)
    square[3:6, 4:9] = 1
    assert u8(ii.blur_mask(square, 2, 3)).tolist() == CV2_SQUARE_BLUR_X2_Y3
    # A kernel 107 times wider than the image: reflected over and over.
    assert u8(ii.blur_mask(np.array([[0, 1, 0]], np.float32), 64, 0)).tolist() == [[133, 122, 133]]


def test_blur_is_a_gaussian_up_to_q8_rounding():
    """Against a float Gaussian written out here (cv2's kernel before its fixed point, numpy's reflect
    padding = BORDER_REFLECT_101): each of cv2's Q8 taps is within one 1/256 of the ideal one, so no
    output moves further than 0.5 + 255 * sum(|tap / 256 - ideal|) grey levels from the float blur."""
    rng = np.random.default_rng(8)
    mask = rng.integers(0, 256, (60, 90)).astype(np.float32) / 255
    for sigma in (1, 2, 4, 9, 17):
        k = 2 * int(2.5 * sigma + 0.5) + 1
        x = np.arange(k) - k // 2
        kernel = np.exp(-x * x / (2.0 * sigma * sigma))
        kernel /= kernel.sum()
        taps = np.array(ii.gaussian_kernel_q8(k, sigma)) / 256
        assert np.abs(taps - kernel).max() < 1 / 256, sigma
        bound = 0.5 + 255 * np.abs(taps - kernel).sum()
        padded = np.pad(np.rint(mask * 255), ((0, 0), (k // 2, k // 2)), mode="reflect")
        expected = sum(kernel[j] * padded[:, j:j + mask.shape[1]] for j in range(k))
        assert np.abs(u8(ii.blur_mask(mask, sigma, 0)).astype(float) - expected).max() <= bound, sigma


def test_blur_kernels_are_cv2_shaped():
    for sigma in range(1, ii.MAX_MASK_BLUR + 1):
        size = ii.blur_kernel_size(sigma)
        assert size == 2 * int(2.5 * sigma + 0.5) + 1
        taps = ii.gaussian_kernel_q8(size, sigma)
        assert len(taps) == size and sum(taps) == 256 and taps == taps[::-1] and min(taps) >= 0
    assert ii.gaussian_kernel_q8(7, 1) == [1, 14, 62, 102, 62, 14, 1]


def test_blur_equals_cv2_for_every_a1111_blur():
    import cv2  # the oracle: A1111 blurs masks with cv2.GaussianBlur (a test dependency)
    rng = np.random.default_rng(9)
    shapes = [(1, 1), (2, 2), (5, 3), (1, 40), (40, 1), (33, 70)]
    for sigma in range(1, ii.MAX_MASK_BLUR + 1):
        k = ii.blur_kernel_size(sigma)
        for shape in shapes:
            for mask in (rng.integers(0, 256, shape, dtype=np.uint8), (rng.random(shape) > 0.5).astype(np.uint8) * 255):
                expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), sigma), (1, k), sigma)
                assert np.array_equal(u8(ii.blur_mask(mask.astype(np.float32) / 255, sigma)), expected), (sigma, shape)


def test_blur_bounds():
    mask = np.zeros((8, 8), np.float32)
    assert np.array_equal(ii.blur_mask(mask, 0), mask)
    for bad in (-1, ii.MAX_MASK_BLUR + 1, 1.5, True, "4"):
        refused(lambda bad=bad: ii.blur_mask(mask, bad), "mask blur")
        refused(lambda bad=bad: ii.check_inputs("unused.png", width=64, height=64, mask_blur=bad), "mask blur")


def test_large_blur_is_quick():
    import time

    mask = (np.random.default_rng(10).random((1024, 1024)) > 0.5).astype(np.float32)
    started = time.perf_counter()
    ii.blur_mask(mask, 64)
    assert time.perf_counter() - started < 5


# --- outpainting -------------------------------------------------------------------------------------------------------


def test_parse_pad():
    assert ii.parse_pad("64") == Padding(64, 64, 64, 64)
    assert ii.parse_pad("8,0, 16 ,24") == Padding(8, 0, 16, 24)
    assert ii.parse_pad("0") == Padding() and not Padding().any
    for bad in ("", "-8", "8,8", "8,8,8", "8,8,8,8,8", "1.5", "a", "8;8;8;8", "٣", "+8", str(ii.MAX_PAD + 1),
                "9" * 5000, "8,,8,8"):
        refused(lambda bad=bad: ii.parse_pad(bad), "padding")
    refused(lambda: ii.parse_pad(64), "padding")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_parse_pad_fuzz(text):
    try:
        padding = ii.parse_pad(text)
    except ImageInputError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(0 <= v <= ii.MAX_PAD for v in padding)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, ii.MAX_PAD), min_size=4, max_size=4), st.sampled_from([",", ", ", " ,"]))
def test_parse_pad_round_trip(values, separator):
    assert tuple(ii.parse_pad(separator.join(map(str, values)))) == tuple(values)


@pytest.mark.parametrize("w, h, pads", [(100, 70, (128, 0, 128, 0)), (512, 512, (128, 128, 128, 128)),
                                        (300, 200, (50, 30, 0, 7)), (64, 64, (0, 0, 0, 0)), (77, 65, (0, 1, 0, 0))])
def test_padded_size_splits_like_poor_mans_outpainting(w, h, pads):
    left, top, right, bottom = pads
    padding, canvas_w, canvas_h = ii.padded_size(w, h, Padding(*pads), multiple=64)
    tw, th, pl, pu, pr, pd = poor_mans_canvas(w, h, left, right, top, bottom)
    assert (canvas_w, canvas_h) == (tw, th)
    # Where A1111 pads a side, the split is A1111's; where an axis has no padding, the rounding goes
    # right/bottom (mk2's layout; A1111's poor man's leaves it unmasked black).
    if left or right:
        assert (padding.left, padding.right) == (pl, pr)
    else:
        assert (padding.left, padding.right) == (0, tw - w)
    if top or bottom:
        assert (padding.top, padding.bottom) == (pu, pd)
    else:
        assert (padding.top, padding.bottom) == (0, th - h)


def test_pad_canvas_fill_and_mask():
    image = random_image(10, 12, seed=11)
    canvas, mask = ii.pad_canvas(image, 4, 0, 0, 3, fill="edge")
    assert canvas.shape == (16, 16, 3) and mask.shape == (16, 16)  # 12+4 = 16; 10+3 -> 16 (3 + 3 of rounding)
    assert np.array_equal(canvas[0:10, 4:16], image)
    assert np.array_equal(canvas, np.pad(image, ((0, 6), (4, 0), (0, 0)), mode="edge"))
    expected_mask = np.ones((16, 16), np.float32)
    expected_mask[0:10, 4:16] = 0
    assert np.array_equal(mask, expected_mask)
    black, _ = ii.pad_canvas(image, 4, 0, 0, 3, fill="black")
    assert (black[10:] == 0).all() and (black[:, :4] == 0).all() and np.array_equal(black[0:10, 4:16], image)
    # overlap: the mask reaches into the image on padded sides only.
    _, overlapped = ii.pad_canvas(image, 4, 0, 0, 3, overlap=2)
    expected_mask = np.ones((16, 16), np.float32)
    expected_mask[0:8, 6:16] = 0
    assert np.array_equal(overlapped, expected_mask)
    _, blurred = ii.pad_canvas(image, 4, 0, 0, 3, mask_blur=2)
    assert np.array_equal(blurred, ii.blur_mask(mask, 2))
    refused(lambda: ii.pad_canvas(image, 4, 0, 0, 3, fill="noise"), "fill")
    refused(lambda: ii.pad_canvas(image, -4, 0, 0, 3), "left")


@FUZZ
@given(w=st.integers(1, 120), h=st.integers(1, 120), pads=st.lists(st.integers(0, 100), min_size=4, max_size=4),
       fill=st.sampled_from(ii.PAD_FILLS), overlap=st.integers(0, 200))
def test_pad_canvas_fuzz(w, h, pads, fill, overlap):
    image = random_image(h, w, seed=w + h)
    canvas, mask = ii.pad_canvas(image, *pads, fill=fill, overlap=overlap)
    ch, cw = canvas.shape[:2]
    assert cw % 8 == 0 and ch % 8 == 0 and cw - 8 < w + pads[0] + pads[2] <= cw and ch - 8 < h + pads[1] + pads[3] <= ch
    padding, _, _ = ii.padded_size(w, h, Padding(*pads))
    assert np.array_equal(canvas[padding.top:padding.top + h, padding.left:padding.left + w], image)
    new = np.ones((ch, cw), bool)
    new[padding.top:padding.top + h, padding.left:padding.left + w] = False
    assert (mask[new] == 1).all() and set(np.unique(mask)) <= {0.0, 1.0}
    if overlap == 0:
        assert (mask[~new] == 0).all()


def test_fill_masked_equals_a1111_masking_fill():
    image = random_image(40, 56, seed=12)
    mask = np.zeros((40, 56), np.float32)
    mask[10:30, 20:50] = 1
    expected = np.array(a1111_fill(Image.fromarray(image), Image.fromarray(u8(mask), "L")))
    got = ii.fill_masked(image, mask)
    assert np.array_equal(got, expected)
    assert np.array_equal(got[mask == 0], image[mask == 0])  # kept pixels stay as they were


# --- to the model ---------------------------------------------------------------------------------------------------------


def test_to_model_input_equals_diffusers_exactly():
    from diffusers.image_processor import VaeImageProcessor

    image = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).astype(np.uint8)  # every level
    expected = VaeImageProcessor().preprocess(Image.fromarray(image)).numpy()[0]
    got = ii.to_model_input(image)
    assert got.dtype == np.float32 and got.shape == (3, 16, 16) and got.flags.c_contiguous
    assert np.array_equal(got, expected)  # bit for bit
    assert got.min() == -1 and got.max() == 1
    # A1111: np.array(image).astype(np.float32) / 255.0, then image * 2 - 1.
    a1111 = np.moveaxis(image.astype(np.float32) / 255.0, 2, 0) * 2 - 1
    assert np.array_equal(got, a1111)


def test_mask_to_model_binarises_as_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    expected = processor.preprocess(Image.fromarray(levels, "L")).numpy()[0]
    mask = levels.astype(np.float32) / 255
    got = ii.mask_to_model(mask)
    assert got.dtype == np.float32 and got.shape == (1, 16, 16)
    assert np.array_equal(got, expected)
    assert np.array_equal(got[0], (levels >= 128).astype(np.float32))
    soft = ii.mask_to_model(mask, binarize=False)
    assert np.array_equal(soft[0], mask)
    with pytest.raises(ValueError):
        ii.mask_to_model(mask * 2)


def test_latent_mask_equals_a1111():
    mask = ii.blur_mask((np.random.default_rng(13).random((64, 96)) > 0.6).astype(np.float32), 4)
    expected = a1111_latent_mask(Image.fromarray(u8(mask), "L"), (8, 12))
    assert np.array_equal(ii.latent_mask_a1111(mask), expected)
    assert set(np.unique(expected)) <= {0.0, 1.0}


# --- a request's inputs -----------------------------------------------------------------------------------------------------


def test_check_inputs_runs_a1111s_steps(tmp_path):
    rng = np.random.default_rng(14)
    rgba = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    init = save(Image.fromarray(rgba, "RGBA"), tmp_path / "init.png")
    mask_pixels = (rng.random((90, 120)) > 0.5).astype(np.uint8) * 255
    mask_path = save(Image.fromarray(mask_pixels, "L"), tmp_path / "mask.png")
    for mode in (0, 1, 2):
        got = ii.check_inputs(init, mask_path, 64, 48, resize_mode=mode, invert_mask=True)
        image = a1111_resize_image(mode, a1111_flatten(Image.open(init)), 64, 48)
        mask = ImageOps.invert(a1111_create_binary_mask(Image.open(mask_path)))
        mask = a1111_resize_image(mode, mask, 64, 48).convert("L")
        assert (got.width, got.height) == (64, 48)
        assert np.array_equal(got.image, np.array(image))
        assert np.array_equal(u8(got.mask), np.array(mask))
    # With a blur: blurred at the mask's own size, before the resize (A1111's order).
    got = ii.check_inputs(init, mask_path, 64, 48, mask_blur=(3, 5))
    blurred = ii.blur_mask(np.array(a1111_create_binary_mask(Image.open(mask_path)), np.float32) / 255, 3, 5)
    expected = a1111_resize_image(0, Image.fromarray(u8(blurred), "L"), 64, 48)
    assert np.array_equal(u8(got.mask), np.array(expected))


def test_check_inputs_without_a_mask_or_size(tmp_path):
    init = save(random_image(48, 64, seed=15), tmp_path / "init.png")
    got = ii.check_inputs(init)
    assert got.mask is None and np.array_equal(got.image, random_image(48, 64, seed=15))
    odd = save(random_image(50, 64), tmp_path / "odd.png")
    refused(lambda: ii.check_inputs(odd), "64x50", "multiple of 8")


def test_check_inputs_outpainting(tmp_path):
    image = random_image(40, 56, seed=16)
    init = save(image, tmp_path / "init.png")
    got = ii.check_inputs(init, pad="8,0,8,0")
    assert (got.width, got.height) == (72, 40)
    assert np.array_equal(got.image[:, 8:64], image) and (got.mask[:, :8] == 1).all() and (got.mask[:, 8:64] == 0).all()
    # A user's mask is padded with white and kept.
    user = np.zeros((40, 56), np.uint8)
    user[10:20, 10:20] = 255
    mask_path = save(Image.fromarray(user, "L"), tmp_path / "mask.png")
    got = ii.check_inputs(init, mask_path, pad=Padding(8, 0, 8, 0))
    assert (got.mask[10:20, 18:28] == 1).all() and got.mask[30, 30] == 0 and (got.mask[:, -8:] == 1).all()
    # A blur reaches `blur` pixels into the image on padded sides, then blurs.
    got = ii.check_inputs(init, pad="8,0,8,0", mask_blur=4)
    _, hard = ii.pad_canvas(image, 8, 0, 8, 0, overlap=4)
    assert np.array_equal(got.mask, ii.blur_mask(hard, 4))
    assert got.mask[:, :8].min() > 0.8  # all the new area repaints
    # ...and then resized to a requested size.
    assert ii.check_inputs(init, pad="8,0,8,0", width=144, height=80).image.shape == (80, 144, 3)
    refused(lambda: ii.check_inputs(init, pad="2000"), "padded is", "--max-pixels")
    refused(lambda: ii.check_inputs(init, pad="8,8"), "padding")
    refused(lambda: ii.check_inputs(init, pad=(8, 8, -8, 8)), "right")


def test_check_inputs_refusals(tmp_path):
    init = save(random_image(48, 64), tmp_path / "init.png")
    mask = save(Image.new("L", (60, 48)), tmp_path / "mask.png")
    refused(lambda: ii.check_inputs(init, mask, 64, 48), "60x48", "64x48", str(mask), str(init))
    refused(lambda: ii.check_inputs(init, None, 60, 48), "width 60")
    refused(lambda: ii.check_inputs(init, None, 64, None), "both")
    refused(lambda: ii.check_inputs(init, None, 64, 48, resize_mode=3), "latent upscale")
    refused(lambda: ii.check_inputs(init, None, 4096, 4096), "--max-pixels")
    refused(lambda: ii.check_inputs(init, None, 64, 48, pad_fill="mirror"), "fill")
    missing = tmp_path / "nope.png"
    refused(lambda: ii.check_inputs(init, missing, 64, 48), str(missing), "no such file")


def test_module_imports_without_torch():
    code = "import sys, ldmcli.image_input; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(ii.__file__).parents[1])})
