"""LDM U-Net: parity with diffusers' UNet2DConditionModel, key maps, config inference.

Parity: the reference is built in diffusers with a fixed seed (norm affines and biases perturbed
so no path is an identity), its state dict renamed by our key map and loaded strictly into our
model built on the meta device; fp32 outputs must agree to atol=rtol=1e-6 (measured: bit-identical
at the tiny sizes, one thread). bf16: our U-Net in bf16 against diffusers' in fp32, and the attention
upcast against attention computed in float64 (tolerances and measurements at each test).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch
from torch.testing import assert_close

from ldmcli.keymap.unet import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_diffusers_to_ldm,
    unet_ldm_to_diffusers,
)
from ldmcli.models.unet import UNetConfig, UNetModel, timestep_embedding, unet_config_from_shapes

from sd_fixtures import MANIFESTS  # noqa: E402

PREFIX = "model.diffusion_model."
# Tiny fp32 parity: measured max abs error 0 (bit-identical outputs, |out| ~ 2) for every tiny
# config below; 1e-6 leaves room for a few float32 ulps from another kernel order. A GroupNorm eps of
# 1e-5 instead of 1e-6 in the transformers' norm moves the outputs by 5e-6..2e-5 and must fail.
ATOL = RTOL = 1e-6
# Full size (slow tests, all threads, 77 tokens): not re-measured here; kept at the earlier bound.
FULL_ATOL = FULL_RTOL = 1e-4

# SD1 block pattern, tiny widths: 8 heads, conv proj, attention on all but the last level.
TINY_SD1_2LEVEL = UNetConfig(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 0), context_dim=32
)
TINY_SD1_3LEVEL = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0), context_dim=32
)
# SD1's full 4-level pattern: 8x12 latents go 12 -> 6 -> 3 -> 2, so the last Upsample must land on 3.
TINY_SD1_4LEVEL = UNetConfig(
    model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 1, 0), context_dim=32
)
# SD2 rules: 64-channel-style fixed head width (16 here), linear proj, fp32 attention upcast.
TINY_SD2 = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0), context_dim=48,
    num_heads=None, head_dim=16, use_linear_projection=True, upcast_attention=True,
)
# SDXL rules: no attention at level 0, deeper transformers below, vector conditioning y.
TINY_SDXL = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 2),
    middle_transformer_depth=2, context_dim=48, num_heads=None, head_dim=16, use_linear_projection=True,
    adm_in_channels=32 + 6 * 256,
)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest):
    """Tiny tensors gain nothing from intra-op threads; on this 2-core box the thread handoff
    made the default run ~6x slower (44 s vs 7 s). Full-size (slow) tests keep all threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Add noise to every parameter: unit norm weights, zero biases and zero-init convs would
    otherwise hide swapped or missing norms/biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _diffusers_unet(config: UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**unet_config_to_diffusers(config)).eval()
    _perturb(ref, seed + 1)
    return ref


def _ours_from(ref, config: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        ours = UNetModel(config)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), config), strict=True, assign=True)
    return ours.eval()


def _sdxl_inputs(config: UNetConfig, batch: int, g: torch.Generator):
    """diffusers' SDXL kwargs and the equivalent LDM `y` = [pooled text | sinusoids of 6 size ids]."""
    assert config.adm_in_channels is not None
    text = torch.randn(batch, config.adm_in_channels - 6 * 256, generator=g)
    time_ids = torch.rand(batch, 6, generator=g) * 1024
    y = torch.cat([text, timestep_embedding(time_ids.flatten(), 256).reshape(batch, -1)], dim=1)
    return {"added_cond_kwargs": {"text_embeds": text, "time_ids": time_ids}}, y


def _parity(
    config: UNetConfig, height: int, width: int, batch: int = 2, tokens: int = 7, tol: tuple[float, float] = (ATOL, RTOL)
) -> float:
    ref = _diffusers_unet(config)
    ours = _ours_from(ref, config)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(batch, config.in_channels, height, width, generator=g)
    t = torch.tensor([999.0, 1.5, 500.25, 0.0][:batch])  # fractional timesteps, as k-samplers pass
    ctx = torch.randn(batch, tokens, config.context_dim, generator=g)
    kwargs, y = _sdxl_inputs(config, batch, g) if config.adm_in_channels else ({}, None)
    with torch.no_grad():
        want = ref(x, t, ctx, **kwargs).sample
        got = ours(x, t, ctx, y=y)
    assert got.shape == (batch, config.out_channels, height, width)
    assert_close(got, want, atol=tol[0], rtol=tol[1])
    return (got - want).abs().max().item()


