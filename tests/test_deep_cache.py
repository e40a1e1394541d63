"""DeepCache (`--deep-cache N`): against the same computation written out with diffusers' U-Net modules.

The oracle: diffusers' UNet2DConditionModel with the same random weights. A full evaluation is its own
forward; the features kept are what enters its last up-block layer (a hook on that ResBlock's input, the
part before the skip is concatenated); an evaluation that reuses them is written out here from diffusers'
modules: conv_in, the concatenation, the last ResBlock and transformer of up_blocks[-1], the output norm,
SiLU and convolution. fp32, one thread.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sd_fixtures import unet_pair

from ldmcli.cli import cli
from ldmcli.deep_cache import DeepCacheNetwork, with_deep_cache
from ldmcli.models.unet import UNetConfig, UNetModel

# SD1's pattern, tiny: attention at level 0, so the outermost output block has a transformer.
CONFIG = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
                    context_dim=32)
# Measured: max |d| 0 at |out| ~2 (identical kernels on identical inputs); a few fp32 ulps of room.
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return unet_pair(CONFIG)


class DiffusersDeepCache:
    """DeepCache written out over diffusers' modules: interval N, evaluations counted by the caller."""

    def __init__(self, ref, interval: int):
        self.ref, self.interval, self.kept = ref, interval, None
        last = ref.up_blocks[-1].resnets[-1]
        skip = ref.conv_in.out_channels

        def keep(_module, args):
            self.kept = args[0][:, : args[0].shape[1] - skip].clone()

        last.register_forward_pre_hook(keep)

    def __call__(self, evaluation: int, x, t, context):
        ref = self.ref
        if evaluation % self.interval == 0:
            return ref(x, t, encoder_hidden_states=context).sample
        emb = ref.time_embedding(ref.time_proj(t.reshape(-1).expand(x.shape[0])).to(x.dtype))
        h = torch.cat([self.kept, ref.conv_in(x)], dim=1)
        h = ref.up_blocks[-1].resnets[-1](h, emb)
        h = ref.up_blocks[-1].attentions[-1](h, encoder_hidden_states=context).sample
        return ref.conv_out(ref.conv_act(ref.conv_norm_out(h)))


def _inputs(n: int, size: int = 8, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, size, size, generator=g), torch.tensor(float(900 - 150 * i)),
             torch.randn(batch, 5, 32, generator=g)) for i in range(n)]


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_evaluations_equal_diffusers_written_out(pair, interval):
    ours, ref = pair
    cached, oracle = DeepCacheNetwork(ours, interval), DiffusersDeepCache(ref, interval)
    with torch.no_grad():
        for i, (x, t, context) in enumerate(_inputs(7)):
            got = cached(x, t.expand(2), context=context)
            want = oracle(i, x, t, context)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"evaluation {i}, interval {interval}")
    assert cached.full_evaluations == len(range(0, 7, interval))


def test_reused_evaluations_are_not_full_ones(pair):
    """The test above must be able to tell: a reusing evaluation differs from the full U-Net."""
    ours, _ = pair
    cached = DeepCacheNetwork(ours, 3)
    with torch.no_grad():
        (x0, t0, c0), (x1, t1, c1) = _inputs(2)
        cached(x0, t0.expand(2), context=c0)
        reused = cached(x1, t1.expand(2), context=c1)
        full = ours(x1, t1.expand(2), context=c1)
    assert (reused - full).abs().max() > 1e-2


def test_guidance_in_two_passes_keeps_features_per_pass(pair):
    """Unpadded CFG evaluates twice at one timestep (uncond, then cond, of different prompt lengths): each pass
    reuses its own features, as two separate caches would."""
    ours, _ = pair
    both, alone = DeepCacheNetwork(ours, 3), [DeepCacheNetwork(ours, 3), DeepCacheNetwork(ours, 3)]
    g = torch.Generator().manual_seed(5)
    contexts = [torch.randn(1, 5, 32, generator=g), torch.randn(1, 9, 32, generator=g)]
    with torch.no_grad():
        for step in range(5):
            x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([900.0 - 100 * step])
            for slot, context in enumerate(contexts):
                assert torch.equal(both(x, t, context=context), alone[slot](x, t, context=context))
    assert both.full_evaluations == 2 * alone[0].full_evaluations == 4


