"""--taesd: the tiny autoencoder decodes in place of the VAE (`models/taesd.py`, `taesd_file.py`).

Oracle: diffusers' `AutoencoderTiny` with the same random weights: alone (decode and encode, bit for bit in
fp32), and in diffusers' `StableDiffusionPipeline(..., vae=AutoencoderTiny)` on its own output path
(`output_type="pil"`), whose final latents ldm decodes (`decode_latents`). The TAESD is the real
architecture (madebyollin's taesd: 64 channels, decoder Blocks 3/3/3/1, encoder 1/3/3/3), random.

Files in each layout a user has: the diffusers folder (`save_pretrained`), its weights file alone (what
stable-diffusion.cpp's --taesd takes), and madebyollin's `taesd_decoder` (.safetensors, .pth), written
here from the diffusers names by madebyollin's rule: his decoder is one nn.Sequential whose layer 0 is the
clamp, so diffusers' `decoder.layers.{i}` is his `{i + 1}` (`ORIGINAL_INDEX` below).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file
from sd_fixtures import assert_pixels_match, diffusers_latents_and_pixels

from ldmcli import pipeline
from ldmcli.cli import cli
from ldmcli.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from ldmcli.models.taesd import TinyAutoencoder, TinyConfig
from ldmcli.taesd_file import read_taesd

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
PROMPT = "a red circle on a blue background"
# madebyollin's taesd.py: Decoder = Sequential(Clamp(), conv(4, 64), ReLU(), Block x3, Upsample, conv, ...):
# his index = diffusers' DecoderTiny index + 1 (DecoderTiny applies the clamp in forward()).
ORIGINAL_INDEX = 1


def _taesd(seed: int, **config):
    """A diffusers AutoencoderTiny in madebyollin's taesd structure, random: He-normal convolutions scaled by
    0.6, so that 40 layers of ReLUs and residual adds neither die out nor blow up (the default init decays
    to a flat image: a test that could not fail), random biases, the last one centred on mid grey."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(**config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim == 4:
                p.normal_(0, 0.6 * math.sqrt(2 / p[0].numel()))
            else:
                p.normal_(0, 0.05)
        vae.decoder.layers[-1].bias.add_(0.5)
    return vae


def _original_decoder(vae) -> dict[str, torch.Tensor]:
    """The decoder's tensors under madebyollin's own names (taesd_decoder.safetensors / .pth)."""
    out = {}
    for key, tensor in vae.state_dict().items():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", key)
        if match:
            out[f"{int(match[1]) + ORIGINAL_INDEX}.{match[2]}"] = tensor.detach().clone().contiguous()
    return out


def _original_encoder(vae) -> dict[str, torch.Tensor]:
    """taesd_encoder's names: madebyollin's encoder Sequential has no clamp, so the indices are diffusers'."""
    return {k.removeprefix("encoder.layers."): v.detach().clone().contiguous()
            for k, v in vae.state_dict().items() if k.startswith("encoder.")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesds")
    vae = _taesd(11)
    vae.save_pretrained(root / "taesd", safe_serialization=True)
    weights = root / "taesd" / "diffusion_pytorch_model.safetensors"
    alone = root / "taesd.safetensors"
    alone.write_bytes(weights.read_bytes())
    save_file(_original_decoder(vae), root / "taesd_decoder.safetensors")
    torch.save(_original_decoder(vae), root / "taesd_decoder.pth")
    save_file(_original_encoder(vae), root / "taesd_encoder.safetensors")
    return {"vae": vae, "folder": root / "taesd", "folder-weights": weights, "diffusers-file": alone,
            "taesd_decoder.safetensors": root / "taesd_decoder.safetensors",
            "taesd_decoder.pth": root / "taesd_decoder.pth", "encoder": root / "taesd_encoder.safetensors"}


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# --- the network -------------------------------------------------------------------------------------


@torch.inference_mode()
def test_decode_and_encode_equal_diffusers_bit_for_bit(files):
    reference = files["vae"]
    ours = TinyAutoencoder(TinyConfig())
    ours.load_state_dict(reference.state_dict(), strict=True)
    z = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(3)) * 2
    expected = reference.decode(z).sample
    assert torch.equal(ours.decode(z), expected)
    assert expected.std() > 0.1 and (expected.abs() < 1).float().mean() > 0.3  # not saturated: the test can fail
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(ours.encode(image), reference.encode(image).latents)


@torch.inference_mode()
def test_bf16_channels_last_decode_is_close_to_fp32(files):
    """What `TaesdFile.build` makes on a CPU with bf16: the error is bf16's (measured max 0.03 on [-1, 1])."""
    taesd = read_taesd(files["folder"])
    exact, fast = taesd.build(CPU, torch.float32), taesd.build(CPU, torch.bfloat16)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5)) * 2
    a, b = exact.decode(z), fast.decode(z.to(torch.bfloat16)).float()
    assert (a - b).abs().max() < 0.08 and (a - b).abs().mean() < 0.01, ((a - b).abs().max(), (a - b).abs().mean())


# --- files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "folder-weights", "diffusers-file", "taesd_decoder.safetensors",
                                  "taesd_decoder.pth"])
