"""`ImageRequest`: the parameters of one image, in one place.

Every other place that names an image parameter derives it from these fields:
- the keys a JSONL prompt file may carry (`jobs.py`), type-checked against the annotations here;
- the `ldm generate` flags that override a job or a PNG's record (a flag's destination is the field's name);
- the output-template fields (`outputs.py`: fields marked `template`);
- the `ldm` JSON record in a PNG and its reader (`metadata.py`), and the A1111 infotext keys
  (fields marked `a1111`; Sampler / Schedule type / Size are spelled out there);
- the `ldm.default_<field>` values a model file may recommend (`detect.py`).
Adding a parameter is: a field here, its flag in `cli.py`, and its use in the engine.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ldmcli.limits import (DEFAULT_MAX_PIXELS, MAX_CFG_SCALE, MAX_CLIP_SKIP, MAX_DEEP_CACHE, MAX_PROMPT_CHARS, MAX_SEED,
                           MAX_STEPS, MAX_TOME)


def _param(default: Any, *, a1111: str | None = None, template: bool = False) -> Any:
    """A request field. a1111: its key in A1111's infotext, written and read as plain text;
    template: usable as an `-o` template field."""
    return field(default=default, metadata={"a1111": a1111, "template": template})


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """One image's parameters. The defaults are ldm's; a model may recommend others (`detect.py`).

    Fields are in A1111's infotext order. Sampler and schedule are written as A1111's `Sampler` and
    `Schedule type`, width and height as `Size` (`metadata.py`); the other `a1111` fields as they are.
    """

    prompt: str = _param("")
    negative_prompt: str = _param("")
    steps: int = _param(30, a1111="Steps", template=True)
    sampler: str = _param("euler_a", template=True)  # ours or A1111's name ("DPM++ 2M Karras"); see `checked`
    schedule: str | None = _param(None)  # None: the sampler name's own (Karras), else the model's timestep spacing
    cfg_scale: float = _param(7.5, a1111="CFG scale", template=True)
    seed: int = _param(0, a1111="Seed", template=True)  # the job's first image; image i gets seed + i
    width: int = _param(512, template=True)
    height: int = _param(512, template=True)
    # A1111's numbering: 1 = the model's own text-encoder layer, N = the layer N - 1 blocks earlier.
    clip_skip: int = _param(1, a1111="Clip skip", template=True)
    # Where the noise comes from: "cpu" torch's CPU generator (diffusers' and A1111's CPU setting),
    # "nv" the numbers torch.randn gives on an NVIDIA GPU (A1111's default there), on any device.
    rng: str = _param("cpu", a1111="RNG", template=True)
    # A prompt and negative prompt of different chunk counts: True pads the shorter with empty chunks
    # and runs both through the U-Net as one batch (A1111's "Pad prompt/negative prompt"); False runs
    # them as two passes, unpadded (A1111's default, so what its images without "Pad conds" used).
    pad_conds: bool = _param(True, a1111="Pad conds")
    # A1111's "eta noise seed delta": after the initial noise, image i's generator restarts at
    # seed + i + ensd for the samplers' later (ancestral) noise. 0: no restart.
    ensd: int = _param(0, a1111="ENSD")
    # Whose numerics to reproduce: "diffusers" (its schedulers' noise levels, rounded pixels) or "a1111"
    # (k-diffusion's noise levels as A1111 runs them: initial noise x sigma_max, fractional timesteps, its
    # uniform grid, its DDIM/PLMS grid; truncated pixels), so that an A1111 image's settings give its pixels.
    match: str = _param("diffusers", a1111="Match")
    # --- starting from an image (img2img, inpainting, outpainting; `img2img.py`, `image_input.py`) ---
    # The image to start from (a path; JSONL: relative to the prompt file); None: text to image. A1111's
    # text does not record it, only its "Denoising strength" (and "Mask blur"), written by `metadata.py`.
    init_image: str | None = _param(None)
    # The part of the steps run from the image (diffusers' `strength`, A1111's "Denoising strength"):
    # int(steps * strength) steps; 1 starts from the image noised all the way.
    strength: float = _param(0.75, template=True)
    # How an image of another size is fitted to width x height (A1111's resize modes): resize (stretch),
    # crop (cover, centre-crop), fill (fit, edges stretched into the rest).
    resize_mode: str = _param("resize")
    # Inpainting: a mask image of the init image's size, white (>= 50 % grey) = repaint, blurred by
    # `mask_blur` pixels (A1111's Gaussian) first; `invert_mask` repaints the black part instead.
    mask: str | None = _param(None)
    invert_mask: bool = _param(False)
    mask_blur: int = _param(4)  # A1111's default
    # Outpainting: "LEFT,TOP,RIGHT,BOTTOM" (or one number for all sides) pixels added around the init image,
    # filled from its edges and masked for repainting.
    pad: str | None = _param(None)
    # --- hires fix (`hires.py`): a first pass at width x height, an upscale by `hires_scale` (1 to 4), and an
    # img2img second pass of `hires_steps` (0: `steps`) at `hires_strength` (A1111's Hires upscale, Hires steps,
    # Hires upscaler, and Denoising strength, which it writes for both this and img2img) ---
    hires_scale: float | None = _param(None)  # None: no second pass
    hires_steps: int = _param(0)
    hires_strength: float = _param(0.7)  # A1111's hires default
    hires_upscaler: str = _param("latent")  # latent (A1111's "Latent", bilinear), lanczos, ...: `hires.HIRES_UPSCALERS`
    # --- the SDXL refiner (`refiner.py`): a model (path or name) that finishes from the base's latents once
    # `refiner_switch` of the way through the noise levels (diffusers' denoising_end/start; A1111's
    # "Refiner", "Refiner switch at") ---
    refiner: str | None = _param(None)
    refiner_switch: float = _param(0.8)
    # --- speed for fidelity: DeepCache (`deep_cache.py`): the U-Net's deep features recomputed on every N-th
    # evaluation only, the others run its outermost blocks on them. 0 (or 1): off, the exact computation.
    # ldm's own key in the A1111 text ("DeepCache"), written when on ---
    deep_cache: int = _param(0, a1111="DeepCache")
    # Token merging (`token_merging.py`, ToMe as A1111 applies it): this fraction of the tokens of each
    # full-resolution self-attention merged into their most similar neighbours first. 0: off, the exact
    # computation. A1111's "Token merging ratio", for every pass of the image ---
    tome: float = _param(0.0, a1111="Token merging ratio")

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs a negative (unconditional) pass: not at scale 1 (Turbo)."""
        return self.cfg_scale != 1

    @property
    def text_prompts(self) -> tuple[str, ...]:
        """The prompts the text encoder sees for this image."""
        return (self.prompt, self.negative_prompt) if self.guided else (self.prompt,)

    def checked(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRequest:
        """This request validated, with A1111 sampler names resolved ("DPM++ 2M Karras" ->
        dpmpp_2m + karras) and numbers in their field's type. Raises ValueError saying what is wrong.

        Everything that would fail or misbehave after the model loads is refused here: non-finite
        numbers, text that is not valid Unicode, sizes and step counts beyond `limits`.
        """
        from ldmcli.samplers import SAMPLERS, SCHEDULES, resolve_sampler_name

        for name in ("prompt", "negative_prompt"):
            check_text(getattr(self, name), name)
        for side in ("width", "height"):
            check_side(getattr(self, side), side)
        if self.width * self.height > max_pixels:
            raise ValueError(f"{self.width}x{self.height} is {self.width * self.height:,} pixels, more than the limit of "
                             f"{max_pixels:,} (--max-pixels raises it)")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2^64 - 1, got {self.seed}")
        if not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            raise ValueError(f"clip_skip must be between 1 and {MAX_CLIP_SKIP}, got {self.clip_skip}")
        if not 0 <= self.ensd <= MAX_SEED:
            raise ValueError(f"ensd must be between 0 and 2^64 - 1, got {self.ensd}")
        if self.rng not in RNGS:
            raise ValueError(f"rng must be one of {', '.join(RNGS)}, got {self.rng!r}")
        if not 0 <= self.deep_cache <= MAX_DEEP_CACHE:
            raise ValueError(f"deep_cache must be between 0 (off) and {MAX_DEEP_CACHE}, got {self.deep_cache}")
        if not (math.isfinite(self.tome) and 0 <= self.tome <= MAX_TOME):
            raise ValueError(f"the token merging ratio (tome, A1111's token_merging_ratio) must be between 0 (off) and "
                             f"{MAX_TOME}, got {self.tome}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {self.cfg_scale}")
        if abs(self.cfg_scale) > MAX_CFG_SCALE:
            raise ValueError(f"cfg_scale must be between -{MAX_CFG_SCALE} and {MAX_CFG_SCALE}, got {self.cfg_scale:g}")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        sampler, name_schedule = resolve_sampler_name(self.sampler)
        schedule = self.schedule or name_schedule
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r} (valid: {', '.join(SCHEDULES)})")
        if sampler == "lcm" and (self.match == "a1111" or schedule is not None or self.steps > LCM_MAX_STEPS):
            raise ValueError("the lcm sampler walks LCM's own grid of at most 50 steps, as diffusers' LCMScheduler: "
                             "no --schedule, steps 1 to 50, and A1111's LCM numerics (--match a1111) are not implemented")
        self._check_image_fields()
        upscaler = self._check_second_passes(sampler, max_pixels)
        if schedule is not None and self.match == "a1111" and SAMPLERS[sampler].a1111_timestep_sampler:
            raise ValueError(f"{SAMPLERS[sampler].display_name} matching A1111 walks A1111's own timestep grid: it "
                             f"takes no schedule (got {schedule!r})")
        # DeepCache at an interval of 1 recomputes everything: it is off, and written as off
        return replace(self, sampler=sampler, schedule=schedule, cfg_scale=float(self.cfg_scale), hires_upscaler=upscaler,
                       deep_cache=0 if self.deep_cache == 1 else self.deep_cache, tome=float(self.tome))

    @property
    def from_image(self) -> bool:
        """Whether this image starts from an init image (img2img, inpainting, outpainting)."""
        return self.init_image is not None

    def _check_image_fields(self) -> None:
        """The img2img fields: cheap checks only (the files are read before loading: `image_input`)."""
        from ldmcli.image_input import check_mask_blur, parse_pad, parse_resize_mode

        if not (0 < self.strength <= 1) or not math.isfinite(self.strength):
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        parse_resize_mode(self.resize_mode)
        check_mask_blur(self.mask_blur)
        if self.pad is not None:
            parse_pad(self.pad)
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or "\0" in value):
                raise ValueError(f"{name} {value!r} is not a file name")
        if not self.from_image:
            given = [name for name in ("mask", "pad") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]} needs an init image (--init-image)")
        elif self.match != "diffusers":
            raise ValueError("starting from an image with A1111's numerics (match a1111) is not reproduced yet: "
                             "use match diffusers")
        else:
            from ldmcli.samplers import first_step

            first_step(self.steps, self.strength)  # a strength that runs none of the steps

    def _check_second_passes(self, sampler: str, max_pixels: int) -> str:
        """The hires fix and refiner fields (cheap checks: the refiner's file is found before loading, in
        the CLI); returns the hires upscaler's ldm name."""
        from ldmcli.hires import check_hires, parse_upscaler
        from ldmcli.samplers import check_switch

        upscaler = parse_upscaler(self.hires_upscaler)
        check_switch(self.refiner_switch)
        if self.hires_scale is not None:
            check_hires(self.width, self.height, self.steps, scale=self.hires_scale, steps=self.hires_steps,
                        strength=self.hires_strength, upscaler=upscaler, sampler=sampler, max_pixels=max_pixels)
        passes = [name for name, on in (("an init image", self.from_image), ("hires fix", self.hires_scale is not None),
                                        ("a refiner", self.refiner is not None)) if on]
        if len(passes) > 1:
            raise ValueError(f"{' and '.join(passes)} together are not supported yet: one of them per image")
        if self.refiner is not None and (not self.refiner.strip() or "\0" in self.refiner):
            raise ValueError(f"refiner {self.refiner!r} is not a model name")
        if (self.hires_scale is not None or self.refiner is not None) and self.match != "diffusers":
            raise ValueError("hires fix and the refiner with A1111's numerics (match a1111) are not reproduced yet: "
                             "use match diffusers")
        return upscaler

    def record(self) -> dict[str, Any]:
        """Every field, as JSON values (the `ldm` PNG record; `from_mapping` reads it back)."""
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str, *, base: ImageRequest | None = None) -> ImageRequest:
        """`base` (default: the defaults) with `values` set: a JSONL line or a PNG's record.

        Every key must be a field and every value of the field's type; raises ValueError naming `where`.
        """
        check_values(values, where)
        return replace(base or cls(), **values)


