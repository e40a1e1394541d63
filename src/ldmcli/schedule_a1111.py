"""A1111's discretization: the noise levels, initial noise and network timesteps A1111 samples with.

diffusers and A1111 walk the same training schedule in different ways (`schedule.py` holds diffusers'):

- A1111's k-diffusion samplers (Euler, Euler a, Heun, LMS, DPM++ ...) use k-diffusion's
  ``DiscreteSchedule`` (Crowson, k-diffusion ``external.py``): sigma_t from the LDM model's
  ``alphas_cumprod`` (float64 arithmetic stored as float32), the uniform grid ``t = linspace(T-1, 0, n)``
  turned into sigmas by interpolating *log* sigma, Karras (rho 7) and exponential grids computed in
  float32 between the model's sigma_min and sigma_max, a final 0 appended; the initial noise is unit
  noise times ``sigmas[0]`` (not ``sqrt(sigma_max^2 + 1)``), and the network sees the fractional
  timestep ``sigma_to_t(sigma)``, the inverse log interpolation.
- A1111's DDIM and PLMS (its ``sd_samplers_timesteps.py``) walk the CompVis grid
  ``range(0, T, T // steps) + 1`` from its top down to its lowest timestep, t = 1: one step fewer
  than the grid has timesteps, ending at alphas_cumprod[1] rather than at a clean image; the initial
  noise is unit noise in the VP latent.

Everything here is float32 as k-diffusion computes it on the device, so that the sigmas, and the
timesteps the network sees, are the ones A1111 used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedule import DiffusionSchedule, Sigmas, leading, trailing


def ldm_alphas_cumprod(schedule: DiffusionSchedule) -> Tensor:
    """[T] float32 alphas_cumprod as the original LDM/SGM code (and so A1111) holds it: betas and their
    cumulative product in float64 (``make_beta_schedule``, ``np.cumprod``), stored as float32. LDM's
    "linear" schedule is diffusers' "scaled_linear" and its "sqrt_linear" diffusers' "linear"."""
    T = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, T, dtype=torch.float64) ** 2
    elif schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, T, dtype=torch.float64)
    else:  # squaredcos_cap_v2: no LDM checkpoint uses it; diffusers' betas, cumulated in float64
        betas = schedule.betas().double()
    return torch.cumprod(1 - betas, dim=0).float()


class KDiffusionSchedule:
    """k-diffusion's ``DiscreteSchedule`` without quantization (A1111's default): sigma <-> t, float32."""

    def __init__(self, schedule: DiffusionSchedule) -> None:
        a = ldm_alphas_cumprod(schedule)
        self.sigmas = ((1 - a) / a) ** 0.5  # [T] increasing
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Fractional timesteps -> sigmas, interpolating log sigma between the neighbouring integers."""
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Sigmas -> fractional timesteps: the inverse of `t_to_sigma` (clamped to [0, T-1])."""
        log_sigma = sigma.float().log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5, as k-diffusion's ``get_sigmas_karras`` computes it (float32 ramp)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma, as k-diffusion's ``get_sigmas_exponential`` (float32)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()


def a1111_sigmas(schedule: DiffusionSchedule, spacing: str | None, steps: int, *, timestep_sampler: bool) -> Sigmas:
    """The noise levels, network timesteps and initial-noise scale A1111 samples ``steps`` steps with.

    spacing: None (A1111's "Uniform"), "linspace" (the same grid), "karras", "exponential"; "leading" and
        "trailing" lay diffusers' timestep grids out and turn them into sigmas the k-diffusion way.
    timestep_sampler: DDIM/PLMS, which A1111 runs on its CompVis grid; they take no spacing.
    """
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T}, got {steps}")
    kd = KDiffusionSchedule(schedule)
    if timestep_sampler:
        if spacing is not None:
            raise ValueError("A1111's DDIM and PLMS walk their own timestep grid: they take no schedule")
        # sd_samplers_timesteps.get_timesteps: every T // steps-th timestep from 0, plus 1, at most T - 1
        grid = (torch.arange(0, T, T // steps) + 1).clamp(0, T - 1).flip(0)
        sigmas = kd.sigmas[grid]
        # Every grid timestep, the last too: PLMS's first step evaluates the network there when the walk is
        # one step long (A1111 always runs that corrector).
        return Sigmas(sigmas=sigmas, timesteps=grid.float(),
                      init_noise_sigma=((sigmas[0] ** 2 + 1) ** 0.5).item())  # unit noise in the VP latent
    if spacing in (None, "linspace"):
        sigmas = kd.t_to_sigma(torch.linspace(T - 1, 0, steps))  # k-diffusion's get_sigmas
    elif spacing == "karras":
        sigmas = karras(steps, kd.sigma_min, kd.sigma_max)
    elif spacing == "exponential":
        sigmas = exponential(steps, kd.sigma_min, kd.sigma_max)
    elif spacing in ("leading", "trailing"):
        grid = (leading if spacing == "leading" else trailing)(schedule, steps)
        sigmas = kd.t_to_sigma(torch.tensor(grid, dtype=torch.float32))
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    timesteps = kd.sigma_to_t(sigmas)
    return Sigmas(sigmas=torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps=timesteps,
                  init_noise_sigma=sigmas[0].item())
