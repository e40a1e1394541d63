"""Samplers: small pure functions over a decreasing ``sigmas`` tensor (k-diffusion ``sampling.py``).

Every sampler has the signature::

    fn(model, x, sigmas, *, noise, callback=None) -> x

``model(x, sigma) -> x0`` is an x0-denoiser (see ``denoiser.py``; CFG already applied), ``x`` starts
at ``sigmas[0]`` in sigma space (``x = x0 + sigma * eps``), ``noise()`` returns a fresh standard
normal tensor shaped like ``x`` (only the stochastic samplers call it, once per step, after the
model, in the order diffusers draws it), and ``callback(i, denoised)`` is called once per step with
the current x0 prediction. Multistep history is a local variable, never hidden object state.

``after_step(i, x) -> x`` (optional, img2img's masked blending) is given the state each time it has
just reached ``sigmas[i + 1]``: after every step, and after the first half of a second-order step
(Heun's, PLMS's first), i.e. whenever a diffusers ``scheduler.step`` call would return it. What it
returns replaces the state, which is what diffusers' inpainting pipeline does to ``latents``.

:func:`sample` is the one entry point the pipeline needs: it builds the noise levels the
corresponding diffusers scheduler would use, draws and scales the initial latent the way that
scheduler does, runs the sampler, and returns the final latent in diffusers' (VP) space. It may also
run a part of the walk: from an image (`StartImage`, img2img), up to a switch (``end=``, diffusers'
``denoising_end``) or on from another model's latents at a switch (`StartLatents`, ``denoising_start``),
the SDXL base and refiner (`refiner.py`); `denoising_cut` says which steps each side runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .schedule import Convention, DiffusionSchedule, Sigmas, make_sigmas
from .request import MATCHES
from .schedule_a1111 import a1111_sigmas

Model = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]
Callback = Callable[[int, Tensor], None]
AfterStep = Callable[[int, Tensor], Tensor]


def _same(i: int, x: Tensor) -> Tensor:
    """The default `after_step`: the state as it is."""
    return x


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 1 with sigma(t) = t)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split a step to sigma_next into a deterministic step to sigma_down plus fresh noise of
    std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion get_ancestral_step)."""
    if eta == 0:
        return sigma_next, sigma_next.new_zeros(())
    up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


@torch.no_grad()
def euler(model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None,
          after_step: AfterStep = _same) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback(i, denoised)
        x = after_step(i, x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i]))
    return x


@torch.no_grad()
def euler_a(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None, eta: float = 1.0,
    after_step: AfterStep = _same,
) -> Tensor:
    """Ancestral Euler (k-diffusion sample_euler_ancestral): an Euler step down to sigma_down, then
    fresh noise back up to sigma_next. eta=1 is the DDPM posterior; eta=0 is plain Euler."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback(i, denoised)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + noise() * sigma_up
        x = after_step(i, x)
    return x


@torch.no_grad()
def heun(model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None,
         after_step: AfterStep = _same) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to 0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, denoised)
        d = _to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = after_step(i, x + d * (sigma_next - sigma))
            continue
        x_2 = after_step(i, x + d * (sigma_next - sigma))
        d_2 = _to_d(x_2, sigma_next, model(x_2, sigma_next))
        x = after_step(i, x + (d + d_2) / 2 * (sigma_next - sigma))
    return x


@torch.no_grad()
def ddim(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None, eta: float = 0.0,
    after_step: AfterStep = _same,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12). In sigma space the eta=0 update
    ``x0 + sigma_next * eps`` is exactly an Euler step; eta > 0 splits off noise of std
    ``eta * sqrt((s'^2 (s^2 - s'^2)) / s^2)`` -- the DDIM sigma_t -- i.e. an ancestral step."""
    return euler_a(model, x, sigmas, noise=noise, callback=callback, eta=eta, after_step=after_step)


