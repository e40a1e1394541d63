"""Where images go: output templates expanded per image, and checks made before any model loads."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

from ldmcli.errors import LdmError
from ldmcli.jobs import ImageTask, Job, check_file_name, slug
from ldmcli.limits import MAX_FORMAT_WIDTH, MAX_IMAGES_PER_RUN, MAX_NAME_BYTES, MAX_PATH_BYTES
from ldmcli.request import template_fields

# CompVis txt2img writes outdir/samples/00000.png; we add the seed so runs with different seeds never clash.
DEFAULT_NAME = "{index:05d}-{seed}.png"
DEFAULT_DIR = "outputs"
# The run's own fields, then the request's (`seed` is each image's: the job's seed + its number in the job).
TEMPLATE_FIELDS = ("index", "job", "image", "prompt_slug", "name", *template_fields())


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

    A format spec may pad and align but not add a path separator (`{name:/>9}`) or a nested field,
    nor make a name wider than a file name may be (`{index:0100000000d}` would allocate 100 MB).
    """
    if not template.lower().endswith(".png"):
        raise LdmError(f"output {template!r} must end in .png (or be a folder ending in /)")
    if len(os.fsencode(template)) > MAX_PATH_BYTES:
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
            path = Path(_format(template, job, job_index, index, i, seed))
            if path in seen:
                raise LdmError(f"output template {template!r} gives {path} to images {seen[path]} and {index}: "
                               "add {index} or {seed}")
            seen[path] = index
            tasks.append(ImageTask(job, job_index, index, i, seed, path))
    return tasks


def _format(template: str, job: Job, job_index: int, index: int, image: int, seed: int) -> str:
    """The image's path. Every field value is one file-name component (`jobs.check_file_name`), so the
    path has the template's folders, whatever a prompt file or PNG put in `name`."""
    prompt_slug = slug(job.request.prompt)
    values = {name: getattr(job.request, name) for name in template_fields()}
    values.update(seed=seed, index=index, job=job_index, image=image, prompt_slug=prompt_slug, name=job.name or prompt_slug)
    try:
        for field, value in values.items():
            if isinstance(value, str):
                check_file_name(value, field)
        path = template.format(**values)
    except (ValueError, TypeError) as exc:
        raise LdmError(f"output template {template!r}: {exc}") from exc
    encoded = os.fsencode(path)
    if len(encoded) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in encoded.split(b"/")):
        raise LdmError(f"output template {template!r} gives a name longer than the file system allows: {path[:80]}...")
    return path


def check_outputs(tasks: list[ImageTask], *, overwrite: bool, skip_existing: bool) -> list[ImageTask]:
    """The tasks still to do; refuses existing files unless told what to do with them, and unwritable folders."""
    existing = [t for t in tasks if t.path.exists()]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise LdmError(f"{existing[0].path} exists{more}: use --skip-existing to keep it or --overwrite to replace it")
    for folder in sorted({t.path.parent for t in tasks}):
        _check_writable(folder)
    from ldmcli.image import is_complete_png

    # --skip-existing keeps finished images only: an empty or cut-short PNG is remade (overwritten).
    return [t for t in tasks if not (skip_existing and is_complete_png(t.path))]


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LdmError(f"cannot write to {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LdmError(f"cannot write to {folder}: permission denied")
