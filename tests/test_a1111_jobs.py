"""Prompt files as A1111 users have them: JSONL lines holding A1111's txt2img request, lines of its
"Prompts from file or textbox" script, `"seed": -1`, and extra-network tags (`<lora:...>`) in any
prompt, each noted rather than dropped. Through the real CLI on the tiny SD1 model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldmcli.cli import cli
from ldmcli.errors import LdmError
from ldmcli.jobs import (
    A1111_API_DEFAULTS,
    A1111_PARAMS,
    A1111_REQUEST_KEYS,
    SCRIPT_OPTIONS,
    check_job,
    command_line_job,
    read_prompt_file,
)
from ldmcli.request import field_names

TINY = ["-W", "64", "-H", "64", "--steps", "2"]


def invoke(*args, env=None, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]


def note_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note: ")]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture
def no_loading(monkeypatch):
    from ldmcli import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "load", refuse)


# An A1111 txt2img request as its API takes it (and returns it as "parameters"), the inert keys included.
A1111_REQUEST = {
    "prompt": "a red circle", "negative_prompt": "blurry", "steps": 2, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
    "cfg_scale": 5, "seed": 3, "width": 64, "height": 64, "n_iter": 2, "batch_size": 2,
    "override_settings": {"CLIP_stop_at_last_layers": 2, "randn_source": "CPU", "sd_vae": "Automatic"},
    "override_settings_restore_afterwards": True, "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent",
    "denoising_strength": 0.7, "restore_faces": True, "tiling": False, "styles": [], "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "eta": None, "s_noise": 1.0,
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "script_args": [], "sampler_index": "Euler",
}


def test_a_saved_a1111_request_runs_unchanged(tmp_path, tiny_single_file):
    """Its images are the ones ldm's own keys for the same request make; what ldm cannot do is noted."""
    theirs, ours = tmp_path / "theirs.jsonl", tmp_path / "ours.jsonl"
    theirs.write_text(json.dumps(A1111_REQUEST) + "\n")
    ours.write_text(json.dumps({"prompt": "a red circle", "negative_prompt": "blurry", "steps": 2, "sampler": "dpmpp_2m",
                                "schedule": "karras", "cfg_scale": 5, "seed": 3, "width": 64, "height": 64,
                                "batch_count": 4, "clip_skip": 2, "rng": "cpu", "match": "a1111"}) + "\n")
    made = {}
    for name, path in (("theirs", theirs), ("ours", ours)):
        result = invoke("generate", "--prompts", path, "-m", tiny_single_file, "--json", "-o", f"{tmp_path / name}/")
        assert result.exit_code == 0, result.output
        made[name] = records(result)
    assert [r["seed"] for r in made["theirs"]] == [3, 4, 5, 6]  # n_iter x batch_size images, seed + i
    first = made["theirs"][0]
    assert (first["sampler"], first["schedule"], first["clip_skip"], first["rng"]) == ("dpmpp_2m", "karras", 2, "cpu")
    assert first["not_honoured"] == [{"key": "restore_faces", "value": "true",
                                      "why": "face restoration, a post-processing model, is not supported"}]
    assert first["notes"] == [] and made["ours"][0]["not_honoured"] == []
    for a, b in zip(made["theirs"], made["ours"]):
        assert np.array_equal(pixels(a["path"]), pixels(b["path"]))


@pytest.mark.parametrize("settings_, flags, rng, noted", [
    ({}, [], "nv", True),  # A1111's default noise source: GPU, which NVIDIA's numbers (nv) reproduce
    ({"randn_source": "GPU"}, [], "nv", True),
    ({"randn_source": "NV"}, [], "nv", False),
    ({"randn_source": "CPU"}, [], "cpu", False),
    ({}, ["--rng", "cpu"], "cpu", False),  # the command line said: its default, not A1111's
])
def test_a1111_noise_source(tmp_path, settings_, flags, rng, noted):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "n_iter": 1, "override_settings": settings_}) + "\n")
    flag_values = {"rng": flags[1]} if flags else {}
    (job,) = read_prompt_file(str(path), command_line_job(flag_values))
    assert job.request.rng == rng
    assert [n.key for n in job.notes if n.honoured] == (["override_settings.randn_source" if settings_ else "randn_source"]
                                                        if noted else [])


