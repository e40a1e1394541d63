"""--from-png is honest: every key of an A1111 text is honoured or named (stderr, --json, `ldm info`),
and the image's model is the one ldm runs, found by hash then name, or an error, never the demo model.

Through the real CLI on the tiny models; the models ldm can find are a temporary $LDM_MODELS_DIR.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from ldmcli.cli import cli
from ldmcli.hashing import legacy_model_hash, model_hash
from ldmcli.metadata import INFOTEXT_KEYS, INFOTEXT_PREFIXES, parse_a1111, read_png_text

TINY = ["-W", "64", "-H", "64", "--steps", "2"]
# The keys of an A1111 text that ldm reads into the request or uses to find the model.
def other_notes(record: dict) -> list[dict]:
    """A record's notes but the one every A1111 image gets: it is sampled with A1111's numerics (--match a1111)."""
    return [n for n in record["notes"] if n["key"] != "Match"]


READ_KEYS = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "RNG", "ENSD", "Model hash",
             "Model", "Token merging ratio"}


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]


def note_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note: ")]


def a1111_png(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def a1111_text(model_hash_: str | None, model: str | None = "mine", extra: str = "", prompt: str = "a red circle") -> str:
    model_keys = (f", Model hash: {model_hash_}" if model_hash_ else "") + (f", Model: {model}" if model else "")
    return (f"{prompt}\nNegative prompt: blurry\n"
            f"Steps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 11, Size: 64x64{model_keys}"
            f"{extra}, Version: v1.10.1")


@pytest.fixture
def models_env(tmp_path, tiny_single_file):
    """$LDM_MODELS_DIR holding the tiny model as "mine", and a private hash cache."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "mine.safetensors").symlink_to(tiny_single_file)
    return {"LDM_MODELS_DIR": str(folder), "XDG_CACHE_HOME": str(tmp_path / "cache"), "LDM_MODEL": None}


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the errors under test come before any model loads."""
    from ldmcli import pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "load", refuse)


# --- every key is honoured or named ------------------------------------------------------------------

EVERYTHING = (", Denoising strength: 0.4, Clip skip: 2, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
              'Lora hashes: "film grain: 0123abcd", TI hashes: "easyneg: 1234abcd", Emphasis: Original, Pad conds: True, '
              "ENSD: 31337, Eta: 1, Token merging ratio: 0.5, My Extension: on, ADetailer model: face_yolov8n.pt")
TAGGED = "a red circle <lora:film grain:0.8>, <hypernet:ink>"


def tiny_lora(path: Path) -> Path:
    """A diffusers-format LoRA for one attention projection of the tiny SD1 U-Net."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_A.weight": torch.randn(4, 32, generator=g),
               f"{key}.lora_B.weight": torch.randn(32, 4, generator=g)}, path)
    return path


def test_every_key_of_an_a1111_text_is_honoured_or_named(tmp_path, tiny_single_file, models_env):
    tiny_lora(Path(models_env["LDM_MODELS_DIR"]) / "loras" / "film grain.safetensors")
    h = model_hash(tiny_single_file)
    text = a1111_text(h, extra=EVERYTHING, prompt=TAGGED)
    png = a1111_png(tmp_path / "a1111.png", text)
    result = invoke("generate", "--from-png", png, "--json", "-o", tmp_path / "out.png", env=models_env)
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    # What is honoured is in the request: clip skip on an SD 1.x model, A1111's default noise (nv).
    assert (made["steps"], made["seed"], made["cfg_scale"], made["clip_skip"], made["rng"]) == (2, 11, 5.0, 2, "nv")
    assert made["prompt"] == TAGGED and made["negative_prompt"] == "blurry"
    assert made["tome"] == 0.5  # Token merging ratio

    # The hires fix is read (and made with diffusers' numerics: said as A1111's numerics not honoured).
    assert (made["hires_scale"], made["hires_steps"], made["hires_strength"], made["hires_upscaler"]) == (2, 10, 0.4, "latent")
    not_honoured = {(n["key"], n["value"]) for n in made["not_honoured"]}
    assert not_honoured == {
        ("Match", "absent"), ("My Extension", "on"), ("ADetailer model", "face_yolov8n.pt"),
        ("prompt", "<hypernet:ink>"),
    }
    # Every key of the text: read, left at a value that means "off" (Emphasis Original, Eta 1), honoured
    # as ldm does it anyway (Pad conds), informational (Version), or named.
    keys = set(parse_a1111(text)) - {"Prompt", "Negative prompt"}
    named = {key for key, _ in not_honoured}
    assert keys - named == READ_KEYS - {"RNG"} | {"Emphasis", "Eta", "Pad conds", "Version", "Lora hashes", "TI hashes",
                                                  "Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler"}
    assert all(n["why"] for n in made["not_honoured"])
    why = {n["key"]: n["why"] for n in made["not_honoured"]}
    assert "second pass" in why["Match"] and "not know" in why["My Extension"]
    assert made["loras"][0]["name"] == "film grain" and made["loras"][0]["te_weight"] == 0.8  # the tag's LoRA, merged
    assert [n["key"] for n in made["notes"]] == ["RNG"] and "nv" in made["notes"][0]["why"]
    assert made["match"] == "diffusers"  # A1111's numerics are reproduced for text-to-image only (named above)

    (line,) = note_lines(result)  # one line for the job, naming each
    assert line.startswith(f"note: {png}: not honoured: ")
    for key, value in not_honoured:
        assert f"{key}: {value}" in line
    assert "RNG: absent" in line
    assert f"was made with model \"mine\" (hash {h}): using " in result.stderr and "(same hash)" in result.stderr


