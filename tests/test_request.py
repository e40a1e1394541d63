"""ImageRequest is the one home of an image's parameters: every field reaches every place that names
parameters (JSONL keys, flags, template fields, the PNG record and A1111 text, --from-png) without
being listed again. Round trips are property-tested with Hypothesis over every field."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldmcli.cli import generate
from ldmcli.errors import LdmError
from ldmcli.jobs import ImageTask, Job, check_job, command_line_job, read_prompt_file
from ldmcli.metadata import A1111_KEY, LDM_KEY, image_record, png_text, request_from_png_text
from ldmcli.outputs import TEMPLATE_FIELDS, plan_images
from ldmcli.request import ImageRequest, field_names
from ldmcli.samplers import SAMPLERS, SCHEDULES

# Prompt text that A1111's infotext carries unchanged: one line, no surrounding blanks.
_WORDS = st.text(st.sampled_from("abcxyz019 ,()[]:|<>.-'"), max_size=40).map(str.strip)


def _strategy(name: str):
    """A valid value for each field. A new field without an entry here fails `test_strategies_cover_every_field`."""
    return {
        "prompt": _WORDS.filter(bool),
        "negative_prompt": _WORDS,
        "steps": st.integers(1, 1000),
        "sampler": st.sampled_from(sorted(SAMPLERS)),
        "schedule": st.sampled_from(sorted(SCHEDULES)),
        "cfg_scale": st.floats(0, 30, allow_nan=False).map(lambda x: round(x, 3)),
        "seed": st.integers(0, 2**63 - 1),
        "width": st.integers(1, 256).map(lambda n: 8 * n),
        "height": st.integers(1, 256).map(lambda n: 8 * n),
        "clip_skip": st.integers(1, 12),
        "rng": st.sampled_from(["cpu", "nv"]),  # written out, not taken from request.RNGS
        "pad_conds": st.booleans(),
        "ensd": st.sampled_from([0, 31337]) | st.integers(0, 2**32),
        "match": st.sampled_from(["diffusers", "a1111"]),
        "init_image": st.none() | st.sampled_from(["in.png", "/abs/a b.png", "dir/é.jpg"]),
        "strength": st.floats(0.01, 1).map(lambda x: round(x, 3)),
        "resize_mode": st.sampled_from(["resize", "crop", "fill"]),
        "mask": st.none() | st.sampled_from(["mask.png", "/abs/m.png"]),
        "invert_mask": st.booleans(),
        "mask_blur": st.integers(0, 64),
        "pad": st.none() | st.sampled_from(["8", "0,16,8,0", "64,64,64,64"]),
        "hires_scale": st.none() | st.sampled_from([1.0, 1.5, 2.0]),
        "hires_steps": st.integers(0, 50),
        "hires_strength": st.floats(0.3, 1).map(lambda x: round(x, 3)),
        # written out, not taken from hires.HIRES_UPSCALERS: ldm's names (A1111's are read back as these)
        "hires_upscaler": st.sampled_from(["latent", "lanczos", "latent-nearest", "latent-bicubic"]),
        "refiner": st.none() | st.sampled_from(["sd_xl_refiner_1.0", "/models/refiner.safetensors"]),
        "refiner_switch": st.floats(0.05, 0.95).map(lambda x: round(x, 3)),
        "deep_cache": st.sampled_from([0, 2, 3]) | st.integers(0, 100),
        "tome": st.sampled_from([0.0, 0.5]) | st.floats(0, 0.9).map(lambda x: round(x, 3)),
    }[name]


# Matching A1111, DDIM and PLMS take no schedule: they walk A1111's own grid; LCM walks its own (at most 50 steps).
# A mask or padding needs an init image; starting from one matches diffusers only.
requests = st.builds(ImageRequest, **{name: _strategy(name) for name in field_names()}).filter(
    lambda r: not (r.match == "a1111" and r.sampler in ("ddim", "plms")) and r.sampler != "lcm"
    and (r.init_image is not None or (r.mask is None and r.pad is None))
    and (r.init_image is None or int(r.steps * r.strength) >= 1)  # a strength that runs a step
    # one of an init image, a hires fix, a refiner; none with A1111's numerics
    and sum((r.init_image is not None, r.hires_scale is not None, r.refiner is not None)) <= 1
    and not ((r.init_image or r.hires_scale or r.refiner) is not None and r.match == "a1111")
    and (r.hires_scale is None or r.width * r.height * r.hires_scale ** 2 <= 1024 * 1024)
    and (r.hires_scale is None or int((r.hires_steps or r.steps) * r.hires_strength) >= 1))  # a second pass that runs a step

# A loaded model as the record writer sees it.
MODEL = SimpleNamespace(
    name="tiny", path=Path("tiny.safetensors"), hash="0123456789", dtype=torch.float32,
    spec=SimpleNamespace(family="sd1", prediction_type="epsilon", schedule=SimpleNamespace(timestep_spacing="leading")),
    loras=(), embeddings=None, vae_file=None, taesd_file=None,  # nothing added to the checkpoint
    # the refiners a request may name, loaded: A1111's text calls each by its file's name and hash
    refiners={"sd_xl_refiner_1.0": SimpleNamespace(name="sd_xl_refiner_1.0", path=Path("r.safetensors"), hash="7440042bbd"),
              "/models/refiner.safetensors": SimpleNamespace(name="refiner", path=Path("/models/refiner.safetensors"),
                                                             hash=None)},
)


def _png_text(request: ImageRequest) -> dict[str, str]:
    task = ImageTask(Job(request), 0, 0, 0, request.seed, Path("x.png"))
    return png_text(MODEL, image_record(MODEL, task))


def test_strategies_cover_every_field() -> None:
    for name in field_names():
        _strategy(name)


@settings(max_examples=150, deadline=None)
@given(requests)
def test_ldm_record_round_trips_every_field(request: ImageRequest) -> None:
    recorded, given_fields, _ = request_from_png_text({LDM_KEY: _png_text(request)[LDM_KEY]}, "x.png")
    assert recorded == request
    assert given_fields == set(field_names())


@settings(max_examples=150, deadline=None)
@given(requests)
def test_a1111_text_round_trips_every_field(request: ImageRequest) -> None:
    """Read as A1111 would leave it (no ldm chunk); ldm writes the model's own spacing as "Uniform"."""
    recorded, _, model = request_from_png_text({A1111_KEY: _png_text(request)[A1111_KEY]}, "x.png")
    expected = request if SCHEDULES[request.schedule].display_name else replace(request, schedule=None)
    default_request = ImageRequest()
    # A1111's text records an img2img image's strength (and an inpainted one's mask blur), not its files
    default = ImageRequest()
    masked = request.from_image and (request.mask is not None or request.pad is not None)
    if request.refiner is not None:  # A1111 names a refiner by its file's name (and hash)
        expected = replace(expected, refiner=MODEL.refiners[request.refiner].name)
    else:  # the refiner's and the hires fix's settings are written only when they are on
        expected = replace(expected, refiner_switch=default_request.refiner_switch)
    if request.hires_scale is None:
        expected = replace(expected, hires_steps=default_request.hires_steps,
                           hires_strength=default_request.hires_strength, hires_upscaler=default_request.hires_upscaler)
    expected = replace(expected, init_image=None, mask=None, pad=None, resize_mode=default.resize_mode,
                       invert_mask=default.invert_mask,
                       strength=request.strength if request.from_image else default.strength,
                       mask_blur=request.mask_blur if masked else default.mask_blur)
    assert recorded.checked() == expected.checked()
    assert model == {"name": "tiny", "hash": "0123456789"}


