"""Jobs and where they come from: the command line, prompt files and PNGs, validated before any model loads.

A job is one `ImageRequest`, a batch count and where it came from; image i of a job gets seed + i.
Every source builds its jobs here:
- the command line: one job per prompt, with the flags the user gave;
- prompt files: plain text (one prompt a line, blank lines and `#` comments skipped; a line that starts
  with `--` is a line of A1111's "Prompts from file or textbox" script) or JSONL (one object a line:
  `prompt` plus any request field, `batch_count` and `name`, or the keys of A1111's txt2img request),
  the flags as their defaults;
- a PNG made by ldm or A1111 (`--from-png`): its recorded request, the flags the user gave on top.
Fields nobody set take the model's recommendation (`check_job`), else `ImageRequest`'s defaults; but a
JSONL line that is an A1111 request (it has a key only A1111 has) runs as A1111's API would run it: what
neither the line nor a flag sets takes A1111's default (`A1111_API_DEFAULTS`), never ldm's or the model's.
A line of A1111's prompt-file script takes the rest from the command line, as the script takes it from
A1111's UI, then from the model and ldm (`_script_job`).

Nothing a source asks for is dropped quietly: what ldm does not do (an A1111 key or setting, a
`<lora:...>` tag in a prompt) stays with the job as a `metadata.Note`, said on stderr and in --json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ldmcli.errors import LdmError
from ldmcli.files import read_stream
from ldmcli.limits import DEFAULT_MAX_PIXELS, MAX_IMAGES_PER_RUN, MAX_NAME_BYTES, MAX_PROMPT_FILE_BYTES, MAX_SEED
from ldmcli.metadata import (
    BROWNIAN_TREE_NOTE,
    BROWNIAN_TREE_SAMPLERS,
    INFOTEXT_PREFIXES,
    MATCH_NOTE_SECOND_PASS,
    SAMPLER_SETTING,
    SECOND_PASS,
    SEED_RESIZE,
    VARIATION_SEEDS,
    Note,
    a1111_rng,
    checkpoint_name,
    a1111_schedule,
    is_off,
)
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
    # What the sources asked for and ldm does not do as asked, or does with a remark (stderr, --json).
    notes: tuple[Note, ...] = ()
    # Fields set with A1111's meaning (an A1111 text or request): clip skip, which A1111 does not apply
    # to SD 2.x and SDXL models (`apply_model_family`).
    a1111: frozenset[str] = frozenset()

    def setting(self, **values: Any) -> Job:
        """This job with request fields set (and counted as given), by a source that means ldm's meaning.

        An A1111 sampler name carries a schedule ("DPM++ 2M Karras"): it is set, as given, by the
        same source, so it overrides a lower source's schedule unless this source names one itself.
        A lower source's notes about a field set here go: its value no longer counts.
        """
        values = {**_split_sampler_name(values.get("sampler")), **values} if "sampler" in values else values
        notes = tuple(n for n in self.notes if not set(n.fields) & values.keys())
        return replace(self, request=replace(self.request, **values), given=self.given | values.keys(),
                       notes=notes, a1111=self.a1111 - values.keys())

    def noting(self, notes, a1111: frozenset[str] | set[str] = frozenset()) -> Job:
        """This job with `notes` added (once each) and the fields `a1111` marked as read with A1111's meaning."""
        added = tuple(n for n in dict.fromkeys(notes) if n not in self.notes)
        return replace(self, notes=self.notes + added, a1111=self.a1111 | frozenset(a1111))

    @property
    def not_honoured(self) -> list[dict[str, str]]:
        """The --json list: what this job's sources asked for that ldm does not do."""
        return [n.record() for n in self.notes if not n.honoured]

    @property
    def remarks(self) -> list[dict[str, str]]:
        """The --json list of the rest: done as asked, with something worth saying."""
        return [n.record() for n in self.notes if n.honoured]


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


