"""Hires fix and the SDXL refiner from the command line and prompt files (issue 18): the flags, the A1111
keys written and read back by --from-png, A1111's request keys, and checks before loading.

The oracles for the pixels are diffusers' pipelines composed as the passes are (txt2img to latents, the
latents resized, img2img; an SDXL base to `denoising_end`, the refiner from `denoising_start`), configured
from tables here; the engines' parity over samplers and settings is tests/test_hires.py's and
tests/test_refiner.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from ldmcli.cli import cli
from sd_fixtures import build_tiny_sdxl_pipeline
from test_inpaint_refiner_models import build_tiny_refiner_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE, SEED, STEPS, CFG = "a red circle", "blurry", 5, 6, 7.5
TINY = ["--steps", str(STEPS), "-s", str(SEED), "--cfg-scale", str(CFG), "--sampler", "euler", "--dtype", "fp32",
        "-n", NEGATIVE]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())


def a1111_only(png: Path, out: Path) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(png).text["parameters"])
    Image.open(png).save(out, pnginfo=info)
    return out


def euler(pipe):
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- hires fix -----------------------------------------------------------------------------------------------


def test_hires_from_the_command_line_equals_diffusers_two_passes(tmp_path, tiny_folder):
    """32x32, x2 with A1111's Latent upscaler (bilinear), 4 second-pass steps at strength 0.6."""
    result = invoke("generate", PROMPT, "-m", tiny_folder, *TINY, "-W", "32", "-H", "32", "--hires-scale", "2",
                    "--hires-steps", "4", "--hires-strength", "0.6", "--json", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    first = euler(StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None))
    latents = first(PROMPT, negative_prompt=NEGATIVE, width=32, height=32, num_inference_steps=STEPS,
                    guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    upscaled = F.interpolate(latents, size=(8, 8), mode="bilinear", antialias=False)
    second = euler(StableDiffusionImg2ImgPipeline(**first.components))
    out = second(PROMPT, negative_prompt=NEGATIVE, image=upscaled, strength=0.6, num_inference_steps=4,
                 guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert_close(pixels(tmp_path / "out.png"), (out * 255).round().astype(int))
    (record,) = records(result)
    assert (record["width"], record["height"], record["hires_scale"]) == (32, 32, 2.0)  # the first pass's size
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    text = Image.open(tmp_path / "out.png").text["parameters"]
    for key in ("Denoising strength: 0.6", "Hires upscale: 2", "Hires steps: 4", "Hires upscaler: Latent"):
        assert key in text, key


def test_hires_is_redone_from_a1111s_text_and_from_a_jsonl(tmp_path, tiny_single_file):
    made = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-W", "32", "-H", "32", "--hires-scale", "1.5",
                  "--hires-upscaler", "Lanczos", "-o", tmp_path / "made.png")
    assert made.exit_code == 0, made.output
    assert "Hires upscaler: Lanczos" in Image.open(tmp_path / "made.png").text["parameters"]
    again = invoke("generate", "--from-png", a1111_only(tmp_path / "made.png", tmp_path / "a1111.png"),
                   "-m", tiny_single_file, "--dtype", "fp32", "-o", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT, "width": 32, "height": 32, "hires_scale": 1.5,
                                                  "hires_upscaler": "lanczos"}) + "\n")
    jsonl = invoke("generate", "--prompts", tmp_path / "p.jsonl", "-m", tiny_single_file, *TINY, "-o", tmp_path / "j.png")
    assert jsonl.exit_code == 0, jsonl.output
    assert np.array_equal(pixels(tmp_path / "j.png"), pixels(tmp_path / "made.png"))


@pytest.mark.parametrize("args, message", [
    (["--hires-scale", "2", "--hires-upscaler", "R-ESRGAN 4x+"], "unknown hires upscaler"),
    (["--hires-scale", "2", "--max-pixels", "2000"], "hires target 64x64"),
    (["--hires-scale", "2", "-i", "{tmp}/x.png"], "together are not supported"),
    (["--hires-scale", "2", "--match", "a1111"], "not reproduced yet"),
    (["--refiner", "nowhere"], "model 'nowhere' not found"),
    (["--refiner", "{model}"], "not an SDXL refiner"),
])
def test_bad_second_passes_are_one_line_errors_before_loading(args, message, tmp_path, tiny_single_file, monkeypatch):
    from ldmcli import pipeline

    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    result = invoke("generate", PROMPT, "-m", tiny_single_file, "-W", "32", "-H", "32",
                    *[a.format(tmp=tmp_path, model=tiny_single_file) for a in args], "-o", tmp_path / "o.png")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "o.png").exists()