@settings(max_examples=100, deadline=None)
@given(requests)
def test_jsonl_takes_every_field(tmp_path_factory, request: ImageRequest) -> None:
    path = tmp_path_factory.mktemp("jsonl") / "p.jsonl"
    path.write_text(json.dumps({**request.record(), "batch_count": 2, "name": "n"}) + "\n", encoding="utf-8")
    (job,) = read_prompt_file(str(path), command_line_job({}))
    # a file's relative paths are relative to its folder
    beside = {name: str(path.parent / value) for name in ("init_image", "mask")
              if (value := getattr(request, name)) is not None and not Path(value).is_absolute()}
    assert job.request == replace(request, **beside) and job.given == set(field_names())
    assert (job.batch_count, job.name) == (2, "n")


def test_every_field_but_the_prompt_has_a_flag_named_after_it() -> None:
    """The CLI finds the fields a user set by their flags' destinations."""
    flags = {p.name for p in generate.params}
    assert set(field_names()) - {"prompt"} <= flags


def test_template_fields_are_the_request_fields_marked_for_templates() -> None:
    marked = {f.name for f in fields(ImageRequest) if f.metadata["template"]}
    assert marked == {"seed", "steps", "sampler", "cfg_scale", "width", "height", "clip_skip", "rng", "strength"}
    assert marked <= set(TEMPLATE_FIELDS)
    request = ImageRequest(prompt="a cat", seed=5, steps=7, sampler="heun", cfg_scale=3.0, width=64, height=80)
    template = "_".join(f"{{{name}}}" for name in TEMPLATE_FIELDS) + ".png"
    (task,) = plan_images([Job(request, name="n")], template)
    assert task.path == Path("0_0_0_a-cat_n_7_heun_3.0_5_64_80_1_cpu_0.75.png")  # run fields, then field order


