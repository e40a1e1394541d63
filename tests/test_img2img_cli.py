"""Starting from an image, from the command line and prompt files (issue 18): -i/--strength, --mask,
--pad, their checks before loading, the JSONL keys (paths relative to the file), the PNG's records and
--from-png.

The oracle for the pixels is diffusers' own pipelines (StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline) run on the same files, configured from tables written here; the engine's
parity over samplers and strengths is tests/test_img2img.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps, PngImagePlugin

from ldmcli.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, SEED, STEPS, CFG = "a red circle", 5, 6, 7.5
TINY = ["--steps", str(STEPS), "-s", str(SEED), "--cfg-scale", str(CFG), "--sampler", "euler", "--dtype", "fp32"]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 3) -> Path:
    """Smooth colour ramps with a little noise (something a VAE round-trips), as an RGB PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([y / height, x / width, (x + y) / (width + height)], -1)
    Image.fromarray(((0.8 * base + 0.2 * rng.random((height, width, 3))) * 255).astype(np.uint8)).save(path)
    return path


def write_mask(path: Path, width: int = 64, height: int = 48) -> Path:
    mask = np.zeros((height, width), np.uint8)
    mask[8:30, 16:44] = 255
    Image.fromarray(mask).save(path)
    return path


def diffusers_pixels(cls, folder: Path, **kwargs) -> np.ndarray:
    """The oracle: diffusers' pipeline `cls` on the tiny folder with Euler, fp32, the CLI's settings."""
    from diffusers import EulerDiscreteScheduler

    pipe = cls.from_pretrained(folder, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
               output_type="np", **kwargs).images[0]
    return (out * 255).round().astype(int)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())


