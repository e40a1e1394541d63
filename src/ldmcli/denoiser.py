"""The denoiser contract ``x0 = D(x, sigma)`` and classifier-free guidance as a wrapper around it.

Follows k-diffusion's ``external.py`` (``DiscreteEpsDDPMDenoiser`` / ``CompVisVDenoiser``) and
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", table 1
preconditioning). The network's parameterisation (eps or v) is handled here and only here:
samplers see nothing but x0 predictions.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .schedule import DiffusionSchedule

Network = Callable[..., Tensor]
"""``model(x_in: [B,C,H,W], t: [B] float32, **cond) -> eps or v``, e.g. our U-Net (``context=``)."""


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    """Scalar or [B] -> [B, 1, 1, ...] broadcastable against x."""
    v = torch.as_tensor(v, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


class Denoiser:
    """Turns an eps- or v-predicting network into an x0-denoiser ``D(x, sigma)`` in sigma space.

    With ``s = sigma``, the network sees ``x * c_in`` (the DDPM latent) at timestep t(sigma):
      eps:  x0 = x - s * eps,                    c_in = 1 / sqrt(s^2 + 1)
      v:    x0 = x * c_skip + v * c_out,          c_skip = 1 / (s^2 + 1),  c_out = -s / sqrt(s^2 + 1)
    (v-prediction, Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0_vp; same as k-diffusion's
    ``CompVisVDenoiser`` and diffusers' ``v_prediction`` branch).
    """

    def __init__(self, model: Network, schedule: DiffusionSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fallback timestep for a sigma no sampling plan named (k-diffusion log interpolation)."""
        return self.schedule.sigma_to_t(sigma).float()

    def __call__(self, x: Tensor, sigma: Tensor | float, *, t: Tensor | None = None, **cond: Any) -> Tensor:
        """x: [B, C, H, W] in sigma space; sigma: scalar or [B]; t: the network timestep for sigma
        (scalar or [B]) if the caller knows diffusers' exact value, else derived from sigma."""
        sigma = torch.as_tensor(sigma)
        if t is None:
            t = self.sigma_to_t(sigma.cpu())
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = _per_sample(sigma, x).to(x.dtype)
        # divide rather than multiply by 1/sqrt: op-for-op what diffusers' scale_model_input does
        out = self.model(x / (s**2 + 1) ** 0.5, t, **cond).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        return out * (-s / (s**2 + 1) ** 0.5) + x / (s**2 + 1)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around an x0-denoiser.

    ``D_cfg(x, sigma) = D_u + scale * (D_c - D_u)``. As the denoiser is affine in the network
    output at fixed (x, sigma), this equals guiding eps (or v) as diffusers does. The unconditional
    and conditional halves go through the network as ONE batch ``[uncond, cond]``; without an uncond
    (the caller's decision: `ImageRequest.guided`) only the conditional pass runs.

    cond / uncond: the text context [B, T, D] (passed as ``context=``) or a mapping of conditioning
    keyword arguments (e.g. SDXL's ``context``, pooled embedding, size ids), each batched on dim 0.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        cond: Tensor | Mapping[str, Tensor],
        uncond: Tensor | Mapping[str, Tensor] | None,
        scale: float,
    ) -> None:
        self.denoiser = denoiser
        self.cond = self._as_kwargs(cond)
        self.uncond = None if uncond is None else self._as_kwargs(uncond)
        if self.uncond is not None and self.uncond.keys() != self.cond.keys():
            raise ValueError(f"cond keys {sorted(self.cond)} != uncond keys {sorted(self.uncond)}")
        self.scale = float(scale)

    @staticmethod
    def _as_kwargs(c: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"context": c} if isinstance(c, Tensor) else dict(c)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, t: Tensor | None = None) -> Tensor:
        if self.uncond is None:
            return self.denoiser(x, sigma, t=t, **self.cond)
        two = lambda v: v if v is None or torch.as_tensor(v).ndim == 0 else torch.cat([v, v])  # noqa: E731
        cond_in = {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}
        uncond_x0, cond_x0 = self.denoiser(torch.cat([x, x]), two(sigma), t=two(t), **cond_in).chunk(2)
        return uncond_x0 + self.scale * (cond_x0 - uncond_x0)