def read_prompt_file(path: str, template: Job, images_before: int = 0) -> list[Job]:
    """Jobs from a prompt file (`-` = stdin); every line is checked, errors name the line.

    UTF-8 (a leading BOM is ignored), at most MAX_PROMPT_FILE_BYTES. Lines end at "\\n" (and "\\r\\n")
    only: U+2028, U+0085 and the other characters `str.splitlines` breaks at stay inside a prompt.
    Reading stops at the line whose images (its batch count), with those of the lines before and the
    `images_before` of the run's other jobs, go beyond MAX_IMAGES_PER_RUN: a 64 MiB file of short lines
    (33 million jobs) is refused in a moment, never built in memory.
    """
    name = "<stdin>" if path == "-" else path
    text = _read_text(path, name)
    jsonl = path.endswith(".jsonl") or (path == "-" and text.lstrip().startswith("{"))
    jobs = []
    images = images_before
    for number, stripped in _content_lines(text):
        where = f"{name}:{number}"
        if jsonl:
            job = _json_job(stripped, template, where, folder=None if path == "-" else os.path.dirname(path))
        elif stripped.startswith("--"):
            job = _script_job(stripped, template, where)
        else:
            job = template.setting(prompt=stripped)
        if isinstance(job.batch_count, int) and job.batch_count > MAX_IMAGES_PER_RUN:  # check_job's message, now
            raise LdmError(f"{where}: batch_count must be between 1 and {MAX_IMAGES_PER_RUN:,}, got {job.batch_count}")
        images += max(job.batch_count, 1) if isinstance(job.batch_count, int) else 1  # 0 and below: check_job's
        if images > MAX_IMAGES_PER_RUN:
            raise LdmError(f"{where}: at least {images:,} images in one run: the limit is {MAX_IMAGES_PER_RUN:,} "
                           "(split the prompt file)")
        jobs.append(replace(job, source=where))
    if not jobs:
        raise LdmError(f"{name}: no prompts in the file")
    return jobs


# A line with something on it that is not a `#` comment, from its first character that is not
# whitespace (as str.strip sees it: `\s` is str.isspace). `^` is a line's start after "\n" only.
_CONTENT_LINE = re.compile(r"^[^\S\n]*([^\s#][^\n]*)", re.MULTILINE)


def _content_lines(text: str):
    """(line number, the line stripped) of each line of `text` (split at "\\n" only) that is neither
    blank nor a `#` comment, one at a time: never a list of the 67 million lines 64 MiB can hold, and
    blank and comment lines are skipped by the regex engine, not one by one in Python."""
    number, counted = 1, 0
    for match in _CONTENT_LINE.finditer(text):
        number += text.count("\n", counted, match.start())
        counted = match.start()
        yield number, match.group(1).rstrip()


def _read_text(path: str, name: str) -> str:
    """A prompt file's text, bounded and strictly decoded; every failure is one LdmError line."""
    try:
        if path == "-":
            if sys.stdin is None or sys.stdin.closed:
                raise LdmError("--prompts -: standard input is closed")
            data = read_stream(sys.stdin.buffer, MAX_PROMPT_FILE_BYTES)
        else:
            with open(path, "rb", buffering=0) as file:
                data = read_stream(file, MAX_PROMPT_FILE_BYTES)
    except (OSError, ValueError) as exc:  # ValueError: reading a closed file
        raise LdmError(f"{name}: cannot read prompt file ({getattr(exc, 'strerror', None) or exc})") from exc
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise LdmError(f"{name}: prompt file larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LdmError(f"{name}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _lora_specs(value: Any, where: str) -> list[str]:
    """A line's "lora": one "NAME[:W]" or a list of them (`lora_uses.check_lora_spec`), as --lora takes them."""
    from ldmcli.lora_uses import check_lora_spec

    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
        raise LdmError(f'{where}: "lora" must be a string "NAME[:W]" or a list of them')
    try:
        return [check_lora_spec(spec) for spec in specs]
    except LdmError as exc:
        raise LdmError(f"{where}: {exc}") from None


# The request fields that name a file: a prompt file's relative paths are relative to its folder.
PATH_FIELDS = ("init_image", "mask")


def _json_job(line: str, template: Job, where: str, folder: str | None = None) -> Job:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LdmError(f"{where}: not valid JSON ({exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep
        raise LdmError(f"{where}: not usable JSON ({type(exc).__name__}: {exc})") from None
    return object_job(obj, template, where, folder=folder)


def object_job(obj: Any, template: Job, where: str, *, folder: str | None = None, a1111: bool = False) -> Job:
    """The job of a JSON object: a JSONL line's (ldm's keys, or A1111's txt2img request) or, with `a1111`,
    a request to A1111's API (`ldm serve`), read as A1111 would read it whatever keys it has (so what it
    leaves out takes A1111's defaults). Relative image paths are relative to `folder` (else the current
    folder). Every problem is one LdmError naming `where`."""
    if not isinstance(obj, dict):
        raise LdmError(f"{where}: expected a JSON object with a \"prompt\"")
    obj = dict(obj)
    ours = (*field_names(), *JOB_KEYS, "lora")
    unknown = sorted(set(obj) - set(ours) - A1111_REQUEST_KEYS)
    if unknown:
        raise LdmError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(ours)}; "
                       f"and the keys of A1111's txt2img request: sampler_name, scheduler, n_iter, batch_size, "
                       f"override_settings, ...)")
    payload = {key: obj.pop(key) for key in list(obj) if key in A1111_REQUEST_KEYS}
    loras = _lora_specs(obj.pop("lora", []), where)
    try:
        check_values(obj, where, extra=JOB_KEYS)
    except ValueError as exc:
        raise LdmError(str(exc)) from exc
    if not isinstance(obj.get("prompt"), str):
        raise LdmError(f"{where}: \"prompt\" (a string) is required")
    job_values = {key: obj.pop(key) for key in JOB_KEYS if key in obj}
    for key in PATH_FIELDS:  # absolute, as the record keeps it: --from-png may run from another folder
        if isinstance(obj.get(key), str) and obj[key]:
            obj[key] = os.path.abspath(os.path.join(folder or os.getcwd(), obj[key]))
    if loras:
        from ldmcli.lora_uses import with_lora_tags

        obj["prompt"] = with_lora_tags(obj["prompt"], loras)
    job = replace(template.setting(**obj), **job_values)
    if payload or a1111:
        job = _a1111_job(job, payload, where, said=obj.keys() | job_values.keys(), defaults=A1111_API_DEFAULTS)
    return job


