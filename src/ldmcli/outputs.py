"""Where images go: output templates expanded per image, and checks made before any model loads."""

from __future__ import annotations

import errno
import functools
import os
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ldmcli.errors import LdmError
from ldmcli.files import kind_of
from ldmcli.jobs import ImageTask, Job, check_file_name, slug
from ldmcli.limits import MAX_FORMAT_WIDTH, MAX_IMAGES_PER_RUN, MAX_NAME_BYTES, MAX_PATH_BYTES
from ldmcli.request import field_type, template_fields

# CompVis txt2img writes outdir/samples/00000.png; we add the seed so runs with different seeds never clash.
DEFAULT_NAME = "{index:05d}-{seed}.png"
DEFAULT_DIR = "outputs"
# The run's own fields, then the request's (`seed` is each image's: the job's seed + its number in the job).
TEMPLATE_FIELDS = ("index", "job", "image", "prompt_slug", "name", *template_fields())
# Each field's kind, which decides the format specs it takes (`check_template`).
FIELD_KINDS: dict[str, type] = {"index": int, "job": int, "image": int, "prompt_slug": str, "name": str,
                                **{name: field_type(name) for name in template_fields()}}

# A format spec pads and aligns: [[fill]align][sign][0][width][.precision][type], where sign, 0, "="
# and precision are for numbers only, precision for cfg_scale (a float) only, and the type is d for a
# whole number, f/e/g for cfg_scale, s for text. No `c` (a character from a number: "/" from 47), no
# precision on text (it cuts "..evil" to ".."), no `#`, grouping or `n`.
_SPEC = re.compile(r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?(?P<zero>0)?(?P<width>[0-9]+)?"
                   r"(?:\.(?P<precision>[0-9]+))?(?P<type>.)?", re.DOTALL)
_TYPES = {int: ("d",), float: ("f", "e", "g"), str: ("s",)}

# The bidirectional-text controls (U+202A-U+202E, U+2066-U+2069) and marks: they reorder how a name
# is displayed ("gpj.exe" shown as "exe.jpg").
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The longest path planned: the temporary file beside it (`image.save_png`) is up to TEMP_PATH_EXTRA
# bytes longer, and the kernel's PATH_MAX counts the terminating NUL.
MAX_OUTPUT_PATH_BYTES = MAX_PATH_BYTES - 1 - 15  # image.TEMP_PATH_EXTRA (image.py imports numpy and PIL)


def resolve_template(output: str | None, output_dir: str | None) -> str:
    """The full template: `-o` as given, a folder + DEFAULT_NAME, or $LDM_OUTPUT_DIR / outputs/ + DEFAULT_NAME."""
    if output is None:
        return os.path.join(output_dir or DEFAULT_DIR, DEFAULT_NAME)
    if output.endswith(("/", os.sep)) or _is_dir(output):
        return os.path.join(output, DEFAULT_NAME)
    return output


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):  # a name too long for the file system; NUL
        return False


def check_template(template: str) -> None:
    """Reject unknown fields, bad format specs and non-PNG names before anything runs.

    A format spec pads and aligns (`_SPEC`): it may not add a path separator (`{name:/>9}`), a nested
    field, a character from a number (`{seed:c}`: "/" from 47, "." from 46) or cut a value short
    (`{name:.2}`: ".." from "..evil"), nor make a name wider than a file name may be
    (`{index:0100000000d}` would allocate 100 MB).
    """
    if not template.lower().endswith(".png"):
        raise LdmError(f"output {template!r} must end in .png (or be a folder ending in /)")
    try:
        size = len(os.fsencode(template))
    except UnicodeEncodeError:
        raise LdmError(f"output template {template!r} is not valid Unicode") from None
    if size > MAX_PATH_BYTES:
        raise LdmError(f"output template is longer than a path may be ({MAX_PATH_BYTES} bytes)")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LdmError(f"output template {template!r}: {exc}") from exc
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise LdmError(f"output template {template!r}: unknown field {{{field}}} (fields: {', '.join(TEMPLATE_FIELDS)})")
        if conversion is not None or any(c in spec for c in "{}/\\\0"):
            raise LdmError(f"output template {template!r}: {{{field}}} may have a format spec like :05d, "
                           "but no conversion, nested field or path separator")
        if any(len(width) > 3 or int(width) > MAX_FORMAT_WIDTH for width in re.findall(r"\d+", spec)):
            raise LdmError(f"output template {template!r}: {{{field}:{spec}}} is wider than a file name may be "
                           f"({MAX_FORMAT_WIDTH})")
        problem = _spec_problem(FIELD_KINDS[field], spec)
        if problem:
            shown = repr(spec)[1:-1]  # a control character in a fill is not echoed raw
            raise LdmError(f"output template {template!r}: {{{field}:{shown}}} {problem}; format specs only pad and "
                           "align ([[fill]align][width]; numbers also sign, 0, type d; {cfg_scale} also "
                           ".precision, type f/e/g)")
    _layout(template)


