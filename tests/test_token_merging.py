"""--tome RATIO: token merging before the full-resolution self-attentions, as A1111 applies it.

Oracle: tomesd (Bolya and Hoffman's own package, which A1111 calls) patched over diffusers' U-Net with
A1111's arguments (`tomesd.apply_patch(ratio=R, use_rand=False, merge_attn=True, merge_crossattn=False,
merge_mlp=False)`, `modules/sd_models.py` `apply_token_merging`; written out here, not taken from ldm), with
the same random weights: the merge functions alone, one U-Net call, and the diffusers pipeline's pixels on its
own output path. fp32, one thread.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sd_fixtures import assert_pixels_match, diffusers_latents_and_pixels, unet_pair

from ldmcli import pipeline
from ldmcli.cli import cli
from ldmcli.models.unet import UNetConfig
from ldmcli.request import ImageRequest
from ldmcli.token_merging import TokenMerging, bipartite_soft_matching

pytestmark = pytest.mark.usefixtures("one_thread")

# A1111's call (modules/sd_models.py apply_token_merging), tomesd's other arguments at its defaults
# (max_downsample 1, sx = sy = 2).
A1111_TOMESD = dict(use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)
# SD1's pattern, tiny: attention at the full-resolution level and one below.
CONFIG = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                    context_dim=32)


@pytest.mark.parametrize("h, w, ratio", [(8, 8, 0.5), (9, 7, 0.3), (16, 12, 0.9), (4, 6, 0.75), (3, 2, 0.5)])
def test_merge_and_unmerge_equal_tomesd_bit_for_bit(h, w, ratio):
    from tomesd.merge import bipartite_soft_matching_random2d

    x = torch.randn(2, h * w, 24, generator=torch.Generator().manual_seed(h * w))
    r = int(h * w * ratio)
    their_merge, their_unmerge = bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)
    our_merge, our_unmerge = bipartite_soft_matching(x, w, h, 2, 2, r)
    merged = their_merge(x)
    assert merged.shape[1] == h * w - min(r, h * w - (h // 2) * (w // 2))
    assert torch.equal(our_merge(x), merged)
    assert torch.equal(our_unmerge(merged), their_unmerge(merged))
    # Merging did something: some tokens came back as another's value
    assert not torch.equal(our_unmerge(merged), x)


def test_only_the_full_resolution_is_merged():
    merging = TokenMerging(0.5, (8, 6))
    tokens = torch.randn(1, 48, 4)
    assert merging.plan(tokens, 8, 6) is not None
    assert merging.plan(tokens[:, :12], 4, 3) is None  # a level below: tomesd's max_downsample 1
    assert TokenMerging(0.01, (8, 6)).plan(tokens, 8, 6) is None  # int(48 x 0.01) = 0 tokens: nothing to merge
    assert TokenMerging(0.5, (1, 48)).plan(tokens, 1, 48) is None  # no whole 2 x 2 cell: no destination


@pytest.fixture(scope="module")
def pair():
    """Our U-Net and diffusers' with the same random weights."""
    return unet_pair(CONFIG)


@pytest.mark.parametrize("size, ratio", [((8, 8), 0.5), ((12, 10), 0.3), ((9, 7), 0.7)])
@torch.inference_mode()
def test_unet_call_equals_diffusers_with_tomesd(pair, size, ratio):
    import tomesd

    ours, ref = pair
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 4, *size, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor(500.0)
    exact = ref(x, t, encoder_hidden_states=context).sample
    tomesd.apply_patch(ref, ratio=0.0, **A1111_TOMESD)
    try:  # tomesd's block, merging nothing, is diffusers' block: the patch itself is faithful here
        assert torch.allclose(ref(x, t, encoder_hidden_states=context).sample, exact, atol=1e-5, rtol=0)
        tomesd.remove_patch(ref)
        tomesd.apply_patch(ref, ratio=ratio, **A1111_TOMESD)
        expected = ref(x, t, encoder_hidden_states=context).sample
    finally:
        tomesd.remove_patch(ref)
    got = ours(x, t, context, merging=TokenMerging(ratio, size))
    # Measured: max |d| 3e-6 at |out| ~3 (the same kernels; attention's softmax sums in another order)
    assert (got - expected).abs().max() < 2e-5, (got - expected).abs().max()
    assert (expected - exact).abs().max() > 1e-2  # merging changed the output: the test can fail