# --- A1111's txt2img request (JSONL) and its "Prompts from file or textbox" lines ---------------------
# Both name StableDiffusionProcessingTxt2Img's attributes (modules/processing.py): the API's request
# (/sdapi/v1/txt2img, modules/api/models.py) all of them, the script (scripts/prompts_from_file.py)
# the ones in `SCRIPT_OPTIONS`. prompt, negative_prompt, steps, cfg_scale, seed, width and height are
# ldm's names too; the others are read here, or named in a note when ldm does not honour them.


@dataclass(frozen=True)
class A1111Param:
    """One of A1111's request keys that ldm does not read into the request."""

    why: str | None  # why ldm does not honour it; None: it does not change the image
    off: tuple[str, ...] = ("",)  # values that leave it off: nothing to honour (`metadata.is_off`)
    needs: str | None = None  # it only matters when this other key is on


_HIRES = INFOTEXT_PREFIXES["Hires "]
_SCRIPTS = "A1111 scripts and extensions are not run"

# A1111's hires fix and refiner keys -> the request fields they set (hires ones only with enable_hr on,
# refiner ones only with a refiner_checkpoint; A1111's own defaults, modules/processing.py, otherwise).
A1111_SECOND_PASS_KEYS = {"enable_hr": None, "hr_scale": "hires_scale", "hr_second_pass_steps": "hires_steps",
                          "hr_upscaler": "hires_upscaler", "denoising_strength": "hires_strength",
                          "refiner_checkpoint": "refiner", "refiner_switch_at": "refiner_switch"}
A1111_HIRES_DEFAULTS = {"hr_scale": 2.0, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "denoising_strength": 0.7}

