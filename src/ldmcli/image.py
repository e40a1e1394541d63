"""Write PNGs atomically: a temporary file in the same folder, fsync, then a rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def save_png(pixels: np.ndarray, path: Path, *, text: Mapping[str, str], overwrite: bool = False) -> None:
    """Write uint8 HxWx3 `pixels` to `path` via a temporary file and a rename: never half-written.

    With overwrite=False an existing file is an error (FileExistsError), checked at the rename too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); an image should get what open() would give it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(pixels, "RGB").save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_clobber(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _rename_no_clobber(tmp: str, path: Path) -> None:
    """Rename, refusing to replace a file that appeared meanwhile (a hard link is atomic about that)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # filesystems without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def contact_sheet(images: list[np.ndarray], captions: list[str], columns: int | None = None) -> np.ndarray:
    """A grid of same-size images, each with a caption strip below it (the --grid output)."""
    from PIL import ImageDraw, ImageFont

    columns = columns or max(1, min(len(images), round(len(images) ** 0.5 + 0.49)))
    rows = -(-len(images) // columns)
    height, width = images[0].shape[:2]
    font = ImageFont.load_default()
    strip = 28
    sheet = Image.new("RGB", (columns * width, rows * (height + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (pixels, caption) in enumerate(zip(images, captions)):
        x, y = (n % columns) * width, (n // columns) * (height + strip)
        sheet.paste(Image.fromarray(pixels, "RGB"), (x, y))
        for line_no, line in enumerate(_fit(draw, caption, font, width - 4)[:2]):
            draw.text((x + 2, y + height + 2 + 12 * line_no), line, fill="black", font=font)
    return np.asarray(sheet)


def _fit(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return [*lines, current]
