"""--deep-cache along every path that reaches it: which features each call reuses (a fake U-Net that stamps
them, through the real samplers and CFG), repeated timesteps, Heun's two evaluations at one noise level, prompt
edits that change the passes, and every U-Net variant (SD1, SD2, SDXL's y, LCM's timestep_cond, 9-channel
inpainting, the fused CPU path) reusing features of the same inputs exactly. From a review that tried to break
DeepCache: the tests on repeated timesteps and changing passes failed on its first version (which counted
evaluations by timestep alone and passes by call order). Tiny models only, fp32, one thread."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ldmcli.cli import cli
from ldmcli.deep_cache import SHALLOW, DeepCacheNetwork
from ldmcli.denoiser import CFGDenoiser, ConditioningSchedule, Denoiser, InpaintingNetwork
from ldmcli.models.unet import DeepFeatures, UNetConfig, UNetModel
from ldmcli.samplers import sample
from ldmcli.schedule import DiffusionSchedule

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# A fake U-Net that records where the deep features it is handed came from (cheap: no convolution)


class Origins:
    """`unet(x, t, context, deep=)`: a full evaluation stamps its features with (call index, pass marker);
    a reusing one records the stamp it was handed."""

    def __init__(self):
        self.calls, self.reuses = 0, []  # reuses: (call, marker, stamp of the features)

    def __call__(self, x, t, context, deep=None, **_):
        call, self.calls = self.calls, self.calls + 1
        marker = context[:, 0, 0].tolist()  # 0.0 = negative prompt's pass, 1.0 = prompt's
        if deep.features is None:
            deep.features = (call, marker)
        else:
            self.reuses.append((call, marker, deep.features))
        return torch.zeros_like(x)


def _run_fake(sampler, steps, interval, cond, uncond, spacing=None):
    fake = Origins()
    net = DeepCacheNetwork(fake, interval)
    g = torch.Generator().manual_seed(0)
    denoiser = CFGDenoiser(Denoiser(net, DiffusionSchedule()), cond, uncond, 7.0)
    sample(sampler, DiffusionSchedule(), steps, denoiser, lambda: torch.randn(1, 4, 2, 2, generator=g), spacing=spacing)
    return fake, net


# A pass never reuses the deep features of the other guidance pass. (Through the CLI a prompt schedule's entries
# are padded to one length (`encode_texts`), so the number of passes cannot change mid-run; any other caller of
# CFGDenoiser with such a schedule could.)
@pytest.mark.parametrize("switch", [1, 5])
def test_heun_prompt_edit_to_two_passes_never_reuses_the_other_pass(switch):
    """Heun evaluates twice at sigma_{i+1} (corrector, then the next predictor): the wrapper counts the second
    as another pass (slot). When prompt editing makes the prompt longer than the negative one mid-run
    (--no-pad-conds: one batched pass -> two passes) at such a call, the slot numbers shift by one: the prompt's
    pass then reuses the negative prompt's features and vice versa."""
    uncond = torch.zeros(1, 77, 8)
    cond = ConditioningSchedule([(switch, torch.ones(1, 77, 8)), (10**6, torch.ones(1, 154, 8))])
    fake, _ = _run_fake("heun", 7, 3, cond, uncond)
    wrong = [(call, marker, stamp) for call, marker, stamp in fake.reuses if stamp[1] != marker]
    assert not wrong, f"(call, pass, (features' call, features' pass)): {wrong}"


# Guard: the same through `ldm generate` does not reuse the other pass (entries padded to one length).
def test_cli_heun_prompt_edit_no_pad_conds_reuses_own_pass(tmp_path, tiny_single_file, monkeypatch):
    forward, origin, keep, wrong = UNetModel.forward, {}, [], []

    def spy(self, x, t, context, *a, deep=None, **k):
        if deep is not None and deep.features is not None:
            if origin[id(deep.features)] != (x.shape[0], context.shape[1]):
                wrong.append((origin[id(deep.features)], (x.shape[0], context.shape[1])))
        out = forward(self, x, t, context, *a, deep=deep, **k)
        if deep is not None and id(deep.features) not in origin:
            origin[id(deep.features)] = (x.shape[0], context.shape[1])
            keep.append(deep.features)
        return out

    monkeypatch.setattr(UNetModel, "forward", spy)
    long = "a cat " + "red " * 90  # two CLIP chunks; the empty negative prompt is one
    for when in (1, 2, 3):
        result = CliRunner().invoke(cli, [
            "generate", f"[a cat:{long}:{when}]", "-m", str(tiny_single_file), "-W", "64", "-H", "64", "--steps", "7",
            "--sampler", "heun", "-s", "3", "--no-pad-conds", "--deep-cache", "3", "--overwrite", "-q",
            "-o", str(tmp_path / f"{when}.png")])
        assert result.exit_code == 0, result.output
    assert not wrong, f"(batch, context length) of the features' pass -> of the pass reusing them: {wrong}"