A1111_PARAMS: dict[str, A1111Param] = {
    "styles": A1111Param("A1111's saved styles, its styles.csv, are not available: put their text in the prompt"),
    "subseed": A1111Param(VARIATION_SEEDS, needs="subseed_strength"),
    "subseed_strength": A1111Param(VARIATION_SEEDS, off=("", "0")),
    "seed_resize_from_h": A1111Param(SEED_RESIZE, off=("", "0", "-1")),
    "seed_resize_from_w": A1111Param(SEED_RESIZE, off=("", "0", "-1")),
    "restore_faces": A1111Param("face restoration, a post-processing model, is not supported", off=("", "false")),
    "tiling": A1111Param("tileable images are not supported", off=("", "false")),
    "eta": A1111Param("ldm's samplers run with their standard eta: 1 for ancestral and SDE samplers, 0 for DDIM"),
    "s_min_uncond": A1111Param("NGMS, skipping the negative pass at low noise, is not supported", off=("", "0")),
    "s_churn": A1111Param(SAMPLER_SETTING, off=("", "0")),
    "s_tmax": A1111Param(SAMPLER_SETTING, off=("", "0", "inf")),
    "s_tmin": A1111Param(SAMPLER_SETTING, off=("", "0")),
    "s_noise": A1111Param(SAMPLER_SETTING, off=("", "1")),
    "firstpass_image": A1111Param(SECOND_PASS),
    "enable_hr": A1111Param(None, off=("", "false")),  # read (A1111_SECOND_PASS_KEYS)
    "firstphase_width": A1111Param(_HIRES, off=("", "0")),
    "firstphase_height": A1111Param(_HIRES, off=("", "0")),
    "hr_resize_x": A1111Param(_HIRES, off=("", "0"), needs="enable_hr"),
    "hr_resize_y": A1111Param(_HIRES, off=("", "0"), needs="enable_hr"),
    **{key: A1111Param(_HIRES, needs="enable_hr") for key in (
        "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg",
        "hr_distilled_cfg")},
    "script_name": A1111Param(_SCRIPTS, off=("", "none")),
    "script_args": A1111Param(_SCRIPTS, needs="script_name"),
    "alwayson_scripts": A1111Param("A1111 scripts and extensions, ControlNet, ADetailer and others, are not run"),
    "infotext": A1111Param("an infotext inside the request, whose values A1111 applies over the request's, "
                           "is not read: use --from-png"),
    # What does not change the image: ldm applies no extra networks whatever this says (their tags
    # are noted), A1111 itself ignores sampler_index unless sampler_name is missing, and the rest is
    # about what A1111 does with the image, not what the image is.
    **{key: A1111Param(None) for key in (
        "disable_extra_networks", "comments", "force_task_id", "sampler_index", "send_images", "save_images",
        "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
        "outpath_samples", "outpath_grids", "prompt_for_display")},
}
# The request keys ldm reads into the job.
A1111_READ_KEYS = frozenset({"sampler_name", "scheduler", "n_iter", "batch_size", "override_settings",
                             *A1111_SECOND_PASS_KEYS}) - {"enable_hr"}
A1111_REQUEST_KEYS = A1111_READ_KEYS | A1111_PARAMS.keys()

# `override_settings` entries ldm knows besides the two it reads (clip skip, the noise source).
A1111_SETTINGS: dict[str, A1111Param] = {
    "sd_model_checkpoint": A1111Param("a run has one model, -m or the one found for --from-png, and a server the "
                                      "one its options name (POST /sdapi/v1/options): a request cannot switch it"),
    "sd_vae": A1111Param("ldm decodes with the model's own VAE; a separate VAE file is not loaded",
                         off=("", "automatic", "none")),
    "emphasis": A1111Param("only A1111's default emphasis, Original, is implemented", off=("", "original")),
    "eta_ancestral": A1111Param("ldm's ancestral and SDE samplers run with eta 1", off=("", "1")),
    "eta_ddim": A1111Param("ldm's DDIM runs with eta 0", off=("", "0")),
    "token_merging_ratio_hr": A1111Param("one token merging ratio for every pass of an image: give it as "
                                         "token_merging_ratio (--tome)", off=("", "0")),
    "token_merging_ratio_img2img": A1111Param("one token merging ratio for every kind of image: give it as "
                                              "token_merging_ratio (--tome)", off=("", "0")),
    "sd_vae_decode_method": A1111Param("a request cannot switch the decoder: --taesd (generate, serve) does",
                                       off=("", "full")),
}
A1111_UNKNOWN_SETTING = "an A1111 setting ldm does not have: not applied"

# The seed that asks for a random one, as in A1111 and stable-diffusion.cpp.
RANDOM_SEED = -1

# What A1111's txt2img API (/sdapi/v1/txt2img) uses for a key a request leaves out, so what an A1111
# request line gets for a field that neither it nor a flag sets. StableDiffusionProcessing's defaults
# (modules/processing.py): negative_prompt "", steps 50, cfg_scale 7.0, width and height 512, seed -1 (a
# random seed, drawn for each line), n_iter and batch_size 1 (the flag -b's default, 1 image, stays);
# the API's sampler_index "Euler", which stands in for a missing sampler_name (modules/api/models.py,
# api.py `sampler_name or sampler_index`); scheduler None: Automatic, A1111's uniform grid for Euler; the
# setting CLIP_stop_at_last_layers 1. Its settings randn_source (GPU: nv) and pad_cond_uncond (False),
# and its numerics (--match a1111), are `_a1111_job`'s, for script lines too.
A1111_API_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "", "steps": 50, "sampler": "Euler", "schedule": None, "cfg_scale": 7.0, "seed": RANDOM_SEED,
    "width": 512, "height": 512, "clip_skip": 1, "ensd": 0,
    # StableDiffusionProcessingImg2Img's (a txt2img request has none of them; they are ldm's defaults too)
    "init_image": None, "strength": 0.75, "resize_mode": "resize", "mask": None, "invert_mask": False, "mask_blur": 4,
    "pad": None,
    # without enable_hr / refiner_checkpoint: no second pass (A1111_HIRES_DEFAULTS apply with enable_hr)
    "hires_scale": None, "hires_steps": 0, "hires_strength": 0.7, "hires_upscaler": "latent", "refiner": None,
    "refiner_switch": 0.8,
    "deep_cache": 0,  # ldm's own (A1111 has no DeepCache): off, the exact computation
    "tome": 0.0,  # A1111's setting token_merging_ratio: off
}