def test_info_shows_the_same_list(tmp_path, tiny_single_file):
    png = a1111_png(tmp_path / "a.png", a1111_text(model_hash(tiny_single_file), extra=EVERYTHING, prompt=TAGGED))
    shown = json.loads(invoke("info", png, "--json").output)
    assert {n["key"] for n in shown["not_honoured"]} == {"Match", "My Extension",
                                                         "ADetailer model", "prompt"}
    assert [n["key"] for n in shown["notes"]] == ["RNG"]
    text = invoke("info", png).output
    assert "not_honoured:\n  - " in text and "  - prompt: <hypernet:ink> (hypernet" in text


def test_the_table_knows_a1111s_keys():
    """The table's spellings are A1111's (modules/processing.py create_infotext, the options' infotext labels)."""
    for key in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "RNG", "Model hash",
                "Model", "Version", "Denoising strength", "Lora hashes", "TI hashes", "VAE", "VAE hash",
                "Face restoration", "Variation seed", "Variation seed strength", "Seed resize from", "ENSD",
                "Token merging ratio", "Eta", "Emphasis", "Pad conds", "Refiner", "Refiner switch at"):
        assert key in INFOTEXT_KEYS, key
    assert {"Hires ", "ADetailer "} <= set(INFOTEXT_PREFIXES)
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("A1111 fields and what ldm does with each"):]
    for key in INFOTEXT_KEYS:  # the README's table lists every key of the one table
        assert f"`{key}`" in table, key


@pytest.mark.parametrize("flag, rng, notes", [([], "cpu", []), (["--rng", "nv"], "nv", [])])
def test_a_recorded_rng_is_honoured_and_a_flag_beats_it(tmp_path, tiny_single_file, models_env, flag, rng, notes):
    png = a1111_png(tmp_path / "a.png", a1111_text(model_hash(tiny_single_file), extra=", RNG: CPU"))
    result = invoke("generate", "--from-png", png, *flag, "--json", "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert (made["rng"], other_notes(made), made["not_honoured"]) == (rng, notes, [])
    assert [line for line in note_lines(result) if "k-diffusion" not in line] == []


def test_a_flag_replaces_the_note_of_what_it_overrides(tmp_path, tiny_single_file, models_env):
    """No RNG in the text means A1111's GPU noise (nv, noted); --rng cpu given: cpu, nothing to note."""
    png = a1111_png(tmp_path / "a.png", a1111_text(model_hash(tiny_single_file)))
    result = invoke("generate", "--from-png", png, "--rng", "cpu", "--json", "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert (made["rng"], other_notes(made)) == ("cpu", [])


# --- the image's model ------------------------------------------------------------------------------


def test_a_hash_that_matches_nothing_is_an_error_naming_it(tmp_path, models_env, no_loading):
    png = a1111_png(tmp_path / "a.png", a1111_text("deadbeef00", model="nowhere-v2"))
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "out" / "x.png", env=models_env)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ldm: error: ")
    assert 'model "nowhere-v2" (hash deadbeef00), which ldm cannot find' in result.stderr
    assert "pass -m MODEL" in result.stderr and models_env["LDM_MODELS_DIR"] in result.stderr
    assert "demo model" not in result.stderr and not (tmp_path / "out").exists()


def test_an_image_that_names_no_model_needs_m(tmp_path, models_env, no_loading):
    png = a1111_png(tmp_path / "a.png", a1111_text(None, model=None))
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "x.png", env=models_env)
    assert result.exit_code == 2 and "does not say which model made it" in result.stderr