# ------------------------------------------------------------------------------- parity (tiny)


@pytest.mark.parametrize(
    ("config", "height", "width"),
    [
        pytest.param(TINY_SD1_2LEVEL, 8, 8, id="sd1-2level-8x8"),
        pytest.param(TINY_SD1_3LEVEL, 8, 12, id="sd1-3level-8x12"),
        pytest.param(TINY_SD1_3LEVEL, 10, 14, id="sd1-3level-odd-10x14"),  # 10 -> 5 -> 3: upsample to skip size
        pytest.param(TINY_SD1_4LEVEL, 8, 12, id="sd1-4level-8x12"),
        pytest.param(TINY_SD2, 8, 12, id="sd2-linear-upcast-8x12"),
        pytest.param(TINY_SD2, 6, 10, id="sd2-odd-6x10"),
        pytest.param(TINY_SDXL, 8, 8, id="sdxl-like-y"),
    ],
)
def test_parity_with_diffusers_tiny(config: UNetConfig, height: int, width: int) -> None:
    err = _parity(config, height, width)
    print(f"max abs err {err:.3g}")


def test_parity_detects_a_wrong_weight() -> None:
    """Negative control: the comparison is sensitive to one swapped pair of norms."""
    config = TINY_SD1_2LEVEL
    ref = _diffusers_unet(config)
    sd = unet_diffusers_to_ldm(ref.state_dict(), config)
    a, b = "input_blocks.1.1.transformer_blocks.0.norm1.weight", "input_blocks.1.1.transformer_blocks.0.norm2.weight"
    sd[a], sd[b] = sd[b], sd[a]
    with torch.device("meta"):
        ours = UNetModel(config)
    ours.load_state_dict(sd, strict=True, assign=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    t = torch.tensor([10.0])
    with torch.no_grad():
        assert (ours(x, t, ctx) - ref(x, t, ctx).sample).abs().max() > 1e-3


def test_context_and_timestep_change_the_output() -> None:
    torch.manual_seed(0)
    model = UNetModel(TINY_SD1_2LEVEL).eval()
    _perturb(model)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        base = model(x, torch.tensor([10.0]), ctx)
        assert (model(x, torch.tensor([11.0]), ctx) - base).abs().max() > 1e-4
        assert (model(x, torch.tensor([10.0]), ctx + 1) - base).abs().max() > 1e-4


def _time_embedding_weighted(ref, factor: float) -> None:
    """Scale the reference's timestep-embedding MLP output by `factor` (before our copy is made).

    With random weights the timestep embedding moves the output about as much as bf16 rounding does,
    so an error in the timestep hides under it; a trained model leans on it far more.
    """
    with torch.no_grad():
        ref.time_embedding.linear_2.weight.mul_(factor)
        ref.time_embedding.linear_2.bias.mul_(factor)


# Timesteps bf16 cannot hold: 999 rounds to 1000 and 500.25 to 500 in bf16 (8 mantissa bits), so a
# timestep cast to bf16 before the sinusoidal embedding is a different timestep.
BF16_UNSAFE_T = (999.0, 500.25)
# Measured at these inputs (tiny SD1 / SD2 configs, time embedding weighted x4), ours in bf16 vs
# diffusers in fp32:
#   timestep embedding (time_embed's output), max abs err / max |emb|: 0.45 % (t as given),
#     7.5 % (t=500.25 rounded to bf16), 26 % (t=999 rounded to bf16), 26-30 % (t + 1);
#   U-Net output, max abs err (|out| ~ 2): 0.030-0.035 (t as given), 0.12-0.17 (t rounded to bf16),
#     0.17-0.25 (t + 1).
BF16_EMB_REL_TOL = 1.5e-2
BF16_OUT_ATOL = 0.07


@pytest.mark.parametrize("config", [TINY_SD1_2LEVEL, TINY_SD2], ids=["sd1", "sd2-upcast"])
def test_bf16_matches_diffusers_fp32(config: UNetConfig) -> None:
    """Our U-Net in bf16 against diffusers' in fp32 (same weights): the only difference allowed is
    bf16 rounding. The timesteps stay fp32 up to the sinusoidal embedding: t=999 fed to the embedding
    as bf16 is t=1000, which must fail both the embedding and the output check."""
    ref = _diffusers_unet(config)
    _time_embedding_weighted(ref, 4.0)
    ours = _ours_from(ref, config).to(torch.bfloat16)
    captured = {}
    ref.time_embedding.register_forward_hook(lambda m, i, out: captured.__setitem__("ref", out))
    ours.time_embed.register_forward_hook(lambda m, i, out: captured.__setitem__("ours", out))
    g = torch.Generator().manual_seed(42)
    x = torch.randn(len(BF16_UNSAFE_T), 4, 8, 8, generator=g)
    ctx = torch.randn(len(BF16_UNSAFE_T), 7, config.context_dim, generator=g)
    t = torch.tensor(BF16_UNSAFE_T)  # fp32, as our Denoiser passes them
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.dtype == torch.bfloat16
    emb_err = ((captured["ours"].float() - captured["ref"]).abs().amax(1) / captured["ref"].abs().amax(1)).max().item()
    out_err = (got.float() - want).abs().max().item()
    print(f"\nbf16 vs fp32: timestep embedding rel err {emb_err:.2e}, output max abs err {out_err:.3f}", end="")
    assert emb_err < BF16_EMB_REL_TOL, f"timestep embedding off by {emb_err:.1%}: timesteps rounded before the embedding?"
    assert out_err < BF16_OUT_ATOL


def _exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, in float64: [B, T, H*D] inputs and output."""
    b, tq, inner = q.shape
    d = inner // heads
    split = lambda t: t.double().reshape(b, -1, heads, d).transpose(1, 2)  # noqa: E731
    p = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (p @ split(v)).transpose(1, 2).reshape(b, tq, inner)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """bf16's unit in the last place at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


@torch.no_grad()
def test_attention_upcast_in_bf16() -> None:
    """SD2's `upcast_attention`: in bf16 the attention of q, k, v is computed in fp32, so its output is
    bf16's correct rounding of the exact attention. The projections are set to (rectangular)
    identities so that q, k and v are exactly the bf16 inputs and the only rounding left is the
    attention's own; the reference is float64 math.

    Measured (self- and cross-attention of TINY_SD2's first transformer, 64 queries x 77 keys):
    with the upcast 0-0.02 % of the outputs differ from the correctly rounded value, by at most
    0.7 bf16 ulp; with the attention run in bf16 (probabilities rounded to bf16 before the product
    with v) ~30 % differ, near-zero outputs by thousands of ulps.
    """
    model = UNetModel(TINY_SD2).eval()
    block = model.input_blocks[1][1].transformer_blocks[0]
    g = torch.Generator().manual_seed(7)
    for attn, context_dim in ((block.attn1, None), (block.attn2, TINY_SD2.context_dim)):
        assert attn.upcast
        inner = attn.to_q.out_features
        query_dim = attn.to_q.in_features
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            lin.weight.copy_(torch.eye(*lin.weight.shape))
        attn.to_out[0].bias.zero_()
        attn.to(torch.bfloat16)
        x = torch.randn(2, 64, query_dim, generator=g).bfloat16()
        context = None if context_dim is None else torch.randn(2, 77, context_dim, generator=g).bfloat16()
        got = attn(x, context).double()
        kv = (x if context is None else context)[..., :inner]
        exact = _exact_attention(x[..., :inner], kv, kv, attn.heads)
        rounded = exact.bfloat16().double()
        mismatched = (got != rounded).double().mean().item()
        worst_ulps = ((got - exact).abs() / _bf16_ulp(exact)).max().item()
        print(f"\n{'self' if context is None else 'cross'}-attention bf16: {mismatched:.4%} not correctly rounded, "
              f"worst {worst_ulps:.2f} ulp", end="")
        assert mismatched <= 0.002 and worst_ulps <= 1.0


def test_timestep_embedding_matches_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 999.0])
    for dim in (32, 33, 320):
        want = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert_close(timestep_embedding(t, dim), want, atol=1e-5, rtol=1e-5)