def test_a_new_shape_starts_with_a_full_evaluation(pair):
    """A hires second pass: the kept 8x8 features cannot serve 16x16 latents."""
    ours, _ = pair
    cached = DeepCacheNetwork(ours, 3)
    with torch.no_grad():
        (x, t, c), = _inputs(1, size=8)
        cached(x, t.expand(2), context=c)
        (big, t2, c2), = _inputs(1, size=16, seed=1)
        t2 = torch.tensor(500.0)
        assert torch.equal(cached(big, t2.expand(2), context=c2), ours(big, t2.expand(2), context=c2))


def test_off_is_the_network_itself(pair):
    ours, _ = pair
    assert with_deep_cache(ours, 0) is ours and with_deep_cache(ours, 1) is ours
    assert isinstance(with_deep_cache(ours, 2), DeepCacheNetwork)


def _run(tmp_path, model, *args):
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(model), "-W", "64", "-H", "64", "--steps", "7",
                                      "--sampler", "euler", "-s", "3", "--overwrite", "-q", *args])
    assert result.exit_code == 0, result.output
    return result


def test_generate_with_deep_cache(tmp_path, tiny_single_file, monkeypatch):
    """`--deep-cache 3` on 7 Euler steps: full U-Net evaluations at steps 0, 3 and 6 only (one batched CFG pass
    each); the image records it (A1111 text and ldm record), --from-png remakes its bytes, and 0 is the exact
    image."""
    full_calls = []
    forward = UNetModel.forward

    def counting(self, *a, deep=None, **k):
        full_calls.append(deep is None or deep.features is None)
        return forward(self, *a, deep=deep, **k)

    monkeypatch.setattr(UNetModel, "forward", counting)
    _run(tmp_path, tiny_single_file, "--deep-cache", "3", "-o", str(tmp_path / "fast.png"))
    assert full_calls == [True, False, False, True, False, False, True]
    text = Image.open(tmp_path / "fast.png").text
    assert "DeepCache: 3" in text["parameters"] and json.loads(text["ldm"])["deep_cache"] == 3
    result = CliRunner().invoke(cli, ["generate", "--from-png", str(tmp_path / "fast.png"), "-m", str(tiny_single_file),
                                      "-o", str(tmp_path / "again.png"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "fast.png").read_bytes()
    full_calls.clear()
    _run(tmp_path, tiny_single_file, "--deep-cache", "0", "-o", str(tmp_path / "off.png"))
    _run(tmp_path, tiny_single_file, "-o", str(tmp_path / "exact.png"))
    assert all(full_calls) and (tmp_path / "off.png").read_bytes() == (tmp_path / "exact.png").read_bytes()
    assert "DeepCache" not in Image.open(tmp_path / "exact.png").text["parameters"]
    assert (tmp_path / "fast.png").read_bytes() != (tmp_path / "exact.png").read_bytes()


@pytest.mark.parametrize("value", ["-1", "101", "x"])
def test_bad_deep_cache_is_one_line_exit_2(tiny_single_file, value):
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "--deep-cache", value])
    assert result.exit_code == 2 and "--deep-cache" in result.output


def test_features_serve_only_the_cycle_they_were_made_in():
    """A kind of call (shape) absent at a cycle's full evaluation must not reuse features from an earlier cycle:
    kind B is made at evaluation 1 (cycle 0) and asked again at evaluation 4 (cycle 1, a reusing position)."""
    made = []

    def fake(x, t, context, deep=None):
        made.append(deep.features is None)
        if deep.features is None:
            deep.features = x.shape
        return torch.zeros_like(x)

    cached = DeepCacheNetwork(fake, 3)
    a, b = torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8)
    context = torch.zeros(2, 5, 32)
    plan = [(0, [a]), (1, [a, b]), (2, [a]), (3, [a]), (4, [a, b])]
    full = []
    for evaluation, calls in plan:
        for x in calls:
            cached(x, torch.tensor(float(900 - evaluation)), context=context[: x.shape[0]])
            full.append(made[-1])
    #          e0     e1 a   e1 b (new kind: full)  e2 a   e3 a (cycle start)  e4 a   e4 b (its features are cycle 0's)
    assert full == [True, False, True, False, True, False, True]
