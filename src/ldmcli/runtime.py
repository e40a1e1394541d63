"""How the networks run on a device: dtype policy, threads, memory format, fused CPU layers, compile,
and a VAE decode that is bounded in memory and never returns a black image.

- `choose_dtype(device, requested)`: bf16 on CPUs with bf16 dot-product units (AMX, AVX512-BF16),
  fp32 on other CPUs; bf16 on CUDA GPUs with native bf16 (Ampere+), fp16 on older ones; fp16 on MPS.
- `configure_threads(n)`: intra-op threads.
- `prepare_for_inference(parts, device, dtype, ...)`: channels_last, oneDNN weight packing and fused
  epilogues on CPU, or `torch.compile` with inductor's on-disk cache.
- `decode_latents_safely(vae, z, tile=...)`: tiled decode with blended overlaps; a decode that comes
  out non-finite in fp16/bf16 is redone in fp32.
- `conv2d`, `upsample_conv2d`, `linear`, `geglu`: the layer calls the U-Net and VAE make; fused
  oneDNN kernels once `pack_for_cpu` prepared the layer, the plain eager ops otherwise.

Fused CPU layers. Eager PyTorch runs `conv -> add` or `linear -> gelu -> mul` as separate passes over
memory, and oneDNN re-lays out a convolution's weight on every call (a 59 MB copy for SD's 2560->1280
3x3 convs, several times the convolution's own cost at 8x8). `pack_for_cpu` marks the convolutions and
linears of a prepared network; `conv2d` / `linear` below then call oneDNN's fused primitives
(`mkldnn::_convolution_pointwise`, `_linear_pointwise`, the ops inductor's freezing pass emits) with
the weight packed once, on first use, for the shape it is used at. The dense weight is released after
packing, so a packed network costs no extra memory; it is then an inference-only, CPU-only object.
Unprepared layers take the plain eager path, bit for bit what they computed before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DTYPES",
    "choose_dtype",
    "configure_threads",
    "conv2d",
    "cpu_bf16_units",
    "decode_latents_safely",
    "decode_tiled",
    "enable_compile_cache",
    "fused_path_available",
    "geglu",
    "is_packed",
    "linear",
    "pack_for_cpu",
    "prepare_for_inference",
    "upsample_conv2d",
]

_FUSED = "_ldm_fused"  # attribute set on a prepared nn.Conv2d / nn.Linear: its _Fused record


# ---------------------------------------------------------------------------------------------
# Fused CPU layers (oneDNN)


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


# ---------------------------------------------------------------------------------------------
# Device and dtype policy


def cpu_bf16_units() -> str | None:
    """Name of the CPU's bf16 dot-product hardware ("AMX-BF16", "AVX512-BF16"), or None.

    Without it (AVX2-only x86, most ARM builds of PyTorch) bf16 is emulated and slower than fp32.
    """
    caps = _cpu_capabilities()
    if caps.get("amx_bf16"):
        return "AMX-BF16"
    if caps.get("avx512_bf16"):
        return "AVX512-BF16"
    return None


def _cpu_capabilities() -> dict:
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # older PyTorch: read the kernel's flags instead
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return {}
        return {"amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """The compute dtype for `device`, and why (one line, for the user).

    auto: CPU with bf16 units -> bf16 (3-4x faster than fp32 there); other CPUs -> fp32;
    CUDA -> bf16 where the GPU has native bf16 (Ampere and newer: fp32's range, so no fp16
    overflow), fp16 before; MPS -> fp16. An explicit `requested` (fp32/bf16/fp16) always wins,
    with a warning in the reason where it is known to be slow.
    """
    kind = torch.device(device).type
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
        dtype = DTYPES[requested]
        note = "requested"
        if kind == "cpu" and dtype == torch.bfloat16 and cpu_bf16_units() is None:
            note += "; this CPU has no bf16 units, so bf16 is emulated and slower than fp32"
        elif kind == "cpu" and dtype == torch.float16:
            note += "; fp16 on a CPU is emulated and slow"
        return dtype, f"{requested} ({note})"
    if kind == "cpu":
        units = cpu_bf16_units()
        if units:
            return torch.bfloat16, f"bf16 (auto: this CPU has {units}; --dtype fp32 for full precision)"
        return torch.float32, "fp32 (auto: this CPU has no bf16 units)"
    if kind == "cuda":
        index = torch.device(device).index
        if torch.cuda.get_device_capability(index)[0] >= 8:
            return torch.bfloat16, "bf16 (auto: the GPU has native bf16)"
        return torch.float16, "fp16 (auto: GPU without native bf16; the VAE decode is NaN-guarded)"
    if kind == "mps":
        return torch.float16, "fp16 (auto: MPS; the VAE decode is NaN-guarded)"
    return torch.float32, f"fp32 (auto: {kind})"


def configure_threads(threads: int | None = None) -> int:
    """Intra-op threads for CPU inference: `threads`, else PyTorch's default (one per physical core,
    which is right: hyperthreads share the AMX/AVX-512 units and only add synchronisation)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------
