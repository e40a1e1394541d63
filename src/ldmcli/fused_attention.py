"""Scaled-dot-product attention as one oneDNN Graph kernel, for bf16 on the CPU: `attention(q, k, v)`.

softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017). PyTorch's CPU `scaled_dot_product_attention` runs it
as a flash-attention loop (Dao et al. 2022) of small GEMMs and a vectorised fp32 softmax; at SD's head
sizes (40-160) that loop, not the GEMMs, bounds it, and it took 40 % of an SD1.5 U-Net step. oneDNN
Graph has a fused kernel for the matmul -> softmax -> matmul pattern that keeps its blocks in AMX
tiles (the kernel OpenVINO's CPU plugin runs for the same pattern): measured 1.5-1.8x faster at SD1.5's
4096-token self-attention and 3x at its 77-token cross-attention, with logits rounded to bf16 inside
the kernel (relative error against fp32 attention about 5x that of the flash kernel; the U-Net's own
bf16 error is what the benchmark reports).

PyTorch reaches oneDNN Graph only through TorchScript's fuser (`torch.jit.enable_onednn_fusion`), so
the pattern is traced once per input layout, and TorchScript's profiling executor compiles a fused
partition the second time it sees that layout (the first, profiling, call runs the ops one by one).
Queries go through in chunks small enough that the profiling call's materialised logits stay small
(`CHUNK_BYTES`). If a build of PyTorch has no oneDNN Graph, the traced pattern is not fused: that is
checked once, and every call then takes `scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CHUNK_BYTES", "attention", "available"]

# Bound on one chunk's logits (bf16): the profiling call of each new layout materialises them, and
# the fused kernel's scratch scales with them. 64 MB: 512 queries against 4096 keys at batch 2 x 8
# heads, SD1.5's largest self-attention; measured no slower than whole-sequence calls.
CHUNK_BYTES = 64 << 20

_lock = threading.Lock()
_traced: dict[tuple, torch.jit.ScriptFunction] = {}
_state = {"available": None}  # None: not checked yet


def _pattern(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # The form oneDNN Graph's fusion recognises: matmul, softmax over keys, matmul. The scale is
    # applied to q before the call (Tq x d multiplies instead of Tq x Tk).
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1), v)


def _key(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype) for t in (q, k, v))


def _function_for(q: Tensor, k: Tensor, v: Tensor) -> torch.jit.ScriptFunction:
    key = _key(q, k, v)
    fn = _traced.get(key)
    if fn is None:
        with _lock:
            fn = _traced.get(key)
            if fn is None:
                # One traced function per layout: each specialises once, so no layout ever falls back
                # to TorchScript's unfused path after its specialisation limit.
                _traced[key] = fn = _trace(*(t[..., :1, :] for t in (q, k, v)))
    return fn


def _trace(q: Tensor, k: Tensor, v: Tensor) -> torch.jit.ScriptFunction:
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, which has no route to this kernel
        # without a C++ compiler at run time. When a release drops it, `available()` turns False.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(_pattern, (q, k, v), check_trace=False)


def _enable() -> None:
    torch.jit.enable_onednn_fusion(True)
    torch._C._jit_set_num_profiled_runs(1)  # compile on the second call of a layout, not later
    torch._C._jit_set_fusion_strategy([("STATIC", 2)])


def available() -> bool:
    """Whether this PyTorch fuses the pattern (checked once, on tiny bf16 inputs, then remembered)."""
    if _state["available"] is None:
        with _lock:
            if _state["available"] is None:
                _state["available"] = _check()
    return bool(_state["available"])


def _check() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.jit, "enable_onednn_fusion")):
        return False
    try:
        _enable()
        q = torch.randn(1, 1, 32, 32, dtype=torch.bfloat16)
        fn = _trace(q, q, q)
        with torch.no_grad():
            fn(q, q, q)
            fn(q, q, q)
            return "oneDNNFusionGroup" in str(fn.graph_for(q, q, q))
    except Exception:  # any failure of the optional path leaves the standard one
        return False


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for [B, H, T, d] bf16 CPU tensors (any strides), under no_grad.

    Falls back to `scaled_dot_product_attention` where oneDNN Graph does not fuse the pattern.
    """
    if not available():
        return F.scaled_dot_product_attention(q, k, v)
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    q = q * (1.0 / math.sqrt(d))
    rows = max(1, min(tq, CHUNK_BYTES // max(1, b * h * tk * q.element_size())))
    if rows >= tq:
        return _function_for(q, k, v)(q, k, v)
    # Output laid out as the callers flatten it ([B, T, H, d] in memory). Each chunk is written through
    # views in that order: copying into the [B, H, T, d] view instead ran 40x slower (7 ms a chunk).
    out = torch.empty((b, tq, h, d), dtype=q.dtype)
    for start in range(0, tq, rows):
        part = q[:, :, start:start + rows]
        out[:, start:start + rows] = _function_for(part, k, v)(part, k, v).transpose(1, 2)
    return out.transpose(1, 2)