@torch.inference_mode()
def test_every_layout_reads_to_the_same_decoder(kind, files):
    taesd = read_taesd(files[kind])
    expected = {k: v for k, v in files["vae"].state_dict().items() if k.startswith("decoder.")}
    assert taesd.tensors.keys() == expected.keys()
    assert all(torch.equal(taesd.tensors[k], expected[k]) for k in expected)
    assert taesd.config == TinyConfig(encoder_blocks=None)
    assert taesd.layout == {"folder": "diffusers", "folder-weights": "diffusers", "diffusers-file": "diffusers-file"}.get(
        kind, "taesd_decoder")
    module = taesd.build(CPU, torch.float32)
    assert module.encoder is None  # images to start from are encoded by the VAE


@pytest.fixture(scope="module")
def sd1_reference(tiny_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)


@pytest.mark.parametrize("kind", ["folder", "taesd_decoder.safetensors"])
@torch.inference_mode()
def test_pixels_equal_diffusers_pipeline_with_autoencoder_tiny(kind, files, tiny_folder, sd1_reference):
    swapped = type(sd1_reference)(**{**sd1_reference.components, "vae": files["vae"]})
    swapped.set_progress_bar_config(disable=True)
    latents, expected = diffusers_latents_and_pixels(swapped, PROMPT, height=64, width=64, num_inference_steps=2,
                                                     generator=torch.Generator().manual_seed(9))
    model = pipeline.load(tiny_folder, taesd=files[kind])
    ours = pipeline.decode_latents(model, latents)
    assert_pixels_match(ours, expected, f"--taesd {kind}")
    full = pipeline.decode_latents(pipeline.load(tiny_folder), latents)
    assert (full.int() - ours.int()).abs().gt(1).double().mean() > 0.5  # the tiny VAE did decode
    assert 0.2 < (expected.float() / 255).mean() < 0.8 and expected.float().std() > 10  # neither flat nor saturated


@torch.inference_mode()
def test_tiled_decode_with_taesd_matches_whole(files, tiny_folder):
    """Tiled decode (`--tile-vae`) with TAESD: the tiles' seams are blended like the VAE's. TAESD has no
    normalisation or attention, but its receptive field (about 18 latents across) is wider than half the
    16-latent overlap, so near a seam the pixels differ a little (measured: max 6/255, mean 0.23/255);
    a tiling that put the image's pixels out of place would differ by tens."""
    model = pipeline.load(tiny_folder, taesd=files["folder"])
    latents = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(2)) * 2
    whole = pipeline.decode_latents(model, latents)
    tiled = pipeline.decode_latents(model, latents, tile=(32, 16))
    diff = (whole.int() - tiled.int()).abs()
    print(f"\ntiled TAESD: max {diff.max().item()}/255, mean {diff.double().mean().item():.3f}/255", end="")
    assert tiled.shape == whole.shape == (1, 384, 320, 3)
    assert diff.max() <= 10 and diff.double().mean() < 0.4


# --- refused, in one line ----------------------------------------------------------------------------


def test_the_encoder_file_alone_is_refused_naming_the_decoder(files):
    with pytest.raises(UnsupportedModelError) as excinfo:
        read_taesd(files["encoder"])
    assert "taesd_decoder" in _one_line(excinfo)