# Repeated timesteps (DPM++ 2M's rounded Karras/exponential grid) are new evaluations, not second passes: no
# extra full evaluations, no features reused many evaluations after they were made.
@pytest.mark.parametrize("spacing, steps", [("exponential", 100), ("karras", 1000)])
def test_features_reused_are_at_most_interval_minus_one_evaluations_old(spacing, steps):
    cond, uncond = torch.ones(1, 77, 8), torch.zeros(1, 77, 8)  # one batched pass a step: calls = evaluations
    fake, net = _run_fake("dpmpp_2m", steps, 3, cond, uncond, spacing=spacing)
    worst = max(call - stamp[0] for call, _, stamp in fake.reuses)
    assert worst <= 2, f"features reused {worst} evaluations after they were computed (interval 3)"


def test_kept_features_are_bounded_by_the_passes():
    """One slot per guidance pass is all that can be reused; every repeated timestep adds one that is kept for
    the rest of the run (on SD1.5 at 512x512 a slot is [2, 320, 64, 64])."""
    cond, uncond = torch.ones(1, 77, 8), torch.zeros(1, 77, 8)
    _, net = _run_fake("dpmpp_2m", 1000, 3, cond, uncond, spacing="exponential")
    assert len(net._kept) <= 2, f"{len(net._kept)} feature tensors kept"


def test_heun_full_evaluations_one_in_n():
    """Docs: "one evaluation in N runs the whole U-Net". Heun, 7 steps = 13 evaluations at interval 3."""
    cond, uncond = torch.ones(1, 77, 8), torch.zeros(1, 77, 8)
    fake, net = _run_fake("heun", 7, 3, cond, uncond)
    assert fake.calls == 13
    assert net.full_evaluations == 5, f"{net.full_evaluations} full evaluations"


# ---------------------------------------------------------------------------------------------
# Consistency across U-Net variants: a reuse of features kept from the SAME inputs is the full output exactly.
# 64 channels, not 32: with 32 channels in 32 GroupNorm groups, a per-channel shift (the time/label embedding
# a ResBlock adds) is removed by the next GroupNorm, so a level-0 block cannot see emb at all -- the reason
# tests/test_deep_cache.py (model_channels=32) cannot catch a wrong t, y or timestep_cond in the reusing path.

SD1_4 = UNetConfig(model_channels=64, channel_mult=(1, 1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 1, 0),
                   context_dim=32)
SD2 = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0), context_dim=48,
                 num_heads=None, head_dim=16, use_linear_projection=True, upcast_attention=True)
SDXL = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 2),
                  middle_transformer_depth=2, context_dim=48, num_heads=None, head_dim=16, use_linear_projection=True,
                  adm_in_channels=64)
LCM = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), context_dim=32,
                 time_cond_proj_dim=16)
INPAINT = UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), context_dim=32,
                     in_channels=9)


def _model(config):
    torch.manual_seed(0)
    m = UNetModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised output convolution
    return m


def _cond(config, batch):
    c = {"context": torch.randn(batch, 5, config.context_dim)}
    if config.adm_in_channels:
        c["y"] = torch.randn(batch, config.adm_in_channels)
    if config.time_cond_proj_dim:
        c["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim)
    return c


@pytest.mark.parametrize("config, size", [(SD1_4, (8, 12)), (SD1_4, (9, 7)), (SD2, (8, 8)), (SDXL, (6, 10)),
                                          (LCM, (8, 8))], ids=["sd1-8x12", "sd1-odd", "sd2", "sdxl", "lcm"])
def test_reuse_of_same_inputs_is_the_full_output(config, size):
    m = _model(config)
    torch.manual_seed(1)
    x, t, cond = torch.randn(2, config.in_channels, *size), torch.tensor([500.0, 500.0]), _cond(config, 2)
    with torch.no_grad():
        deep = DeepFeatures(SHALLOW)
        full = m(x, t, **cond, deep=deep)
        plain = m(x, t, **cond)
        reused = m(x, t, **cond, deep=DeepFeatures(SHALLOW, deep.features))
    assert torch.equal(full, plain)
    torch.testing.assert_close(reused, full, atol=1e-6, rtol=0)


def test_inpainting_network_passes_deep_through():
    m = _model(INPAINT)
    torch.manual_seed(2)
    net = InpaintingNetwork(m, torch.rand(1, 1, 8, 8), torch.randn(1, 4, 8, 8))
    cached = DeepCacheNetwork(net, 2)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        a = cached(x, torch.tensor([900.0, 900.0]), context=c)
        assert torch.equal(a, net(x, torch.tensor([900.0, 900.0]), context=c))
        b = cached(x, torch.tensor([800.0, 800.0]), context=c)  # reuse
    assert cached.full_evaluations == 1 and b.shape == x.shape


def test_fused_cpu_path_reuse_is_the_full_output():
    """The packed oneDNN layers (`optimize.prepare_for_inference`, on for SD-sized U-Nets on CPU)."""
    from ldmcli.kernels import fused_path_available
    from ldmcli.optimize import prepare_for_inference

    if not fused_path_available():
        pytest.skip("no fused path")
    m = _model(SD1_4)
    prepare_for_inference({"unet": m}, "cpu", torch.float32, fuse=True)
    torch.manual_seed(3)
    x, t, c = torch.randn(2, 4, 8, 12), torch.tensor([500.0, 500.0]), torch.randn(2, 5, 32)
    with torch.no_grad():
        deep = DeepFeatures(SHALLOW)
        full = m(x, t, c, deep=deep)
        reused = m(x, t, c, deep=DeepFeatures(SHALLOW, deep.features))
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# End to end: one wrapper per sampling run, second passes start full, metadata round trips.


def _generate(tmp_path, model, *args):
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-W", "64", "-H", "64", "--steps", "6",
                                      "--sampler", "euler", "-s", "3", "--overwrite", "-q", *args])
    assert result.exit_code == 0, result.output
    return result


