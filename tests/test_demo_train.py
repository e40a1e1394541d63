"""The demo model's training recipe (python -m ldmcli.demo.train) end to end, at a few steps.

The shipped file's quality is tested in test_demo_model.py; this checks that the recipe still runs,
writes a file the pipeline loads like any SD 1.x checkpoint, records how it was made, is seeded,
and continues from its own output with --init.
"""

from __future__ import annotations

import json

import pytest
import torch

from ldmcli.checkpoint import read_safetensors_metadata
from ldmcli.demo import train

# Every stage, a handful of steps: seconds, not the recipe's hour.
TINY = ["--vae-steps", "3", "--vae-full-steps", "1", "--vae-batch", "2", "--pool-size", "8", "--steps", "3",
        "--batch", "2", "--warmup", "1", "--procs", "1", "--threads", "1", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-train")
    out = work / "model.safetensors"
    train.main([*TINY, "--workdir", str(work), "--out", str(out)])
    return work, out


def test_recipe_writes_a_loadable_sd1_file_with_its_record(trained) -> None:
    from ldmcli.pipeline import generate, load
    from ldmcli.request import ImageRequest

    work, out = trained
    meta = read_safetensors_metadata(out)
    record = json.loads(meta["ldm.training"])
    assert record["command"].startswith("python -m ldmcli.demo.train") and "--steps 3" in record["command"]
    assert record["recipe"]["steps"] == record["steps_done"] == 3 and record["seed"] == 0
    assert record["torch"] == torch.__version__
    model = load(out)
    assert model.spec.family == "sd1" and model.spec.native_size == 64
    assert model.spec.scale_factor == pytest.approx(float(meta["ldm.scale_factor"]))
    image = generate(model, ImageRequest(prompt="a red circle", width=64, height=64, steps=2, cfg_scale=2.0, sampler="euler"), [0])
    assert image.shape == (1, 64, 64, 3)


def test_recipe_is_seeded(trained, tmp_path) -> None:
    """The diffusion stage rerun on the saved VAE gives the same weights (same seed, one thread)."""
    from safetensors.torch import load_file

    work, out = trained
    again = tmp_path / "again.safetensors"
    train.main([*TINY, "--stage", "diffusion", "--workdir", str(work), "--out", str(again)])
    first, second = load_file(str(out)), load_file(str(again))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def test_continuation_records_what_it_continued(trained, tmp_path) -> None:
    from safetensors.torch import load_file

    work, out = trained
    more = tmp_path / "more.safetensors"
    train.main([*TINY, "--stage", "diffusion", "--workdir", str(work), "--init", str(out), "--out", str(more)])
    record = json.loads(read_safetensors_metadata(more)["ldm.training"])
    assert record["continued_from"] == json.loads(read_safetensors_metadata(out)["ldm.training"])
    before, after = load_file(str(out)), load_file(str(more))
    unet_keys = [k for k in before if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(before[k], after[k]) for k in unet_keys)  # it trained on
    vae_keys = [k for k in before if k.startswith("first_stage_model.")]
    assert all(torch.equal(before[k], after[k]) for k in vae_keys)  # on the same VAE


@pytest.mark.parametrize("scheme", ["eps", "min_snr", "min_snr_v", "eps_min_snr_v"])
def test_loss_weights(scheme) -> None:
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    w = train.loss_weights(snr, scheme, gamma=5.0)
    expected = {
        "eps": [1.0, 1.0, 1.0, 1.0],
        "min_snr": [1.0, 1.0, 1.0, 0.05],
        "min_snr_v": [101.0, 2.0, 1.2, 0.06],
        "eps_min_snr_v": [101.0, 2.0, 1.2, 1.0],
    }[scheme]
    torch.testing.assert_close(w, torch.tensor(expected))
