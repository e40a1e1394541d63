"""The layer calls the U-Net and VAE make: `conv2d`, `upsample_conv2d`, `linear`, `geglu`, `attention`. Fused
oneDNN kernels once `pack_for_cpu` prepared the layer, the plain eager ops otherwise. The networks
(`models/`) import this module and no other: preparation (`optimize`) and the VAE decode (`vae_decode`)
build on it, never the reverse.

Fused CPU layers. Eager PyTorch runs `conv -> add` or `linear -> gelu -> mul` as separate passes over
memory, and oneDNN re-lays out a convolution's weight on every call (a 59 MB copy for SD's 2560->1280
3x3 convs, several times the convolution's own cost at 8x8). `pack_for_cpu` marks the convolutions and
linears of a prepared network; `conv2d` / `linear` below then call oneDNN's fused primitives
(`mkldnn::_convolution_pointwise`, `_linear_pointwise`, the ops inductor's freezing pass emits) with
the weight packed once, on first use, for the shape it is used at. The dense weight is released after
packing, so a packed network costs no extra memory; it is then an inference-only, CPU-only object.
Unprepared layers take the plain eager path, bit for bit what they computed before. Attention layers
(modules with `FUSABLE_ATTENTION = True`) of a prepared network run bf16 attention as one oneDNN
Graph kernel (`fused_attention`).

Also here: `return_freed_memory` (glibc `malloc_trim`), which packing needs so that the released
dense weights really leave the process; and what a packed layer holds (`packed_dtype`,
`packed_weight`), for code that rebuilds a plain network from a packed one (the VAE's fp32 redo).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmcli import fused_attention

__all__ = [
    "SUBPIXEL_SLICE",
    "attention",
    "conv2d",
    "fused_path_available",
    "geglu",
    "is_packed",
    "linear",
    "pack_for_cpu",
    "packed_dtype",
    "packed_weight",
    "return_freed_memory",
    "upsample_conv2d",
]

_FUSED = "_ldm_fused"  # attribute set on a prepared nn.Conv2d / nn.Linear: its _Fused record
_FUSED_ATTENTION = "_ldm_fused_attention"  # set (True) on a prepared attention layer


def fused_path_available() -> bool:
    """True where oneDNN's fused convolution/linear ops exist (x86/ARM CPU builds of PyTorch)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


@dataclass
class _Fused:
    """What `pack_for_cpu` leaves on a layer: its weights in the forms the fused ops need."""

    dense: Tensor | None  # the weight as loaded; dropped once packed (unless keep_dense)
    bias: Tensor | None
    dtype: torch.dtype  # what the layer was prepared for; inputs must match
    packed: Tensor | None = None  # oneDNN-blocked weight (conv: for its kxk kernel), packed on first use
    subpixel: Tensor | None = None  # upsampling conv: packed [4*out, in, 2, 2] phase weights
    subpixel_bias: Tensor | None = None
    keep_dense: bool = False  # an upsampling conv keeps it for sizes the sub-pixel form cannot do
    halves: tuple[Tensor, Tensor] | None = None  # GEGLU projection: (value, gate) rows, each packed


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Packing replaces each loaded convolution weight by a packed copy. glibc keeps the freed dense
    weights in its heap (they are below its adaptive mmap threshold), so without this the process
    would hold both copies: measured on SD1.5 in bf16, 3.9 GB peak instead of 2.6 GB.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _is_fused(layer: nn.Module, x: Tensor) -> _Fused | None:
    fused = layer.__dict__.get(_FUSED)
    if fused is not None and x.dtype != fused.dtype:
        raise TypeError(f"{type(layer).__name__} was prepared for {fused.dtype}, got a {x.dtype} input")
    return fused


def is_packed(layer: nn.Module) -> bool:
    """Whether `pack_for_cpu` routed this layer through the fused path."""
    return _FUSED in layer.__dict__


def _conv_args(conv: nn.Conv2d) -> tuple[list[int], list[int], list[int], int]:
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def conv2d(conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None, bias_add: Tensor | None = None) -> Tensor:
    """`conv(x) + bias_add[None, :, None, None] + residual` (bias_add: [out] or None).

    One oneDNN call with a packed weight when `conv` was packed; otherwise the eager ops, in the
    order the networks always computed them.
    """
    fused = _is_fused(conv, x)
    if fused is None:
        y = conv(x)
        if bias_add is not None:
            y = y + bias_add[None, :, None, None]
        return y if residual is None else residual + y
    if fused.packed is None:
        # Pack for the shape actually seen: oneDNN picks its blocked layout per problem size (other
        # sizes later still run, oneDNN then converts the layout where its kernel wants another).
        assert fused.dense is not None
        fused.packed = torch.ops.mkldnn._reorder_convolution_weight(fused.dense, *_conv_args(conv), list(x.shape))
        if not fused.keep_dense:
            _drop_dense(conv, fused)
    x = x.contiguous(memory_format=torch.channels_last)  # no-op inside a channels_last network
    bias = fused.bias
    if bias_add is not None:
        bias = bias_add if bias is None else (bias.float() + bias_add.float()).to(bias.dtype)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, fused.packed, bias, *_conv_args(conv), "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise(
        x, residual.contiguous(memory_format=torch.channels_last), fused.packed, bias, *_conv_args(conv),
        "add", 1.0, None, [], None,
    )