@torch.no_grad()
def dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None,
             after_step: AfterStep = _same) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: 2nd-order multistep in lambda = -log(sigma), data prediction.
    First step and the final step to sigma=0 are 1st order (diffusers' lower_order_final)."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, denoised)
        if sigma_next == 0:
            x = after_step(i, denoised)
            continue
        h = sigma.log() - sigma_next.log()
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = after_step(i, (sigma_next / sigma) * x - torch.expm1(-h) * d)
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None,
                 after_step: AfterStep = _same) -> Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (eta=1, midpoint 2nd-order correction), as diffusers'
    ``sde-dpmsolver++``: the exact-in-lambda SDE step plus a multistep correction of the x0 term."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, denoised)
        if sigma_next == 0:
            x = after_step(i, denoised)
            continue
        h = sigma.log() - sigma_next.log()
        keep = -torch.expm1(-2 * h)  # 1 - e^{-2h}
        x = (sigma_next / sigma) * torch.exp(-h) * x + keep * denoised
        if old_denoised is not None:
            x = x + 0.5 * keep * (h / h_last) * (denoised - old_denoised)
        x = after_step(i, x + noise() * sigma_next * keep.sqrt())
        old_denoised, h_last = denoised, h
    return x


# Gauss-Legendre nodes/weights on [-1, 1], 3 points: exact for polynomials up to degree 5, and the
# order-4 Lagrange basis integrated by lms is cubic. Avoids a scipy dependency.
_GL_NODES = (-math.sqrt(3 / 5), 0.0, math.sqrt(3 / 5))
_GL_WEIGHTS = (5 / 9, 8 / 9, 5 / 9)


