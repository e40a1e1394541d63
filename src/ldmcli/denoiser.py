"""The denoiser contract ``x0 = D(x, sigma)`` and classifier-free guidance as a wrapper around it.

Follows k-diffusion's ``external.py`` (``DiscreteEpsDDPMDenoiser`` / ``CompVisVDenoiser``) and
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models", table 1
preconditioning). The network's parameterisation (eps or v) is handled here and only here:
samplers see nothing but x0 predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

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


Conditioning = Tensor | Mapping[str, Tensor]
"""The text context [B, T, D] (passed as ``context=``) or a mapping of conditioning keyword arguments
(e.g. SDXL's ``context`` and ``y``), each batched on dim 0."""


class ConditioningSchedule:
    """Conditioning that changes during sampling (A1111's prompt editing and alternation).

    entries: [(end_at_step, conditioning), ...] sorted by step. Call k of the denoiser (0-based) uses
    the first entry whose end_at_step is at least k, the last one after that. The count is of calls,
    not of sampler steps, as A1111's CFGDenoiser counts (`self.step += 1` per call): with a sampler
    that evaluates the model twice a step (Heun, DPM2) the switch comes at half the step number.
    """

    def __init__(self, entries: Sequence[tuple[int, Conditioning]]) -> None:
        if not entries:
            raise ValueError("a conditioning schedule needs at least one entry")
        self.entries = [(end, _as_kwargs(c)) for end, c in sorted(entries, key=lambda e: e[0])]

    def at(self, call: int) -> dict[str, Tensor]:
        return next((c for end, c in self.entries if call <= end), self.entries[-1][1])

    def keys(self) -> set[str]:
        return set(self.entries[0][1])


def _as_kwargs(c: Conditioning) -> dict[str, Tensor]:
    return {"context": c} if isinstance(c, Tensor) else dict(c)


def _as_schedule(c: Conditioning | ConditioningSchedule) -> ConditioningSchedule:
    return c if isinstance(c, ConditioningSchedule) else ConditioningSchedule([(0, c)])


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around an x0-denoiser.

    ``D_cfg(x, sigma) = D_u + scale * (D_c - D_u)``. As the denoiser is affine in the network
    output at fixed (x, sigma), this equals guiding eps (or v) as diffusers does. The unconditional
    and conditional halves go through the network as ONE batch ``[uncond, cond]``; without an uncond
    (the caller's decision: `ImageRequest.guided`) only the conditional pass runs.

    cond / uncond: a `Conditioning`, or a `ConditioningSchedule` when it changes during sampling (the
    calls are counted here). They must have the same keys; when their shapes differ (texts of different
    lengths, unpadded) the two go through the network one after the other instead of as one batch.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        cond: Conditioning | ConditioningSchedule,
        uncond: Conditioning | ConditioningSchedule | None,
        scale: float,
    ) -> None:
        self.denoiser = denoiser
        self.cond = _as_schedule(cond)
        self.uncond = None if uncond is None else _as_schedule(uncond)
        if self.uncond is not None and self.uncond.keys() != self.cond.keys():
            raise ValueError(f"cond keys {sorted(self.cond.keys())} != uncond keys {sorted(self.uncond.keys())}")
        self.scale = float(scale)
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor | float, *, t: Tensor | None = None) -> Tensor:
        call, self.calls = self.calls, self.calls + 1
        cond = self.cond.at(call)
        if self.uncond is None:
            return self.denoiser(x, sigma, t=t, **cond)
        uncond = self.uncond.at(call)
        if any(uncond[k].shape != cond[k].shape for k in cond):
            # Texts of different lengths, unpadded (A1111's default): two passes, as A1111 runs them.
            uncond_x0 = self.denoiser(x, sigma, t=t, **uncond)
            cond_x0 = self.denoiser(x, sigma, t=t, **cond)
        else:
            two = lambda v: v if v is None or torch.as_tensor(v).ndim == 0 else torch.cat([v, v])  # noqa: E731
            cond_in = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            uncond_x0, cond_x0 = self.denoiser(torch.cat([x, x]), two(sigma), t=two(t), **cond_in).chunk(2)
        return uncond_x0 + self.scale * (cond_x0 - uncond_x0)


class InpaintingNetwork:
    """A 9-channel inpainting U-Net (SD 1.5/2 inpainting) seen as an ordinary `Network`.

    Its input is ``cat([x_in, mask, masked_image_latents])`` on the channel axis (diffusers'
    `StableDiffusionInpaintPipeline`: `scale_model_input` scales the latents only, then the two
    conditioning planes are appended). `Denoiser` keeps doing the eps/v math on the 4 latent channels;
    this wrapper only widens the input. The planes are the batch's own, repeated when the denoiser runs
    the guidance halves as one batch (``[uncond, cond]``, as diffusers' ``torch.cat([mask] * 2)``).

    mask: [N, 1, h, w] at latent size, 1 = repaint; masked_image_latents: [N, 4, h, w], the VAE latents
    (scaled) of the image with the repainted part set to 0 (mid-grey).
    """

    def __init__(self, model: Network, mask: Tensor, masked_image_latents: Tensor) -> None:
        if mask.shape[0] != masked_image_latents.shape[0] or mask.shape[-2:] != masked_image_latents.shape[-2:]:
            raise ValueError(f"mask {list(mask.shape)} and masked image latents {list(masked_image_latents.shape)} differ")
        self.model = model
        self.planes = torch.cat([mask, masked_image_latents], dim=1)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        repeats, rest = divmod(x.shape[0], self.planes.shape[0])
        if rest or x.shape[-2:] != self.planes.shape[-2:]:
            raise ValueError(f"latents {list(x.shape)} do not fit the inpainting planes {list(self.planes.shape)}")
        planes = self.planes.to(x).repeat(repeats, 1, 1, 1)
        return self.model(torch.cat([x, planes], dim=1), t, **cond)