def test_unknown_missing_and_misshapen_tensors_are_named(tmp_path, files):
    tensors = _original_decoder(files["vae"])
    save_file({**tensors, "20.weight": torch.zeros(3, 3, 3, 3), "ema.decay": torch.ones(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "extra.safetensors")
    assert "ema.decay" in _one_line(excinfo)
    dropped = dict(tensors)
    del dropped["3.conv.2.bias"]
    save_file(dropped, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "missing.safetensors")
    assert "decoder.layers.2.conv.2.bias" in _one_line(excinfo) and "missing" in str(excinfo.value)
    bent = {**tensors, "4.conv.0.weight": torch.zeros(64, 64, 1, 1)}
    save_file(bent, tmp_path / "bent.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "bent.safetensors")
    assert "decoder.layers.3.conv.0.weight has shape [64, 64, 1, 1]" in _one_line(excinfo)
    save_file({**tensors, "01.weight": tensors["1.weight"].clone()}, tmp_path / "twice.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "twice.safetensors")  # "1.weight" and "01.weight": one layer twice
    assert "'01.weight'" in _one_line(excinfo) and "same layer" in str(excinfo.value)
    diffusers_named = {k: v.contiguous() for k, v in files["vae"].state_dict().items()}
    save_file({**diffusers_named, "encoder.layers.0.extra": torch.zeros(1)}, tmp_path / "extra-diffusers.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "extra-diffusers.safetensors")  # the diffusers layout's own unknown-key check
    assert "encoder.layers.0.extra" in _one_line(excinfo)
    shuffled = {k: v for k, v in tensors.items() if not k.startswith("7.")}  # the conv after the first upsampling gone
    save_file(shuffled, tmp_path / "shuffled.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "shuffled.safetensors")
    _one_line(excinfo)


def test_what_is_not_a_taesd_is_refused(tmp_path, tiny_folder, tiny_single_file):
    with pytest.raises(ModelNotFoundError):
        read_taesd(tmp_path / "nowhere.safetensors")
    with pytest.raises(UnsupportedModelError) as excinfo:
        read_taesd(tiny_folder / "vae")  # a full VAE
    assert "--vae" in _one_line(excinfo)
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tiny_single_file)  # a whole checkpoint
    _one_line(excinfo)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError) as excinfo:
        read_taesd(tmp_path / "notes.txt")
    _one_line(excinfo)


def test_a_taesd_of_another_latent_space_does_not_fit(tmp_path, tiny_folder):
    flux_like = _taesd(3, latent_channels=16)
    flux_like.save_pretrained(tmp_path / "taef1", safe_serialization=True)
    with pytest.raises(UnsupportedModelError) as excinfo:
        pipeline.load(tiny_folder, taesd=tmp_path / "taef1")
    assert "16 latent channels" in _one_line(excinfo)
    config = json.loads((tmp_path / "taef1" / "config.json").read_text())
    (tmp_path / "taef1" / "config.json").write_text(json.dumps({**config, "latent_channels": 4, "shift_factor": 0.1159}))
    with pytest.raises(UnsupportedModelError) as excinfo:
        read_taesd(tmp_path / "taef1")
    assert "shift_factor" in _one_line(excinfo)


def test_a_taesdxl_on_an_sd1_model_is_said(tmp_path, files, tiny_folder):
    xl = tmp_path / "taesdxl_decoder.safetensors"
    xl.write_bytes(files["taesd_decoder.safetensors"].read_bytes())
    model = pipeline.load(tiny_folder, taesd=xl)
    assert any("taesdxl_decoder.safetensors" in n and "SDXL" in n for n in model.notes), model.notes
    assert pipeline.load(tiny_folder, taesd=files["taesd_decoder.safetensors"]).notes == []


# --- the command line --------------------------------------------------------------------------------

TINY = ["-W", "64", "-H", "64", "--steps", "3", "-s", "5", "--dtype", "fp32"]


def _invoke(*args, env):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_generate_decodes_with_taesd_records_it_and_from_png_finds_it(tmp_path, files, tiny_single_file):
    env = {"LDM_MODELS_DIR": str(tmp_path / "models"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "LDM_MODEL": None}
    decoder = tmp_path / "taesd_decoder.safetensors"
    decoder.write_bytes(files["taesd_decoder.safetensors"].read_bytes())
    made = _invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--taesd", decoder, "--json",
                   "-o", tmp_path / "t.png", env=env)
    plain = _invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "p.png", env=env)
    assert made.exit_code == plain.exit_code == 0, made.output
    assert "decoding with the tiny autoencoder taesd_decoder.safetensors" in made.stderr
    record = json.loads(next(line for line in made.stdout.splitlines() if line.startswith('{"path"')))
    import hashlib

    assert record["taesd"] == {"name": "taesd_decoder.safetensors", "path": str(decoder.resolve()),
                               "hash": hashlib.sha256(decoder.read_bytes()).hexdigest()[:10]}
    assert "VAE Decoder: TAESD" in Image.open(tmp_path / "t.png").text["parameters"]  # A1111's label for it
    assert "VAE Decoder" not in Image.open(tmp_path / "p.png").text["parameters"]
    ours, full = np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "p.png"))
    assert (np.abs(ours.astype(int) - full.astype(int)) > 1).mean() > 0.5
    # The same image through the library: load with the TAESD, sample, decode.
    again = _invoke("generate", "--from-png", tmp_path / "t.png", "-o", tmp_path / "again.png", env=env)
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), ours)
    # Another file at the recorded path (its hash differs): not used, and said
    decoder.rename(tmp_path / "elsewhere.safetensors")
    other = _taesd(12)
    save_file(_original_decoder(other), decoder)
    swapped = _invoke("generate", "--from-png", tmp_path / "t.png", "-o", tmp_path / "swapped.png", env=env)
    assert swapped.exit_code == 0, swapped.output
    assert "not the file at" in swapped.stderr and np.array_equal(np.asarray(Image.open(tmp_path / "swapped.png")), full)
    decoder.unlink()
    moved = _invoke("generate", "--from-png", tmp_path / "t.png", "-o", tmp_path / "moved.png", env=env)
    assert moved.exit_code == 0, moved.output
    assert "decoded with the tiny autoencoder taesd_decoder.safetensors" in moved.stderr and "--taesd" in moved.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "moved.png")), full)


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.safetensors", "no such TAESD"),
    (lambda d: d / "tiny-sd1-folder-vae", "--vae"),
])
def test_a_bad_taesd_is_a_one_line_error_before_any_image(tmp_path, tiny_single_file, tiny_folder, make, message):
    import shutil

    shutil.copytree(tiny_folder / "vae", tmp_path / "tiny-sd1-folder-vae")
    env = {"LDM_MODELS_DIR": str(tmp_path / "models"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "LDM_MODEL": None}
    result = _invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--taesd", make(tmp_path),
                     "-o", tmp_path / "out" / "x.png", env=env)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