def test_img2img_from_the_command_line_equals_diffusers(tmp_path, tiny_folder):
    init = write_image(tmp_path / "init.png")
    result = invoke("generate", PROMPT, "-m", tiny_folder, *TINY, "-i", init, "--strength", "0.6", "--json",
                    "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionImg2ImgPipeline

    theirs = diffusers_pixels(StableDiffusionImg2ImgPipeline, tiny_folder, image=Image.open(init), strength=0.6)
    assert_close(pixels(tmp_path / "out.png"), theirs)
    (record,) = records(result)
    assert (record["width"], record["height"]) == (64, 48)  # the image's own size when none is given
    assert record["init_image"] == str(init.absolute()) and record["strength"] == 0.6
    text = Image.open(tmp_path / "out.png").text["parameters"]
    assert "Denoising strength: 0.6" in text and "Mask blur" not in text


def test_inpainting_from_the_command_line_equals_diffusers(tmp_path, tiny_folder):
    init, mask = write_image(tmp_path / "init.png"), write_mask(tmp_path / "mask.png")
    result = invoke("generate", PROMPT, "-m", tiny_folder, *TINY, "-i", init, "--mask", mask, "--mask-blur", "0",
                    "--strength", "1", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionInpaintPipeline

    theirs = diffusers_pixels(StableDiffusionInpaintPipeline, tiny_folder, image=Image.open(init),
                              mask_image=Image.open(mask), strength=1.0, height=48, width=64)
    assert_close(pixels(tmp_path / "out.png"), theirs)
    assert "Mask blur: 0" in Image.open(tmp_path / "out.png").text["parameters"]


def test_outpainting_pads_the_canvas_and_keeps_the_image_size_a_multiple_of_8(tmp_path, tiny_single_file):
    init = write_image(tmp_path / "init.png", 60, 44)
    result = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-i", init, "--pad", "8,0,20,0", "--json",
                    "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    (record,) = records(result)
    assert (record["width"], record["height"]) == (88, 48) and record["pad"] == "8,0,20,0"
    assert Image.open(tmp_path / "out.png").size == (88, 48)


def test_jsonl_paths_are_relative_to_the_prompt_file_and_from_png_makes_the_same_bytes(tmp_path, tiny_single_file):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png")
    write_mask(tmp_path / "in" / "m.png")
    (tmp_path / "jobs.jsonl").write_text(
        '{"prompt": "a cat", "init_image": "in/a.png", "strength": 0.5, "name": "i2i"}\n'
        '{"prompt": "a dog", "init_image": "in/a.png", "mask": "in/m.png", "name": "inpaint"}\n'
        '{"prompt": "a hen", "name": "t2i", "width": 32, "height": 32}\n')
    made = invoke("generate", "--prompts", tmp_path / "jobs.jsonl", "-m", tiny_single_file, *TINY, "--json",
                  "-o", f"{tmp_path / 'out'}/{{name}}.png")
    assert made.exit_code == 0, made.output
    by_name = {Path(r["path"]).stem: r for r in records(made)}
    assert by_name["i2i"]["init_image"] == str(tmp_path / "in" / "a.png") and by_name["t2i"]["init_image"] is None
    assert (by_name["i2i"]["width"], by_name["i2i"]["height"], by_name["t2i"]["width"]) == (64, 48, 32)
    for name in ("i2i", "inpaint"):
        again = invoke("generate", "--from-png", tmp_path / "out" / f"{name}.png", "-m", tiny_single_file,
                       "-o", tmp_path / f"again-{name}.png")
        assert again.exit_code == 0, again.output
        assert np.array_equal(pixels(tmp_path / f"again-{name}.png"), pixels(tmp_path / "out" / f"{name}.png")), name


def test_an_a1111_text_gives_the_strength_and_asks_for_the_image(tmp_path, tiny_single_file):
    """A1111's text records the strength and mask blur, not the image or mask: a note until -i/--mask give them,
    and with them the same image."""
    init, mask = write_image(tmp_path / "init.png"), write_mask(tmp_path / "mask.png")
    made = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-i", init, "--mask", mask, "--strength", "0.7",
                  "--mask-blur", "2", "-o", tmp_path / "made.png")
    assert made.exit_code == 0, made.output
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(tmp_path / "made.png").text["parameters"])
    Image.open(tmp_path / "made.png").save(tmp_path / "a1111.png", pnginfo=info)
    bare = invoke("generate", "--from-png", tmp_path / "a1111.png", "-m", tiny_single_file, "--dtype", "fp32",
                  "--json", "-o", tmp_path / "bare.png")
    assert bare.exit_code == 0, bare.output
    (record,) = records(bare)
    assert {n["key"] for n in record["not_honoured"]} == {"Denoising strength", "Mask blur"}
    assert "give it with -i" in bare.stderr
    again = invoke("generate", "--from-png", tmp_path / "a1111.png", "-m", tiny_single_file, "--dtype", "fp32",
                   "-i", init, "--mask", mask, "--json", "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    (record,) = records(again)
    assert record["strength"] == 0.7 and record["mask_blur"] == 2 and record["not_honoured"] == []
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png"))


@pytest.mark.parametrize("args, message", [
    (["-i", "{tmp}/nowhere.png"], "nowhere.png: no such file"),
    (["-i", "{tmp}/text.png"], "not an image"),
    (["--mask", "{tmp}/mask.png"], "mask needs an init image"),
    (["-i", "{tmp}/init.png", "--mask", "{tmp}/small.png"], "a mask must have its image's size"),
    (["-i", "{tmp}/init.png", "--pad", "1,2,x"], "padding"),
    (["--prompts", "{tmp}/bad.jsonl"], "strength must be in (0, 1]"),
])
def test_bad_image_inputs_are_one_line_errors_before_loading(args, message, tmp_path, tiny_single_file, monkeypatch):
    from ldmcli import pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    write_image(tmp_path / "init.png")
    write_image(tmp_path / "small.png", 32, 32)
    (tmp_path / "text.png").write_text("not a png")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat", "init_image": "init.png", "strength": 1.5}\n')
    prompt = [] if "--prompts" in args else [PROMPT]
    result = invoke("generate", *prompt, "-m", tiny_single_file, *[a.format(tmp=tmp_path) for a in args],
                    "-o", tmp_path / "o.png")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o.png").exists()


# --- from the review -----------------------------------------------------------------------------------


def _inpaint(tmp_path, model, mask, out, *extra):
    init = tmp_path / "init.png"
    if not init.exists():
        write_image(init)
    result = invoke("generate", PROMPT, "-m", model, *TINY, "-i", init, "--mask", mask, "--strength", "0.9",
                    *extra, "-o", tmp_path / out)
    assert result.exit_code == 0, result.output
    return pixels(tmp_path / out)


def test_invert_mask_reaches_the_engine(tmp_path, tiny_single_file):
    mask = write_mask(tmp_path / "mask.png")
    ImageOps.invert(Image.open(mask).convert("L")).save(tmp_path / "inverted.png")
    flagged = _inpaint(tmp_path, tiny_single_file, mask, "flag.png", "--invert-mask", "--mask-blur", "0")
    by_file = _inpaint(tmp_path, tiny_single_file, tmp_path / "inverted.png", "file.png", "--mask-blur", "0")
    plain = _inpaint(tmp_path, tiny_single_file, mask, "plain.png", "--mask-blur", "0")
    assert np.array_equal(flagged, by_file)
    assert not np.array_equal(flagged, plain)


def test_mask_blur_reaches_the_engine(tmp_path, tiny_single_file):
    """--mask-blur N equals the same mask blurred beforehand (A1111's Gaussian) with --mask-blur 0. A blur wide
    enough to move the 0.5 level of a small, thin mask region, so binarising does not hide it."""
    from ldmcli.image_input import blur_mask

    mask = np.zeros((48, 64), np.uint8)
    mask[8:14, 16:44] = 255  # 6 px tall: a blur of 8 pulls its centre below 0.5
    Image.fromarray(mask).save(tmp_path / "mask.png")
    blurred = blur_mask(mask.astype(np.float32) / 255, 8)
    Image.fromarray((blurred * 255).round().astype(np.uint8)).save(tmp_path / "blurred.png")
    flagged = _inpaint(tmp_path, tiny_single_file, tmp_path / "mask.png", "flag.png", "--mask-blur", "8")
    by_file = _inpaint(tmp_path, tiny_single_file, tmp_path / "blurred.png", "file.png", "--mask-blur", "0")
    unblurred = _inpaint(tmp_path, tiny_single_file, tmp_path / "mask.png", "none.png", "--mask-blur", "0")
    assert np.array_equal(flagged, by_file)
    assert not np.array_equal(flagged, unblurred)


def test_strength_that_runs_no_step_is_refused_before_loading(tmp_path, tiny_single_file, monkeypatch):
    from ldmcli import pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    init = write_image(tmp_path / "init.png")
    result = invoke("generate", PROMPT, "-m", tiny_single_file, "--steps", "4", "-i", init, "--strength", "0.1",
                    "-o", tmp_path / "o.png")
    assert result.exit_code == 2, result.output
    assert "runs no step" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_relative_prompt_file_records_absolute_paths(tmp_path, tiny_single_file, monkeypatch):
    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "jobs.jsonl").write_text('{"prompt": "a cat", "init_image": "a.png", "seed": 1}\n')
    monkeypatch.chdir(tmp_path)
    made = invoke("generate", "--prompts", "in/jobs.jsonl", "-m", tiny_single_file, *TINY, "--json",
                  "-o", tmp_path / "out.png")
    assert made.exit_code == 0, made.output
    (record,) = records(made)
    assert record["init_image"] == str(tmp_path / "in" / "a.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = invoke("generate", "--from-png", tmp_path / "out.png", "-m", tiny_single_file, "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "out.png"))


def test_a1111_denoising_strength_with_an_init_image_is_not_dropped(tmp_path, tiny_single_file):
    """An A1111-style line (sampler_name) that starts from an image: denoising_strength is A1111's img2img
    strength; it must be used (or at least be listed in not_honoured), never silently replaced by 0.75."""
    write_image(tmp_path / "init.png")
    (tmp_path / "a.jsonl").write_text(json.dumps({
        "prompt": PROMPT, "init_image": "init.png", "denoising_strength": 0.3, "sampler_name": "Euler",
        "steps": 4, "seed": 1, "width": 64, "height": 48, "match": "diffusers"}) + "\n")
    result = invoke("generate", "--prompts", tmp_path / "a.jsonl", "-m", tiny_single_file, "--dtype", "fp32",
                    "--json", "-o", tmp_path / "o.png")
    assert result.exit_code == 0, result.output
    (record,) = records(result)
    assert record["strength"] == 0.3 or any(n["key"] == "denoising_strength" for n in record["not_honoured"])
