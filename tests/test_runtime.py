"""The runtime side: device.py (dtype/thread policy), kernels.py + optimize.py (the fused, packed oneDNN
CPU path and how networks are prepared for it), vae_decode.py (tiled and NaN-guarded VAE decode).

Tolerances. fp32 fused vs fp32 eager: same math, different kernels and summation order, atol=rtol=1e-4
(measured ~5e-6). bf16 against fp32: relative L2 error of the output, bound 3e-2 (measured ~1e-2 on
these tiny random-weight models; random weights are a harsher test than trained ones). No test here
asserts a time: speed is measured by benchmarks/bench.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ldmcli import device, kernels, optimize, vae_decode
from ldmcli.models.unet import UNetConfig, UNetModel
from ldmcli.models.vae import AutoencoderKL, VAEConfig

from test_unet import TINY_SD2  # SD2 rules: fixed head width, linear proj, fp32 attention

needs_fused = pytest.mark.skipif(not kernels.fused_path_available(), reason="no oneDNN in this PyTorch build")

TINY_SD1 = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0), context_dim=32
)
TINY_SDXL = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 1, 2),
    middle_transformer_depth=2, context_dim=48, num_heads=None, head_dim=16, use_linear_projection=True,
    adm_in_channels=64,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads; on a shared 2-core box the handoff dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturbed(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random init plus noise on every parameter, so no norm or bias is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval().requires_grad_(False)


def _unet(config: UNetConfig) -> UNetModel:
    torch.manual_seed(0)
    return _perturbed(UNetModel(config))


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return _perturbed(AutoencoderKL(TINY_VAE))


def _prepared(module: torch.nn.Module, dtype: torch.dtype, name: str) -> torch.nn.Module:
    module = copy.deepcopy(module).to(dtype)
    parts = {name: module}
    optimize.prepare_for_inference(parts, "cpu", dtype, fuse=True)
    return parts[name]


def _unet_inputs(config: UNetConfig, h: int, w: int, t=(10.0, 10.0)):
    g = torch.Generator().manual_seed(42)
    x = torch.randn(2, 4, h, w, generator=g)
    ctx = torch.randn(2, 5, config.context_dim, generator=g)
    y = torch.randn(2, config.adm_in_channels, generator=g) if config.adm_in_channels else None
    return x, torch.tensor(t), ctx, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------ policy


def _fake_cpu(monkeypatch, **caps: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))


def test_auto_dtype_on_cpu_follows_bf16_units(monkeypatch) -> None:
    _fake_cpu(monkeypatch, amx_bf16=True, avx512_bf16=True)
    dtype, reason = device.choose_dtype("cpu")
    assert dtype == torch.bfloat16 and "AMX-BF16" in reason
    _fake_cpu(monkeypatch, avx512_bf16=True)
    assert device.choose_dtype("cpu")[0] == torch.bfloat16
    _fake_cpu(monkeypatch, avx2=True)
    dtype, reason = device.choose_dtype("cpu")
    assert dtype == torch.float32 and "no bf16" in reason


def test_requested_dtype_wins_and_warns_when_slow(monkeypatch) -> None:
    _fake_cpu(monkeypatch, avx2=True)
    dtype, reason = device.choose_dtype("cpu", "bf16")
    assert dtype == torch.bfloat16 and "emulated" in reason
    assert device.choose_dtype("cpu", "fp32")[0] == torch.float32
    assert "slow" in device.choose_dtype("cpu", "fp16")[1]
    with pytest.raises(ValueError, match="dtype must be"):
        device.choose_dtype("cpu", "fp8")


def test_gpu_policies_without_a_gpu(monkeypatch) -> None:
    """CUDA: bf16 from compute capability 8 (Ampere) on, fp16 before; MPS: fp16 (GPU paths untested here)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert device.choose_dtype("cuda")[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert device.choose_dtype("cuda:0")[0] == torch.float16
    assert device.choose_dtype("mps")[0] == torch.float16


def test_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert device.configure_threads(1) == 1 == torch.get_num_threads()
        assert device.configure_threads(None) == 1  # None keeps the current setting
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        device.configure_threads(0)


# ---------------------------------------------------------------------------------------- fused path


@needs_fused
def test_prepare_packs_layers_without_changing_names_or_adding_buffers() -> None:
    model = _unet(TINY_SD1)
    names = [n for n, _ in model.named_parameters()]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    parts = {"unet": model}
    notes = optimize.prepare_for_inference(parts, "cpu", torch.float32, fuse=True)
    assert f"fused oneDNN layers ({convs + linears} packed)" in notes
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.buffers()) == []
    # convolution weights now live (packed) in the layer records: one copy of the weights
    assert all(m.weight.is_meta for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert all(kernels.is_packed(m) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


@needs_fused
def test_default_fuses_only_wide_networks() -> None:
    """Packed oneDNN layers lose on narrow networks (the demo model), so the default leaves them on ATen."""
    narrow = torch.nn.Sequential(torch.nn.Conv2d(4, optimize.FUSE_MIN_CHANNELS // 2, 3, padding=1))
    wide = torch.nn.Sequential(torch.nn.Conv2d(4, optimize.FUSE_MIN_CHANNELS, 3, padding=1))
    notes = optimize.prepare_for_inference({"unet": narrow, "vae": wide}, "cpu", torch.float32)
    assert "fused oneDNN layers (1 packed)" in notes
    assert kernels.is_packed(wide[0]) and not kernels.is_packed(narrow[0])
    assert narrow[0].weight.is_contiguous(memory_format=torch.channels_last)  # still channels_last
    forced = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1))
    optimize.prepare_for_inference({"unet": forced}, "cpu", torch.float32, fuse=True)
    assert kernels.is_packed(forced[0])
    untouched = torch.nn.Sequential(torch.nn.Conv2d(4, 512, 3, padding=1))
    optimize.prepare_for_inference({"unet": untouched}, "cpu", torch.float32, fuse=False)
    assert not kernels.is_packed(untouched[0])


@needs_fused
@pytest.mark.parametrize(
    ("config", "h", "w"),
    [
        pytest.param(TINY_SD1, 8, 12, id="sd1"),
        pytest.param(TINY_SD1, 10, 14, id="sd1-odd-sizes"),  # 10 -> 5 -> 3: plain upsampling to the skip size
        pytest.param(TINY_SD2, 8, 8, id="sd2-linear-proj"),
        pytest.param(TINY_SDXL, 8, 8, id="sdxl-y"),
    ],
)
def test_fused_unet_equals_eager_in_fp32(config: UNetConfig, h: int, w: int) -> None:
    eager = _unet(config)
    fused = _prepared(eager, torch.float32, "unet")
    for t in ((10.0, 10.0), (999.0, 3.0)):  # one timestep (embedding folded into the conv bias) and two
        x, ts, ctx, y = _unet_inputs(config, h, w, t)
        with torch.inference_mode():
            want, got = eager(x, ts, ctx, y=y), fused(x, ts, ctx, y=y)
        assert got.shape == want.shape
        assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_fused
def test_dtype_plumbing_of_a_prepared_bf16_unet() -> None:
    """The U-Net casts its inputs (a sampler may keep fp32 state); a packed layer refuses other dtypes."""
    fused = _prepared(_unet(TINY_SD1), torch.bfloat16, "unet")
    x, t, ctx, _ = _unet_inputs(TINY_SD1, 8, 8)
    with torch.inference_mode():
        from_fp32 = fused(x, t, ctx)
        from_bf16 = fused(x.bfloat16(), t, ctx.bfloat16())
        assert from_fp32.dtype == torch.bfloat16
        assert torch.equal(from_fp32, from_bf16)
        with pytest.raises(TypeError, match="prepared for torch.bfloat16"):
            kernels.conv2d(fused.input_blocks[0][0], x)


@needs_fused
def test_fused_vae_equals_eager_in_fp32() -> None:
    eager = _vae()
    fused = _prepared(eager, torch.float32, "vae")
    z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = eager.decode(z)
        got = fused.decode(z)
        assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert_close(fused.encode(want)[0], eager.encode(want)[0], atol=1e-4, rtol=1e-4)


@needs_fused
@pytest.mark.parametrize("size", [None, (12, 14), (11, 13)], ids=["2x", "2x-given", "odd"])
@pytest.mark.parametrize("out", [48, 300])  # 300 > kernels.SUBPIXEL_SLICE: crosses a slice boundary
def test_subpixel_upsample_conv_equals_upsample_then_conv(size, out) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, out, 3, padding=1)
    x = torch.randn(2, 32, 6, 7)
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=size))
    kernels.pack_for_cpu(conv)
    with torch.inference_mode():
        got = kernels.upsample_conv2d(conv, x, size)
        again = kernels.upsample_conv2d(conv, x, size)  # packed weights reused
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)
    assert got.is_contiguous(memory_format=torch.channels_last)


