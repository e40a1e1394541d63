"""Jobs: what to generate, from the command line and from prompt files, validated before any model loads.

A job is one prompt with its parameters and a batch count; image i of a job gets seed + i.
Prompt files are plain text (one prompt a line, blank lines and `#` comments skipped) or JSONL
(one object a line: `prompt` plus any per-job override of `JOB_FIELDS`).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ldmcli.errors import LdmError


# Used where neither the command line, the job nor the model's own metadata says otherwise.
DEFAULTS = {"steps": 30, "cfg_scale": 7.5, "sampler": "euler_a", "width": 512, "height": 512}


@dataclass(frozen=True)
class Job:
    """One prompt and its parameters. None means: the model's recommendation, else DEFAULTS."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None  # None: the sampler name's own (e.g. "DPM++ 2M Karras"), else the model's spacing
    width: int | None = None
    height: int | None = None
    batch_count: int = 1
    name: str | None = None  # for output templates; defaults to the prompt's slug
    source: str = "command line"  # where the job came from, for error messages ("prompts.jsonl:3")


# Per-job overrides a JSONL line may carry, and the type each must have.
JOB_FIELDS: dict[str, type | tuple[type, ...]] = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "cfg_scale": (int, float),
    "sampler": str,
    "schedule": str,
    "width": int,
    "height": int,
    "batch_count": int,
    "name": str,
}


@dataclass(frozen=True)
class ImageTask:
    """One image to make: its job, its number in the run and in the job, its seed and file."""

    job: Job
    job_index: int
    index: int  # position in the whole run: stable across re-runs, so names are too
    image_in_job: int
    seed: int
    path: Path


def read_prompt_file(path: str, template: Job) -> list[Job]:
    """Jobs from a prompt file (`-` = stdin); every line is checked, errors name the line."""
    if path == "-":
        text, name = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, name = Path(path).read_text(encoding="utf-8"), path
        except (OSError, UnicodeDecodeError) as exc:
            raise LdmError(f"{path}: cannot read prompt file ({exc.strerror or exc})") from exc
    jsonl = path.endswith(".jsonl") or (path == "-" and text.lstrip().startswith("{"))
    jobs = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{name}:{number}"
        jobs.append(_json_job(stripped, template, where) if jsonl else replace(template, prompt=stripped, source=where))
    if not jobs:
        raise LdmError(f"{name}: no prompts in the file")
    return jobs


def _json_job(line: str, template: Job, where: str) -> Job:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LdmError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise LdmError(f"{where}: expected a JSON object with a \"prompt\"")
    unknown = sorted(set(obj) - set(JOB_FIELDS))
    if unknown:
        raise LdmError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(JOB_FIELDS)})")
    if not isinstance(obj.get("prompt"), str):
        raise LdmError(f"{where}: \"prompt\" (a string) is required")
    for key, value in obj.items():
        wanted = JOB_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = wanted.__name__ if isinstance(wanted, type) else "number"
            raise LdmError(f"{where}: \"{key}\" must be a {kind}, got {json.dumps(value)}")
    return replace(template, **obj, source=where)


def check_job(job: Job, defaults: dict | None = None) -> Job:
    """Fill unset values (`defaults`, then DEFAULTS), validate, resolve A1111 sampler names.

    Raises LdmError naming the job's source (e.g. "prompts.jsonl:3").
    """
    from ldmcli.samplers import SCHEDULES, resolve_sampler_name

    fallback = {**DEFAULTS, **(defaults or {})}
    job = replace(job, **{k: fallback[k] for k in DEFAULTS if getattr(job, k) is None})
    where = job.source
    for side in ("width", "height"):
        pixels = getattr(job, side)
        if pixels < 8 or pixels % 8:
            raise LdmError(f"{where}: {side} {pixels} is not a positive multiple of 8")
    if job.steps < 1:
        raise LdmError(f"{where}: steps must be at least 1, got {job.steps}")
    if job.batch_count < 1:
        raise LdmError(f"{where}: batch_count must be at least 1, got {job.batch_count}")
    if job.seed < 0:
        raise LdmError(f"{where}: seed must be >= 0, got {job.seed}")
    try:
        sampler, schedule = resolve_sampler_name(job.sampler)
    except ValueError as exc:
        raise LdmError(f"{where}: {exc}") from exc
    schedule = job.schedule or schedule
    if schedule is not None and schedule not in SCHEDULES:
        raise LdmError(f"{where}: unknown schedule {schedule!r} (valid: {', '.join(SCHEDULES)})")
    return replace(job, sampler=sampler, schedule=schedule, cfg_scale=float(job.cfg_scale))


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe rendering of a prompt: lowercase words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:limit].rstrip("-") or "prompt"


