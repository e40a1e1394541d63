"""Making loaded networks fast on their device, in place: `prepare_for_inference`.

channels_last convolutions on CPU and CUDA; on CPU, the fused oneDNN layers of `kernels` for the
networks wide enough to gain from them (`FUSE_MIN_CHANNELS`); or `torch.compile` (inductor) with its
caches on disk, so only the first run in a cache pays the compile.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ldmcli.kernels import fused_path_available, pack_for_cpu

__all__ = ["FUSE_MIN_CHANNELS", "compile_module", "enable_compile_cache", "prepare_for_inference", "widest_conv"]


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