def _lms_coeff(order: int, s: list[float], i: int, j: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial of node s[i-j] among the
    nodes s[i], ..., s[i-order+1] (k-diffusion linear_multistep_coeff)."""

    def basis(tau: float) -> float:
        p = 1.0
        for k in range(order):
            if k != j:
                p *= (tau - s[i - k]) / (s[i - j] - s[i - k])
        return p

    a, b = s[i], s[i + 1]
    return (b - a) / 2 * sum(w * basis((b - a) / 2 * u + (a + b) / 2) for u, w in zip(_GL_NODES, _GL_WEIGHTS))


@torch.no_grad()
def lms(
    model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None, order: int = 4,
    after_step: AfterStep = _same,
) -> Tensor:
    """Linear multistep (Adams-Bashforth on the nonuniform sigma grid), order 4 (k-diffusion
    sample_lms / diffusers LMSDiscreteScheduler): coefficients integrate the Lagrange basis."""
    s = sigmas.double().tolist()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if callback is not None:
            callback(i, denoised)
        ds = (ds + [_to_d(x, sigmas[i], denoised)])[-order:]
        cur = min(i + 1, order)
        coeffs = [_lms_coeff(cur, s, i, j) for j in range(cur)]
        x = after_step(i, x + sum(c * d for c, d in zip(coeffs, reversed(ds))))
    return x


def _adams_bashforth(ds: list[Tensor]) -> Tensor:
    """Fixed-coefficient Adams-Bashforth combination of up to 4 derivatives (newest last),
    written as diffusers' PNDM writes it so the float32 rounding matches."""
    if len(ds) == 1:
        return ds[-1]
    if len(ds) == 2:
        return (3 * ds[-1] - ds[-2]) / 2
    if len(ds) == 3:
        return (23 * ds[-1] - 16 * ds[-2] + 5 * ds[-3]) / 12
    return (55 * ds[-1] - 59 * ds[-2] + 37 * ds[-3] - 9 * ds[-4]) / 24


@torch.no_grad()
def plms(model: Model, x: Tensor, sigmas: Tensor, *, noise: Noise, callback: Callback | None = None,
         corrector_on_one_step: bool = False, after_step: AfterStep = _same) -> Tensor:
    """Pseudo linear multistep, PNDM (Liu et al. 2022) with skip_prk_steps as SD configures it.

    PNDM's transfer function is the DDIM step, i.e. Euler in sigma space with d = eps. The first
    step is a pseudo improved-Euler (Heun) step whose corrector evaluation is NOT kept in the
    history; afterwards eps is extrapolated with Adams-Bashforth coefficients of order <= 4, which
    assume equal steps (as PNDM does on its uniform timestep grid). A walk of one step has no corrector
    in diffusers' PNDM; A1111's PLMS runs it anyway (`corrector_on_one_step`).
    """
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if callback is not None:
            callback(i, denoised)
        ds = (ds + [_to_d(x, sigma, denoised)])[-4:]
        if i == 0 and (len(sigmas) > 2 or corrector_on_one_step):
            x_2 = after_step(i, x + ds[0] * (sigma_next - sigma))
            d = (_to_d(x_2, sigma_next, model(x_2, sigma_next)) + ds[0]) / 2
        else:
            d = _adams_bashforth(ds)
        x = after_step(i, x + d * (sigma_next - sigma))
    return x


# --- registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler: our name, the A1111 display name, and the diffusers scheduler it reproduces."""

    name: str  # our name (CLI --sampler)
    display_name: str  # A1111 / PNG "Sampler:" name
    fn: Callable[..., Tensor]
    convention: Convention  # whose timestep spacing and initial-noise scaling sample() reproduces
    diffusers_class: str  # the equivalent diffusers scheduler (configured from the model's config)
    diffusers_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""
    # A1111 lays prompt-editing timelines over twice the steps for its second-order samplers (its
    # SamplerData.total_steps), since they call the model about twice a step and it counts calls.
    second_order: bool = False
    # The schedule A1111 1.9+ means by "Automatic" for this sampler (its sampler options' "scheduler");
    # None: its uniform grid, which ldm has not (the model's own spacing stands in).
    a1111_automatic: str | None = None
    # A1111 runs it as a CompVis timestep sampler on its own grid (DDIM, PLMS), not through k-diffusion.
    a1111_timestep_sampler: bool = False


@dataclass(frozen=True)
class ScheduleInfo:
    """A sigma spacing: our name, its A1111 suffix (None if A1111 has none) and diffusers kwargs."""

    name: str
    display_name: str | None  # "DPM++ 2M Karras" -> "Karras"
    diffusers_kwargs: Mapping[str, Any]
    description: str


def _info(name, display, fn, convention, cls, description, second_order=False, a1111_automatic=None,  # noqa: ANN001
          a1111_timestep_sampler=False, **kwargs) -> SamplerInfo:
    return SamplerInfo(name, display, fn, convention, cls, MappingProxyType(kwargs), description, second_order,
                       a1111_automatic, a1111_timestep_sampler)


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        _info("euler", "Euler", euler, "discrete", "EulerDiscreteScheduler", "Euler ODE solver, 1st order"),
        _info("euler_a", "Euler a", euler_a, "discrete", "EulerAncestralDiscreteScheduler",
              "ancestral Euler: fresh noise every step (stochastic, does not converge with steps)"),
        _info("heun", "Heun", heun, "discrete", "HeunDiscreteScheduler",
              "Heun's 2nd-order ODE solver, two network calls per step", second_order=True),
        _info("ddim", "DDIM", ddim, "ddim", "DDIMScheduler", "DDIM, Song et al. 2020 (eta=0: deterministic)",
              a1111_timestep_sampler=True),
        _info("dpmpp_2m", "DPM++ 2M", dpmpp_2m, "dpm", "DPMSolverMultistepScheduler",
              "DPM-Solver++(2M), Lu et al. 2022: 2nd-order multistep, one call per step",
              a1111_automatic="karras", algorithm_type="dpmsolver++", solver_order=2),
        _info("dpmpp_2m_sde", "DPM++ 2M SDE", dpmpp_2m_sde, "dpm", "DPMSolverMultistepScheduler",
              "DPM-Solver++(2M) SDE: stochastic 2nd-order multistep",
              a1111_automatic="exponential", algorithm_type="sde-dpmsolver++", solver_order=2),
        _info("lms", "LMS", lms, "discrete", "LMSDiscreteScheduler", "linear multistep, order 4"),
        _info("plms", "PLMS", plms, "ddim", "PNDMScheduler",
              "pseudo linear multistep (PNDM, Liu et al. 2022), SD's original default",
              a1111_timestep_sampler=True, skip_prk_steps=True),
    )
}

