"""Write an SD1.5-shaped single-file checkpoint with random weights (for load-time and RSS benchmarks).

Keys, shapes and dtypes come from the real v1-5-pruned-emaonly manifest; every floating tensor is
written in `dtype` (fp16: ~2.1 GB, the file people download). Weights are drawn like PyTorch's default
init (uniform, 1/sqrt(fan_in)) so activations stay finite; norms are 1, biases 0; the schedule buffers
are SD's real scaled-linear schedule.
"""

from __future__ import annotations

import json
import tempfile
import math
from pathlib import Path

import torch

MANIFEST = Path(__file__).resolve().parents[1] / "tests" / "data" / "sd15-single-file.json"


def _tensor(key: str, shape: list[int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if len(shape) == 1:
        is_norm = any(part in key for part in ("norm", "ln_", "layer_norm")) and key.endswith("weight")
        return (torch.ones if is_norm else torch.zeros)(shape, dtype=dtype)
    fan_in = math.prod(shape[1:])
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=g) * (2 * bound) - bound).to(dtype)


def schedule_buffers() -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float()}


def write_sd15_file(path: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write (once) and return `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file():
        return path
    manifest = json.loads(MANIFEST.read_text())
    g = torch.Generator().manual_seed(seed)
    sched = schedule_buffers()
    tensors = {}
    for key, (shape, _) in manifest.items():
        if key in sched:
            tensors[key] = sched[key]
        elif key in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                     "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                     "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2"):
            tensors[key] = torch.zeros(shape)  # unused by every loader; present so the key set is real
        else:
            tensors[key] = _tensor(key, shape, dtype, g)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)
    return path


if __name__ == "__main__":
    import sys

    print(write_sd15_file(Path(sys.argv[1] if len(sys.argv) > 1 else str(Path(tempfile.gettempdir()) / "ldm-bench" / "sd15-fp16.safetensors"))))
