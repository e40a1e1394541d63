"""Latent Consistency Models (Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution
Images with Few-Step Inference"): multistep consistency sampling, as diffusers' `LCMScheduler` runs it.

A consistency model maps any point of a trajectory straight to its end. LCM parameterises it as
(the paper's eq. 9, diffusers' `get_scalings_for_boundary_condition_discrete`)

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred(x_t, t),
    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),   c_out = s t / sqrt((s t)^2 + sigma_data^2),

with sigma_data = 0.5, the timestep scaled by s = `timestep_scaling` = 10, x_t the DDPM (VP) latent and
x0_pred the network's clean-image estimate (eps or v turned into x0). Multistep sampling (the paper's
Algorithm 3) alternates f with re-noising to the next timestep with FRESH noise:
x_{t'} = sqrt(a_t') f + sqrt(1 - a_t') z, the last step returning f itself. In k-diffusion's sigma space
(x = x_vp / sqrt(a)) that is `x = f + sigma_next * z` (A1111's `sample_lcm` writes it so).

The timesteps are LCM's own (`LCMScheduler.set_timesteps`): the distillation ran on a "skipping" grid of
`original_inference_steps` = 50 timesteps, every k = T // 50 = 20th from k - 1 (19, 39, ..., 999), and
n inference steps take the entries at indices floor(linspace(0, 50, n, endpoint=False)) of it counted down
from 999 (4 steps: 999, 759, 499, 259). The scheduler config's `timestep_spacing` plays no part.

Guidance for LCM-distilled U-Nets (LCM_Dreamshaper_v7, lcm-sdxl) is a network input, not CFG: the U-Net
takes `timestep_cond` = `guidance_embedding(w)` with w = guidance_scale - 1, through `time_embedding.cond_proj`
(diffusers' `LatentConsistencyModelPipeline`). LCM-LoRA models are ordinary U-Nets run with this sampler at
CFG 1-2.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .schedule import DiffusionSchedule, Sigmas

ORIGINAL_INFERENCE_STEPS = 50  # the distillation's skipping grid (LCMScheduler's original_inference_steps)
TIMESTEP_SCALING = 10.0  # LCMScheduler's timestep_scaling
SIGMA_DATA = 0.5  # get_scalings_for_boundary_condition_discrete's sigma_data
# The training-timestep count `lcm` assumes when it is not told the timesteps (`sample()` does not tell
# it); `lcm_sigmas` refuses schedules of another length so the two cannot disagree.
TRAIN_TIMESTEPS = 1000


def lcm_timesteps(steps: int, num_train_timesteps: int = TRAIN_TIMESTEPS,
                  original_steps: int = ORIGINAL_INFERENCE_STEPS) -> list[int]:
    """`LCMScheduler.set_timesteps(steps)`'s timesteps, descending: ``steps`` entries of the skipping grid
    ``[(i + 1) * k - 1 for i in range(original_steps)]`` (k = T // original_steps), counted down from its
    top at the indices ``floor(i * original_steps / steps)``."""
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_inference_steps must be in 1..{num_train_timesteps}, got {original_steps}")
    if not 1 <= steps <= original_steps:
        raise ValueError(f"the LCM sampler takes 1 to {original_steps} steps (its distillation grid has "
                         f"{original_steps} timesteps), got {steps}")
    k = num_train_timesteps // original_steps
    descending = [(original_steps - j) * k - 1 for j in range(original_steps)]
    step = original_steps / steps  # numpy.linspace(0, N, n, endpoint=False) is i * (N / n), then floored
    return [descending[math.floor(i * step)] for i in range(steps)]


def lcm_sigmas(schedule: DiffusionSchedule, spacing: str | None, steps: int) -> Sigmas:
    """The sampling plan of `LCMScheduler` (`schedule.make_sigmas(convention="lcm")`): the training noise
    levels at `lcm_timesteps`, then 0 (the last step returns the consistency function's output, a clean
    latent); initial noise is unit VP noise (init_noise_sigma 1), i.e. sqrt(sigma_max^2 + 1) in k-space.

    spacing: must be None -- LCM walks its own grid, which no spacing changes (diffusers ignores the
    config's timestep_spacing; a Karras or trailing grid would feed the network timesteps it was not
    distilled on)."""
    if spacing is not None:
        raise ValueError(f"the LCM sampler walks LCMScheduler's own timesteps (every {TRAIN_TIMESTEPS // ORIGINAL_INFERENCE_STEPS}th "
                         f"of {ORIGINAL_INFERENCE_STEPS}); it takes no schedule, got {spacing!r}")
    if schedule.num_train_timesteps != TRAIN_TIMESTEPS:
        raise ValueError(f"the LCM sampler needs a {TRAIN_TIMESTEPS}-timestep training schedule (as every LCM "
                         f"model has), this model has {schedule.num_train_timesteps}")
    ts = torch.tensor(lcm_timesteps(steps), dtype=torch.float64)
    sig = schedule.t_to_sigma(ts)  # exactly the float32 training sigmas: the timesteps are whole
    sigmas = torch.cat([sig, sig.new_zeros(1)]).float()
    return Sigmas(sigmas=sigmas, timesteps=ts.float(), init_noise_sigma=((sigmas[0] ** 2 + 1) ** 0.5).item())


def boundary_scalings(t: float, timestep_scaling: float = TIMESTEP_SCALING,
                      sigma_data: float = SIGMA_DATA) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's consistency parameterisation at timestep t (the scaled timestep s t plays
    the role of the noise level): c_skip -> 1 and c_out -> 0 as t -> 0, so f(x, 0) = x."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


@torch.no_grad()
def lcm(
    model: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    *,
    noise: Callable[[], Tensor],
    callback: Callable[[int, Tensor], None] | None = None,
    timesteps: list[float] | Tensor | None = None,
) -> Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3) in sigma space.

    Each step: x0 = model(x, sigma); the consistency function f = c_out(t) x0 + c_skip(t) x / sqrt(1 +
    sigma^2) (the VP latent, as diffusers applies c_skip); then x = f + sigma_next * noise() -- fresh noise
    drawn after the model, on every step but the last (sigma_next = 0), as `LCMScheduler.step` draws it.
    timesteps: the timestep of each of sigmas[:-1] for the boundary scalings; None means LCM's own grid for
    len(sigmas) - 1 steps (`lcm_timesteps`, what `lcm_sigmas` lays out).
    """
    n = len(sigmas) - 1
    ts = lcm_timesteps(n) if timesteps is None else [float(t) for t in timesteps]
    if len(ts) != n:
        raise ValueError(f"{len(ts)} timesteps for {n} steps")
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, sigma)
        c_skip, c_out = boundary_scalings(ts[i])
        denoised = c_out * x0 + c_skip * (x / (sigma**2 + 1) ** 0.5)
        if callback is not None:
            callback(i, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * noise()
    return x


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """The guidance-scale embedding an LCM-distilled U-Net takes as `timestep_cond` (VDM's sinusoidal
    embedding of 1000 w; diffusers' `LatentConsistencyModelPipeline.get_guidance_scale_embedding`):
    [sin | cos] of 1000 w times 10000^(-j / (dim/2 - 1)), zero-padded to an odd dim. w: [B] -> [B, dim] fp32."""
    if w.ndim != 1:
        raise ValueError(f"w must be one value per image ([B]), got shape {list(w.shape)}")
    half = dim // 2
    # op for op as diffusers (a float32 log, not math.log): the embedding's last bits decide parity
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def embedded_guidance(cfg_scale: float, batch: int, dim: int) -> dict[str, Tensor]:
    """The U-Net keyword argument that carries guidance into an LCM-distilled U-Net, as diffusers' LCM and
    SD pipelines make it for a `time_cond_proj_dim` U-Net: w = cfg_scale - 1, embedded, one row per image
    (and no unconditional pass: such a U-Net is never run under CFG)."""
    return {"timestep_cond": guidance_embedding(torch.full((batch,), float(cfg_scale) - 1.0), dim)}