SCHEDULES: dict[str, ScheduleInfo] = {
    s.name: s
    for s in (
        ScheduleInfo("leading", None, MappingProxyType({"timestep_spacing": "leading"}),
                     "every T/n-th timestep from t=steps_offset up (SD's scheduler config default)"),
        ScheduleInfo("linspace", None, MappingProxyType({"timestep_spacing": "linspace"}),
                     "n timesteps evenly spaced from T-1 down to 0"),
        ScheduleInfo("trailing", None, MappingProxyType({"timestep_spacing": "trailing"}),
                     "every T/n-th timestep down from T-1 (Lin et al. 2023)"),
        # timestep_spacing="linspace" makes diffusers' *Discrete schedulers take sigma_min/max from the
        # full training range, as DPMSolverMultistep and k-diffusion do.
        ScheduleInfo("karras", "Karras",
                     MappingProxyType({"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
                     "Karras et al. 2022 rho=7 noise levels between the training sigma_max and sigma_min"),
        ScheduleInfo("exponential", "Exponential",
                     MappingProxyType({"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
                     "noise levels evenly spaced in log sigma between the training sigma_max and sigma_min"),
    )
}


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower().replace("-", "_"))


# A1111's other names for the samplers ldm has, which its `samplers_map` (modules/sd_samplers.py) takes
# in any case: the aliases of its samplers table (modules/sd_samplers_kdiffusion.py `samplers_k_diffusion`;
# DDIM's and PLMS's, "ddim" and "plms", are ldm's names), and those of the "... Karras" samplers it had
# before 1.9 split samplers from schedule types (k_lms_ka, k_dpmpp_2m_ka, k_dpmpp_2m_sde_ka). Its samplers
# ldm lacks (k_dpm_2, k_dpmpp_sde, k_dpm_fast, ...) stay unknown names.
A1111_ALIASES: dict[str, tuple[str, str | None]] = {
    "k_euler_a": ("euler_a", None),
    "k_euler_ancestral": ("euler_a", None),
    "k_euler": ("euler", None),
    "k_lms": ("lms", None),
    "k_heun": ("heun", None),
    "k_dpmpp_2m": ("dpmpp_2m", None),
    "k_dpmpp_2m_sde": ("dpmpp_2m_sde", None),
    "k_lms_ka": ("lms", "karras"),
    "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"),
    "k_dpmpp_2m_sde_ka": ("dpmpp_2m_sde", "karras"),
}

# LCM (lcm.py): LCMScheduler's multistep consistency sampling on its own timestep grid (convention "lcm");
# A1111's "LCM", alias k_lcm (modules/sd_samplers_lcm.py).
from .lcm import lcm as _lcm  # noqa: E402

SAMPLERS["lcm"] = _info("lcm", "LCM", _lcm, "lcm", "LCMScheduler",
                        "latent consistency (Luo et al. 2023): LCM-LoRA and LCM models, 4-8 steps at CFG 1-2")
A1111_ALIASES["k_lcm"] = ("lcm", None)


def _aliases() -> dict[str, tuple[str, str | None]]:
    table: dict[str, tuple[str, str | None]] = {"euler_ancestral": ("euler_a", None)}
    for s in SAMPLERS.values():
        table[_norm(s.name)] = table[_norm(s.display_name)] = (s.name, None)
        for sch in SCHEDULES.values():
            table[_norm(f"{s.name}_{sch.name}")] = (s.name, sch.name)
            if sch.display_name:
                table[_norm(f"{s.display_name} {sch.display_name}")] = (s.name, sch.name)
    table.update({_norm(alias): hit for alias, hit in A1111_ALIASES.items()})
    return table


_ALIASES = _aliases()


def resolve_sampler_name(name: str) -> tuple[str, str | None]:
    """Our sampler name or an A1111 name or alias, case-insensitively, optionally with a schedule suffix:
    "DPM++ 2M Karras" -> ("dpmpp_2m", "karras"), "Euler a" -> ("euler_a", None),
    "k_euler_a" -> ("euler_a", None), "dpmpp_2m_karras" -> ("dpmpp_2m", "karras"). Unknown names
    raise ValueError."""
    hit = _ALIASES.get(_norm(name))
    if hit is None:
        valid = ", ".join(f"{s.name} ({s.display_name!r})" for s in SAMPLERS.values())
        suffixes = ", ".join(repr(s.display_name) for s in SCHEDULES.values() if s.display_name)
        raise ValueError(
            f"unknown sampler {name!r}; valid: {valid}, or A1111's aliases of these (k_euler_a, k_dpmpp_2m, ...); "
            f"A1111 names may end in a schedule: {suffixes}"
        )
    return hit


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class StartImage:
    """Where sampling starts when an image comes in (img2img, inpainting), in diffusers' terms.

    latents: the image's clean latents x0 [N, C, h, w] (what the VAE encoder gave, times the scale
        factor: diffusers' ``init_latents`` / ``image_latents``). None only when the walk starts from pure
        noise and nothing is blended (a 9-channel inpainting U-Net at strength 1 never encodes the image).
    noise: [N, C, h, w] standard normal: what the image is noised with (diffusers' ``add_noise(init_latents,
        noise, t)``), and at full strength with `noise_at_full_strength` the start itself. The caller draws
        it, since diffusers draws it between two VAE posterior samples (`img2img`).
    strength: how much of the schedule to run (diffusers' ``get_timesteps``: the last
        ``min(int(steps * strength), steps)`` of the ``steps`` steps).
    mask: [N, 1, h, w] at latent size, 1 = repaint, 0 = keep (4-channel inpainting): after every step the
        kept part of the state is replaced by the image noised to the state's level with the same noise
        that started the walk (`StableDiffusionInpaintPipeline` with a 4-channel U-Net). None: img2img.
    noise_at_full_strength: strength 1 starts from pure noise, as diffusers' inpainting pipeline does
        (``is_strength_max``), rather than from the image noised to the first level (its img2img pipeline).
    """

    latents: Tensor | None
    noise: Tensor
    strength: float
    mask: Tensor | None = None
    noise_at_full_strength: bool = False


def first_step(steps: int, strength: float) -> int:
    """Index of the first of `steps` steps img2img runs at `strength` (diffusers' ``get_timesteps``:
    ``t_start = max(steps - min(int(steps * strength), steps), 0)``; the same index into a second-order
    scheduler's doubled timesteps, ``t_start * order``, lands on the same noise level)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = max(steps - min(int(steps * strength), steps), 0)
    if start == steps:
        raise ValueError(f"strength {strength} runs no step of {steps} (int({steps} * {strength}) = 0): "
                         "raise the strength or the steps")
    return start


def _noised_image(start: StartImage, sigmas: Tensor) -> Callable[[int], Tensor]:
    """``level(k)``: the image at ``sigmas[k]`` in sigma space: diffusers' ``scheduler.add_noise(x0, noise,
    t_k)`` for every scheduler family -- ``x0 + sigma * noise`` for the sigma-space ones (Euler, LMS, Heun),
    ``sqrt(a) x0 + sqrt(1 - a) noise`` in the VP latent for DDIM/PNDM/DPM/LCM, which divided by sqrt(a) is
    the same. At the walk's end the inpainting pipeline blends with the clean image, unnoised: in the VP
    latent, which is ``x0 * sqrt(1 + sigma^2)`` in sigma space when the walk ends above 0 (DDIM, PLMS)."""
    last, eps = len(sigmas) - 1, start.noise
    if start.latents is None:
        raise ValueError("no image latents to start from or to blend with")

    def level(k: int) -> Tensor:
        if k == last:
            s = sigmas[-1].item()
            return start.latents if s == 0 else start.latents * (1 + s**2) ** 0.5
        return start.latents + eps * sigmas[k]

    return level


def _masked_blend(start: StartImage, sigmas: Tensor) -> AfterStep:
    """The `after_step` of 4-channel inpainting: ``x = (1 - mask) * noised_image + mask * x`` with the image
    noised to the level x has just reached (diffusers' loop: ``add_noise(image_latents, noise, timesteps[i + 1])``,
    the clean image after the last step). It blends the state x, not the denoised x0 as A1111 does."""
    assert start.mask is not None
    level, mask = _noised_image(start, sigmas), start.mask.to(start.noise)
    return lambda i, x: (1 - mask) * level(i + 1) + mask * x


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class StartLatents:
    """Where a walk takes over from another model's (the SDXL refiner after the base), in diffusers' terms:
    `StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=switch)`.

    latents: [N, C, h, w] what the previous ``sample(..., end=switch)`` returned: diffusers' latents at the
        switch, as they are. No noise is added (the pipeline's ``add_noise=False`` when ``denoising_start`` is
        given) and nothing is drawn for them.
    switch: the fraction of the training timesteps the previous walk denoised (its ``denoising_end``, this
        walk's ``denoising_start``); `denoising_cut` says which steps that leaves to this walk.
    """

    latents: Tensor
    switch: float


def check_switch(switch: float) -> float:
    """`switch` if it is a fraction strictly between 0 and 1 (diffusers applies ``denoising_end`` /
    ``denoising_start`` only then: ``isinstance(v, float) and 0 < v < 1``); otherwise a one-line ValueError."""
    if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch < 1:
        raise ValueError(f"the refiner switch must be a fraction between 0 and 1 (exclusive), the part of the "
                         f"denoising the base model does, got {switch!r}")
    return float(switch)


def timestep_cutoff(switch: float, num_train_timesteps: int) -> int:
    """diffusers' ``discrete_timestep_cutoff = int(round(T - switch * T))``: the base runs the timesteps
    >= it, the refiner those below (Python's round, half to even, as diffusers calls it)."""
    return int(round(num_train_timesteps - check_switch(switch) * num_train_timesteps))


@dataclass(frozen=True)
class Cut:
    """How `denoising_cut` splits an n-step walk at a switch, in step indices (step i goes from sigmas[i] to
    sigmas[i + 1] at timesteps[i]).

    base_steps: the base runs steps 0 .. base_steps - 1 (``sample(..., end=switch)``).
    base_predictor_only: the base's last step is only the first (Euler) half of a second-order step.
    refiner_first: the refiner runs steps refiner_first .. n - 1, its state taken to be at sigmas[refiner_first].
    """

    base_steps: int
    base_predictor_only: bool
    refiner_first: int


def denoising_cut(timesteps: Tensor, switch: float, num_train_timesteps: int, *, second_order: bool = False) -> Cut:
    """Where diffusers' base stops (`StableDiffusionXLPipeline.__call__` with ``denoising_end``) and its refiner
    starts (`StableDiffusionXLImg2ImgPipeline.get_timesteps` with ``denoising_start``), on a walk's timesteps.

    First-order schedulers: with k = the number of timesteps >= `timestep_cutoff`, the base runs steps 0 .. k-1
    and stops at sigmas[k]; the refiner runs the rest, from sigmas[k].

    Second-order (diffusers' ``scheduler.order == 2``: Heun, whose timestep list is t0, t1, t1, t2, t2, ...):
    the base keeps the 2k - 1 list entries >= the cutoff, so it ends on the FIRST half of step k-1 (an Euler
    predictor to sigmas[k], its corrector never run). The refiner counts the 2(n - k) entries below the cutoff,
    an even number, and adds one "so as not to start between the two derivatives": its fresh scheduler starts
    at the predictor of step k-1 -- it walks step k-1 again, from sigmas[k-1], taking the base's latents (which
    are at sigmas[k]) to be at that level. ldm reproduces both sides as they are.
    """
    cutoff = timestep_cutoff(switch, num_train_timesteps)
    k = int((timesteps >= cutoff).sum())
    if not second_order or k == 0:
        return Cut(k, False, k)
    return Cut(k, True, k - 1)


def sample(
    sampler: str,
    schedule: DiffusionSchedule,
    steps: int,
    denoiser: Callable[..., Tensor],
    noise: Noise,
    *,
    spacing: str | None = None,
    match: str = "diffusers",
    callback: Callback | None = None,
    start: StartImage | StartLatents | None = None,
    end: float | None = None,
    **options: Any,
) -> Tensor:
    """Run a whole sampling loop as diffusers' StableDiffusionPipeline would with the equivalent
    scheduler (``SamplerInfo.diffusers_class.from_config(model_config, **kwargs)``).

    sampler: our name or an A1111 name (a schedule suffix like "Karras" selects the spacing).
    denoiser: ``denoiser(x, sigma, t=timestep) -> x0`` (a Denoiser or CFGDenoiser); ``t`` is the exact
        network timestep diffusers would use at that sigma, or None.
    noise: draws standard normal noise of the latent shape (first the initial latent, then
        per-step noise for stochastic samplers, as diffusers draws them from ``generator=``).
    spacing: one of schedule.SPACINGS; None means the schedule's own ``timestep_spacing`` (with
        match "a1111": A1111's uniform grid).
    match: "diffusers" (the above) or "a1111": the noise levels, initial noise and network timesteps
        A1111 uses (`schedule_a1111.a1111_sigmas`), the samplers' steps being the same.
    callback: ``callback(i, denoised)`` once per step run, i counted from 0 at the first step this call runs.
    start: an image to start from (img2img / inpainting, `StartImage`): the walk is the last
        ``int(steps * strength)`` steps of the ``steps``-step schedule, from the image noised to the first
        of them with ``start.noise``; ``noise`` then gives only the stochastic samplers' draws. Or another
        model's latents at a switch (`StartLatents`, the SDXL refiner: diffusers' ``denoising_start``): the
        steps `denoising_cut` leaves after it, from the latents as they are, with a fresh sampler (no
        multistep history: diffusers' refiner pipeline has its own new scheduler). match "diffusers" only.
    end: stop at this switch (diffusers' ``denoising_end``, the SDXL base before its refiner): run the steps
        `denoising_cut` gives the base and return diffusers' latents there -- what the pipeline returns with
        ``output_type="latent"``: sigma-space for the Euler/Heun/LMS family, the VP latent for DDIM, PNDM, DPM
        and LCM -- for a `StartLatents` of the same switch. match "diffusers" only; not with a `StartImage`.
    options: extra sampler arguments (e.g. ``eta`` for ddim).
    Returns the final latent in diffusers' (VP) space: divide by the VAE scale factor and decode.

    Where we deliberately differ from diffusers (tests pin both sides):
    - ddim/plms on a non-uniform grid ("linspace", or "trailing" when steps does not divide T):
      diffusers steps to ``t - T // steps`` and then evaluates at the next listed timestep; we step
      to the next listed timestep, as DDIM/PNDM are defined.
    - karras/exponential with euler_a, ddim, plms: diffusers has no such option; we run the same
      sampler on those sigmas (initial noise scaled as the sampler's diffusers scheduler would).
    - karras/exponential with steps=1: diffusers collapses sigma_max onto sigma_min; we do not.
    - plms from an image at strength < 1, or from a switch (`StartLatents`): PNDM's timestep list repeats its
      second timestep (the first step's corrector) and diffusers' img2img cuts that list as if it had one
      entry per step: its walk starts a timestep higher than the step it counts, and after the corrector
      evaluates the latent one timestep below its noise level, skipping an interval (from a switch, its last
      call is taken for a corrector and the final step is never walked). We walk PNDM from the start step as
      it is defined (pseudo-Heun first step, then Adams-Bashforth), which is diffusers' walk at strength 1.
    - lms from an image at strength < 1, or from a switch: diffusers' LMS takes its order from the step's
      index in the whole schedule, so a cut walk's first steps use 4th-order coefficients with fewer
      derivatives; we start at order 1, as k-diffusion's sample_lms on the cut sigmas.
    """
    name, implied = resolve_sampler_name(sampler)
    if implied is not None and spacing is not None and spacing != implied:
        raise ValueError(f"sampler {sampler!r} implies spacing {implied!r}, but spacing={spacing!r}")
    info = SAMPLERS[name]
    if end is not None:
        check_switch(end)
        if start is not None and not isinstance(start, StartLatents):
            raise ValueError("stopping at a switch (end=) is not supported from an image (StartImage)")
        if isinstance(start, StartLatents) and end <= start.switch:
            raise ValueError(f"end={end} must come after the start's switch {start.switch}")  # diffusers refuses it too
    if match == "a1111":
        if start is not None or end is not None:
            raise ValueError("--match a1111 does not reproduce A1111's img2img or refiner yet (its step count, its "
                             "noise order, its inpainting that blends the denoised image, its one-loop refiner "
                             "switch); use --match diffusers")
        plan = a1111_sigmas(schedule, spacing or implied, steps, timestep_sampler=info.a1111_timestep_sampler)
        if name == "plms":
            options = {**options, "corrector_on_one_step": True}
    elif match == "diffusers":
        plan = make_sigmas(schedule, spacing or implied, steps, convention=info.convention)
    else:
        raise ValueError(f"unknown match {match!r}; expected one of {MATCHES}")

    def model(x: Tensor, sigma: Tensor) -> Tensor:
        return denoiser(x, sigma, t=plan.timestep_for(sigma))

    def walk(x: Tensor, first: int, stop: int, after_step: AfterStep = _same) -> Tensor:
        """Steps first .. stop-1 of the plan, one sampler run with a fresh history."""
        sigmas = plan.sigmas[first : stop + 1]
        if name == "lcm":
            return _lcm_steps(model, x, sigmas, plan.timesteps[first:stop], noise, callback, after_step, **options)
        return info.fn(model, x, sigmas, noise=noise, callback=callback, after_step=after_step, **options)

    n = len(plan.timesteps)
    if isinstance(start, StartLatents):
        first = _cut(plan, start.switch, info, schedule).refiner_first
        x = _from_diffusers_latents(start.latents, plan.sigmas[first], info.convention)
    elif start is None:
        first, x = 0, noise() * plan.init_noise_sigma
    else:
        first = first_step(steps, start.strength)
        sigmas = plan.sigmas[first:]
        if start.noise_at_full_strength and first == 0:
            x = start.noise * plan.init_noise_sigma
        else:
            x = _noised_image(start, sigmas)(0)
        after_step = _same if start.mask is None else _masked_blend(start, sigmas)
        return plan.to_vp(walk(x, first, n, after_step))

    if end is None:
        return plan.to_vp(walk(x, first, n))
    cut = _cut(plan, end, info, schedule)
    stop = max(cut.base_steps, first)
    if cut.base_predictor_only and stop > first:
        # diffusers' base stops after the first half of its last Heun step: an Euler step to sigmas[stop]
        x = walk(x, first, stop - 1)
        last = stop - 1 - first  # that step's index among this call's
        step_callback = None if callback is None else (lambda _, denoised: callback(last, denoised))
        x = euler(model, x, plan.sigmas[stop - 1 : stop + 1], noise=noise, callback=step_callback)
    else:
        x = walk(x, first, stop)
    return _to_diffusers_latents(x, plan.sigmas[stop], info.convention)


def _cut(plan: Sigmas, switch: float, info: SamplerInfo, schedule: DiffusionSchedule) -> Cut:
    # SamplerInfo.second_order marks the samplers whose diffusers scheduler has order 2 (Heun)
    return denoising_cut(plan.timesteps, switch, schedule.num_train_timesteps, second_order=info.second_order)


def _to_diffusers_latents(x: Tensor, sigma: Tensor, convention: Convention) -> Tensor:
    """A sigma-space state at `sigma` as diffusers' scheduler holds it: as it is for the sigma-space family
    (Euler, Euler a, Heun, LMS: ``init_noise_sigma`` scales the start, ``scale_model_input`` the network's
    input), the VP latent ``x / sqrt(1 + sigma^2)`` for DDIM, PNDM, DPM-Solver and LCM."""
    return x if convention == "discrete" else x / (1 + sigma.item() ** 2) ** 0.5


def _from_diffusers_latents(latents: Tensor, sigma: Tensor, convention: Convention) -> Tensor:
    """The inverse of `_to_diffusers_latents`: diffusers' latents taken to be at `sigma`, in sigma space."""
    return latents if convention == "discrete" else latents * (1 + sigma.item() ** 2) ** 0.5


def _lcm_steps(model: Model, x: Tensor, sigmas: Tensor, timesteps: Tensor, noise: Noise, callback: Callback | None,
               after_step: AfterStep, **options: Any) -> Tensor:
    """`lcm.lcm` over a part of its grid, one step at a time so `after_step` can act between steps (LCM keeps no
    history, so this is the same walk); each step is told its timestep, which is not the n-step grid's."""
    for i in range(len(sigmas) - 1):
        step_callback = None if callback is None else (lambda _, denoised, i=i: callback(i, denoised))
        x = _lcm(model, x, sigmas[i : i + 2], noise=noise, callback=step_callback, timesteps=timesteps[i : i + 1],
                 **options)
        x = after_step(i, x)
    return x