def _spec_problem(kind: type, spec: str) -> str | None:
    """What a field of `kind` (int, float, str) cannot have in `spec`, or None when it pads and aligns."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        return "is not a format spec ldm takes"
    fill, align, sign, zero, _, precision, kind_letter = match.group("fill", "align", "sign", "zero", "width",
                                                                     "precision", "type")
    if kind_letter is not None and kind_letter not in _TYPES[kind]:
        return f"has type {kind_letter!r}, which this field does not take"
    if kind is str and (sign or zero or align == "="):
        return "has a sign, 0 or '=' alignment, which text does not take"
    if precision is not None and kind is not float:
        return "has a precision, which only {cfg_scale} takes (it would cut the value short)"
    if fill is not None and unsafe_character(fill):
        return f"pads with a control character (U+{ord(fill):04X})"
    return None


def unsafe_character(char: str) -> bool:
    """Whether `char` may not appear in a name ldm makes: a control character (C0, DEL, C1: ESC, BEL,
    newline...), a line or paragraph separator, a bidirectional-text control, or a lone surrogate.
    These would reach the terminal raw when a path is printed, or show a name as another."""
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in _BIDI_CONTROLS


def check_name_text(text: str, what: str) -> None:
    """ValueError unless `text` can be (part of) one file name: no separator or NUL (a value adds no
    folder), no `unsafe_character`, valid Unicode. For every value an output template expands."""
    if "/" in text or "\\" in text or "\0" in text:
        raise ValueError(f"{what} {text!r} must be a file name, not a path (no '/', '\\', NUL, '.' or '..')")
    if text.isprintable():  # the usual case, quickly: no control, format (bidi), separator or surrogate character
        return
    bad = next((c for c in text if unsafe_character(c)), None)
    if bad is not None:
        if unicodedata.category(bad) == "Cs":
            raise ValueError(f"{what} {text!r} is not valid Unicode")
        named = unicodedata.name(bad, "a control character")
        raise ValueError(f"{what} {text!r} contains {named} (U+{ord(bad):04X}): names are printable text")


@dataclass(frozen=True)
class _Layout:
    """A template cut at its separators: each component as (literal text, field or None, spec) pieces."""

    components: tuple[tuple[tuple[str, str | None, str], ...], ...]
    literal: int  # how many leading components are literal text only: the folders every path is inside
    prefix: tuple[str, ...]  # those folders, as Path parts
    depth: int  # how many Path parts every expanded path has


_SEPARATORS = re.compile("[/\\\\]" if os.sep == "\\" else "/")


@functools.lru_cache(maxsize=8)
def _layout(template: str) -> _Layout:
    """`template` cut into components. A separator never sits inside a field (`check_template`), so each
    component parses on its own, and expanding each one and joining them is `template.format`."""
    texts = _SEPARATORS.split(template)
    components = tuple(tuple((literal, field, spec or "") for literal, field, spec, _ in string.Formatter().parse(text))
                       for text in texts)
    literal = next((k for k, pieces in enumerate(components) if any(f is not None for _, f, _ in pieces)),
                   len(components))
    shape = "/".join("".join(lit + ("x" if f is not None else "") for lit, f, _ in pieces) for pieces in components)
    # The literal folders as the expanded path spells them ("{{" is "{"; "/" and "//" are roots), then the
    # component of the first field, which stands in as "x".
    folders = "".join("".join(lit for lit, _, _ in pieces) + "/" for pieces in components[:literal])
    prefix = Path(folders + "x").parent.parts if literal < len(texts) else Path(shape).parent.parts
    return _Layout(components, literal, prefix, len(Path(shape).parts))


def plan_images(jobs: list[Job], template: str) -> list[ImageTask]:
    """One ImageTask per image of every job, numbered in order; names must be unique."""
    check_template(template)
    total = sum(job.batch_count for job in jobs)
    if total > MAX_IMAGES_PER_RUN:
        raise LdmError(f"{total:,} images in one run: the limit is {MAX_IMAGES_PER_RUN:,} (split the prompt file)")
    many = total > 1
    if many and "{" not in template:  # one fixed name for many images: number them
        template = f"{template[:-4]}-{{index:05d}}{template[-4:]}"
    tasks, seen = [], {}
    for job_index, job in enumerate(jobs):
        for i in range(job.batch_count):
            index, seed = len(tasks), job.request.seed + i
            task = ImageTask(job, job_index, index, i, seed, _format(template, job, job_index, index, i, seed))
            if task.path in seen:
                other = tasks[seen[task.path]]
                raise LdmError(f"output template {template!r} names two images {task.path}: image {other.index} "
                               f"({_describe(other)}) and image {index} ({_describe(task)}); add a field that tells "
                               "them apart, such as {index}")
            seen[task.path] = index
            tasks.append(task)
    return tasks


def _describe(task: ImageTask) -> str:
    """Which image a task is, for a message: "job 2, prompts.jsonl:3, seed 5"."""
    return f"job {task.job_index}, {task.job.source}, seed {task.seed}"


def _format(template: str, job: Job, job_index: int, index: int, image: int, seed: int) -> Path:
    """The image's path, expanded component by component. Every field value is one file-name component
    (`jobs.check_file_name`, `check_name_text`), and every component a field is in is a name (not
    empty, "." or ".."), so the path is inside the folders the template's literal text names, whatever
    a prompt file or PNG put in `name`."""
    layout = _layout(template)
    prompt_slug = slug(job.request.prompt)
    values = {name: getattr(job.request, name) for name in template_fields()}
    values.update(seed=seed, index=index, job=job_index, image=image, prompt_slug=prompt_slug, name=job.name or prompt_slug)
    try:
        for field, value in values.items():
            if isinstance(value, str):
                check_file_name(value, field)
                check_name_text(value, field)
    except ValueError as exc:
        raise LdmError(f"{job.source}: {exc}") from exc
    parts = []
    for pieces in layout.components:
        text = []
        for literal, field, spec in pieces:
            text.append(literal)
            if field is None:
                continue
            try:
                formatted = format(values[field], spec)
                check_name_text(formatted, f"{{{field}:{spec}}} gives" if spec else f"{{{field}}} gives")
            except (ValueError, TypeError, OverflowError) as exc:
                raise LdmError(f"output template {template!r}: {exc}") from exc
            text.append(formatted)
        part = "".join(text)
        if part in ("", ".", "..") and any(field is not None for _, field, _ in pieces):
            raise LdmError(f"output template {template!r} gives {part!r} as a folder or file name (image {index})")
        parts.append(part)
    path = "/".join(parts)
    planned = Path(path)
    if planned.parts[: len(layout.prefix)] != layout.prefix or len(planned.parts) != layout.depth:  # never, by construction
        raise LdmError(f"output template {template!r} gives {path!r}, outside the folders it names")
    encoded = os.fsencode(path)
    if any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise LdmError(f"output template {template!r} gives a name longer than the file system allows "
                       f"({MAX_NAME_BYTES} bytes): {path[:80]}...")
    if len(encoded) > MAX_OUTPUT_PATH_BYTES:
        raise LdmError(f"output template {template!r} gives a path of {len(encoded):,} bytes, longer than the "
                       f"file system allows ({MAX_OUTPUT_PATH_BYTES:,}, with room for the temporary file): {path[:80]}...")
    return planned


def check_outputs(tasks: list[ImageTask], *, overwrite: bool, skip_existing: bool) -> list[ImageTask]:
    """The tasks still to do; refuses existing files unless told what to do with them, unwritable
    folders, and anything at an output path that is not a regular file, whatever the flags."""
    existing = [t for t in tasks if _occupied(t.path)]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise LdmError(f"{existing[0].path} exists{more}: use --skip-existing to keep it or --overwrite to replace it")
    for folder in sorted({t.path.parent for t in tasks}):
        _check_writable(folder)
    from ldmcli.image import is_complete_png

    # --skip-existing keeps finished images only: an empty or cut-short PNG is remade (overwritten).
    done = {t.path for t in existing if skip_existing and is_complete_png(t.path)}
    return [t for t in tasks if t.path not in done]


def _occupied(path: Path) -> bool:
    """Whether something is at `path`: a file, a symlink to one, or a symlink to nothing (which
    `save_png`'s no-clobber rename would find in its way, as `os.path.lexists` does). LdmError for
    anything else (a FIFO, whose open() blocks forever; a device, socket or folder): ldm neither
    reads it (--skip-existing) nor replaces it (--overwrite)."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):  # nothing there, or a file where a folder should be
        return False
    except (OSError, ValueError) as exc:
        raise LdmError(f"{path}: cannot check the output path ({getattr(exc, 'strerror', None) or exc})") from exc
    try:
        kind = kind_of(path)
    except (FileNotFoundError, NotADirectoryError):  # a dangling symlink
        return True
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink loop: a link to nothing as well
            return True
        raise LdmError(f"{path}: cannot check the output path ({exc.strerror or exc})") from exc
    if kind is not None:
        raise LdmError(f"{path}: not a file but {kind}: an output path must be free or a file")
    return True


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LdmError(f"cannot write to {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LdmError(f"cannot write to {folder}: permission denied")
