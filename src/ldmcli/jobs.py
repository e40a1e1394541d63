"""Jobs and where they come from: the command line, prompt files and PNGs, validated before any model loads.

A job is one `ImageRequest`, a batch count and where it came from; image i of a job gets seed + i.
Every source builds its jobs here:
- the command line: one job per prompt, with the flags the user gave;
- prompt files: plain text (one prompt a line, blank lines and `#` comments skipped) or JSONL (one
  object a line: `prompt` plus any request field, `batch_count` and `name`), the flags as their defaults;
- a PNG made by ldm or A1111 (`--from-png`): its recorded request, the flags the user gave on top.
Fields nobody set take the model's recommendation (`check_job`), else `ImageRequest`'s defaults.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ldmcli.errors import LdmError
from ldmcli.limits import DEFAULT_MAX_PIXELS, MAX_IMAGES_PER_RUN, MAX_NAME_BYTES, MAX_PROMPT_FILE_BYTES, MAX_SEED
from ldmcli.request import ImageRequest, check_values, field_names

# What a JSONL line may carry besides the request's fields, and the type each must have.
JOB_KEYS: dict[str, type] = {"batch_count": int, "name": str}


@dataclass(frozen=True)
class Job:
    """One request, how many images of it, and where it came from."""

    request: ImageRequest
    # The request fields somebody set (a flag, a JSONL key, a PNG's record); the others take the
    # model's recommended value when it has one.
    given: frozenset[str] = frozenset()
    batch_count: int = 1
    name: str | None = None  # for output templates; defaults to the prompt's slug
    source: str = "command line"  # where the job came from, for error messages ("prompts.jsonl:3")

    def setting(self, **values: Any) -> Job:
        """This job with request fields set (and counted as given).

        An A1111 sampler name carries a schedule ("DPM++ 2M Karras"): it is set, as given, by the
        same source, so it overrides a lower source's schedule unless this source names one itself.
        """
        values = {**_split_sampler_name(values.get("sampler")), **values} if "sampler" in values else values
        return replace(self, request=replace(self.request, **values), given=self.given | values.keys())


def _split_sampler_name(name: Any) -> dict[str, Any]:
    """{"schedule": ...} named by an A1111 sampler name, else {} (a bad name is `checked`'s to report)."""
    from ldmcli.samplers import resolve_sampler_name

    try:
        _, schedule = resolve_sampler_name(name)
    except (ValueError, TypeError, AttributeError):
        return {}
    return {} if schedule is None else {"schedule": schedule}


@dataclass(frozen=True)
class ImageTask:
    """One image to make: its job, its number in the run and in the job, its seed and file."""

    job: Job
    job_index: int
    index: int  # position in the whole run: stable across re-runs, so names are too
    image_in_job: int
    seed: int
    path: Path


def command_line_job(flags: Mapping[str, Any], batch_count: int = 1) -> Job:
    """The job the flags describe, prompt unset: the template of every job of a run.

    flags: the request fields the user gave (a flag's destination is its field's name).
    """
    return Job(ImageRequest(), batch_count=batch_count).setting(**flags)


def read_prompt_file(path: str, template: Job) -> list[Job]:
    """Jobs from a prompt file (`-` = stdin); every line is checked, errors name the line.

    UTF-8 (a leading BOM is ignored), at most MAX_PROMPT_FILE_BYTES. Lines end at "\\n" (and "\\r\\n")
    only: U+2028, U+0085 and the other characters `str.splitlines` breaks at stay inside a prompt.
    """
    name = "<stdin>" if path == "-" else path
    text = _read_text(path, name)
    jsonl = path.endswith(".jsonl") or (path == "-" and text.lstrip().startswith("{"))
    jobs = []
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{name}:{number}"
        job = _json_job(stripped, template, where) if jsonl else template.setting(prompt=stripped)
        jobs.append(replace(job, source=where))
    if not jobs:
        raise LdmError(f"{name}: no prompts in the file")
    return jobs


def _read_text(path: str, name: str) -> str:
    """A prompt file's text, bounded and strictly decoded; every failure is one LdmError line."""
    try:
        if path == "-":
            if sys.stdin is None or sys.stdin.closed:
                raise LdmError("--prompts -: standard input is closed")
            data = sys.stdin.buffer.read(MAX_PROMPT_FILE_BYTES + 1)
        else:
            with open(path, "rb") as file:
                data = file.read(MAX_PROMPT_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # ValueError: reading a closed file
        raise LdmError(f"{name}: cannot read prompt file ({getattr(exc, 'strerror', None) or exc})") from exc
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise LdmError(f"{name}: prompt file larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LdmError(f"{name}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _json_job(line: str, template: Job, where: str) -> Job:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LdmError(f"{where}: not valid JSON ({exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep
        raise LdmError(f"{where}: not usable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise LdmError(f"{where}: expected a JSON object with a \"prompt\"")
    try:
        check_values(obj, where, extra=JOB_KEYS)
    except ValueError as exc:
        raise LdmError(str(exc)) from exc
    if not isinstance(obj.get("prompt"), str):
        raise LdmError(f"{where}: \"prompt\" (a string) is required")
    job_values = {key: obj.pop(key) for key in JOB_KEYS if key in obj}
    return replace(template.setting(**obj), **job_values)


def job_from_png(path: Path, template: Job) -> tuple[Job, dict]:
    """The job a PNG records (ours or A1111's), the flags of `template` taking precedence, and the
    image's model record (name, hash, path if it still exists, prediction type, dtype)."""
    from ldmcli.metadata import read_png_text, request_from_png_text

    recorded, given, model = request_from_png_text(read_png_text(path), str(path))
    flags = {name: getattr(template.request, name) for name in template.given}
    job = replace(template, request=recorded, given=frozenset(given), source=str(path)).setting(**flags)
    if model.get("path") and not Path(model["path"]).exists():
        model = {k: v for k, v in model.items() if k != "path"}
    return job, model


def check_job(job: Job, recommended: Mapping[str, Any] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Job:
    """Fill the fields nobody set with the model's `recommended` values, validate, resolve A1111
    sampler names. Raises LdmError naming the job's source (e.g. "prompts.jsonl:3")."""
    fill = {k: v for k, v in (recommended or {}).items() if k in field_names() and k not in job.given}
    try:
        request = replace(job.request, **fill).checked(max_pixels=max_pixels)
        if not 1 <= job.batch_count <= MAX_IMAGES_PER_RUN:
            raise ValueError(f"batch_count must be between 1 and {MAX_IMAGES_PER_RUN:,}, got {job.batch_count}")
        if request.seed + job.batch_count - 1 > MAX_SEED:
            raise ValueError(f"seed {request.seed} + {job.batch_count - 1} (the job's last image) is beyond 2^64 - 1")
        if job.name is not None:
            check_file_name(job.name, "name")
    except ValueError as exc:
        raise LdmError(f"{job.source}: {exc}") from exc
    return replace(job, request=request)


def check_file_name(value: str, what: str) -> None:
    """A value that becomes part of a file name: one component, never a path (no separator, not
    "." or ".."), no NUL, valid Unicode, at most MAX_NAME_BYTES bytes."""
    if value in (".", "..") or any(c in value for c in ("/", "\\", "\0")):
        raise ValueError(f"{what} {value!r} must be a file name, not a path (no '/', '\\', NUL, '.' or '..')")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not valid Unicode") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"{what} is {size} bytes long, more than a file name may be ({MAX_NAME_BYTES})")


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe rendering of a prompt: lowercase words joined by '-'."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:limit].rstrip("-") or "prompt"