def test_hires_keys_are_read_only_when_hires_is_on(tmp_path):
    """enable_hr on: A1111's hires keys (its defaults for those left out: hr_upscaler Latent, second-pass steps
    0) become the request's hires fix, made with diffusers' numerics (noted); off: nothing is read or noted."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5}) + "\n"
                    + json.dumps({"prompt": "b", "enable_hr": False, "hr_scale": 2, "denoising_strength": 0.5}) + "\n"
                    + json.dumps({"prompt": "c", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}) + "\n"
                    + json.dumps({"prompt": "d", "refiner_checkpoint": "sd_xl_refiner_1.0 [7440042bbd]",
                                  "refiner_switch_at": 0.7}) + "\n")
    on, off, esrgan, refined = read_prompt_file(str(path), command_line_job({}))
    r = on.request
    assert (r.hires_scale, r.hires_strength, r.hires_steps, r.hires_upscaler, r.match) == (2.0, 0.5, 0, "latent", "diffusers")
    assert {n.key for n in on.notes if not n.honoured} == {"match"}
    assert off.request.hires_scale is None and off.request.match == "a1111"
    assert [n.key for n in off.notes if not n.honoured] == []
    assert (esrgan.request.hires_scale, esrgan.request.hires_strength, esrgan.request.hires_upscaler) == (2.0, 0.7, "lanczos")
    assert {n.key for n in esrgan.notes if not n.honoured} == {"match", "hr_upscaler"}
    assert (refined.request.refiner, refined.request.refiner_switch) == ("sd_xl_refiner_1.0", 0.7)


def test_every_request_key_is_read_or_has_a_rule():
    """The API's txt2img keys (StableDiffusionProcessingTxt2Img, modules/api/models.py) and the script's options."""
    api = {"prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
           "seed_resize_from_w", "sampler_name", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width",
           "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta",
           "denoising_strength", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
           "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at",
           "disable_extra_networks", "firstpass_image", "comments", "enable_hr", "firstphase_width",
           "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
           "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
           "force_task_id", "sampler_index", "script_name", "script_args", "send_images", "save_images",
           "alwayson_scripts", "infotext"}
    ldm_names = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height"}
    assert api - ldm_names <= A1111_REQUEST_KEYS
    assert set(SCRIPT_OPTIONS) - ldm_names <= A1111_REQUEST_KEYS
    assert all(rule.needs is None or rule.needs in A1111_PARAMS for rule in A1111_PARAMS.values())


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "colour": "red"}, "unknown field(s) colour (known: prompt, negative_prompt, steps,"),
    ({"prompt": "x", "sampler": "euler", "sampler_name": "Euler"}, '"sampler" and "sampler_name" both given'),
    ({"prompt": "x", "batch_count": 2, "n_iter": 2}, '"batch_count" and "n_iter" both given'),
    ({"prompt": "x", "n_iter": "2"}, '"n_iter" must be a whole number, got "2"'),
    ({"prompt": "x", "batch_size": 0}, '"batch_size" must be at least 1, got 0'),
    ({"prompt": "x", "override_settings": []}, '"override_settings" must be an object'),
    ({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": "2"}}, '"CLIP_stop_at_last_layers" must be a whole'),
    ({"prompt": "x", "clip_skip": 2, "override_settings": {"CLIP_stop_at_last_layers": 2}}, "both given"),
    ({"prompt": "x", "scheduler": "Align Your Steps"}, "schedule type 'Align Your Steps' is not one ldm has"),
    ({"prompt": "x", "sampler_name": "UniPC"}, "unknown sampler 'UniPC'"),
    ({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 40}}, "clip_skip must be between 1 and 12"),
])
def test_a1111_request_errors_name_the_line_before_loading(tmp_path, tiny_single_file, no_loading, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + json.dumps(line) + "\n")
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"ldm: error: {path}:2: ") and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1


# --- "seed": -1 ------------------------------------------------------------------------------------------


def test_jsonl_seed_minus_one_is_random_and_recorded(tmp_path, tiny_single_file):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "seed": -1, "batch_count": 2}\n')
    seeds = []
    for run in range(2):
        result = invoke("generate", "--prompts", path, "-m", tiny_single_file, *TINY, "--json", "-o",
                        f"{tmp_path / str(run)}/")
        assert result.exit_code == 0, result.output
        first, second = records(result)
        assert second["seed"] == first["seed"] + 1 and 0 <= first["seed"] < 2**32
        seeds.append(first["seed"])
    assert seeds[0] != seeds[1]


# --- "Prompts from file or textbox" lines -----------------------------------------------------------------


def test_prompts_from_file_script_lines(tmp_path, tiny_single_file):
    path = tmp_path / "prompts.txt"
    path.write_text('a plain prompt\n'
                    '--prompt "a red circle" on blue --negative_prompt "ugly, bad" --steps 2 --sampler_name "Euler a" '
                    "--seed 5 --width 64 --height 64 --cfg_scale 4.5 --n_iter 2 --restore_faces true --tiling false\n")
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, *TINY, "-s", "9", "--json", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0, result.output
    plain, circle1, circle2 = records(result)
    assert (plain["prompt"], plain["seed"], plain["rng"], plain["notes"]) == ("a plain prompt", 9, "cpu", [])
    assert (circle1["prompt"], circle1["negative_prompt"], circle1["sampler"], circle1["cfg_scale"]) == (
        "a red circle on blue", "ugly, bad", "euler_a", 4.5)
    assert (circle1["seed"], circle2["seed"], circle1["rng"]) == (5, 6, "nv")  # A1111's default noise
    assert [n["key"] for n in circle1["not_honoured"]] == ["restore_faces"]
    assert [n["key"] for n in circle1["notes"]] == ["randn_source"]
    (line,) = note_lines(result)
    assert line.startswith(f"note: {path}:2: not honoured: restore_faces: true (")


@pytest.mark.parametrize("line, message", [
    ("--prompt a --sd_model foo", "unknown option '--sd_model'"),
    ("--prompt a --hires true", "unknown option '--hires'"),
    ("--prompt a --steps many", "--steps takes a whole number, got 'many'"),
    ("--prompt a --cfg_scale nan", '"cfg_scale" must be a finite number'),
    ('--prompt "a cat', "not a valid A1111 prompt-file line (No closing quotation)"),
    ("--steps 3", "needs --prompt"),
    ("--prompt a --steps", "--steps needs a value"),
    ("--prompt a stray --steps 2 value", "expected an option starting with --, got 'value'"),
])
def test_script_line_errors_name_file_and_line(tmp_path, tiny_single_file, no_loading, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"fine\n{line}\n")
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"ldm: error: {path}:2: ") and message in result.stderr, result.stderr


# --- extra-network tags, from any source ---------------------------------------------------------------


def test_extra_network_tags_are_noted_once_per_job(tmp_path, tiny_single_file):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a dog <hypernet:ink:1>", "negative_prompt": "<lyco:bad:0.5> blurry"}\n')
    result = invoke("generate", "a cat <wildcard:film grain:0.8>", "a cow", "--prompts", path, "-m", tiny_single_file,
                    *TINY, "-s", "1", "-b", "2", "--json", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0, result.output
    cat1, cat2, cow, _, dog, _ = records(result)
    assert cat1["not_honoured"] == cat2["not_honoured"] == [
        {"key": "prompt", "value": "<wildcard:film grain:0.8>", "why": "an extra network ldm does not have; the tag "
                                                                       "is removed from the prompt"}]
    assert cow["not_honoured"] == cow["notes"] == []
    # In the prompt a tag is not honoured (removed, not applied); in the negative prompt it stays words of
    # the text, as in A1111, which reads extra networks from the prompt only: said as a remark, not as removed.
    assert [(n["key"], n["value"]) for n in dog["not_honoured"]] == [("prompt", "<hypernet:ink:1>")]
    (negative,) = dog["notes"]
    assert (negative["key"], negative["value"]) == ("negative_prompt", "<lyco:bad:0.5>")
    assert negative["why"].startswith("kept as words of the negative prompt, as in A1111, which reads extra networks "
                                      "from the prompt only")
    lines = note_lines(result)  # one per job with tags, not per image
    assert len(lines) == 2
    assert lines[0].startswith("note: command line: not honoured: prompt: <wildcard:film grain:0.8> (an extra")
    assert lines[1].startswith(f"note: {path}:1: not honoured: prompt: <hypernet:ink:1> (hypernetworks")
    assert "negative_prompt: <lyco:bad:0.5> (kept as words of the negative prompt, as in A1111" in lines[1]


def test_a_lora_tag_that_names_no_file_is_an_error_before_loading(tmp_path, tiny_single_file, no_loading):
    result = invoke("generate", "a cat <lora:film grain:0.8>", "-m", tiny_single_file, "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("ldm: error: LoRA 'film grain' not found: not a path, and ")
    assert len(result.stderr.strip().splitlines()) == 1


# --- fuzz: any line is jobs or one clear error ---------------------------------------------------------

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=6)
PAYLOADS = st.dictionaries(st.sampled_from(sorted(A1111_REQUEST_KEYS | {"prompt", "seed", "steps", "sampler"})),
                           JSON_VALUES | st.dictionaries(st.sampled_from(["CLIP_stop_at_last_layers", "randn_source",
                                                                          "token_merging_ratio",
                                                                          "sd_vae", "x"]), JSON_VALUES, max_size=3),
                           max_size=6)
SCRIPT_WORDS = st.sampled_from([*("--" + o for o in SCRIPT_OPTIONS), "--", "--x", '"', "'", "a", "1", "-1", "2.5",
                                "true", "nan", "Euler a", "\\", "é"])


def _jobs_or_one_error(path) -> None:
    try:
        jobs = read_prompt_file(str(path), command_line_job({}))
    except LdmError as exc:
        assert "\n" not in str(exc)
        return
    for job in jobs:
        try:
            check_job(job)
        except LdmError as exc:
            assert str(exc).startswith(f"{path}:")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=PAYLOADS)
def test_any_a1111_request_line_is_a_job_or_one_error(tmp_path, payload):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(payload) + "\n")
    _jobs_or_one_error(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(SCRIPT_WORDS | st.text(max_size=6), max_size=8))
def test_any_script_line_is_a_job_or_one_error(tmp_path, words):
    path = tmp_path / "p.txt"
    path.write_text("--" + " ".join(words).replace("\n", " ").replace("\r", " ") + "\n", encoding="utf-8",
                    errors="surrogatepass")
    _jobs_or_one_error(path)


def test_a1111_request_pads_conds_only_when_its_settings_say(tmp_path):
    from ldmcli.jobs import Job, read_prompt_file
    from ldmcli.request import ImageRequest

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "sampler_name": "Euler"}\n'
                    '{"prompt": "b", "sampler_name": "Euler", "override_settings": {"pad_cond_uncond": true}}\n'
                    '{"prompt": "c"}\n', encoding="utf-8")
    default, on, ours = read_prompt_file(str(path), Job(ImageRequest()))
    assert (default.request.pad_conds, on.request.pad_conds, ours.request.pad_conds) == (False, True, True)


# --- what an A1111 line leaves out ----------------------------------------------------------------------

# A model's recommendation (as the demo model and Turbo models make): an A1111 request line never takes it.
RECOMMENDED = {"steps": 4, "cfg_scale": 1.0, "sampler": "dpmpp_2m", "schedule": "karras", "width": 64, "height": 64,
               "clip_skip": 2, "negative_prompt": "ugly"}


def _request(job):
    r = job.request
    return {"steps": r.steps, "cfg_scale": r.cfg_scale, "width": r.width, "height": r.height, "sampler": r.sampler,
            "schedule": r.schedule, "clip_skip": r.clip_skip, "negative_prompt": r.negative_prompt,
            "rng": r.rng, "pad_conds": r.pad_conds, "match": r.match, "batch_count": job.batch_count}


A1111_DEFAULT_REQUEST = {"steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "sampler": "euler",
                         "schedule": None, "clip_skip": 1, "negative_prompt": "", "rng": "nv", "pad_conds": False,
                         "match": "a1111", "batch_count": 1}


def test_an_a1111_request_takes_a1111s_defaults_for_what_it_leaves_out(tmp_path):
    """StableDiffusionProcessing's defaults (steps 50, cfg_scale 7.0, 512x512, seed -1, n_iter and batch_size
    1) and the API's sampler_index "Euler": not ldm's (30 steps, CFG 7.5, Euler a), nor the model's."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "sampler_name": "Euler", "seed": 7}\n'  # the reviewer's line
                    '{"prompt": "a dog", "n_iter": 1}\n'
                    '{"prompt": "a hen", "n_iter": 1}\n'
                    '{"prompt": "a cow"}\n')  # ldm's keys only: ldm's meaning
    cat, dog, hen, cow = (check_job(job, RECOMMENDED) for job in read_prompt_file(str(path), command_line_job({})))
    assert _request(cat) == _request(dog) == A1111_DEFAULT_REQUEST
    assert cat.request.seed == 7
    assert 0 <= dog.request.seed < 2**32 and dog.request.seed != hen.request.seed  # -1: each request its own
    assert _request(cow) == {**RECOMMENDED, "rng": "cpu", "pad_conds": True, "match": "diffusers", "batch_count": 1}
    # Every request field has A1111's value when a request leaves it out (the prompt is required; the
    # noise source and pad conds are A1111 settings, read with the request's override_settings).
    assert set(A1111_API_DEFAULTS) | {"prompt", "rng", "pad_conds", "match"} == set(field_names())


