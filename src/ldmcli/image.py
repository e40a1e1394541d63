"""Write PNGs atomically: a temporary file in the same folder, fsync, then a rename.

Also what a later run needs to know about an earlier one's files: whether a PNG is complete
(`is_complete_png`, for --skip-existing) and which temporary files a killed run left behind
(`remove_stale_temp_files`).
"""

from __future__ import annotations

import io
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin

try:
    import fcntl
except ImportError:  # Windows: no flock, so temporary files are never cleaned up there
    fcntl = None

# save_png's temporary files: ".STEM.XXXXXXXX.png.part" (mkstemp's 8 random characters), and only those.
TEMP_SUFFIX = ".png.part"
_TEMP_NAME = re.compile(r"\..*\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
# A temporary name is this many bytes longer than the image's stem: ".", ".XXXXXXXX" and TEMP_SUFFIX.
TEMP_NAME_EXTRA = 1 + 1 + 8 + len(TEMP_SUFFIX)
# ...and at most this many bytes longer than the image's whole path ("NAME.png" -> ".NAME.XXXXXXXX.png.part"):
# output paths are bounded so that the temporary file's path fits too (outputs.py).
TEMP_PATH_EXTRA = TEMP_NAME_EXTRA - len(".png")
# Linux's NAME_MAX: the longest file name, in bytes.
_NAME_MAX = 255

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_HEAD = PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR"  # every PNG starts with its 13-byte IHDR chunk
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # ...and ends with an empty IEND chunk (CRC included)


def png_bytes(pixels: np.ndarray, *, text: Mapping[str, str]) -> bytes:
    """uint8 HxWx3 `pixels` as a PNG file's bytes, with `text` as its text chunks (iTXt where not ASCII).

    The one encoder of ldm's images: `save_png` writes these bytes, and the server (`server_worker`)
    sends them, so an image is the same file whichever way it leaves."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(pixels: np.ndarray, path: Path, *, text: Mapping[str, str], overwrite: bool = False) -> None:
    """Write uint8 HxWx3 `pixels` to `path` via a temporary file and a rename: never half-written.

    With overwrite=False an existing file is an error (FileExistsError), checked at the rename too.
    """
    write_png(png_bytes(pixels, text=text), path, overwrite=overwrite)


def write_png(data: bytes, path: Path, *, overwrite: bool = False) -> None:
    """Write a PNG's bytes (`png_bytes`) to `path` via a locked temporary file, fsync and a rename
    (no-clobber unless `overwrite`: FileExistsError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f, tmp = _locked_temp_file(path)
    try:
        with f:
            # mkstemp makes the file private (0600); an image should get what open() would give it.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            # Renamed while still open, so still locked: a cleaner never takes a finished temporary file.
            if overwrite:
                os.replace(tmp, path)
            else:
                _rename_no_clobber(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _locked_temp_file(path: Path) -> tuple[BinaryIO, str]:
    """A new temporary file beside `path`, open for writing and locked (flock) until closed: (file, name).

    The lock tells `remove_stale_temp_files` that a live process is writing it. A cleaner that took
    the lock in the instant between the file's creation and our lock has unlinked it (it unlinks
    under its lock): then the file has no name left, and we make another.
    """
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{_temp_stem(path.stem)}.", suffix=TEMP_SUFFIX, dir=path.parent)
        if _lock(fd, wait=True) and os.fstat(fd).st_nlink == 0:
            os.close(fd)
            continue
        return os.fdopen(fd, "wb"), tmp


def _temp_stem(stem: str) -> str:
    """`stem`, cut (at a character boundary) so that its temporary name fits in a file name: an image
    name of up to 255 bytes is valid, and its temporary name is TEMP_NAME_EXTRA bytes longer. The cut
    name still has the form `remove_stale_temp_files` looks for."""
    encoded = os.fsencode(stem)
    room = _NAME_MAX - TEMP_NAME_EXTRA
    if len(encoded) <= room:
        return stem
    end = room
    while end > 0 and encoded[end] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
        end -= 1
    return os.fsdecode(encoded[:end])


def _lock(fd: int, *, wait: bool) -> bool:
    """Take an exclusive flock on `fd`; False where it is held elsewhere or cannot be had at all
    (no fcntl, a filesystem without locks: there nothing is ever removed, and writing still works)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files killed runs left in `folder` (not its subfolders); return them.

    Only names `save_png` gives (`.STEM.XXXXXXXX.png.part`), and only files no live process holds:
    a writer keeps its temporary file locked from creation to rename, and a lock dies with its
    process, so a file whose lock can be taken is a dead run's leftover, never the image in progress
    of another run sharing the folder (two runs, or the processes of `accelerate launch`).
    """
    try:
        names = [entry.name for entry in os.scandir(folder) if _TEMP_NAME.fullmatch(entry.name)]
    except OSError:  # no such folder (yet), or unreadable: nothing of ours in it
        return []
    return [Path(folder) / name for name in names if _remove_if_unlocked(Path(folder) / name)]


def _remove_if_unlocked(path: Path) -> bool:
    try:
        # Opened for writing: NFS implements flock with POSIX locks, whose exclusive kind needs it.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # a symlink, a folder, not ours to write, or gone already
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _lock(fd, wait=False):
            return False
        os.unlink(path)  # under the lock: see _locked_temp_file
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def is_complete_png(path: Path) -> bool:
    """Whether `path` is a PNG written to its end: signature and IHDR first, the IEND chunk last.

    --skip-existing keeps only such files: a 0-byte or truncated file (an interrupted copy, a writer
    less careful than `save_png`) is remade. Reads 28 bytes whatever the image's size, so resuming
    a run of thousands of images stays instant; it does not decode (or CRC-check) the pixels.

    Only a regular file (or a symlink to one) can be complete: the file is opened without blocking
    and checked before it is read, so a FIFO (whose open() would wait for a writer forever) or a
    device is never read (`outputs.check_outputs` refuses those before this runs).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError):  # missing, unreadable; ValueError: a NUL in the path
        return False
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)  # not a folder, a FIFO, a device
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return False
    with open(fd, "rb") as f:
        try:
            head = f.read(len(_PNG_HEAD))
            if head != _PNG_HEAD or f.seek(0, os.SEEK_END) < len(_PNG_HEAD) + len(_PNG_END):
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
        except OSError:
            return False


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