# Pairs of ldm's key and A1111's for one thing: a line gives one of them.
_SAME_THING = (("sampler", "sampler_name"), ("schedule", "scheduler"), ("batch_count", "n_iter"),
               ("batch_count", "batch_size"))


def _a1111_job(job: Job, payload: Mapping[str, Any], where: str, *, said, defaults: Mapping[str, Any]) -> Job:
    """`job` (a JSONL line's or a script line's ldm values already set over the command line's) with
    A1111's request keys `payload` read or noted, and `defaults` for the fields neither the line nor a
    flag set. said: the ldm keys the line itself gave."""
    for ours, theirs in _SAME_THING:
        if ours in said and payload.get(theirs) is not None:
            raise LdmError(f'{where}: "{ours}" and "{theirs}" both given: they say the same thing, give one')
    values, batch_count, notes, a1111 = _read_a1111_request(payload, where, said)
    sampler = str(values.get("sampler", ""))
    if sampler.strip().lower().removesuffix(" karras").removesuffix(" exponential") in BROWNIAN_TREE_SAMPLERS:
        notes.append(Note("sampler_name", sampler, BROWNIAN_TREE_NOTE, fields=("sampler",)))
    job = job.setting(**values)  # its `given`: the flags', the line's (a sampler name's schedule too)
    if batch_count is not None:
        job = replace(job, batch_count=batch_count)
    if "rng" not in job.given:
        # A1111 draws its noise as its randn_source setting says, GPU unless changed.
        rng, note = a1111_rng(None, "randn_source", absent_means_gpu=True)
        job = job.setting(rng=rng)
        notes.append(note)
    if "pad_conds" not in job.given:
        job = job.setting(pad_conds=False)  # A1111's default: prompt and negative prompt unpadded
    # A1111's img2img request: its strength (a txt2img request without enable_hr ignores it, as A1111 does)
    if payload.get("denoising_strength") is not None and "hires_strength" not in values and job.request.from_image:
        job = job.setting(strength=_typed(payload, "denoising_strength", float, where))
    if "match" not in job.given:  # A1111's request: its numerics, which ldm reproduces for text-to-image only
        second_pass = job.request.hires_scale is not None or job.request.refiner is not None or job.request.from_image
        job = job.setting(match="diffusers" if second_pass else "a1111")
        if second_pass:
            notes.append(Note("match", "a1111", MATCH_NOTE_SECOND_PASS, fields=("match",)))
    unset = {key: value for key, value in defaults.items() if key not in job.given}
    return (job.setting(**unset) if unset else job).noting(notes, a1111)


