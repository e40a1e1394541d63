"""Noise schedules: betas -> alphas_cumprod -> sigmas, and the sampling-time spacings.

We work in k-diffusion's "sigma space" (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): a latent at noise level sigma is ``x = x0 + sigma * eps``,
which is the DDPM/VP latent divided by ``sqrt(alphas_cumprod)``, with
``sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)``.

Numerics deliberately follow diffusers' schedulers (float32 betas and cumprod, ``np.interp`` for
timestep -> sigma, log-sigma interpolation for sigma -> timestep) so that our samplers reproduce
``StableDiffusionPipeline`` to float32 round-off. The different diffusers scheduler families
disagree on how they space timesteps and scale the initial noise; :func:`make_sigmas` reproduces
each family (``convention``) so the caller never has to know.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

SPACINGS = ("leading", "linspace", "trailing", "karras", "exponential")
"""Sampling-time spacings: diffusers' three ``timestep_spacing`` values plus two sigma-space ones."""

Convention = Literal["discrete", "ddim", "dpm", "lcm"]
"""Which diffusers scheduler family's conventions to reproduce (see :func:`make_sigmas`)."""

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DiffusionSchedule:
    """The training noise schedule plus diffusers' inference spacing conventions.

    Defaults are Stable Diffusion 1.5's ``scheduler/scheduler_config.json``.
    """

    num_train_timesteps: int = 1000  # T: the model was trained on timesteps 0..T-1
    beta_start: float = 0.00085  # beta_0 (LDM's linear_start)
    beta_end: float = 0.012  # beta_{T-1} (LDM's linear_end)
    beta_schedule: str = "scaled_linear"  # LDM: linear in sqrt(beta), then squared
    prediction_type: str = "epsilon"  # what the network predicts: "epsilon" or "v_prediction" (SD2-768)
    timestep_spacing: str = "leading"  # default spacing when the caller does not choose one
    steps_offset: int = 1  # added to "leading" timesteps (SD: 1 -> last step at t=1, not t=0)
    set_alpha_to_one: bool = False  # DDIM/PNDM end at alphas_cumprod[0] (False) or at a clean image (True)

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in ("leading", "linspace", "trailing"):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any]) -> "DiffusionSchedule":
        """Read a diffusers ``scheduler_config.json`` dict; unrelated keys are ignored.

        Options that change the training schedule itself and that we do not implement are refused
        rather than silently dropped.
        """
        if cfg.get("trained_betas") is not None:
            raise ValueError("scheduler config with explicit trained_betas is not supported")
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config with rescale_betas_zero_snr=True is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def betas(self) -> Tensor:
        """[T] float32 betas, built exactly as diffusers builds them (same dtype, same ops)."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        # squaredcos_cap_v2: Nichol & Dhariwal 2021 cosine schedule, beta capped at 0.999.
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)

    def alphas_cumprod(self) -> Tensor:
        """[T] float32 cumulative product of (1 - beta). Kept in float32 like diffusers: a float64
        cumprod differs by ~1e-6 relative, which would show up in parity tests."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def training_sigmas(self) -> Tensor:
        """[T] float32 sigma_t = sqrt((1 - a_t) / a_t), increasing with t."""
        a = self.alphas_cumprod()
        return ((1 - a) / a) ** 0.5

    def sigma_min(self) -> float:
        return self.training_sigmas()[0].item()

    def sigma_max(self) -> float:
        return self.training_sigmas()[-1].item()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Timestep -> sigma by linear interpolation in sigma (diffusers' ``np.interp``); float64."""
        sig = self.training_sigmas().double()
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        return sig[lo] + (sig[hi] - sig[lo]) * (t - lo)  # exactly sig[t] at integer t

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Sigma -> fractional timestep by linear interpolation in log sigma (k-diffusion's and
        diffusers' ``_sigma_to_t``); float64, clipped to [0, T-1]."""
        # diffusers takes np.log of the float32 sigma array, so the table is float32.
        log_sigmas = self.training_sigmas().log().double()
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        # low = last index whose log sigma <= log_sigma (that is what diffusers' cumsum/argmax finds)
        low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True).reshape(log_sigma.shape) - 1
        low = low.clamp(0, self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)


# --- spacings -------------------------------------------------------------------------------------


def _np_linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace, op for op (torch.linspace rounds differently in the last bit)."""
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    return [i * step + start for i in range(num - 1)] + [float(stop)]


def _np_arange(start: float, stop: float, step: float) -> list[float]:
    """numpy.arange with a float step: length ceil((stop - start) / step), values start + i*step."""
    return [start + i * step for i in range(max(0, math.ceil((stop - start) / step)))]


def leading(schedule: DiffusionSchedule, steps: int) -> list[float]:
    """"leading" spacing (DDIM, Song et al. 2020; CompVis ``ddim_uniform``): every T//steps-th
    timestep from 0, shifted by ``steps_offset``; descending."""
    ratio = schedule.num_train_timesteps // steps
    return [float(round(i * ratio) + schedule.steps_offset) for i in reversed(range(steps))]


def linspace(schedule: DiffusionSchedule, steps: int) -> list[float]:
    """"linspace" spacing: ``steps`` evenly spaced (fractional) timesteps from T-1 down to 0."""
    return _np_linspace(0, schedule.num_train_timesteps - 1, steps)[::-1]


def trailing(schedule: DiffusionSchedule, steps: int) -> list[float]:
    """"trailing" spacing (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", table 2): every T/steps-th timestep counted down from T-1."""
    T = schedule.num_train_timesteps
    return [float(round(t)) - 1 for t in _np_arange(T, 0, -T / steps)]


_TIMESTEP_SPACINGS = {"leading": leading, "linspace": linspace, "trailing": trailing}


def karras(schedule: DiffusionSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (eq. 5) noise levels, rho=7, from the training sigma_max to sigma_min
    (diffusers' ``use_karras_sigmas``); float64, descending, without the final 0."""
    ramp = torch.tensor(_np_linspace(0, 1, steps), dtype=torch.float64)
    lo, hi = schedule.sigma_min() ** (1 / rho), schedule.sigma_max() ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(schedule: DiffusionSchedule, steps: int) -> Tensor:
    """Noise levels evenly spaced in log sigma from the training sigma_max to sigma_min
    (diffusers' ``use_exponential_sigmas``); float64, descending, without the final 0."""
    ramp = _np_linspace(math.log(schedule.sigma_max()), math.log(schedule.sigma_min()), steps)
    return torch.tensor(ramp, dtype=torch.float64).exp()


# --- the sampling plan ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class Sigmas:
    """What a sampler walks through: noise levels and the timesteps diffusers pairs with them.

    Carrying the timesteps matters because diffusers feeds the network the timestep it spaced,
    while inverting sigma -> t by log interpolation gives a different value for fractional
    ("linspace") and interpolated timesteps (up to ~0.05 of a step near t=0, visible at the
    highest timestep-embedding frequencies).
    """

    sigmas: Tensor  # [n+1] float32, decreasing; ends in 0, or in sigma(alphas_cumprod[0]) for DDIM/PNDM
    timesteps: Tensor  # [n] float32: the network timestep for sigmas[i], as diffusers passes it
    init_noise_sigma: float  # x_start = unit noise * this (k-space), as diffusers scales its latents

    def timestep_for(self, sigma: Tensor) -> Tensor | None:
        """The exact timestep of a noise level of this plan, or None if it is not one of them."""
        hit = (self.sigmas[: len(self.timesteps)] == sigma.reshape(-1)[0].to(self.sigmas)).nonzero()
        return self.timesteps[hit[0, 0]] if len(hit) else None

    def to_vp(self, x: Tensor) -> Tensor:
        """k-space latent at the final sigma -> diffusers' (VP) latent, i.e. what the VAE decodes."""
        s = self.sigmas[-1].item()
        return x if s == 0 else x / (1 + s**2) ** 0.5


def make_sigmas(
    schedule: DiffusionSchedule,
    spacing: str | None,
    steps: int,
    *,
    convention: Convention = "discrete",
) -> Sigmas:
    """Noise levels for ``steps`` sampling steps, reproducing a diffusers scheduler family.

    spacing: one of SPACINGS; None means ``schedule.timestep_spacing``.
    convention:
      "discrete" -- EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete / LMSDiscrete: float
                    timesteps, sigma = np.interp(t), ends at 0; initial noise sigma_max, or
                    sqrt(sigma_max^2 + 1) for "leading".
      "ddim"     -- DDIM / PNDM: integer timesteps (rounded "linspace"); the walk ends at
                    alphas_cumprod[0] unless set_alpha_to_one; initial noise is unit VP noise,
                    i.e. sqrt(sigma_max^2 + 1) in k-space.
      "dpm"      -- DPMSolverMultistep: "leading"/"linspace" lay out steps+1 integer timesteps
                    and drop the last; ends at 0; unit VP initial noise.
    "karras" and "exponential" always span the full training range and end at 0 (k-diffusion);
    their timesteps come from log-sigma interpolation (rounded by "dpm", truncated by "dpm" for
    exponential since diffusers casts to int64 there).
      "lcm"      -- LCMScheduler: its own skipping grid, no spacing (`lcm.lcm_sigmas`).
    """
    if convention == "lcm":
        from .lcm import lcm_sigmas

        return lcm_sigmas(schedule, spacing, steps)
    spacing = spacing or schedule.timestep_spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if convention not in ("discrete", "ddim", "dpm"):
        raise ValueError(f"unknown convention {convention!r}")
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{schedule.num_train_timesteps}, got {steps}")

    final = 0.0
    if spacing in ("karras", "exponential"):
        sig = (karras if spacing == "karras" else exponential)(schedule, steps)
        ts = schedule.sigma_to_t(sig)
        if convention == "dpm":
            ts = ts.round() if spacing == "karras" else ts.trunc()
    else:
        space = _TIMESTEP_SPACINGS[spacing]
        if convention == "dpm" and spacing != "trailing":
            ts = [round(t) for t in space(schedule, steps + 1)[:-1]]
        elif convention == "ddim":
            ts = [round(t) for t in space(schedule, steps)]
        else:
            ts = space(schedule, steps)
        # diffusers stores timesteps as float32 before interpolating sigmas at them
        ts = torch.tensor(ts, dtype=torch.float32).double()
        sig = schedule.t_to_sigma(ts)
        if convention == "ddim" and not schedule.set_alpha_to_one:
            final = schedule.sigma_min()  # sigma at alphas_cumprod[0]
    sigmas = torch.cat([sig, sig.new_tensor([final])]).float()

    s_max = sigmas[0]
    vp_unit_noise = convention != "discrete" or spacing == "leading"
    init = ((s_max**2 + 1) ** 0.5 if vp_unit_noise else s_max).item()
    return Sigmas(sigmas=sigmas, timesteps=ts.float(), init_noise_sigma=init)
