"""Opening the files ldm reads: regular files only, and no more of them than a bound.

A FIFO, socket or device given where a model, config or PNG belongs would block `open()` forever (a
FIFO with no writer) or never reach end of file (/dev/zero). So the type is checked with `stat()`,
which follows symlinks and never blocks, before anything opens the path. Symlinks to regular files
are fine: the Hugging Face cache is made of them.
"""

from __future__ import annotations

import json
import os
import select
import stat
from pathlib import Path
from typing import BinaryIO

from ldmcli.errors import LdmError

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(path: Path) -> str | None:
    """What `path` is when it exists but is not a regular file ("a FIFO (named pipe)"); None for a
    regular file. Raises FileNotFoundError (an OSError) when nothing is there."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def is_present(path: Path, error: type[LdmError] = LdmError) -> bool:
    """Whether an optional file is there: True for a regular file, False when nothing is there,
    `error` when something else is (a FIFO named config.json is not "absent")."""
    try:
        kind = kind_of(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise error(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    if kind is not None:
        raise error(f"{path}: not a file but {kind}")
    return True


def check_regular_file(path: Path, error: type[LdmError] = LdmError, missing: str = "no such file") -> Path:
    """`path`, if it is a regular file (or a symlink to one); `error` naming what it is otherwise."""
    if not is_present(path, error):
        raise error(f"{path}: {missing}")
    return Path(path)


def read_bounded(path: Path, limit: int, error: type[LdmError] = LdmError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `error` for anything else."""
    check_regular_file(path, error)
    try:
        with open(path, "rb") as stream:
            data = stream.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise error(f"{path}: larger than {limit:,} bytes, the most ldm reads of such a file")
    return data


# How long a read of a pipe waits before the main thread looks at pending signals again.
SIGNAL_CHECK_SECONDS = 0.2


def read_stream(stream: BinaryIO, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of a file, pipe or FIFO, read so that Ctrl-C and SIGTERM still stop it.

    A signal may be delivered to any thread of the process (torch's, once it is imported): the main
    thread, blocked in read() on a pipe nobody writes to, would then never run Python's handler. So the
    read waits in select() with a timeout and returns to Python between waits, where the handler runs.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # an in-memory stream (a test's stdin): it cannot block
        return stream.read(limit + 1)
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        ready, _, _ = select.select([fd], [], [], SIGNAL_CHECK_SECONDS)
        if not ready:
            continue
        chunk = os.read(fd, min(1 << 20, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def loads_json(text: str | bytes) -> object:
    """json.loads, with every way it fails as a ValueError: nesting deep enough to exhaust the
    parser's recursion is a RecursionError, an integer of more than 4300 digits a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def json_type(value: object) -> str:
    """How JSON names the type of a parsed value, for messages: "an array", "a string", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)