def _read_a1111_request(payload: Mapping[str, Any], where: str, said) -> tuple[dict, int | None, list[Note], set[str]]:
    """(request values, batch count, notes, fields with A1111's meaning) of A1111's request keys."""
    values: dict[str, Any] = {}
    notes: list[Note] = []
    a1111: set[str] = set()
    sampler = payload.get("sampler_name")
    if sampler is None and isinstance(payload.get("sampler_index"), str):
        sampler = payload["sampler_index"]  # what A1111's API falls back to
    if sampler is not None:
        values["sampler"] = _typed(payload, "sampler_name", str, where, sampler)
    if payload.get("scheduler") is not None:
        try:
            # None (Automatic, Uniform): the model's own spacing, set so that a --schedule flag does not apply
            values["schedule"] = a1111_schedule(_typed(payload, "scheduler", str, where), values.get("sampler"))
        except ValueError as exc:
            raise LdmError(f'{where}: "scheduler": {exc}') from None
    elif "sampler" in values and "schedule" not in said:  # A1111 1.9+: no scheduler is "Automatic"
        automatic = a1111_schedule("Automatic", values["sampler"])
        if automatic is not None:
            values["schedule"] = automatic
    batch_count = None
    for key in ("n_iter", "batch_size"):  # A1111 makes n_iter batches of batch_size images: seed, seed + 1, ...
        if payload.get(key) is not None:
            count = _typed(payload, key, int, where)
            if count < 1:
                raise LdmError(f'{where}: "{key}" must be at least 1, got {count}')
            batch_count = (batch_count or 1) * count
    settings = payload.get("override_settings")
    if settings is not None:
        if not isinstance(settings, dict):
            raise LdmError(f'{where}: "override_settings" must be an object, got {_json_text(settings)[:40]}')
        for key, value in settings.items():
            if key == "CLIP_stop_at_last_layers":
                if "clip_skip" in said:
                    raise LdmError(f'{where}: "clip_skip" and override_settings "{key}" both given: give one')
                values["clip_skip"] = _typed(settings, key, int, where)
                a1111.add("clip_skip")
            elif key == "eta_noise_seed_delta":
                if "ensd" in said:
                    raise LdmError(f'{where}: "ensd" and override_settings "{key}" both given: give one')
                values["ensd"] = _typed(settings, key, int, where)
            elif key == "pad_cond_uncond":
                if "pad_conds" in said:
                    raise LdmError(f'{where}: "pad_conds" and override_settings "{key}" both given: give one')
                if not isinstance(value, bool):
                    raise LdmError(f'{where}: override_settings "{key}" must be true or false, got {_json_text(value)[:40]}')
                values["pad_conds"] = value
            elif key == "token_merging_ratio":
                if "tome" in said:
                    raise LdmError(f'{where}: "tome" and override_settings "{key}" both given: give one')
                values["tome"] = _typed(settings, key, float, where)
            elif key == "randn_source":
                if "rng" in said:
                    raise LdmError(f'{where}: "rng" and override_settings "{key}" both given: give one')
                values["rng"], note = a1111_rng(_typed(settings, key, str, where), "override_settings.randn_source",
                                                absent_means_gpu=False)
                notes += [note] if note else []
            else:
                rule = A1111_SETTINGS.get(key, A1111Param(A1111_UNKNOWN_SETTING, off=()))
                if rule.why is not None and not is_off(value, rule.off):
                    notes.append(Note(f"override_settings.{key}", _json_text(value), rule.why))
    values.update(_second_passes(payload, where, said, notes))
    for key, value in payload.items():
        rule = A1111_PARAMS.get(key)
        if rule is None or rule.why is None or is_off(value, rule.off):
            continue
        if rule.needs is not None and is_off(payload.get(rule.needs), A1111_PARAMS[rule.needs].off):
            continue
        notes.append(Note(key, _json_text(value), rule.why))
    return values, batch_count, notes, a1111


def _second_passes(payload: Mapping[str, Any], where: str, said, notes: list[Note]) -> dict[str, Any]:
    """The request fields of A1111's hires fix (with enable_hr on; its defaults for the keys left out) and
    refiner (with a refiner_checkpoint) keys. An upscaler ldm lacks becomes Lanczos, noted."""
    from ldmcli.hires import parse_upscaler

    values: dict[str, Any] = {}
    if not is_off(payload.get("enable_hr"), A1111_PARAMS["enable_hr"].off):
        for key, default in A1111_HIRES_DEFAULTS.items():
            value = default if payload.get(key) is None else payload[key]
            values[A1111_SECOND_PASS_KEYS[key]] = _typed(payload, key, type(default), where, value)
        try:
            values["hires_upscaler"] = parse_upscaler(values["hires_upscaler"])
        except ValueError:
            notes.append(Note("hr_upscaler", values["hires_upscaler"], "an upscaling model ldm does not have: the "
                              "second pass starts from a Lanczos resize", fields=("hires_upscaler",)))
            values["hires_upscaler"] = "lanczos"
    if not is_off(payload.get("refiner_checkpoint"), ("", "none")):
        # A1111 takes a checkpoint's title, "NAME [hash]", or its name: found by name, as -m finds models
        values["refiner"] = checkpoint_name(_typed(payload, "refiner_checkpoint", str, where))
        if payload.get("refiner_switch_at") is not None:
            values["refiner_switch"] = _typed(payload, "refiner_switch_at", float, where)
    for field_name in values:
        if field_name in said:
            key = next(k for k, f in A1111_SECOND_PASS_KEYS.items() if f == field_name)
            raise LdmError(f'{where}: "{field_name}" and "{key}" both given: they say the same thing, give one')
    return values