# --- the SDXL refiner -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    folders = {}
    for name, pipe in (("base", build_tiny_sdxl_pipeline()), ("refiner", build_tiny_refiner_pipeline())):
        folders[name] = tmp_path_factory.mktemp(f"cli-sdxl-{name}")
        pipe.save_pretrained(folders[name], safe_serialization=True)
    return folders["base"], folders["refiner"]


def test_refiner_from_the_command_line_equals_diffusers(tmp_path, sdxl_pair):
    base, refiner_folder = sdxl_pair
    result = invoke("generate", PROMPT, "-m", base, *TINY, "-W", "64", "-H", "64", "--refiner", refiner_folder,
                    "--refiner-switch", "0.7", "--json", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    theirs_base = euler(StableDiffusionXLPipeline.from_pretrained(base, local_files_only=True, add_watermarker=False))
    theirs_refiner = euler(StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, local_files_only=True,
                                                                            add_watermarker=False))
    generator = [torch.Generator().manual_seed(SEED)]  # one per image, continued by the refiner
    shared = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, generator=generator)
    handed = theirs_base(**shared, height=64, width=64, denoising_end=0.7, output_type="latent").images
    out = theirs_refiner(**shared, image=handed, denoising_start=0.7, output_type="np").images[0]
    assert_close(pixels(tmp_path / "out.png"), (out * 255).round().astype(int))
    (record,) = records(result)
    assert record["refiner"] == str(refiner_folder) and record["refiner_switch"] == 0.7
    text = Image.open(tmp_path / "out.png").text["parameters"]
    assert f"Refiner: {refiner_folder.name}" in text and "Refiner switch at: 0.7" in text
    assert "loaded refiner" in result.stderr


# --- from the review -----------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_tile_vae_reaches_both_hires_decodes(tmp_path, tiny_single_file, monkeypatch, upscaler):
    from ldmcli import pipeline

    tiles = []
    real = pipeline.decode_latents

    def spy(model, latents, *a, tile=None, **k):
        tiles.append(tile)
        return real(model, latents, *a, tile=tile, **k)

    monkeypatch.setattr(pipeline, "decode_latents", spy)
    result = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-W", "32", "-H", "32", "--hires-scale", "2",
                    "--hires-upscaler", upscaler, "--tile-vae", "on", "-o", tmp_path / "o.png")
    assert result.exit_code == 0, result.output
    assert tiles and all(t is not None for t in tiles), tiles
    assert len(tiles) == (2 if upscaler == "lanczos" else 1)


def test_refiner_continues_the_prompt_editing_timeline(tmp_path, monkeypatch, sdxl_pair):
    """[cat:dog:0.5] over 10 steps, switch 0.8: the base runs 8 steps (cat, then dog from call 6); the refiner's
    2 steps are calls 8 and 9 of A1111's one loop: dog. Restarting the count at 0 gives cat again."""
    from ldmcli import denoiser

    base, ref = sdxl_pair
    used = []
    real_at = denoiser.ConditioningSchedule.at

    def at(self, call):
        c = real_at(self, call)
        if len(self.entries) > 1:
            used.append(next(i for i, (_, cc) in enumerate(self.entries) if cc is c))
        return c

    monkeypatch.setattr(denoiser.ConditioningSchedule, "at", at)
    result = invoke("generate", "[cat:dog:0.5]", "-m", base, "--refiner", ref, "--refiner-switch", "0.8",
                    "--steps", "10", "--sampler", "euler", "-W", "64", "-H", "64", "--dtype", "fp32",
                    "-o", tmp_path / "o.png")
    assert result.exit_code == 0, result.output
    assert used == [0] * 6 + [1] * 4, used