def test_found_by_hash_under_another_name(tmp_path, tiny_single_file, models_env):
    png = a1111_png(tmp_path / "a.png", a1111_text(model_hash(tiny_single_file), model="renamed-since"))
    result = invoke("generate", "--from-png", png, "--json", "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    assert "mine.safetensors (same hash)" in result.stderr
    assert records(result)[0]["model"]["name"] == "mine"


def test_found_by_a1111s_older_8_digit_hash(tmp_path, tiny_single_file, models_env):
    png = a1111_png(tmp_path / "a.png", a1111_text(legacy_model_hash(tiny_single_file), model="old-name"))
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    assert "(same hash)" in result.stderr


def test_a_name_match_with_another_hash_is_used_with_a_warning(tmp_path, tiny_single_file, models_env):
    png = a1111_png(tmp_path / "a.png", a1111_text("0123456789", model="mine"))
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    warning = f"of the same name but hash {model_hash(tiny_single_file)}: the image may differ"
    assert "warning: " in result.stderr and warning in result.stderr


def test_m_is_used_and_a_different_hash_is_warned(tmp_path, tiny_single_file, models_env):
    png = a1111_png(tmp_path / "a.png", a1111_text("0123456789", model="nowhere"))
    result = invoke("generate", "--from-png", png, "-m", tiny_single_file, "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    assert f"-m {tiny_single_file} has hash {model_hash(tiny_single_file)}: the image may differ" in result.stderr
    same = a1111_png(tmp_path / "b.png", a1111_text(model_hash(tiny_single_file), model="nowhere"))
    result = invoke("generate", "--from-png", same, "-m", tiny_single_file, "-o", tmp_path / "p.png", env=models_env)
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_ldm_model_env_does_not_replace_a_recorded_model_ldm_cannot_find(tmp_path, tiny_single_file, models_env,
                                                                         no_loading):
    """$LDM_MODEL is a default, not a choice made for this image: only -m replaces the model it records."""
    png = a1111_png(tmp_path / "a.png", a1111_text("0123456789", model="nowhere"))
    env = {**models_env, "LDM_MODEL": str(tiny_single_file)}
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "o.png", env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ldm: error: ")
    assert 'model "nowhere" (hash 0123456789), which ldm cannot find' in result.stderr
    assert f"$LDM_MODEL ({tiny_single_file}) is not used in its place: only -m" in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_ldm_model_env_runs_an_image_that_names_no_model(tmp_path, tiny_single_file, models_env):
    """No recorded model to be untrue to: $LDM_MODEL, the user's default, is used, and said."""
    png = a1111_png(tmp_path / "a.png", a1111_text(None, model=None))
    env = {**models_env, "LDM_MODEL": str(tiny_single_file)}
    result = invoke("generate", "--from-png", png, "-o", tmp_path / "o.png", env=env)
    assert result.exit_code == 0, result.output
    assert f"does not say which model made it; using $LDM_MODEL {tiny_single_file}" in result.stderr


def test_ldm_record_path_first_then_the_same_lookup(tmp_path, tiny_single_file, models_env):
    """ldm's record names the file it was made with; gone, the model is looked up by its hash."""
    gone = tmp_path / "moved" / "copy.safetensors"
    gone.parent.mkdir()
    shutil.copy(tiny_single_file, gone)
    first = tmp_path / "first.png"
    assert invoke("generate", "a red circle", "-m", gone, "-s", "4", *TINY, "-o", first, env=models_env).exit_code == 0
    again = tmp_path / "again.png"
    result = invoke("generate", "--from-png", first, "-o", again, env=models_env)
    assert result.exit_code == 0 and "warning" not in result.stderr  # the recorded path, same file
    shutil.rmtree(gone.parent)
    found = tmp_path / "found.png"
    result = invoke("generate", "--from-png", first, "-o", found, env=models_env)
    assert result.exit_code == 0, result.output
    assert 'made with model "copy"' in result.stderr and "mine.safetensors (same hash)" in result.stderr
    assert np.array_equal(np.asarray(Image.open(found)), np.asarray(Image.open(first)))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("generate", "--from-png", first, "-o", tmp_path / "none.png", env={**models_env, "LDM_MODELS_DIR": str(empty)})
    assert result.exit_code == 2 and 'model "copy"' in result.stderr and model_hash(tiny_single_file) in result.stderr


# --- clip skip where A1111 does not apply it ----------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    from sd_fixtures import build_tiny_sd2_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny_sd2_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_clip_skip_of_an_a1111_image_is_not_applied_on_sd2(tmp_path, sd2_folder):
    png = a1111_png(tmp_path / "a.png", a1111_text(None, model="tiny-sd2", extra=", Clip skip: 2, RNG: CPU"))
    result = invoke("generate", "--from-png", png, "-m", sd2_folder, "--json", "-o", tmp_path / "o.png")
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert made["clip_skip"] == 1 and made["not_honoured"] == []
    assert [(n["key"], n["value"]) for n in other_notes(made)] == [("Clip skip", "2")]
    assert "SD 2.x and SDXL" in other_notes(made)[0]["why"]
    (line,) = note_lines(result)
    assert "Clip skip: 2 (A1111 does not apply clip skip" in line
    # Asked for on the command line, it is ldm's clip skip: applied, nothing to note.
    result = invoke("generate", "--from-png", png, "-m", sd2_folder, "--clip-skip", "2", "--json", "-o", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert (made["clip_skip"], other_notes(made)) == (2, [])


def test_clip_skip_of_an_a1111_request_is_not_applied_on_sd2(tmp_path, sd2_folder):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1,
                                   "override_settings": {"CLIP_stop_at_last_layers": 2, "randn_source": "CPU"}}) + "\n")
    result = invoke("generate", "--prompts", prompts, "-m", sd2_folder, "--json", "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert made["clip_skip"] == 1 and [n["key"] for n in other_notes(made)] == ["Clip skip"]


def test_clip_skip_of_an_a1111_image_is_applied_on_sd1(tmp_path, tiny_single_file, models_env):
    png = a1111_png(tmp_path / "a.png", a1111_text(model_hash(tiny_single_file), extra=", Clip skip: 2, RNG: CPU"))
    result = invoke("generate", "--from-png", png, "--json", "-o", tmp_path / "o.png", env=models_env)
    assert result.exit_code == 0, result.output
    (made,) = records(result)
    assert (made["clip_skip"], other_notes(made)) == (2, [])
    assert json.loads(read_png_text(tmp_path / "o.png")["ldm"])["clip_skip"] == 2


@pytest.mark.parametrize("sampler, schedule_type, expected", [
    ("DPM++ 2M", "Automatic", "karras"),  # A1111 1.9+: the sampler's own (sd_samplers_kdiffusion options)
    ("DPM++ 2M SDE", "Automatic", "exponential"),
    ("Euler a", "Automatic", None),  # A1111's uniform grid: the model's own spacing stands in
    ("DPM++ 2M", None, None),  # A1111 before 1.9 wrote no schedule type: "DPM++ 2M" was its uniform grid
    ("DPM++ 2M Karras", None, None),  # ... and put Karras in the sampler's name (resolved with the sampler)
    ("DPM++ 2M", "Exponential", "exponential"),
])
def test_automatic_schedule_type_is_the_samplers_own_as_in_a1111(sampler, schedule_type, expected):
    from ldmcli.metadata import A1111_KEY, request_from_png_text

    kind = f", Schedule type: {schedule_type}" if schedule_type else ""
    text = f"a cat\nSteps: 4, Sampler: {sampler}{kind}, CFG scale: 5, Seed: 1, Size: 64x64"
    recorded = request_from_png_text({A1111_KEY: text}, "a.png")[0]
    assert recorded.schedule == expected


def test_a1111_request_without_scheduler_uses_the_samplers_automatic(tmp_path):
    from ldmcli.jobs import Job, read_prompt_file
    from ldmcli.request import ImageRequest

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "sampler_name": "DPM++ 2M"}\n{"prompt": "b", "sampler_name": "DPM++ 2M", '
                    '"scheduler": "Uniform"}\n', encoding="utf-8")
    automatic, uniform = read_prompt_file(str(path), Job(ImageRequest()))
    assert (automatic.request.schedule, uniform.request.schedule) == ("karras", None)