def _typed(values: Mapping[str, Any], key: str, kind: type, where: str, value: Any = None) -> Any:
    value = values[key] if value is None else value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = {int: "a whole number", str: "a string", float: "a number"}[kind]
        raise LdmError(f'{where}: "{key}" must be {what}, got {json.dumps(value, ensure_ascii=False, default=str)[:40]}')
    return value


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


# The options of A1111's "Prompts from file or textbox" script and how it converts their values.
def _script_bool(text: str) -> bool:
    return text == "true"


SCRIPT_OPTIONS: dict[str, type | Any] = {
    "outpath_samples": str, "outpath_grids": str, "prompt_for_display": str, "prompt": str,
    "negative_prompt": str, "styles": str, "seed": int, "subseed_strength": float, "subseed": int,
    "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_index": int, "sampler_name": str,
    "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
    "restore_faces": _script_bool, "tiling": _script_bool, "do_not_save_samples": _script_bool,
    "do_not_save_grid": _script_bool,
}


def _script_job(line: str, template: Job, where: str) -> Job:
    """A line of A1111's "Prompts from file or textbox" script: `--prompt "a cat" --steps 30 ...`,
    shell-quoted; --prompt and --negative_prompt take every word up to the next option.

    What the line leaves out the script takes from A1111's UI: its copy of the UI's request, the line's
    options set over it. ldm's command line is that UI here, so the rest comes from the flags, then the
    model's recommendation and ldm's defaults, as for a plain line; not from A1111's API defaults, which
    are not what the script's user had on screen. A1111's settings (its noise source, pad conds) are
    not on that screen: they take A1111's defaults unless a flag sets them, as for a request line."""
    options = _script_options(line, where)
    if "prompt" not in options:
        raise LdmError(f"{where}: an A1111 prompt-file line (it starts with --) needs --prompt")
    ours = {key: options.pop(key) for key in list(options) if key in field_names()}
    try:
        check_values(ours, where)  # the script's conversions give each field its type; NaN is refused here
    except ValueError as exc:
        raise LdmError(str(exc)) from exc
    return _a1111_job(template.setting(**ours), options, where, said=set(ours), defaults={})


def _script_options(line: str, where: str) -> dict[str, Any]:
    """The options of a script line, as the script's `cmdargs` reads them; every problem an LdmError."""
    try:
        args = shlex.split(line)
    except ValueError as exc:  # an unclosed quotation
        raise LdmError(f"{where}: not a valid A1111 prompt-file line ({exc})") from None
    options: dict[str, Any] = {}
    pos = 0
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise LdmError(f"{where}: expected an option starting with --, got {arg[:40]!r}")
        tag = arg[2:]
        convert = SCRIPT_OPTIONS.get(tag)
        if convert is None:
            raise LdmError(f"{where}: unknown option {arg[:40]!r} (A1111's prompt-file options: "
                           f"{', '.join('--' + o for o in SCRIPT_OPTIONS)})")
        if pos + 1 >= len(args):
            raise LdmError(f"{where}: {arg} needs a value")
        if tag in ("prompt", "negative_prompt"):
            end = pos + 2
            while end < len(args) and not args[end].startswith("--"):
                end += 1
            options[tag] = " ".join(args[pos + 1:end])
            pos = end
            continue
        try:
            options[tag] = convert(args[pos + 1])
        except ValueError:
            raise LdmError(f"{where}: {arg} takes {_kind(convert)}, got {args[pos + 1][:40]!r}") from None
        pos += 2
    return options


def _kind(convert: Any) -> str:
    return {int: "a whole number", float: "a number", str: "text"}.get(convert, "true or false")


def job_from_png(path: Path, template: Job) -> tuple[Job, dict]:
    """The job a PNG records (ours or A1111's), the flags of `template` taking precedence, and the
    image's model record (name, hash, path if it still exists, prediction type, dtype). What the PNG
    asks for and ldm does not do is in the job's notes."""
    from ldmcli.metadata import read_png_parameters, read_png_text

    found = read_png_parameters(read_png_text(path), str(path))
    flags = {name: getattr(template.request, name) for name in template.given}
    job = replace(template, request=found.request, given=found.given, source=str(path), notes=found.notes,
                  a1111=found.a1111).setting(**flags)
    model = found.model
    if model.get("path") and not Path(model["path"]).exists():
        model = {k: v for k, v in model.items() if k != "path"}
    return job, model