def test_deep_cache_reaches_the_base_and_the_refiner(tmp_path, sdxl_pair, monkeypatch):
    """--deep-cache wraps both U-Nets of a refined image: each starts with a full evaluation and reuses between,
    on its own features (the two U-Nets are different modules)."""
    from ldmcli.models.unet import UNetModel

    base, refiner_folder = sdxl_pair
    calls = []
    forward = UNetModel.forward

    def spy(self, *a, deep=None, **k):
        calls.append((id(self), deep is not None and deep.features is not None))
        return forward(self, *a, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", spy)
    result = invoke("generate", PROMPT, "-m", base, *TINY, "-W", "64", "-H", "64", "--refiner", refiner_folder,
                    "--refiner-switch", "0.5", "--deep-cache", "2", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    unets = list(dict.fromkeys(unet for unet, _ in calls))
    assert len(unets) == 2
    for unet in unets:
        reused = [r for u, r in calls if u == unet]
        assert reused[0] is False and reused[1::2] == [True] * len(reused[1::2]), (unet, reused)
    assert "DeepCache: 2" in Image.open(tmp_path / "out.png").text["parameters"]


def _merging_spy(monkeypatch) -> list[tuple[int, tuple[int, ...], float | None, bool]]:
    """Each U-Net call: (which U-Net, latent shape, the token merging ratio it was handed, DeepCache reused)."""
    from ldmcli.models.unet import UNetModel

    calls = []
    forward = UNetModel.forward

    def spy(self, x, *a, merging=None, deep=None, **k):
        calls.append((id(self), tuple(x.shape[-2:]), None if merging is None else merging.ratio,
                      deep is not None and deep.features is not None))
        return forward(self, x, *a, merging=merging, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", spy)
    return calls


def test_tome_reaches_the_base_the_refiner_and_deep_cache(tmp_path, sdxl_pair, monkeypatch):
    """--tome with --deep-cache on a refined image: every call of both U-Nets merges, reused or not."""
    base, refiner_folder = sdxl_pair
    calls = _merging_spy(monkeypatch)
    result = invoke("generate", PROMPT, "-m", base, *TINY, "-W", "64", "-H", "64", "--refiner", refiner_folder,
                    "--refiner-switch", "0.5", "--deep-cache", "2", "--tome", "0.5", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert len({unet for unet, *_ in calls}) == 2 and any(reused for *_, reused in calls)
    assert all(ratio == 0.5 for _, _, ratio, _ in calls), calls


def test_tome_reaches_both_hires_passes_and_img2img(tmp_path, tiny_single_file, monkeypatch):
    calls = _merging_spy(monkeypatch)
    result = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-W", "32", "-H", "32", "--hires-scale", "2",
                    "--tome", "0.3", "-o", tmp_path / "hires.png")
    assert result.exit_code == 0, result.output
    assert {shape for _, shape, _, _ in calls} == {(4, 4), (8, 8)}  # first pass, second pass
    assert all(ratio == 0.3 for _, _, ratio, _ in calls), calls
    calls.clear()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "init.png")
    result = invoke("generate", PROMPT, "-m", tiny_single_file, *TINY, "-i", tmp_path / "init.png", "--strength", "0.6",
                    "--tome", "0.4", "-o", tmp_path / "img2img.png")
    assert result.exit_code == 0, result.output
    assert calls and all(ratio == 0.4 for _, _, ratio, _ in calls), calls


def test_taesd_decodes_the_refiners_images(tmp_path, sdxl_pair, monkeypatch):
    """The refiner's images are decoded by the TAESD too (the refiner's own VAE decodes them otherwise)."""
    from diffusers import AutoencoderTiny

    from ldmcli.models.taesd import TinyAutoencoder
    from ldmcli.models.vae import AutoencoderKL

    base, refiner_folder = sdxl_pair
    torch.manual_seed(3)
    AutoencoderTiny().save_pretrained(tmp_path / "taesdxl", safe_serialization=True)
    decoded = []
    for cls in (TinyAutoencoder, AutoencoderKL):
        real = cls.decode
        monkeypatch.setattr(cls, "decode", lambda self, z, real=real, cls=cls: decoded.append(cls.__name__) or real(self, z))
    result = invoke("generate", PROMPT, "-m", base, *TINY, "-W", "64", "-H", "64", "--refiner", refiner_folder,
                    "--refiner-switch", "0.5", "--taesd", tmp_path / "taesdxl", "-o", tmp_path / "out.png")
    assert result.exit_code == 0, result.output
    assert decoded == ["TinyAutoencoder"], decoded
    assert "note:" not in result.stderr  # taesdxl on SDXL: no family note
