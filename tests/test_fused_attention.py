"""fused_attention.py (oneDNN Graph's fused attention, bf16 on CPU) and its routing in kernels.attention.

The reference is attention written out in float64: softmax(q k^T / sqrt(d)) v. Tolerances come from
measurement: the fused kernel rounds its logits to bf16, so its relative L2 error against the float64
reference was 7.8e-3..9.9e-3 on these inputs (PyTorch's bf16 flash kernel: 1.7e-3); the bound is 1.5e-2.
A wrong scale, a dropped or doubled chunk, or keys and values swapped are errors of order 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmcli import fused_attention, kernels
from ldmcli.models.unet import CrossAttention
from ldmcli.models.vae import AttnBlock

TOLERANCE = 1.5e-2


pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


def _as_the_unet_makes_them(b, t, heads, d, seed, scale=1.0):
    """[B, T, heads*d] projections viewed as [B, heads, T, d] (strided, as CrossAttention passes them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, heads * d, generator=g) * scale
    return x.bfloat16().view(b, t, heads, d).transpose(1, 2)


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def test_this_machine_fuses_the_pattern() -> None:
    # The CI machines have oneDNN Graph (x86-64 PyTorch builds): if this stops holding, the fast path
    # is silently gone, which must fail here rather than only show in a benchmark.
    assert fused_attention.available()


@pytest.mark.parametrize(
    ("b", "heads", "tq", "tk", "d"),
    [
        (2, 8, 256, 256, 40),  # SD1.5's head size, self-attention
        (2, 8, 256, 77, 40),  # cross-attention on one prompt chunk
        (1, 5, 130, 154, 64),  # SD2/SDXL head size, two prompt chunks, odd counts
        (2, 2, 64, 64, 160),  # SD1.5's deepest level
        (1, 1, 96, 96, 512),  # the VAE's single head
    ],
)
def test_fused_attention_matches_the_formula(b, heads, tq, tk, d) -> None:
    q = _as_the_unet_makes_them(b, tq, heads, d, 1, scale=2.0)  # logits of order 10, like trained nets
    k = _as_the_unet_makes_them(b, tk, heads, d, 2, scale=2.0)
    v = _as_the_unet_makes_them(b, tk, heads, d, 3)
    want = _reference(q, k, v)
    with torch.no_grad():
        got = fused_attention.attention(q, k, v)
        again = fused_attention.attention(q, k, v)  # the compiled (second) call of this layout
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    errors = (_rel(got, want), _rel(again, want))
    flash = _rel(F.scaled_dot_product_attention(q, k, v), want)
    print(f"\nfused relative error {errors[0]:.2e} / {errors[1]:.2e}, bf16 SDPA {flash:.2e}")
    assert max(errors) < TOLERANCE


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 100])
def test_chunks_cover_every_query_once(monkeypatch, chunk_rows) -> None:
    b, heads, tq, tk, d = 2, 4, 200, 120, 40
    q = _as_the_unet_makes_them(b, tq, heads, d, 4, scale=2.0)
    k = _as_the_unet_makes_them(b, tk, heads, d, 5, scale=2.0)
    v = _as_the_unet_makes_them(b, tk, heads, d, 6)
    monkeypatch.setattr(fused_attention, "CHUNK_BYTES", chunk_rows * b * heads * tk * 2)
    sizes = []
    real = fused_attention._function_for
    monkeypatch.setattr(fused_attention, "_function_for", lambda q, k, v: sizes.append(q.shape[2]) or real(q, k, v))
    want = _reference(q, k, v)
    with torch.no_grad():
        got = fused_attention.attention(q, k, v)
    assert max(sizes) == chunk_rows and sum(sizes) == tq  # each chunk's logits within CHUNK_BYTES
    # Row by row: a skipped or misplaced chunk leaves rows that are wrong, whatever the average.
    row_errors = ((got.double() - want).norm(dim=-1) / want.norm(dim=-1)).amax(dim=(0, 1))
    assert row_errors.max().item() < 5 * TOLERANCE, row_errors.argmax().item()
    assert _rel(got, want) < TOLERANCE
    # The output is laid out as the callers flatten it: [B, T, heads, d] in memory.
    assert got.transpose(1, 2).is_contiguous()


def test_only_prepared_bf16_inference_calls_take_the_fused_kernel(monkeypatch) -> None:
    calls = []
    real = fused_attention.attention
    monkeypatch.setattr(fused_attention, "attention", lambda *a: calls.append(1) or real(*a))
    layer = CrossAttention(64, None, 4, 16)
    q = _as_the_unet_makes_them(1, 32, 4, 16, 7)
    with torch.no_grad():
        plain = kernels.attention(layer, q, q, q)
        assert not calls and torch.equal(plain, F.scaled_dot_product_attention(q, q, q))
        kernels.pack_for_cpu(layer)
        kernels.attention(layer, q, q, q)
        assert len(calls) == 1
        q32 = q.float()
        assert torch.equal(kernels.attention(layer, q32, q32, q32), F.scaled_dot_product_attention(q32, q32, q32))
    assert len(calls) == 1  # fp32 keeps SDPA (bit for bit what it computed before)
    with torch.enable_grad():
        kernels.attention(layer, q, q, q)
    assert len(calls) == 1  # autograd keeps SDPA (TorchScript's fused graph has no backward here)


def test_prepared_bf16_networks_route_every_attention_layer_through_it(monkeypatch) -> None:
    from test_runtime import TINY_SD1, _prepared, _unet, _unet_inputs, _vae

    calls = []
    real = fused_attention.attention
    monkeypatch.setattr(fused_attention, "attention", lambda *a: calls.append(1) or real(*a))
    unet = _prepared(_unet(TINY_SD1), torch.bfloat16, "unet")
    x, t, ctx, _ = _unet_inputs(TINY_SD1, 8, 8)
    with torch.inference_mode():
        unet(x.bfloat16(), t, ctx.bfloat16())
    assert len(calls) == sum(isinstance(m, CrossAttention) for m in unet.modules()) > 0
    calls.clear()
    vae = _prepared(_vae(), torch.bfloat16, "vae")
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, 8, 8).bfloat16())
    assert len(calls) == sum(isinstance(m, AttnBlock) for m in vae.decoder.modules()) > 0
