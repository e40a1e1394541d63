"""Write PNGs atomically, with A1111 `parameters` text and our own JSON metadata."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

# Text chunk keys: "parameters" is what A1111, image browsers and civitai read; "ldm" is ours, complete.
A1111_KEY = "parameters"
LDM_KEY = "ldm"


def a1111_quote(value: object) -> str:
    """A1111's infotext quoting: values holding `,` `:` or a newline are JSON strings."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The A1111 `parameters` text: prompt, `Negative prompt:` line, then `Key: value, ...`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {a1111_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


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


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def ldm_metadata(fields: Mapping[str, object]) -> str:
    return json.dumps(dict(fields), ensure_ascii=False, sort_keys=True)