def test_batches_and_hires_each_start_full(tmp_path, tiny_single_file, monkeypatch):
    forward, calls = UNetModel.forward, []

    def spy(self, x, *a, deep=None, **k):
        calls.append((tuple(x.shape), deep is None or deep.features is None))
        return forward(self, x, *a, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", spy)
    _generate(tmp_path, tiny_single_file, "--deep-cache", "4", "--batch-count", "2", "-o", str(tmp_path / "a.png"))
    # 6 steps, 2 runs: full at 0 and 4 in each
    assert [full for _, full in calls] == [True, False, False, False, True, False] * 2
    calls.clear()
    _generate(tmp_path, tiny_single_file, "--deep-cache", "4", "--hires-scale", "2", "--hires-steps", "6",
              "--hires-strength", "0.5", "-o", str(tmp_path / "h.png"))
    second = [full for shape, full in calls if shape[-1] == 16]
    assert second and second[0], "the hires pass starts with a full evaluation"
    assert not all(second), "the hires pass uses DeepCache too"
    text = Image.open(tmp_path / "h.png").text
    assert "DeepCache: 4" in text["parameters"] and json.loads(text["ldm"])["deep_cache"] == 4


def test_img2img_and_inpainting_use_deep_cache(tmp_path, tiny_single_file, monkeypatch):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    forward, calls = UNetModel.forward, []

    def spy(self, x, *a, deep=None, **k):
        calls.append(deep is None or deep.features is None)
        return forward(self, x, *a, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", spy)
    _generate(tmp_path, tiny_single_file, "--deep-cache", "2", "-i", str(tmp_path / "init.png"), "--strength", "0.5",
              "-o", str(tmp_path / "i.png"))
    assert calls == [True, False, True]  # int(6 * 0.5) = 3 steps
    calls.clear()
    _generate(tmp_path, tiny_single_file, "--deep-cache", "2", "-i", str(tmp_path / "init.png"), "--mask",
              str(tmp_path / "mask.png"), "-o", str(tmp_path / "m.png"))
    assert calls == [True, False] * 2  # strength 0.75: int(6 * 0.75) = 4 steps
    assert "DeepCache: 2" in Image.open(tmp_path / "m.png").text["parameters"]


def test_cli_dpmpp_2m_exponential_reuses_only_recent_features(tmp_path, tiny_single_file, monkeypatch):
    """End to end: `--sampler dpmpp_2m --schedule exponential --steps 100 --deep-cache 3` (diffusers'
    rounded timesteps repeat near the end)."""
    forward, n, born, ages = UNetModel.forward, [0], {}, []

    def spy(self, x, *a, deep=None, **k):
        if deep.features is not None:
            ages.append(n[0] - born[id(deep.features)])
        out = forward(self, x, *a, deep=deep, **k)
        born.setdefault(id(deep.features), n[0])
        keep.append(deep.features)
        n[0] += 1
        return out

    keep = []
    monkeypatch.setattr(UNetModel, "forward", spy)
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "-W", "64", "-H", "64",
                                      "--steps", "100", "--sampler", "dpmpp_2m", "--schedule", "exponential", "-s", "3",
                                      "--deep-cache", "3", "-q", "-o", str(tmp_path / "d.png")])
    assert result.exit_code == 0, result.output
    assert max(ages) <= 2, f"deep features reused {max(ages)} U-Net evaluations after they were computed"