def test_flags_are_the_defaults_of_an_a1111_request_too(tmp_path, tiny_single_file):
    """Through the CLI: the line's values, then the flags, then A1111's defaults; -s for a line without a seed."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "sampler_name": "Euler", "seed": 7}\n'
                    '{"prompt": "a dog", "n_iter": 1, "cfg_scale": 3}\n'
                    '{"prompt": "a cow"}\n')
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, *TINY, "--json", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0, result.output
    cat, dog, cow = records(result)
    assert (cat["steps"], cat["width"], cat["cfg_scale"], cat["sampler"], cat["seed"]) == (2, 64, 7.0, "euler", 7)
    assert (dog["cfg_scale"], dog["sampler"], dog["rng"]) == (3.0, "euler", "nv")
    assert (cow["cfg_scale"], cow["sampler"], cow["rng"]) == (7.5, "euler_a", "cpu")  # ldm's line, ldm's defaults
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, *TINY, "-s", "9", "--cfg-scale", "2",
                    "--sampler", "k_heun", "--json", "-o", f"{tmp_path / 'flags'}/")
    assert result.exit_code == 0, result.output
    cat, dog, cow = records(result)
    assert (cat["seed"], cat["cfg_scale"], cat["sampler"]) == (7, 2.0, "euler")
    assert (dog["seed"], dog["cfg_scale"], dog["sampler"]) == (9, 3.0, "heun")
    assert (cow["seed"], cow["cfg_scale"], cow["sampler"]) == (9, 2.0, "heun")


def test_a_script_line_takes_the_rest_from_the_command_line_as_from_a1111s_ui(tmp_path):
    """The script copies A1111's UI values under each line: here the command line is the UI, so what a
    line leaves out is the flags', else the model's recommendation, else ldm's; A1111's settings (noise
    source, pad conds) are A1111's defaults, as for a request line."""
    path = tmp_path / "prompts.txt"
    path.write_text('--prompt "a cat" --sampler_name k_euler\n')
    (plain,) = read_prompt_file(str(path), command_line_job({}))
    (flagged,) = read_prompt_file(str(path), command_line_job({"steps": 3, "cfg_scale": 2.0, "width": 128}))
    plain, flagged = check_job(plain, RECOMMENDED), check_job(flagged, RECOMMENDED)
    assert _request(plain) == {**RECOMMENDED, "sampler": "euler", "schedule": "karras", "rng": "nv",
                               "pad_conds": False, "match": "a1111", "batch_count": 1}
    assert (flagged.request.steps, flagged.request.cfg_scale, flagged.request.width) == (3, 2.0, 128)
    (bare,) = read_prompt_file(str(path), command_line_job({}))
    assert (check_job(bare).request.steps, check_job(bare).request.cfg_scale) == (30, 7.5)  # ldm's, not A1111's 50/7


