"""A1111 API requests in, A1111 API responses out.

In: the body of `POST /sdapi/v1/txt2img` or `img2img` becomes the `Job` that `ldm generate` runs for the
same request as a JSONL line (`jobs.object_job`, which reads A1111's requests: its keys, its defaults,
its notes), so the server and the command line make the same PNG bytes. What only the API has is read
here: img2img's base64 images (written to files `image_input` reads, named by their content), its
resize mode and inpainting keys, and the server's settings (`POST /sdapi/v1/options`) as the
`override_settings` a request leaves out. What a client may name is checked here too: models and LoRAs
only by the names the server lists, never a path on the server (ldm's own path keys are refused).

Out: A1111's response, `{"images": [base64 PNG], "parameters": the request, "info": JSON text}`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ldmcli.errors import LdmError
from ldmcli.jobs import Job, command_line_job, object_job
from ldmcli.limits import MAX_IMAGES_PER_REQUEST
from ldmcli.metadata import Note, printable


class RequestError(LdmError):
    """A request the server refuses before queueing it: HTTP 422, the message as A1111's `detail`."""


# The server's settings a request's override_settings may also set, and the request field each sets
# (`jobs._read_a1111_request` reads them; a request giving the field itself keeps its own).
SETTING_FIELDS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_noise_seed_delta": "ensd", "randn_source": "rng",
                  "pad_cond_uncond": "pad_conds"}

# ldm's request keys that name a file on the machine ldm runs on: fine in a JSONL file of one's own, never
# from a client (an img2img request sends its images as base64; LoRAs are named in the prompt's tags).
PATH_KEYS = ("init_image", "mask", "lora")

# A1111's img2img keys that the inpainting engine has no counterpart for, and what ldm does instead.
_INPAINT = "ldm inpaints as diffusers' pipelines do, from the image itself noised (A1111's \"original\")"
_WHOLE = "ldm inpaints the whole image (A1111's \"Whole picture\"); \"Only masked\" is not supported"

WHERE = "request"


class InputStore:
    """The files a request's base64 images become: `folder/<sha256 of the bytes>.<format>`. Named by their
    content, so the same image sent twice is one file, and an image's `ldm` record names a file that holds
    exactly what was sent.

    A file lives while a request uses it (`put` ... `release`). With `keep` (--output-dir) the files of
    accepted requests stay, beside the images whose records name them (`--from-png` of a served image
    works); a refused request's files never do (else any client could fill the disk with 422s). Without
    `keep` (a temporary folder) every file goes once no request uses it."""

    def __init__(self, folder: Path, keep: bool = True):
        self.folder, self.keep = Path(folder), keep
        self._lock = threading.Lock()
        self._users: Counter[Path] = Counter()
        self._kept: set[Path] = set()  # files an accepted request made with `keep`, or there before

    def put(self, data: bytes, what: str, uses: list[tuple[Path, str]]) -> Path:
        """The file holding `data`, written if new; recorded in `uses` (path, the request field it came from)
        until `release`."""
        from ldmcli.image import TEMP_SUFFIX

        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.{_format(data)}"
        with self._lock:
            if path.is_file():
                if not self._users[path]:
                    self._kept.add(path)  # there before this server made it: never deleted
            else:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
                tmp.write_bytes(data)
                tmp.replace(path)
            self._users[path] += 1
        uses.append((path, what))
        return path

    def release(self, uses: list[tuple[Path, str]], accepted: bool) -> None:
        """The request that `put` these is answered (or refused): delete the files nothing else needs."""
        with self._lock:
            for path, _ in uses:
                self._users[path] -= 1
                if accepted and self.keep:
                    self._kept.add(path)
                if self._users[path] <= 0:
                    del self._users[path]
                    if path not in self._kept:
                        path.unlink(missing_ok=True)
            uses.clear()

    @staticmethod
    def hide(message: str, uses: list[tuple[Path, str]]) -> str:
        """`message` with the server's paths of a request's images replaced by the fields they came from."""
        for path, what in uses:
            message = message.replace(str(path), what)
        return message