def check_job(job: Job, recommended: Mapping[str, Any] | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Job:
    """Fill the fields nobody set with the model's `recommended` values, validate, resolve A1111
    sampler names. Raises LdmError naming the job's source (e.g. "prompts.jsonl:3")."""
    fill = {k: v for k, v in (recommended or {}).items() if k in field_names() and k not in job.given}
    if job.request.seed == RANDOM_SEED:  # A1111's and sd.cpp's "-1": a random seed, recorded like any other
        fill["seed"] = random_seed()
    try:
        request = replace(job.request, **fill).checked(max_pixels=max_pixels)
        if not 1 <= job.batch_count <= MAX_IMAGES_PER_RUN:
            raise ValueError(f"batch_count must be between 1 and {MAX_IMAGES_PER_RUN:,}, got {job.batch_count}")
        if request.seed + job.batch_count - 1 > MAX_SEED:
            raise ValueError(f"seed {request.seed} + {job.batch_count - 1} (the job's last image) is beyond 2^64 - 1")
        if request.seed + job.batch_count - 1 + request.ensd > MAX_SEED:
            raise ValueError(f"seed {request.seed} + {job.batch_count - 1} + ensd {request.ensd} (the job's last image's "
                             "restarted generator) is beyond 2^64 - 1")
        if job.name is not None:
            check_file_name(job.name, "name")
    except ValueError as exc:
        raise LdmError(f"{job.source}: {exc}") from exc
    return replace(job, request=request).noting(prompt_tag_notes(request))


def prompt_tag_notes(request: ImageRequest) -> list[Note]:
    """A note for each extra-network tag ldm does not apply (`<hypernet:...>`, any `<kind:...>` but a LoRA's,
    which `lora_uses` merges): in the prompt, not honoured (the text conditioning removes it before
    encoding, as A1111 does); in the negative prompt, a remark that it stays words of the text, as in
    A1111, which reads extra networks from the prompt only."""
    from ldmcli.lora_uses import LORA_TAG_KINDS
    from ldmcli.prompt_syntax import extra_network_tags

    _, tags = extra_network_tags(request.prompt)
    notes = [Note("prompt", _tag_text(tag), EXTRA_NETWORKS.get(tag.kind.lower(), OTHER_EXTRA_NETWORK))
             for tag in tags if tag.kind.lower() not in LORA_TAG_KINDS]
    _, tags = extra_network_tags(request.negative_prompt)
    return notes + [Note("negative_prompt", _tag_text(tag), NEGATIVE_PROMPT_TAG, honoured=True) for tag in tags]


NEGATIVE_PROMPT_TAG = ("kept as words of the negative prompt, as in A1111, which reads extra networks from the prompt "
                       "only: nothing is applied or removed")

# Why each kind of A1111 extra network in the prompt is not applied (the tag is removed either way).
EXTRA_NETWORKS = {
    "hypernet": "hypernetworks are not supported; the tag is removed from the prompt",
}
OTHER_EXTRA_NETWORK = "an extra network ldm does not have; the tag is removed from the prompt"


def _tag_text(tag: Any) -> str:
    """The tag as written: <kind:name:arg...>."""
    args = tag.args if isinstance(tag.args, (list, tuple)) else [tag.args]
    return "<" + ":".join(str(part) for part in (tag.kind, tag.name, *args)) + ">"


# What A1111 does not do for SD 2.x and SDXL models, which ldm then does not do either.
A1111_NO_CLIP_SKIP = ("A1111 does not apply clip skip to SD 2.x and SDXL models (a fixed text-encoder layer), "
                      "so neither does ldm here (--clip-skip applies it)")


def apply_model_family(job: Job, family: str) -> Job:
    """The job as A1111 would run it on a model of `family`: a clip skip read with A1111's meaning (an
    A1111 text, an A1111 request) is not applied to SD 2.x and SDXL models, where A1111 uses a fixed
    layer (its OpenCLIP embedder; SDXL's CLIP-L too unless the non-default sdxl_clip_l_skip option is
    set), and the job's notes say so. Anything else is left as it is."""
    if "clip_skip" not in job.a1111 or job.request.clip_skip == 1 or family not in ("sd2", "sdxl"):
        return job
    note = Note("Clip skip", str(job.request.clip_skip), A1111_NO_CLIP_SKIP, honoured=True, fields=("clip_skip",))
    return replace(job, request=replace(job.request, clip_skip=1)).noting([note])


def random_seed() -> int:
    """A random seed in A1111's range (32 bits), from the OS's entropy (not the seeded generators)."""
    return int.from_bytes(os.urandom(4), "little")


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