def test_no_buffers_and_meta_construction() -> None:
    with torch.device("meta"):
        model = UNetModel(TINY_SDXL)
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())


def test_forward_requires_y_exactly_for_sdxl() -> None:
    model = UNetModel(TINY_SD1_2LEVEL)
    with pytest.raises(ValueError, match="adm_in_channels"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 32), y=torch.randn(1, 8))


# ------------------------------------------------------------------------------------ key maps


@pytest.mark.parametrize("config", [TINY_SD1_2LEVEL, TINY_SD1_3LEVEL, TINY_SD2, TINY_SDXL], ids=str)
def test_keymap_round_trip_and_model_keys(config: UNetConfig) -> None:
    with torch.device("meta"):
        ldm = UNetModel(config).state_dict()
    diff = unet_ldm_to_diffusers(ldm, config)
    assert len(diff) == len(ldm)
    back = unet_diffusers_to_ldm(diff, config)
    assert list(back) == list(ldm)  # identity, order included
    assert all(back[k] is ldm[k] for k in ldm)  # renames only: same tensors, no copies


def test_keymap_matches_diffusers_module_names() -> None:
    from diffusers import UNet2DConditionModel

    for config in (TINY_SD1_3LEVEL, TINY_SD2, TINY_SDXL):
        with torch.device("meta"):
            ref = UNet2DConditionModel(**unet_config_to_diffusers(config)).state_dict()
            ours = UNetModel(config).state_dict()
        mapped = unet_ldm_to_diffusers(ours, config)
        assert set(mapped) == set(ref)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def test_keymap_names_unknown_keys() -> None:
    with torch.device("meta"):
        sd = UNetModel(TINY_SD1_2LEVEL).state_dict()
    sd["input_blocks.1.0.bogus.weight"] = torch.empty(1)
    sd["label_emb.0.0.weight"] = torch.empty(1)  # SDXL key in a non-SDXL config
    sd["out.2.weight_scale"] = torch.empty(1)  # e.g. a quantisation side-car on a leaf module
    with pytest.raises(KeyError, match=r"input_blocks\.1\.0\.bogus\.weight.*label_emb.*out\.2\.weight_scale"):
        unet_ldm_to_diffusers(sd, TINY_SD1_2LEVEL)
    with pytest.raises(KeyError, match="down_blocks.9.resnets.0.conv1.weight"):
        unet_diffusers_to_ldm({"down_blocks.9.resnets.0.conv1.weight": torch.empty(1)}, TINY_SD1_2LEVEL)