def _format(data: bytes) -> str:
    """A file suffix for an image's bytes (the reader goes by the content, `image_input.IMAGE_FORMATS`)."""
    if data.startswith(b"\x89PNG"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def decode_image(value: Any, what: str) -> bytes:
    """A base64 image as A1111 takes one: plain base64, or a data URL (`data:image/png;base64,...`)."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f'{WHERE}: "{what}" must be a base64-encoded image, got {_shown(value)}')
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f'{WHERE}: "{what}" is not base64 (an image encoded as A1111 sends it)') from None


def request_job(body: Any, kind: str, inputs: InputStore, settings: Mapping[str, Any],
                uses: list[tuple[Path, str]]) -> Job:
    """The job of a txt2img or img2img (`kind`) request body, as `ldm generate` reads the same request in a
    JSONL file; `settings`: the server's (`POST /sdapi/v1/options`), for what the request leaves out; the
    files its images became are added to `uses` (`InputStore.put`), for the caller to release.
    RequestError (or another LdmError) for anything wrong, naming it."""
    if not isinstance(body, dict):
        raise RequestError(f"{WHERE}: the body must be a JSON object (A1111's {kind} request), got {_shown(body)}")
    payload = dict(body)
    # (img2img's "mask" is A1111's: a base64 image, read below)
    given = [key for key in PATH_KEYS if key in payload and not (kind == "img2img" and key == "mask")]
    if given:
        raise RequestError(f'{WHERE}: "{given[0]}" names a file on the server, which clients cannot: send images as '
                           "base64 (img2img's init_images and mask) and LoRAs as <lora:NAME:W> tags in the prompt")
    notes: list[Note] = []
    if kind == "img2img":
        payload, notes = _img2img_keys(payload, inputs, uses)
    payload = _with_settings(payload, settings)
    payload.setdefault("prompt", "")  # A1111's default; a JSONL line must say it
    job = replace(object_job(payload, command_line_job({}), WHERE, a1111=True), source=WHERE)
    if job.batch_count > MAX_IMAGES_PER_REQUEST:
        raise RequestError(f"{WHERE}: {job.batch_count} images (n_iter x batch_size): the limit is "
                           f"{MAX_IMAGES_PER_REQUEST} a request; send more requests")
    return job.noting(notes)


def check_names(job: Job, lora_folder: Path | None) -> None:
    """The LoRAs a prompt's tags name and the refiner a request names: only ones the server lists
    (`server_models`), never a path. RequestError (or ModelNameError) otherwise."""
    from ldmcli.lora_uses import lora_tags
    from ldmcli.server_models import find_listed, listed_loras

    loras = {lora["name"] for lora in listed_loras(lora_folder)}
    for name, _ in lora_tags(job.request.prompt):
        if name not in loras:
            raise RequestError(f"{WHERE}: <lora:{printable(name, 60)}> is not a LoRA /sdapi/v1/loras lists: prompts "
                               "name LoRAs by those names only")
    if job.request.refiner is not None:
        find_listed(job.request.refiner, "refiner_checkpoint")


def _img2img_keys(payload: dict, inputs: InputStore, uses: list[tuple[Path, str]]) -> tuple[dict, list[Note]]:
    """An img2img request's own keys read into ldm's request keys (init_image and mask as files, resize mode
    by name, invert and blur), and notes for those ldm does not honour."""
    from ldmcli.image_input import parse_resize_mode

    images = payload.pop("init_images", None)
    if not isinstance(images, list) or not images:
        raise RequestError(f'{WHERE}: "init_images" must be a list of base64-encoded images (at least one), '
                           f"got {_shown(images)}")
    values: dict[str, Any] = {"init_image": str(inputs.put(decode_image(images[0], "init_images[0]"), "init_images[0]", uses))}
    notes: list[Note] = []
    if len(images) > 1:
        notes.append(Note("init_images", f"{len(images)} images", "only the first is used, for every image of the "
                          "request (A1111 takes image i from init_images[i])"))
    mask = payload.pop("mask", None)
    if mask not in (None, ""):
        values["mask"] = str(inputs.put(decode_image(mask, "mask"), "mask", uses))
    mode = payload.pop("resize_mode", None)
    if mode is not None:
        try:
            values["resize_mode"] = parse_resize_mode(mode).name.lower()
        except LdmError as exc:
            raise RequestError(f'{WHERE}: "resize_mode": {exc}') from None
    invert = payload.pop("inpainting_mask_invert", None)
    if invert is not None:
        if invert not in (0, 1):  # True and False are 1 and 0
            raise RequestError(f'{WHERE}: "inpainting_mask_invert" must be 0 or 1, got {_shown(invert)}')
        values["invert_mask"] = bool(invert)
    masked = "mask" in values
    for key, why, off in (("inpainting_fill", _INPAINT, (1,)), ("inpaint_full_res", _WHOLE, (False, 0, None)),
                          ("initial_noise_multiplier", "ldm noises the image as diffusers does (multiplier 1)", (1, None)),
                          ("latent_mask", "a separate latent mask is not supported", (None, ""))):
        value = payload.pop(key, None)
        if key in ("inpainting_fill", "inpaint_full_res") and not masked:
            continue  # inpainting keys: nothing to honour without a mask
        if value not in off and not (key == "inpainting_fill" and value is None):
            notes.append(Note(key, _json(value), why))
    blur = payload.get("mask_blur", 4)
    for key in ("mask_blur_x", "mask_blur_y"):
        value = payload.pop(key, None)
        if masked and value is not None and value != blur:
            notes.append(Note(key, _json(value), "ldm blurs the mask by mask_blur on both axes"))
    # Without effect on ldm's images: InstructPix2Pix's image guidance, the padding of "Only masked", whether
    # the response repeats the init images (`response`).
    for key in ("image_cfg_scale", "inpaint_full_res_padding", "include_init_images"):
        payload.pop(key, None)
    payload.update(values)
    return payload, notes


def _with_settings(payload: dict, settings: Mapping[str, Any]) -> dict:
    """The request with the server's settings as the override_settings it leaves out (neither it nor its
    own override_settings, nor ldm's key for the same thing, sets them)."""
    overrides = payload.get("override_settings")
    if not settings or not (overrides is None or isinstance(overrides, dict)):
        return payload  # a malformed override_settings is the reader's to refuse
    missing = {key: value for key, value in settings.items()
               if key not in (overrides or {}) and SETTING_FIELDS[key] not in payload}
    return {**payload, "override_settings": {**missing, **(overrides or {})}} if missing else payload


def echoed(body: Mapping[str, Any]) -> dict:
    """The request as A1111's response repeats it (`parameters`): its init images and mask only when it asked
    for them (include_init_images), as A1111 does."""
    if body.get("include_init_images"):
        return dict(body)
    return {**body, **{key: None for key in ("init_images", "mask") if key in body}}


def response(body: Mapping[str, Any], made: list, model, job: Job, *, interrupted: bool, failed: int,
             send_images: bool = True) -> dict:
    """A1111's txt2img/img2img response for the images `made` (`run.MadeImage`) of `job`.

    `info` is a JSON text, as A1111's: its keys (prompt, all_prompts, seed, all_seeds, infotexts, width,
    height, sampler_name, steps, cfg_scale, ...), each image's infotext being its PNG's `parameters` text;
    and ldm's: what the request asked for that ldm did not do (`not_honoured`), the rest worth saying
    (`notes`), whether /interrupt or a shutdown stopped it (`interrupted`, the images not made left out) and
    how many images failed (`failed`)."""
    from ldmcli.generation import output_size
    from ldmcli.metadata import A1111_KEY, png_text
    from ldmcli.samplers import SAMPLERS

    request = job.request
    seeds = [image.task.seed for image in made] or [request.seed]
    width, height = output_size(request)
    count = len(made)
    a1111 = request.match == "a1111"
    info = {
        "prompt": request.prompt, "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * count,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": width, "height": height, "sampler_name": SAMPLERS[request.sampler].display_name,
        "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": body.get("batch_size", 1) or 1,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.hash,
        "sd_vae_name": None if model.vae_file is None else Path(model.vae_file.source).name, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": _strength(request),
        "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [png_text(model, image.record)[A1111_KEY] for image in made],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": bool(model.spec.inpainting and request.from_image),
        "version": _version(),
        # ldm's own
        "numerics": "a1111" if a1111 else "diffusers",
        "not_honoured": job.not_honoured, "notes": job.remarks, "interrupted": interrupted, "failed": failed,
    }
    images = [base64.b64encode(image.png).decode("ascii") for image in made] if send_images else []
    return {"images": images, "parameters": echoed(body), "info": json.dumps(info, ensure_ascii=False)}


def _strength(request) -> float | None:
    if request.from_image:
        return request.strength
    return request.hires_strength if request.hires_scale is not None else None


def _version() -> str:
    from ldmcli import __version__

    return f"ldm {__version__}"


def _json(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text[:40] + ("..." if len(text) > 40 else "")