@needs_fused
def test_fused_conv_and_linear_epilogues() -> None:
    torch.manual_seed(0)
    conv, lin, proj = torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Linear(16, 24), torch.nn.Linear(16, 48)
    x, res, e = torch.randn(2, 16, 5, 6), torch.randn(2, 32, 5, 6), torch.randn(32)
    tokens, other, rows = torch.randn(2, 7, 16), torch.randn(2, 7, 24), torch.randn(3, 16)
    want = {
        "conv": conv(x) + e[:, None, None] + res,
        "gelu": F.gelu(lin(tokens)),
        "add": lin(tokens) + other,
        "other row count": lin(rows),
        "geglu": (lambda a, g: a * F.gelu(g))(*proj(tokens).chunk(2, dim=-1)),
        "geglu, other row count": (lambda a, g: a * F.gelu(g))(*proj(rows).chunk(2, dim=-1)),
    }
    for m in (conv, lin, proj):
        kernels.pack_for_cpu(m)
    with torch.inference_mode():
        got = {
            "conv": kernels.conv2d(conv, x, residual=res, bias_add=e),
            "gelu": kernels.linear(lin, tokens, gelu=True),  # packs for 14 rows
            "add": kernels.linear(lin, tokens, residual=other),
            "other row count": kernels.linear(lin, rows),
            "geglu": kernels.geglu(proj, tokens),
            "geglu, other row count": kernels.geglu(proj, rows),
        }
    for key in want:
        assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=key)
    # Packed once: the dense weights are gone, from the record and from the module.
    assert lin.weight.is_meta and proj.weight.is_meta and conv.weight.is_meta