def upsample_conv2d(conv: nn.Conv2d, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
    """`conv(nearest_upsample(x, size or 2x))`, the upsampling layer of both the U-Net and the VAE.

    Packed, a 2x nearest upsample followed by a 3x3 conv runs as ONE 2x2 conv over the small input
    with 4x the output channels, one per output phase (the sub-pixel view of Shi et al. 2016): output
    pixel (2i+a, 2j+b) only ever sees input rows {i-1+a, i+a} and columns {j-1+b, j+b}, whose 3x3
    taps sum to a 2x2 kernel. That is 16 instead of 36 multiply-adds per input pixel and channel
    pair, and the 4x-size upsampled tensor is never written. The phases are interleaved into the
    channels_last output by one strided copy. Other sizes (odd skip sizes) take the plain path.
    """
    fused = _is_fused(conv, x)
    h, w = x.shape[-2:]
    if size is not None and tuple(size) == (2 * h, 2 * w):
        size = None
    plain = (
        fused is None or size is not None or conv.kernel_size != (3, 3) or conv.padding != (1, 1)
        or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
    )
    if plain:
        if fused is not None:
            fused.keep_dense = True
        up = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(x, size=tuple(size), mode="nearest")
        return conv2d(conv, up)
    if fused.subpixel is None:
        fused.keep_dense = True
        assert fused.dense is not None
        phases = _subpixel_weights(fused.dense)
        fused.subpixel = torch.ops.mkldnn._reorder_convolution_weight(phases, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        fused.subpixel_bias = None if fused.bias is None else fused.bias.repeat(4)
    n, out = x.shape[0], conv.out_channels
    # [N, 4*out, H+1, W+1]: phase (a, b) of output pixel (2i+a, 2j+b) sits at (i+a, j+b), channels (2a+b)*out...
    y = torch.ops.mkldnn._convolution_pointwise(
        x.contiguous(memory_format=torch.channels_last), fused.subpixel, fused.subpixel_bias,
        [1, 1], [1, 1], [1, 1], 1, "none", [], "",
    ).contiguous(memory_format=torch.channels_last)
    sn, _, sh, sw = y.stride()  # channels_last: channel stride 1, pixel stride 4*out
    # View of y indexed [n, i, a, j, b, c] = y[n, (2a+b)*out + c, i+a, j+b]: each step in a moves one
    # row and two phase blocks, each step in b one column and one phase block.
    phased = y.as_strided((n, h, 2, w, 2, out), (sn, sh, sh + 2 * out, sw, sw + out, 1))
    result = torch.empty((n, 2 * h, 2 * w, out), dtype=y.dtype, device=y.device)
    result.view(n, h, 2, w, 2, out).copy_(phased)
    return result.permute(0, 3, 1, 2)  # [N, out, 2H, 2W], channels_last


SUBPIXEL_SLICE = 128  # output channels folded at a time by `_subpixel_weights`


def _subpixel_weights(weight: Tensor) -> Tensor:
    """3x3 kernel [O, C, 3, 3] -> the four 2x2 phase kernels [4*O, C, 2, 2], phase (a, b) at block 2a+b.

    Along one axis, phase 0 (even outputs) reads input offsets {-1, 0} with taps {w0, w1 + w2}, phase 1
    (odd outputs) reads offsets {0, +1} with taps {w0 + w1, w2}. Summed in fp32, rounded once. Built a
    slice of output channels at a time: the fp32 intermediates of a whole 1280-channel kernel would
    briefly take about 0.25 GB during the first step, when the phases are built.
    """
    out = weight.shape[0]
    phases = weight.new_empty((4 * out, weight.shape[1], 2, 2))

    def fold(t: Tensor, dim: int, phase: int) -> Tensor:
        t0, t1, t2 = t.unbind(dim)
        pair = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
        return torch.stack(pair, dim)

    for start in range(0, out, SUBPIXEL_SLICE):
        wf = weight[start:start + SUBPIXEL_SLICE].float()
        for block, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            phases[block * out + start:block * out + start + len(wf)] = fold(fold(wf, 2, a), 3, b)
    return phases


def linear(
    lin: nn.Linear,
    x: Tensor,
    *,
    gelu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """`gelu(lin(x))` or `lin(x) + residual`, one oneDNN call with a packed weight when `lin` was prepared."""
    assert not (gelu and residual is not None), "one epilogue at a time"
    fused = _is_fused(lin, x)
    if fused is None:
        y = lin(x)
        if gelu:
            return F.gelu(y)
        return y if residual is None else residual + y
    weight = _packed_linear_weight(lin, fused, x)
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, fused.bias, "gelu", [], "none")
    y = torch.ops.mkldnn._linear_pointwise(x, weight, fused.bias, "none", [], "")
    # The fused "add" epilogue measured slower than an in-place add (its binary path has a fixed
    # per-call overhead), so the residual is added after the GEMM, in place.
    return y if residual is None else y.add_(residual)


def _pack_linear(weight: Tensor, x: Tensor) -> Tensor:
    """A [out, in] weight in oneDNN's blocked layout for x's row count (the layout is chosen per GEMM
    shape; other row counts still run). Measured at SD1.5's 16x16 level (512 rows): 25 % faster GEMMs."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), x.numel() // x.shape[-1])


def _packed_linear_weight(lin: nn.Linear, fused: _Fused, x: Tensor) -> Tensor:
    """Pack on first use through `linear`, then drop the dense weight and the module's copy of it.

    Only layers that reach `linear` are packed: the timestep MLPs call their nn.Linear directly and
    keep their plain weights.
    """
    if fused.packed is None:
        assert fused.dense is not None
        fused.packed = _pack_linear(fused.dense, x)
        _drop_dense(lin, fused)
    return fused.packed


def _drop_dense(layer: nn.Module, fused: _Fused) -> None:
    fused.dense = None
    layer.weight = nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
    return_freed_memory()


def pack_for_cpu(model: nn.Module) -> int:
    """Route every Conv2d/Linear of a CPU `model` through the fused oneDNN path; returns how many.

    Convolution weights move into the layer's record (the module keeps a meta-device placeholder of
    the same shape) and are packed on first use, so the network holds one copy of its weights but can
    no longer be moved, cast or saved: prepare a network once it is loaded and cast. A linear layer
    keeps its weight until its first call through `linear`/`geglu` packs it (layers called directly,
    like the timestep MLPs, keep theirs). Only fp32 and bf16 CPU weights are packed.
    """
    if not fused_path_available():
        return 0
    count = 0
    for layer in model.modules():
        if getattr(layer, "FUSABLE_ATTENTION", False):
            layer.__dict__[_FUSED_ATTENTION] = True
        if layer.__dict__.get(_FUSED) is not None or not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        weight = layer.weight.detach()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            continue
        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                continue
            layer.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        layer.__dict__[_FUSED] = _Fused(weight, bias, weight.dtype)
        count += 1
    return count


def attention(layer: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, heads, tokens, d] inputs, as `scaled_dot_product_attention`.

    oneDNN Graph's fused kernel (`fused_attention`) when `pack_for_cpu` prepared `layer` and the inputs
    are bf16 CPU tensors outside autograd (where it measured 1.5-3x faster); SDPA otherwise.
    """
    if (layer.__dict__.get(_FUSED_ATTENTION) and q.dtype == torch.bfloat16 and q.device.type == "cpu"
            and not torch.is_grad_enabled()):
        return fused_attention.attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def geglu(proj: nn.Linear, x: Tensor) -> Tensor:
    """GEGLU (Shazeer 2020): `a * gelu(gate)` with `a, gate = proj(x).chunk(2)`.

    Packed: two GEMMs over the halves of the weight, each packed once; the gate's GELU rides in its
    GEMM, and the product is taken in place on `a` (measured 12 % faster than oneDNN's binary "mul"
    epilogue). Nothing [tokens, 2 * inner] wide is written.
    """
    fused = _is_fused(proj, x)
    if fused is None:
        a, gate = proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)
    if fused.halves is None:
        assert fused.dense is not None
        half = fused.dense.shape[0] // 2
        fused.halves = (_pack_linear(fused.dense[:half], x), _pack_linear(fused.dense[half:], x))
        _drop_dense(proj, fused)
    value_weight, gate_weight = fused.halves
    b = fused.bias
    gate = torch.ops.mkldnn._linear_pointwise(x, gate_weight, None if b is None else b[b.shape[0] // 2:], "gelu", [], "none")
    value = torch.ops.mkldnn._linear_pointwise(x, value_weight, None if b is None else b[: b.shape[0] // 2], "none", [], "")
    return value.mul_(gate)


def _records(module: nn.Module) -> Iterator[_Fused]:
    for layer in module.modules():
        if _FUSED in layer.__dict__:
            yield layer.__dict__[_FUSED]


def packed_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype `module`'s packed layers were prepared for (their inputs must match); None if none is packed."""
    for record in _records(module):
        return record.dtype
    return None


def packed_weight(layer: nn.Module) -> Tensor | None:
    """A packed layer's weight as a dense tensor (its module holds only a meta placeholder), unpacked
    if the dense copy was already released; None for a layer `pack_for_cpu` did not take."""
    record = layer.__dict__.get(_FUSED)
    if record is None:
        return None
    return record.dense if record.dense is not None else record.packed.to_dense()