# The noise generators (`ImageRequest.rng`).
RNGS = ("cpu", "nv")
# Whose numerics a request reproduces (`ImageRequest.match`): diffusers' schedulers (`schedule.py`) or
# A1111's (`schedule_a1111.py`), and their pixel rounding (`pipeline.decode_latents`).
MATCHES = ("diffusers", "a1111")
# The lcm sampler's steps are a subset of LCM's 50 original inference steps (`lcm.lcm_timesteps`).
LCM_MAX_STEPS = 50


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ImageRequest))


def template_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ImageRequest) if f.metadata["template"])


def a1111_keys() -> dict[str, str]:
    """Field name -> A1111 infotext key, for the fields written as plain `Key: value`."""
    return {f.name: f.metadata["a1111"] for f in fields(ImageRequest) if f.metadata["a1111"]}


def field_type(name: str) -> type:
    """The field's value type: `int`, `float`, `str` or `bool` (`X | None` gives X)."""
    hint = typing.get_type_hints(ImageRequest)[name]
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return kinds[0]


def parse_value(name: str, text: str) -> Any:
    """A field's value from text (A1111 infotext, safetensors metadata). Raises ValueError."""
    kind = field_type(name)
    if kind is bool:  # bool("False") is True: spell it out
        if text.strip().lower() not in ("true", "false"):
            raise ValueError(f"{name} must be True or False, got {text!r}")
        return text.strip().lower() == "true"
    return kind(text) if kind is not str else text