def test_one_set_of_defaults() -> None:
    """The request's defaults are the CLI's and the engine's: no second table to disagree."""
    job = check_job(command_line_job({}).setting(prompt="a cat"))
    assert job.request == ImageRequest(prompt="a cat")
    assert (job.request.sampler, job.request.steps, job.request.cfg_scale) == ("euler_a", 30, 7.5)


def test_model_recommendations_fill_only_what_nobody_set() -> None:
    recommended = {"steps": 1, "cfg_scale": 1.0, "width": 1024, "height": 1024}
    job = check_job(command_line_job({"steps": 4}).setting(prompt="a cat"), recommended)
    assert (job.request.steps, job.request.cfg_scale, job.request.width) == (4, 1.0, 1024)


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
    ({"steps": 1001}, "steps must be between 1 and 1000, got 1001"),
    ({"width": 60}, "width 60 is not a positive multiple of 8"),
    ({"width": 2056, "height": 2048}, "2056x2048 is 4,210,688 pixels, more than the limit of 4,194,304"),
    ({"seed": -2}, "seed must be between 0 and 2^64 - 1, got -2"),  # -1 asks for a random seed
    ({"seed": 2**64}, "seed must be between 0 and 2^64 - 1"),
    ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number"),
    ({"prompt": "a \udc80 cat"}, "prompt is not valid Unicode: a lone surrogate at character 2"),
    ({"negative_prompt": "a\0b"}, "negative_prompt contains a NUL character"),
    ({"prompt": "x" * 65537}, "prompt has 65,537 characters, more than the limit of 65,536"),
    ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
    ({"cfg_scale": 1e308}, "cfg_scale must be between -100 and 100, got 1e+308"),
    ({"cfg_scale": -100.5}, "cfg_scale must be between -100 and 100, got -100.5"),
    ({"sampler": "nope"}, "nope"),
    ({"schedule": "nope"}, "unknown schedule 'nope'"),
])
def test_check_job_names_the_source(values, message) -> None:
    job = replace(command_line_job({}).setting(prompt="a cat").setting(**values), source="p.jsonl:3")
    with pytest.raises(LdmError, match=f"^p.jsonl:3: .*{re.escape(message)}"):
        check_job(job)


def test_guidance_decided_once() -> None:
    assert ImageRequest(prompt="a", negative_prompt="b").text_prompts == ("a", "b")
    assert ImageRequest(prompt="a", negative_prompt="b", cfg_scale=1.0).text_prompts == ("a",)


def test_from_png_takes_the_record_and_only_the_flags_given(tmp_path) -> None:
    import numpy as np

    from ldmcli.image import save_png
    from ldmcli.jobs import job_from_png

    request = ImageRequest(prompt="a cat", negative_prompt="a dog", steps=7, seed=3, width=64, height=72).checked()
    path = tmp_path / "x.png"
    save_png(np.zeros((8, 8, 3), np.uint8), path, overwrite=False, text=_png_text(request))
    job, model = job_from_png(path, command_line_job({"steps": 9}, batch_count=2))
    # the record names the model's own spacing ("leading") where the request left it to the model
    assert job.request == replace(request, steps=9, schedule="leading")
    assert job.given == set(field_names()) and job.batch_count == 2
    assert model["hash"] == "0123456789" and "path" not in model  # tiny.safetensors does not exist here


@pytest.mark.parametrize("cfg_scale, batch", [(1.0, 1), (5.0, 2)])
def test_guidance_scale_one_runs_no_unconditional_pass(tiny_folder, cfg_scale, batch) -> None:
    from ldmcli import pipeline

    model = pipeline.load(tiny_folder)
    seen = []
    model.unet.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    request = ImageRequest(prompt="a cat", negative_prompt="a dog", steps=2, cfg_scale=cfg_scale, sampler="euler",
                           width=64, height=64)
    pipeline.sample_latents(model, request, [0])
    assert seen == [batch, batch]


