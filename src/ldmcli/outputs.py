"""Where images go: output templates expanded per image, and checks made before any model loads."""

from __future__ import annotations

import os
import string
from pathlib import Path

from ldmcli.errors import LdmError
from ldmcli.jobs import ImageTask, Job, slug
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
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return os.path.join(output, DEFAULT_NAME)
    return output


def check_template(template: str) -> None:
    """Reject unknown fields, bad format specs and non-PNG names before anything runs."""
    if not template.lower().endswith(".png"):
        raise LdmError(f"output {template!r} must end in .png (or be a folder ending in /)")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise LdmError(f"output template {template!r}: {exc}") from exc
    for _, field, _, _ in parsed:
        if field is not None and field not in TEMPLATE_FIELDS:
            raise LdmError(f"output template {template!r}: unknown field {{{field}}} (fields: {', '.join(TEMPLATE_FIELDS)})")


def plan_images(jobs: list[Job], template: str) -> list[ImageTask]:
    """One ImageTask per image of every job, numbered in order; names must be unique."""
    check_template(template)
    many = sum(job.batch_count for job in jobs) > 1
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
    prompt_slug = slug(job.request.prompt)
    values = {name: getattr(job.request, name) for name in template_fields()}
    try:
        return template.format(**{**values, "seed": seed}, index=index, job=job_index, image=image,
                               prompt_slug=prompt_slug, name=job.name or prompt_slug)
    except (ValueError, TypeError) as exc:
        raise LdmError(f"output template {template!r}: {exc}") from exc


def check_outputs(tasks: list[ImageTask], *, overwrite: bool, skip_existing: bool) -> list[ImageTask]:
    """The tasks still to do; refuses existing files unless told what to do with them, and unwritable folders."""
    existing = [t for t in tasks if t.path.exists()]
    if existing and not (overwrite or skip_existing):
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise LdmError(f"{existing[0].path} exists{more}: use --skip-existing to keep it or --overwrite to replace it")
    for folder in sorted({t.path.parent for t in tasks}):
        _check_writable(folder)
    return [t for t in tasks if not (skip_existing and t.path.exists())]


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LdmError(f"cannot write to {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LdmError(f"cannot write to {folder}: permission denied")