# A model file may recommend a value for any field in its safetensors header: `ldm.default_<field>`.
RECOMMENDATION_PREFIX = "ldm.default_"


def recommended_in_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The request values a model file's `ldm.default_*` header entries recommend (the demo model's
    steps, CFG and sampler). Raises ValueError for a value that is not of its field's type."""
    found = {}
    for name in field_names():
        text = metadata.get(RECOMMENDATION_PREFIX + name)
        if text is not None:
            found[name] = parse_value(name, text)
    return found


def check_values(values: Mapping[str, Any], where: str, *, extra: Mapping[str, type] | None = None) -> None:
    """Raise ValueError unless every key is a request field (or in `extra`) with a value of its type.

    JSON numbers: an int field takes only whole numbers (not true/false), a float field any finite
    number; a `str | None` field takes a string or null.
    """
    extra = extra or {}
    names = (*field_names(), *extra)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(names)})")
    for key, value in values.items():
        kind = extra.get(key) or field_type(key)
        optional = key not in extra and type(None) in typing.get_args(typing.get_type_hints(ImageRequest)[key])
        if value is None and optional:
            continue
        accepted = (int, float) if kind is float else (kind,)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
            raise ValueError(f"{where}: \"{key}\" must be {_kind_name(kind)}, got {_json(value)}")
        if kind is float:
            try:  # a whole number of 309 digits or more is beyond a float: math.isfinite raises OverflowError
                finite = math.isfinite(value)
            except OverflowError:
                raise ValueError(f"{where}: \"{key}\" must be a finite number, got a {len(str(abs(value)))}-digit "
                                 "number, beyond what a float holds") from None
            if not finite:
                raise ValueError(f"{where}: \"{key}\" must be a finite number, got {value}")


def check_text(text: str, name: str) -> None:
    """A prompt: valid Unicode (a lone surrogate comes from invalid UTF-8 on the command line or an
    escaped surrogate in JSON, and cannot be written to a PNG), no NUL, at most MAX_PROMPT_CHARS."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} has {len(text):,} characters, more than the limit of {MAX_PROMPT_CHARS:,}")
    if "\0" in text:
        raise ValueError(f"{name} contains a NUL character (at {text.index(chr(0))})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid Unicode: a lone surrogate at character {exc.start} "
                         "(invalid UTF-8 on the command line, or an escaped surrogate in JSON)") from None


def check_side(pixels: int, side: str) -> None:
    """A width or height: positive and a multiple of 8 (the VAE downsamples by 8)."""
    if pixels < 8 or pixels % 8:
        raise ValueError(f"{side} {pixels} is not a positive multiple of 8")


def _kind_name(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, default=str)