@pytest.mark.parametrize("config", [TINY_SD1_2LEVEL, TINY_SD1_3LEVEL, TINY_SD2, TINY_SDXL], ids=str)
def test_diffusers_config_round_trip(config: UNetConfig) -> None:
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_diffusers_config_rejects_unsupported() -> None:
    dcfg = unet_config_to_diffusers(TINY_SD1_2LEVEL) | {"class_embed_type": "timestep"}
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers(dcfg)


def test_lead_tiny_unet_fixture_loads() -> None:
    """The tiny diffusers U-Net the pipeline tests use maps and runs through our model."""
    from sd_fixtures import TINY_UNET

    config = unet_config_from_diffusers(TINY_UNET)
    assert config.num_heads == 8 and config.transformer_depth == (1, 0) and config.context_dim == 64
    err = _parity(config, 8, 8)
    print(f"max abs err {err:.3g}")


# ------------------------------------------------------------------------- config from shapes


@pytest.mark.parametrize("config", [TINY_SD1_2LEVEL, TINY_SD1_3LEVEL, TINY_SD2, TINY_SDXL], ids=str)
def test_config_from_shapes_recovers_tiny_configs(config: UNetConfig) -> None:
    with torch.device("meta"):
        sd = UNetModel(config).state_dict()
    heads = {"num_heads": config.num_heads} if config.num_heads else {"head_dim": config.head_dim}
    inferred = unet_config_from_shapes({k: v.shape for k, v in sd.items()}, **heads)
    assert inferred == dataclasses.replace(config, upcast_attention=False)  # upcast is not in the weights