# --- A1111's sampler aliases ------------------------------------------------------------------------------


def test_a1111_sampler_aliases_in_script_lines_jsonl_and_flags(tmp_path, tiny_single_file):
    """samplers_map's aliases (k_euler_a, k_dpmpp_2m_sde, ...), in any case, for the samplers ldm has."""
    text, jsonl = tmp_path / "prompts.txt", tmp_path / "p.jsonl"
    text.write_text('--prompt "a red circle" --sampler_name k_euler_a --seed 5\n'
                    '--prompt "a red circle" --sampler_name "Euler a" --seed 5\n')
    jsonl.write_text('{"prompt": "a cat", "sampler_name": "K_DPMPP_2M_SDE"}\n'
                     '{"prompt": "a cat", "sampler_name": "k_dpmpp_2m_ka"}\n')
    result = invoke("generate", "a cow", "--sampler", "k_lms", "--prompts", text, "-m", tiny_single_file, *TINY,
                    "--json", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0, result.output
    cow, alias, name = records(result)
    assert (cow["sampler"], alias["sampler"], name["sampler"]) == ("lms", "euler_a", "euler_a")
    assert np.array_equal(pixels(alias["path"]), pixels(name["path"]))
    (sde, karras) = read_prompt_file(str(jsonl), command_line_job({}))
    sde, karras = check_job(sde), check_job(karras)
    # no scheduler in an A1111 request is "Automatic": DPM++ 2M SDE's own, Exponential (A1111 1.9+)
    assert (sde.request.sampler, sde.request.schedule) == ("dpmpp_2m_sde", "exponential")
    assert (karras.request.sampler, karras.request.schedule) == ("dpmpp_2m", "karras")


@pytest.mark.parametrize("where, line", [
    ("p.txt", '--prompt "a" --sampler_name k_dpm_2'),  # A1111's DPM2: ldm has no such sampler
    ("p.jsonl", '{"prompt": "a", "sampler_name": "k_dpmpp_sde"}'),
    ("p.jsonl", '{"prompt": "a", "sampler_name": "k_euler_x"}'),
])
def test_unknown_sampler_aliases_are_refused_before_loading(tmp_path, tiny_single_file, no_loading, where, line):
    path = tmp_path / where
    path.write_text(line + "\n")
    result = invoke("generate", "--prompts", path, "-m", tiny_single_file, "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"ldm: error: {path}:1: unknown sampler '") and result.stderr.count("\n") == 1
    result = invoke("generate", "a", "--sampler", "k_dpm_2", "-m", tiny_single_file, "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 2 and "unknown sampler 'k_dpm_2'" in result.stderr


def test_token_merging_settings(tmp_path):
    """token_merging_ratio is --tome; the per-pass ratios A1111 also has are noted (ldm has one ratio)."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "override_settings": {"token_merging_ratio": 0.5}}) + "\n"
                    + json.dumps({"prompt": "b", "override_settings": {"token_merging_ratio_hr": 0.4,
                                                                       "token_merging_ratio_img2img": 0}}) + "\n")
    merged, per_pass = read_prompt_file(str(path), command_line_job({}))
    assert merged.request.tome == 0.5 and not [n for n in merged.notes if not n.honoured and "token" in n.key]
    assert per_pass.request.tome == 0.0
    (note,) = [n for n in per_pass.notes if "token" in n.key]  # img2img's 0 is off: nothing to say
    assert note.key == "override_settings.token_merging_ratio_hr" and "one token merging ratio" in note.why
    path.write_text(json.dumps({"prompt": "c", "override_settings": {"token_merging_ratio": 0.95}}) + "\n")
    with pytest.raises(LdmError, match="token_merging_ratio"):
        for job in read_prompt_file(str(path), command_line_job({})):
            check_job(job)