def test_a1111_text_and_jsonl_key_read_back(tmp_path, tiny_single_file, monkeypatch):
    from ldmcli.metadata import read_png_parameters

    base = "a cat\nNegative prompt: ugly\nSteps: 6, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64"
    assert read_png_parameters({"parameters": base + ", DeepCache: 3"}, "x").request.deep_cache == 3
    assert read_png_parameters({"parameters": base}, "x").request.deep_cache == 0
    with pytest.raises(Exception):
        read_png_parameters({"parameters": base + ", DeepCache: many"}, "x")
    with pytest.raises(Exception):  # out of range: refused, not run
        read_png_parameters({"parameters": base + ", DeepCache: 1000"}, "x").request.checked()

    forward, calls = UNetModel.forward, []

    def spy(self, x, *a, deep=None, **k):
        calls.append(deep is None or deep.features is None)
        return forward(self, x, *a, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", spy)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "deep_cache": 3}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    result = CliRunner().invoke(cli, ["generate", "--prompts", str(jobs), "-m", str(tiny_single_file), "-W", "64",
                                      "-H", "64", "--steps", "6", "--sampler", "euler", "-s", "3", "-q",
                                      "-o", str(tmp_path / "j.png")])
    assert result.exit_code == 0, result.output
    assert calls == [True, False, False, True, False, False] + [True] * 6  # the second job: off, exact
    pngs = sorted(tmp_path.glob("j*.png"))
    assert len(pngs) == 2
    params = [Image.open(p).text["parameters"] for p in pngs]
    assert sum("DeepCache: 3" in t for t in params) == 1 and sum("DeepCache" in t for t in params) == 1


@pytest.mark.parametrize("deep_cache", ["0", "3"])
def test_an_image_does_not_depend_on_its_batch(tmp_path, tiny_single_file, deep_cache):
    """Image 2 of a batch of 2 (seed 4) against seed 4 alone: DeepCache keeps no cross-image state."""
    _generate(tmp_path, tiny_single_file, "--deep-cache", deep_cache, "-b", "2", "--batch-size", "2", "-o", str(tmp_path / "b.png"))
    _generate(tmp_path, tiny_single_file, "--deep-cache", deep_cache, "-s", "4", "-o", str(tmp_path / "one.png"))
    made = sorted(p.name for p in tmp_path.glob("b*.png"))
    assert len(made) == 2, made
    a = torch.from_numpy(np.array(Image.open(tmp_path / made[1]))).float()
    b = torch.from_numpy(np.array(Image.open(tmp_path / "one.png"))).float()
    assert (a - b).abs().max() <= 1


# The feature's own diffusers oracle, at 64 channels (2 per GroupNorm group) so the last block sees emb.
CONFIG64 = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                      context_dim=32)


@pytest.fixture(scope="module")
def pair64():
    from sd_fixtures import unet_pair

    return unet_pair(CONFIG64)


def test_reusing_evaluation_depends_on_t(pair64):
    """Sanity for the oracle below: at 32 channels this difference is 0 (GroupNorm removes emb)."""
    ours, _ = pair64
    torch.manual_seed(4)
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        deep = DeepFeatures(SHALLOW)
        ours(x, torch.tensor([500.0, 500.0]), c, deep=deep)
        a = ours(x, torch.tensor([500.0, 500.0]), c, deep=DeepFeatures(SHALLOW, deep.features))
        b = ours(x, torch.tensor([100.0, 100.0]), c, deep=DeepFeatures(SHALLOW, deep.features))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("interval", [2, 3])
def test_evaluations_equal_diffusers_at_64_channels(pair64, interval):
    from test_deep_cache import DiffusersDeepCache, _inputs

    ours, ref = pair64
    cached, oracle = DeepCacheNetwork(ours, interval), DiffusersDeepCache(ref, interval)
    with torch.no_grad():
        for i, (x, t, context) in enumerate(_inputs(7)):
            torch.testing.assert_close(cached(x, t.expand(2), context=context), oracle(i, x, t, context), atol=1e-5,
                                       rtol=0, msg=f"evaluation {i}")


@pytest.mark.parametrize("value, expect", [(3, 3), (0, 0), (1, 0)])
def test_server_request_deep_cache(tmp_path, value, expect):
    from ldmcli.server_request import InputStore, request_job

    job = request_job({"prompt": "a cat", "seed": 1, "deep_cache": value}, "txt2img", InputStore(tmp_path), {}, [])
    assert job.request.checked().deep_cache == expect
    assert request_job({"prompt": "a cat"}, "txt2img", InputStore(tmp_path), {}, []).request.deep_cache == 0
    with pytest.raises(Exception):
        request_job({"prompt": "a cat", "seed": 1, "deep_cache": 101}, "txt2img", InputStore(tmp_path), {}, []).request.checked()