@pytest.mark.parametrize("fuse", [False, pytest.param(True, marks=needs_fused)], ids=["eager", "fused"])
def test_bf16_unet_tracks_fp32(fuse: bool) -> None:
    model = _unet(TINY_SD1)
    x, t, ctx, _ = _unet_inputs(TINY_SD1, 8, 8)
    with torch.inference_mode():
        want = model(x, t, ctx)
        low = _prepared(model, torch.bfloat16, "unet") if fuse else copy.deepcopy(model).bfloat16()
        got = low(x.bfloat16(), t, ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    err = _rel(got, want)
    print(f"\nbf16 U-Net ({'fused' if fuse else 'eager'}) relative L2 error vs fp32: {err:.2e}")
    assert err < 3e-2


@pytest.mark.parametrize("fuse", [False, pytest.param(True, marks=needs_fused)], ids=["eager", "fused"])
def test_bf16_vae_tracks_fp32(fuse: bool) -> None:
    model = _vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = model.decode(z)
        low = _prepared(model, torch.bfloat16, "vae") if fuse else copy.deepcopy(model).bfloat16()
        got = low.decode(z.bfloat16())
    err = _rel(got, want)
    print(f"\nbf16 VAE decode ({'fused' if fuse else 'eager'}) relative L2 error vs fp32: {err:.2e}")
    assert err < 3e-2


# ------------------------------------------------------------------------------------ VAE decoding


def _upsample8(z: torch.Tensor) -> torch.Tensor:
    """A pixel-local stand-in decoder: tiles of it must blend back to exactly the untiled result."""
    return z[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)


@pytest.mark.parametrize(("h", "w", "tile", "overlap"), [(40, 56, 16, 4), (17, 33, 16, 8), (64, 64, 64, 16), (20, 9, 8, 0)])
def test_tile_blending_is_exact_for_a_local_decoder(h: int, w: int, tile: int, overlap: int) -> None:
    z = torch.randn(2, 4, h, w)
    assert_close(vae_decode.decode_tiled(_upsample8, z, tile=tile, overlap=overlap), _upsample8(z), atol=1e-6, rtol=1e-6)


def test_tile_overlap_must_be_smaller_than_the_tile() -> None:
    with pytest.raises(ValueError, match="overlap"):
        vae_decode.decode_tiled(_upsample8, torch.randn(1, 4, 32, 32), tile=16, overlap=16)


def _seam_ratio(images: torch.Tensor, dim: int) -> float:
    """Largest mean step between neighbouring pixel rows/columns, over the median step: a seam is a
    row or column whose step stands out."""
    steps = images.diff(dim=dim).abs().mean(dim=[i for i in range(4) if i != dim % 4])
    return (steps.max() / steps.median()).item()


def test_tiled_vae_decode_has_no_seams() -> None:
    """Tiles see their own GroupNorm statistics and attention context, so colours drift a little from
    the untiled decode (random weights drift more than trained VAEs); blending the overlaps keeps the
    drift smooth, where butting tiles together (overlap 0) leaves a visible seam."""
    vae = _vae()
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        whole = vae.decode(z)
        tiled = vae_decode.decode_latents_safely(vae, z, tile=16, overlap=8)
        butted = vae_decode.decode_latents_safely(vae, z, tile=16, overlap=0)
    assert tiled.shape == whole.shape
    delta = (tiled - whole).abs()
    print(f"\ntiled vs untiled (tiny random VAE): max |d| {delta.max():.3f}, mean |d| {delta.mean():.4f}")
    limit = 1.05 * _seam_ratio(whole, -1)
    assert _seam_ratio(tiled, -1) < limit < _seam_ratio(butted, -1)  # the test can see a seam
    assert _seam_ratio(tiled, -2) < 1.05 * _seam_ratio(whole, -2)
    assert delta.mean() < 0.5 * whole.abs().mean()


def _overflowing_vae(dtype: torch.dtype) -> AutoencoderKL:
    """A VAE whose last conv makes values past fp16's range (65504) but not past fp32's."""
    vae = _vae()
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e5)
    return vae.to(dtype)


