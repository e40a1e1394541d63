"""Device policy: which compute dtype a device gets, and how many CPU threads run.

- `choose_dtype(device, requested)`: bf16 on CPUs with bf16 dot-product units (AMX, AVX512-BF16),
  fp32 on other CPUs; bf16 on CUDA GPUs with native bf16 (Ampere+), fp16 on older ones; fp16 on MPS.
- `configure_threads(n)`: intra-op threads, at most `max_threads()`.
- `return_freed_memory()`: give the process's freed heap pages back to the OS (glibc).
"""

from __future__ import annotations

import os

import torch

from ldmcli.limits import MAX_THREADS_PER_CPU

__all__ = ["DTYPES", "MAX_THREADS_PER_CPU", "choose_dtype", "configure_threads", "cpu_bf16_units", "max_threads",
           "return_freed_memory"]


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


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16": the names --dtype takes."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


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


def max_threads() -> int:
    """The most intra-op threads `configure_threads` (and --threads) accepts on this machine."""
    return MAX_THREADS_PER_CPU * (os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Intra-op threads for CPU inference: `threads`, else PyTorch's default (one per physical core,
    which is right: hyperthreads share the AMX/AVX-512 units and only add synchronisation)."""
    if threads is not None:
        if not 1 <= threads <= max_threads():
            raise ValueError(f"threads must be 1 to {max_threads()} ({MAX_THREADS_PER_CPU} per CPU), got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed blocks below its mmap threshold (up to 32 MB) in the heap for reuse, so a
    transient allocation of many such tensors (a LoRA's factors while they are merged) would stay in
    the RSS through sampling and add to the run's peak; trimming returns those pages at once.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)