# Preparing loaded networks


# oneDNN's packed kernels pay a fixed cost per call that only large GEMMs amortise. Measured on this
# CPU: 1.3x faster than ATen on SD-sized networks (320-1280 channels), 2x slower on the demo model's
# 32-128-channel U-Net. By default a network is fused only if its widest convolution reaches this.
FUSE_MIN_CHANNELS = 256


def widest_conv(module: nn.Module) -> int:
    """Largest output channel count of any Conv2d in `module` (0 if none)."""
    return max((m.out_channels for m in module.modules() if isinstance(m, nn.Conv2d)), default=0)


def prepare_for_inference(
    parts: dict[str, nn.Module],
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    channels_last: bool | None = None,
    fuse: bool | None = None,
    compile: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Make loaded networks fast on `device`, in place; returns one note per thing done.

    `parts` maps names ("unet", "vae", "text_encoder") to networks already on `device` in `dtype`
    (cast once, by the loader). Their entries are replaced when compiled.
    - channels_last (default: on for CPU and CUDA): convolutions in NHWC, the layout oneDNN and cuDNN
      run fastest; the transformer blocks then flatten to tokens without a copy.
    - fuse (default: on for CPU, for networks at least `FUSE_MIN_CHANNELS` wide): `pack_for_cpu` on
      the U-Net and VAE (packed weights, fused epilogues, sub-pixel upsampling). The packed networks
      cannot be moved or cast afterwards. True fuses both regardless of width.
    - compile: `torch.compile` (inductor) each network instead of fusing by hand, with inductor's
      FX-graph and kernel caches on disk under `cache_dir` (default ~/.cache/ldm/inductor), so only
      the first run in a cache pays the compile. Needs a C++ compiler on CPU.
    """
    kind = torch.device(device).type
    notes = []
    if channels_last is None:
        channels_last = kind in ("cpu", "cuda")
    if fuse is None:
        fuse = kind == "cpu" and not compile and dtype in (torch.float32, torch.bfloat16) and fused_path_available()
        wide = [name for name in ("unet", "vae") if name in parts and widest_conv(parts[name]) >= FUSE_MIN_CHANNELS]
    else:
        wide = [name for name in ("unet", "vae") if name in parts]
    for name, module in parts.items():
        module.eval().requires_grad_(False)
        # Packed layers re-lay out their weights anyway (and feed themselves channels_last inputs):
        # converting the weights first would only cost a copy of every convolution.
        if channels_last and not (fuse and name in wide) and name in ("unet", "vae"):
            module.to(memory_format=torch.channels_last)
    if channels_last:
        notes.append("channels_last")
    if fuse and wide:
        count = sum(pack_for_cpu(parts[name]) for name in wide)
        notes.append(f"fused oneDNN layers ({count} packed)")
    if compile:
        enable_compile_cache(cache_dir)
        if "unet" in parts:
            parts["unet"] = compile_module(parts["unet"], kind)
        if "vae" in parts:  # the VAE is called through .decode(), which torch.compile(vae) would not cover
            parts["vae"].decoder = compile_module(parts["vae"].decoder, kind)
        notes.append(f"torch.compile (inductor, cache {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
    return notes


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> str:
    """Point inductor's on-disk caches (FX graphs and compiled kernels) at `cache_dir`.

    Must run before the first compile in the process. The second process with the same model and
    shapes then loads the compiled graphs instead of compiling them.
    """
    path = os.fspath(cache_dir) if cache_dir else os.path.join(os.path.expanduser("~"), ".cache", "ldm", "inductor")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", path)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_module(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """`torch.compile` for inference. On CPU, inductor's freezing pass treats the weights as
    constants, so it can pack them for oneDNN and fold them into fused kernels."""
    if device_type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(module, dynamic=False)


# ---------------------------------------------------------------------------------------------
# VAE decode: tiled, NaN-guarded


def decode_latents_safely(
    vae: nn.Module,
    z: Tensor,
    *,
    tile: int | None = None,
    overlap: int = 16,
    on_redo: Callable[[str], None] | None = None,
) -> Tensor:
    """`vae.decode(z)` (z: latents already divided by the scale factor) -> images [N, 3, H, W], float32.

    tile: decode in latent tiles of this side (e.g. 64 = 512 px) overlapping by `overlap` latents,
    blended with linear ramps, so memory is bounded by one tile whatever the image size (see
    `decode_tiled`). A decode that comes out non-finite in fp16/bf16 (fp16 VAEs overflow) is redone
    in fp32, tile by tile, and `on_redo` is told; a black image is never returned.
    """
    if tile is None or max(z.shape[-2:]) <= tile:
        return _decode_guarded(vae, z, on_redo)
    said: list[str] = []

    def once(message: str) -> None:  # one message per image, not per tile
        if on_redo is not None and not said:
            on_redo(message)
        said.append(message)

    factor = getattr(getattr(vae, "config", None), "downsample_factor", 8)
    return decode_tiled(lambda part: _decode_guarded(vae, part, once), z, tile=tile, overlap=overlap, factor=factor)


def _decode_guarded(vae: nn.Module, z: Tensor, on_redo: Callable[[str], None] | None) -> Tensor:
    dtype = _module_dtype(vae)
    images = vae.decode(z.to(dtype)).float()
    if dtype == torch.float32 or bool(torch.isfinite(images).all()):
        return images
    if on_redo is not None:
        on_redo(f"VAE decode in {str(dtype).removeprefix('torch.')} overflowed (inf/NaN); decoded again in float32")
    if any(True for _ in _records(vae)):
        return _fp32_twin(vae).decode(z.float()).float()
    vae.to(torch.float32)  # in place, no second copy; cast back after (exact: the values came from `dtype`)
    try:
        return vae.decode(z.float()).float()
    finally:
        vae.to(dtype)


def _module_dtype(module: nn.Module) -> torch.dtype:
    for record in _records(module):
        return record.dtype
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _records(module: nn.Module):
    for layer in module.modules():
        if _FUSED in layer.__dict__:
            yield layer.__dict__[_FUSED]


def _fp32_twin(vae: nn.Module) -> nn.Module:
    """An fp32 copy of `vae` (kept on the module for later redos): weights from the packed records
    where the layers were packed. Costs 4 bytes per VAE parameter, only once an overflow happened."""
    twin = vae.__dict__.get("_ldm_fp32_twin")
    if twin is not None:
        return twin
    device = next(p.device for p in vae.parameters() if not p.is_meta)
    state = {}
    for name, layer in vae.named_modules():
        record = layer.__dict__.get(_FUSED)
        for pname, p in layer.named_parameters(recurse=False):
            if record is not None and pname == "weight":
                weight = record.dense if record.dense is not None else record.packed.to_dense()
                state[f"{name}.weight" if name else "weight"] = weight.float()
            else:
                state[f"{name}.{pname}" if name else pname] = p.detach().float()
    with torch.device("meta"):
        twin = type(vae)(vae.config)
    if vae.encoder is None:  # dropped for text-to-image: the twin matches
        twin.drop_encoder()
    twin.load_state_dict(state, strict=True, assign=True)
    twin = twin.to(device).eval().requires_grad_(False)
    vae.__dict__["_ldm_fp32_twin"] = twin
    return twin


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, *, tile: int = 64, overlap: int = 16, factor: int = 8) -> Tensor:
    """Decode latents [N, C, h, w] tile by tile; images [N, 3, h*factor, w*factor] in float32.

    Tiles of `tile` x `tile` latents start every `tile - overlap` latents (the last tile of a row or
    column is moved back to end at the border, so all tiles are full size). Each tile's image is
    weighted by a ramp that rises linearly across the overlap on every side that has a neighbour,
    and the weighted sum is divided by the summed weights: no seams, and memory holds one tile's
    activations plus the output image. The VAE's mid-block attention and GroupNorm statistics then
    see one tile at a time, so the result differs slightly from an untiled decode (measured in
    docs/performance.md).
    """
    n, _, h, w = z.shape
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = decode(z[:, :, y0 : y0 + tile, x0 : x0 + tile]).float()
            if out is None:
                out = torch.zeros((n, part.shape[1], h * factor, w * factor), dtype=torch.float32, device=part.device)
                weight = torch.zeros((1, 1, h * factor, w * factor), dtype=torch.float32, device=part.device)
            th, tw = part.shape[-2:]
            ramp = _ramp(th, overlap * factor, y0 > 0, y0 + tile < h, part.device)[:, None] * _ramp(
                tw, overlap * factor, x0 > 0, x0 + tile < w, part.device
            )[None, :]
            sy, sx = y0 * factor, x0 * factor
            out[:, :, sy : sy + th, sx : sx + tw] += part * ramp
            weight[:, :, sy : sy + th, sx : sx + tw] += ramp
    assert out is not None and weight is not None
    return out / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, width: int, rise: bool, fall: bool, device) -> Tensor:
    """1 in the middle, rising linearly over `width` pixels at an edge shared with a neighbour."""
    r = torch.ones(length, dtype=torch.float32, device=device)
    if width > 0:
        edge = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        if rise:
            r[:width] = torch.minimum(r[:width], edge)
        if fall:
            r[-width:] = torch.minimum(r[-width:], edge.flip(0))
    return r