def test_nonfinite_fp16_decode_is_redone_in_fp32() -> None:
    vae = _overflowing_vae(torch.float16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert not torch.isfinite(vae.decode(z.half())).all()  # the premise
        said: list[str] = []
        images = vae_decode.decode_latents_safely(vae, z, on_redo=said.append)
        want = copy.deepcopy(vae).float().decode(z)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert_close(images, want)
    assert len(said) == 1 and "float32" in said[0]
    assert next(vae.parameters()).dtype == torch.float16  # cast back after the redo


@needs_fused
@pytest.mark.parametrize("encoder", ["kept", "dropped"])  # `ldm generate` drops it
def test_nonfinite_decode_of_a_packed_vae_uses_an_fp32_twin(monkeypatch, encoder) -> None:
    vae = _vae()
    if encoder == "dropped":
        vae.drop_encoder()
    reference = copy.deepcopy(vae).bfloat16().float()  # fp32 network with the bf16-rounded weights
    packed = _prepared(vae, torch.bfloat16, "vae")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    real_decode = packed.decode
    monkeypatch.setattr(packed, "decode", lambda t: real_decode(t) * float("inf"))  # simulate an overflow
    said: list[str] = []
    with torch.inference_mode():
        images = vae_decode.decode_latents_safely(packed, z, tile=4, overlap=2, on_redo=said.append)
        want = vae_decode.decode_tiled(reference.decode, z, tile=4, overlap=2, factor=TINY_VAE.downsample_factor)
    assert torch.isfinite(images).all()
    assert_close(images, want, atol=1e-4, rtol=1e-4)
    assert len(said) == 1  # every tile overflowed and was redone; the user hears it once


@pytest.mark.slow
@needs_fused
def test_compiled_unet_matches_eager(tmp_path) -> None:
    """torch.compile (inductor, freezing) of the tiny U-Net, caches under tmp_path. Minutes: slow."""
    model = _unet(TINY_SD1)
    x, t, ctx, _ = _unet_inputs(TINY_SD1, 8, 8)
    parts = {"unet": copy.deepcopy(model)}
    optimize.prepare_for_inference(parts, "cpu", torch.float32, compile=True, cache_dir=tmp_path)
    with torch.inference_mode():
        assert_close(parts["unet"](x, t, ctx), model(x, t, ctx), atol=1e-4, rtol=1e-4)


@needs_fused
def test_a_run_too_short_to_pay_leaves_the_unet_unpacked_and_the_vae_packed() -> None:
    """pipeline.optimize(pack_unet=False): the U-Net channels_last on ATen, the VAE packed as always."""
    from types import SimpleNamespace

    from ldmcli import pipeline

    wide = optimize.FUSE_MIN_CHANNELS
    model = SimpleNamespace(unet=torch.nn.Sequential(torch.nn.Conv2d(4, wide, 3, padding=1)),
                            vae=torch.nn.Sequential(torch.nn.Conv2d(4, wide, 3, padding=1)),
                            device=torch.device("cpu"), dtype=torch.float32)
    notes = pipeline.optimize(model, pack_unet=False)
    assert not kernels.is_packed(model.unet[0]) and kernels.is_packed(model.vae[0])
    assert model.unet[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert any("U-Net left unpacked" in n for n in notes)


def test_packing_pays_after_enough_u_net_calls() -> None:
    """The rule's arithmetic, written out: about 3 s to pack, 0.4 s saved a call at CFG 1, 1.9 s a guided call."""
    from ldmcli.request import ImageRequest
    from ldmcli.run import packing_pays

    turbo = ImageRequest(steps=1, cfg_scale=1)
    assert not packing_pays([turbo])  # 0.4 s saved < 3 s
    assert not packing_pays([ImageRequest(steps=4, cfg_scale=1)])  # LCM's 4 steps: 1.6 s
    assert packing_pays([ImageRequest(steps=8, cfg_scale=1)])  # 3.2 s
    assert packing_pays([turbo] * 8)  # eight one-step images in one run
    assert not packing_pays([ImageRequest(steps=1, cfg_scale=7.5)])  # 1.9 s
    assert packing_pays([ImageRequest(steps=2, cfg_scale=7.5)])  # 3.8 s
    assert packing_pays([ImageRequest(steps=4, cfg_scale=1, hires_scale=2, hires_steps=4)])  # 8 calls: 3.2 s