@pytest.mark.parametrize("key, value, message", [
    ("steps", True, '"steps" must be a whole number, got true'),
    ("steps", 2.5, '"steps" must be a whole number, got 2.5'),
    ("cfg_scale", False, '"cfg_scale" must be a number, got false'),
    ("cfg_scale", "7", '"cfg_scale" must be a number, got "7"'),
    ("sampler", None, '"sampler" must be a string, got null'),
    ("batch_count", "2", '"batch_count" must be a whole number, got "2"'),
    ("stpes", 2, "unknown field(s) stpes (known: prompt, negative_prompt, steps,"),
])
def test_jsonl_types_follow_the_fields(tmp_path, key, value, message) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", key: value}) + "\n", encoding="utf-8")
    with pytest.raises(LdmError) as caught:
        read_prompt_file(str(path), command_line_job({}))
    assert str(caught.value).startswith(f"{path}:1: ") and message in str(caught.value)


def test_jsonl_schedule_may_be_null(tmp_path) -> None:
    """`schedule` is `str | None`: null asks for the model's own spacing, as when the key is absent."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "schedule": null}\n', encoding="utf-8")
    (job,) = read_prompt_file(str(path), command_line_job({"schedule": "karras"}))
    assert job.request.schedule is None


# --- review findings --------------------------------------------------------------------------------


def test_an_a1111_sampler_name_brings_its_schedule_from_the_same_source(tmp_path) -> None:
    """A JSONL line's "DPM++ 2M Karras" beats the command line's --schedule; a flag's beats a PNG's record."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "sampler": "DPM++ 2M Karras"}\n{"prompt": "b", "sampler": "DPM++ 2M"}\n')
    karras, plain = (check_job(j) for j in read_prompt_file(str(path), command_line_job({"schedule": "exponential"})))
    assert (karras.request.sampler, karras.request.schedule) == ("dpmpp_2m", "karras")
    assert (plain.request.sampler, plain.request.schedule) == ("dpmpp_2m", "exponential")
    both = check_job(command_line_job({"sampler": "DPM++ 2M Karras", "schedule": "exponential"}).setting(prompt="a"))
    assert both.request.schedule == "exponential"  # the same source naming both: its explicit schedule


def test_unknown_jsonl_key_is_named_before_a_missing_prompt(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"promt": "a cat"}\n')
    with pytest.raises(LdmError, match="unknown field"):
        read_prompt_file(str(path), command_line_job({}))


def test_a1111_text_without_a_seed_leaves_it_unset() -> None:
    request, given_fields, _ = request_from_png_text({A1111_KEY: "a cat\nSteps: 5, Sampler: Euler, CFG scale: 4"}, "x")
    assert "seed" not in given_fields and request.steps == 5


def test_every_recommendation_names_a_field() -> None:
    """check_job ignores keys that are not fields, so a misspelt recommendation would vanish silently."""
    from ldmcli.detect import TURBO_RECOMMENDED

    assert set(TURBO_RECOMMENDED) <= set(field_names())


def test_the_schedule_flag_offers_every_schedule() -> None:
    from ldmcli.cli import SCHEDULES as FLAG_CHOICES

    assert set(FLAG_CHOICES) == set(SCHEDULES)


def test_a_bool_field_would_round_trip(monkeypatch) -> None:
    """The machinery handles every field type a parameter may have: a bool too (JSON true/false, "True" in text)."""
    from dataclasses import make_dataclass

    import ldmcli.request as rq

    extended = make_dataclass("Extended", [("tiling", bool, rq._param(False, a1111="Tiling"))],
                              bases=(rq.ImageRequest,), frozen=True, kw_only=True)
    monkeypatch.setattr(rq, "ImageRequest", extended)
    rq.check_values({"tiling": True}, "x")
    with pytest.raises(ValueError, match='"tiling" must be true or false, got 1'):
        rq.check_values({"tiling": 1}, "x")
    assert rq.parse_value("tiling", "False") is False and rq.parse_value("tiling", "True") is True
    with pytest.raises(ValueError):
        rq.parse_value("tiling", "maybe")


def test_guidance_below_one_still_runs_the_negative_pass() -> None:
    assert ImageRequest(prompt="a", negative_prompt="b", cfg_scale=0.5).text_prompts == ("a", "b")
    assert ImageRequest(prompt="a", negative_prompt="b", cfg_scale=0.0).guided