def test_config_from_shapes_asymmetric_output_depths() -> None:
    config = dataclasses.replace(TINY_SDXL, output_transformer_depth=(3, 3, 1, 1, 1, 2, 0, 0, 0))
    with torch.device("meta"):
        sd = UNetModel(config).state_dict()
    assert unet_config_from_shapes(sd, head_dim=16) == config
    assert unet_config_from_diffusers(unet_config_to_diffusers(config)) == config


def test_config_from_shapes_errors() -> None:
    with torch.device("meta"):
        sd = UNetModel(TINY_SD1_2LEVEL).state_dict()
    with pytest.raises(ValueError, match="num_heads"):
        unet_config_from_shapes(sd)
    with pytest.raises(ValueError, match="input_blocks.0.0.weight"):
        unet_config_from_shapes({k: v for k, v in sd.items() if not k.startswith("input_blocks.0.")}, num_heads=8)
    with pytest.raises(ValueError, match="model.diffusion_model"):
        unet_config_from_shapes({PREFIX + k: v for k, v in sd.items()}, num_heads=8)


# ---------------------------------------------------------------- real checkpoint manifests


def _manifest(name: str) -> dict:
    path = MANIFESTS / name
    return json.loads(path.read_text())


def _ldm_shapes(family: str) -> dict[str, tuple[int, ...]]:
    single = _manifest(f"{family}-single-file.json")
    return {k[len(PREFIX):]: tuple(v[0]) for k, v in single.items() if k.startswith(PREFIX)}


REAL = {
    # family: (heads kwarg, expected config)
    "sd15": ({"num_heads": 8}, UNetConfig()),
    "sd21": (
        {"head_dim": 64},
        UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_projection=True),
    ),
    "sdxl": (
        {"head_dim": 64},
        UNetConfig(
            channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), middle_transformer_depth=10, context_dim=2048,
            num_heads=None, head_dim=64, use_linear_projection=True, adm_in_channels=2816,
        ),
    ),
}


@pytest.mark.parametrize("family", list(REAL))
def test_real_checkpoint_manifests(family: str) -> None:
    heads, expected = REAL[family]
    ldm = _ldm_shapes(family)
    config = unet_config_from_shapes(ldm, **heads)
    assert config == expected

    # Our module, built on meta, has exactly the single file's keys and shapes.
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in UNetModel(config).state_dict().items()}
    assert ours == ldm

    # The diffusers folder's U-Net renames onto exactly the same keys and shapes, and back.
    folder = _manifest(f"{family}-diffusers-folder.json")["unet"]
    diff = {k: tuple(v[0]) for k, v in folder["tensors"].items()}
    assert unet_diffusers_to_ldm(diff, config) == ldm
    assert unet_ldm_to_diffusers(ldm, config) == diff

    # Config conversions agree with the folder's config.json (upcast_attention is config-only).
    dcfg = folder["config"]
    from_folder = unet_config_from_diffusers(dcfg)
    assert from_folder == dataclasses.replace(config, upcast_attention=bool(dcfg["upcast_attention"]))
    ours_dcfg = unet_config_to_diffusers(from_folder, addition_time_embed_dim=dcfg.get("addition_time_embed_dim") or 256)
    for key, value in ours_dcfg.items():
        want = bool(dcfg[key]) if key == "upcast_attention" else dcfg[key]  # SDXL stores null
        if isinstance(value, list) and not isinstance(want, list):
            want = [want] * len(value)
        assert (list(want) if isinstance(want, (list, tuple)) else want) == value, key


# ------------------------------------------------------------------------------ slow: full size


def _full_parity(config: UNetConfig, size: int) -> None:
    start = time.perf_counter()
    err = _parity(config, size, size, batch=2, tokens=77, tol=(FULL_ATOL, FULL_RTOL))
    print(f"\nfull-size parity {config.context_dim=}: max abs err {err:.3g} in {time.perf_counter() - start:.1f}s")


@pytest.mark.slow
def test_full_sd15_parity() -> None:
    _full_parity(REAL["sd15"][1], 64)


@pytest.mark.slow
def test_full_sd21_parity() -> None:
    _full_parity(dataclasses.replace(REAL["sd21"][1], upcast_attention=True), 64)