@pytest.fixture(scope="module")
def sd1_reference(tiny_folder):
    """The tiny SD1 folder in diffusers' pipeline, with DDIM (its own config's schedule): ldm's `ddim`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


@torch.inference_mode()
def test_pixels_equal_the_diffusers_pipeline_with_tomesd(tiny_folder, sd1_reference):
    """ldm's sampling path at --tome 0.5 (`guided_denoiser`'s wrapper over the U-Net, which every path builds)
    against diffusers' pipeline patched by tomesd, DDIM, on its own output path."""
    import tomesd

    prompt, seed = "a red circle on a blue background", 9
    kwargs = dict(height=64, width=64, num_inference_steps=3, guidance_scale=7.5)
    tomesd.apply_patch(sd1_reference, ratio=0.5, **A1111_TOMESD)
    try:
        latents, expected = diffusers_latents_and_pixels(sd1_reference, prompt, generator=torch.Generator().manual_seed(seed),
                                                         **kwargs)
    finally:
        tomesd.remove_patch(sd1_reference)
    _, exact = diffusers_latents_and_pixels(sd1_reference, prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
    model = pipeline.load(tiny_folder)
    request = ImageRequest(prompt=prompt, steps=3, cfg_scale=7.5, seed=seed, width=64, height=64, sampler="ddim",
                           tome=0.5).checked()
    ours = pipeline.decode_latents(model, pipeline.sample_latents(model, request, [seed]))
    assert_pixels_match(ours, expected, "--tome 0.5")
    assert (expected.int() - exact.int()).abs().max() > 2  # tomesd changed diffusers' image


# --- the command line and A1111's key -----------------------------------------------------------------


TINY = ["-W", "64", "-H", "64", "--steps", "3", "-s", "5", "--dtype", "fp32"]


def _invoke(*args, env):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def test_tome_is_written_as_a1111_does_and_read_back(tmp_path, tiny_single_file):
    env = {"LDM_MODELS_DIR": str(tmp_path / "models"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "LDM_MODEL": None}
    made = _invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--tome", "0.5", "--json", "-o", tmp_path / "t.png",
                   env=env)
    exact = _invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "e.png", env=env)
    assert made.exit_code == exact.exit_code == 0, made.output
    record = json.loads(next(line for line in made.stdout.splitlines() if line.startswith('{"path"')))
    assert record["tome"] == 0.5
    text = Image.open(tmp_path / "t.png").text["parameters"]
    assert "Token merging ratio: 0.5" in text and "Token merging ratio" not in Image.open(tmp_path / "e.png").text["parameters"]
    ours, plain = np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "e.png"))
    assert not np.array_equal(ours, plain)
    # The A1111 text alone (no ldm record) reproduces it
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.open(tmp_path / "t.png").save(tmp_path / "a1111.png", pnginfo=info)
    again = _invoke("generate", "--from-png", tmp_path / "a1111.png", "-m", tiny_single_file, "--dtype", "fp32",
                    "-o", tmp_path / "again.png", env=env)
    assert again.exit_code == 0, again.output
    assert "Token merging" not in again.stderr  # honoured: no note
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), ours)
    # A1111's request setting and ldm's JSONL key say the same
    lines = [{"prompt": "a cat", "tome": 0.5, "name": "jsonl"},
             {"prompt": "a cat", "override_settings": {"token_merging_ratio": 0.5}, "steps": 3, "seed": 5,
              "cfg_scale": 7.5, "width": 64, "height": 64, "sampler_name": "Euler a", "name": "a1111"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    batch = _invoke("generate", "--prompts", tmp_path / "p.jsonl", "-m", tiny_single_file, *TINY, "--json",
                    "-o", f"{tmp_path / 'batch'}/{{name}}.png", env=env)
    assert batch.exit_code == 0, batch.output
    assert [json.loads(line)["tome"] for line in batch.stdout.splitlines() if line.startswith('{"path"')] == [0.5, 0.5]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "batch" / "jsonl.png")), ours)


@pytest.mark.parametrize("args", [["--tome", "0.95"], ["--tome", "-0.1"], ["--tome", "nan"]])
def test_a_ratio_out_of_bounds_is_exit_2_before_loading(tmp_path, tiny_single_file, args):
    result = _invoke("generate", "a cat", "-m", tiny_single_file, *args, "-o", tmp_path / "x.png", env={})
    assert result.exit_code == 2 and "tome" in result.stderr, result.output
    assert "loaded" not in result.stderr  # refused while reading the flags, or the request before loading


def test_a_request_out_of_bounds_is_refused():
    for bad in (0.95, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="token merging ratio"):
            ImageRequest(tome=bad).checked()
    assert ImageRequest(tome=0.9).checked().tome == 0.9
