"""`--match a1111` (issue 16): A1111's numerics, so that an A1111 image's seed and settings give its pixels.

The oracle is A1111's sampling written out in this file, independently of ldm's code: k-diffusion's
``DiscreteSchedule`` and ``CompVisDenoiser`` (sigmas from the LDM model's float64-built alphas_cumprod,
log-sigma interpolation both ways, fractional timesteps), its ``get_sigmas_karras`` /
``get_sigmas_exponential``, its sampler loops (``sample_euler``, ``sample_euler_ancestral``,
``sample_heun``, ``sample_lms``, ``sample_dpmpp_2m``), A1111's ``KDiffusionSampler.sample`` (initial noise
times ``sigmas[0]``), A1111's DDIM and PLMS (``sd_samplers_timesteps``: the CompVis grid
``range(0, 1000, 1000 // steps) + 1``, walked in VP space with alphas_cumprod), and A1111's pixels
(``(255. * x).astype(np.uint8)``, a truncation). The network is diffusers' U-Net and VAE with the tiny
model's weights; the text conditioning is diffusers' ``encode_prompt``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ldmcli import pipeline
from ldmcli.request import ImageRequest
from ldmcli.schedule import DiffusionSchedule
from ldmcli.schedule_a1111 import a1111_sigmas
from sd_fixtures import assert_latents_match, build_tiny_sd1_pipeline

SIZE = 64
SEED = 1234
pytestmark = pytest.mark.usefixtures("one_thread")

# The training schedules, as the models' LDM configs write them (linear_start, linear_end; LDM's
# "linear" is sqrt-linear squared).
LDM_SCHEDULES = {"sd1": (0.00085, 0.012), "sd2": (0.00085, 0.012)}


def ldm_alphas_cumprod(linear_start: float, linear_end: float, T: int = 1000) -> torch.Tensor:
    """LDM's register_schedule: torch float64 linspace, squared, numpy cumprod, stored as float32."""
    betas = (torch.linspace(linear_start**0.5, linear_end**0.5, T, dtype=torch.float64) ** 2).numpy()
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


# --- k-diffusion, written out -------------------------------------------------------------------------


class CompVisDenoiser:
    """k-diffusion's DiscreteEpsDDPMDenoiser (quantize=False, A1111's default) around an eps network."""

    def __init__(self, eps_fn, alphas_cumprod: torch.Tensor) -> None:
        self.eps_fn = eps_fn
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.seen_t: list[float] = []

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()

    def get_sigmas(self, n):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def __call__(self, x, sigma):
        c_out, c_in = -sigma, 1 / (sigma**2 + 1) ** 0.5
        t = self.sigma_to_t(sigma)
        self.seen_t.append(t.reshape(-1)[0].item())
        eps = self.eps_fn(x * c_in[:, None, None, None], t)
        return x + eps * c_out[:, None, None, None]


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_exponential(n, sigma_min, sigma_max):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_euler(model, x, sigmas, randn_like):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_euler_ancestral(model, x, sigmas, randn_like):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + randn_like(x) * sigma_up
    return x


def sample_heun(model, x, sigmas, randn_like):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


def linear_multistep_coeff(order, t, i, j):
    """The integral k-diffusion takes with scipy's quad, taken exactly: the basis is a polynomial."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if j != k:
            poly = poly * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    antiderivative = poly.integ()
    return antiderivative(t[i + 1]) - antiderivative(t[i])


def sample_lms(model, x, sigmas, randn_like, order=4):
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2m(model, x, sigmas, randn_like):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


K_SAMPLERS = {"euler": sample_euler, "euler_a": sample_euler_ancestral, "heun": sample_heun, "lms": sample_lms,
              "dpmpp_2m": sample_dpmpp_2m}


def k_diffusion_sigmas(denoiser: CompVisDenoiser, schedule: str, steps: int) -> torch.Tensor:
    """A1111's KDiffusionSampler.get_sigmas: Uniform is the denoiser's own grid."""
    sigma_min, sigma_max = denoiser.sigmas[0].item(), denoiser.sigmas[-1].item()
    if schedule == "uniform":
        return denoiser.get_sigmas(steps)
    if schedule == "karras":
        return get_sigmas_karras(steps, sigma_min, sigma_max)
    return get_sigmas_exponential(steps, sigma_min, sigma_max)


# --- A1111's DDIM and PLMS (sd_samplers_timesteps), written out ------------------------------------------


def a1111_timesteps(steps: int) -> torch.Tensor:
    return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)


def a1111_ddim(eps_model, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, timesteps[index].item() * s_in)
        a_t = alphas[index].item() * s_in
        a_prev = alphas_prev[index].item() * s_in
        sqrt_one_minus_at = sqrt_one_minus_alphas[index].item() * s_in
        pred_x0 = (x - sqrt_one_minus_at[:, None, None, None] * e_t) / a_t.sqrt()[:, None, None, None]
        dir_xt = (1.0 - a_prev).sqrt()[:, None, None, None] * e_t  # eta 0: sigma_t = 0
        x = a_prev.sqrt()[:, None, None, None] * pred_x0 + dir_xt
    return x


def a1111_plms(eps_model, x, timesteps, alphas_cumprod):
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1 - alphas)
    s_in = x.new_ones([x.shape[0]])
    old_eps = []

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t = (alphas[index].item() * s_in)[:, None, None, None]
        a_prev = (alphas_prev[index].item() * s_in)[:, None, None, None]
        sqrt_one_minus_at = (sqrt_one_minus_alphas[index].item() * s_in)[:, None, None, None]
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = eps_model(x, ts)
        if len(old_eps) == 0:
            x_prev = get_x_prev_and_pred_x0(x, e_t, index)
            e_t_next = eps_model(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev = get_x_prev_and_pred_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
    return x


# --- the model and A1111's run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("a1111-match")
    build_tiny_sd1_pipeline(seed=5).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="module")
def ours(folder):
    return pipeline.load(folder)


PROMPT, NEGATIVE, CFG = "a red circle", "blurry", 6.0


def cfg_eps(reference):
    """A1111's CFG around the U-Net: [cond, uncond] in one batch, guided by cond_scale."""
    cond, uncond = reference.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)

    def eps(x, t):
        out = reference.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([cond, uncond])).sample
        c, u = out.chunk(2)
        return u + (c - u) * CFG

    return eps


def a1111_latents(reference, sampler: str, schedule: str, steps: int, seed: int = SEED) -> torch.Tensor:
    """What A1111 samples for (sampler, schedule, steps, seed) with the CPU generator, as VP latents."""
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((4, SIZE // 8, SIZE // 8), generator=generator)[None]  # A1111's ImageRNG: C, H, W an image
    randn_like = lambda x: torch.randn(x.shape[1:], generator=generator)[None]  # noqa: E731
    alphas_cumprod = ldm_alphas_cumprod(*LDM_SCHEDULES["sd1"])
    eps = cfg_eps(reference)
    with torch.no_grad():
        if sampler in ("ddim", "plms"):
            run = a1111_ddim if sampler == "ddim" else a1111_plms
            return run(eps, x, a1111_timesteps(steps), alphas_cumprod)
        denoiser = CompVisDenoiser(eps, alphas_cumprod)
        sigmas = k_diffusion_sigmas(denoiser, schedule, steps)
        return K_SAMPLERS[sampler](denoiser, x * sigmas[0], sigmas, randn_like)  # x0 at sigma 0: VP too


def a1111_pixels(reference, latents: torch.Tensor) -> torch.Tensor:
    """A1111's decode_first_stage and its save: clamp((x + 1) / 2), (255. * x).astype(np.uint8)."""
    with torch.no_grad():
        x = reference.vae.decode(latents / reference.vae.config.scaling_factor).sample
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)
    return torch.from_numpy(np.stack([(255.0 * np.moveaxis(s.numpy(), 0, 2)).astype(np.uint8) for s in x]))


# (sampler, A1111 schedule type, steps). ldm's schedule None is A1111's Uniform. DDIM and PLMS at 6 steps
# walk 6 of the grid's 7 timesteps (1000 // 6 = 166), at 5 steps 4 of 5.
CASES = [
    ("euler_a", "uniform", 6), ("euler", "uniform", 5), ("heun", "uniform", 4), ("lms", "uniform", 6),
    ("dpmpp_2m", "karras", 6), ("dpmpp_2m", "exponential", 5), ("euler", "karras", 5), ("euler_a", "uniform", 1),
    ("ddim", None, 6), ("ddim", None, 5), ("plms", None, 6), ("plms", None, 5), ("ddim", None, 2), ("plms", None, 2),
]


@pytest.mark.parametrize("sampler, schedule, steps", CASES)
def test_images_equal_a1111s(sampler, schedule, steps, reference, ours):
    expected = a1111_latents(reference, sampler, schedule, steps)
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, sampler=sampler,
                           schedule=None if schedule == "uniform" else schedule, width=SIZE, height=SIZE,
                           match="a1111").checked()
    latents = pipeline.sample_latents(ours, request, [SEED])
    label = f"a1111 {sampler}/{schedule}/{steps}"
    assert_latents_match(latents, expected, "sd1", label)
    pixels, expected_pixels = pipeline.decode_latents(ours, latents, match="a1111"), a1111_pixels(reference, expected)
    diff = (pixels.int() - expected_pixels.int()).abs()
    print(f"\n{label} pixels: max diff {diff.max().item()}/255, {(diff > 0).double().mean().item():.4%} differ", end="")
    assert diff.max().item() <= 1 and (diff > 0).double().mean().item() <= 1e-3, label


def test_the_network_sees_k_diffusions_fractional_timesteps(ours):
    """Every timestep ldm feeds the U-Net equals k-diffusion's sigma_to_t of A1111's sigmas, bit for bit."""
    seen = []
    real = ours.unet.forward

    def spy(x, t, *args, **kwargs):
        seen.append(torch.as_tensor(t).reshape(-1)[0].item())
        return real(x, t, *args, **kwargs)

    ours.unet.forward = spy
    try:
        request = ImageRequest(prompt=PROMPT, steps=7, sampler="euler", match="a1111", width=SIZE, height=SIZE)
        pipeline.sample_latents(ours, request.checked(), [SEED])
    finally:
        del ours.unet.forward
    denoiser = CompVisDenoiser(None, ldm_alphas_cumprod(*LDM_SCHEDULES["sd1"]))
    expected = [denoiser.sigma_to_t(s).item() for s in denoiser.get_sigmas(7)[:-1]]
    assert seen == expected
    assert seen[0] == 999 and any(t != round(t) for t in seen)  # fractional, unlike diffusers' leading grid


@pytest.mark.parametrize("family", sorted(LDM_SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 30, 999, 1000])
def test_sigmas_equal_k_diffusions(family, steps):
    schedule = DiffusionSchedule(beta_start=LDM_SCHEDULES[family][0], beta_end=LDM_SCHEDULES[family][1])
    denoiser = CompVisDenoiser(None, ldm_alphas_cumprod(*LDM_SCHEDULES[family]))
    for name in ("uniform", "karras", "exponential"):
        plan = a1111_sigmas(schedule, None if name == "uniform" else name, steps, timestep_sampler=False)
        expected = k_diffusion_sigmas(denoiser, name, steps)
        assert torch.equal(plan.sigmas, expected), name
        assert plan.init_noise_sigma == expected[0].item()  # unit noise x sigma_max, not sqrt(sigma_max^2 + 1)
        assert torch.equal(plan.timesteps, denoiser.sigma_to_t(expected[:-1])), name
    grid = a1111_timesteps(steps)
    plan = a1111_sigmas(schedule, None, steps, timestep_sampler=True)
    assert plan.timesteps.tolist() == grid.flip(0).tolist()  # the top down to the lowest, where the walk ends
    a = ldm_alphas_cumprod(*LDM_SCHEDULES[family])[grid.flip(0)]
    torch.testing.assert_close(plan.sigmas, ((1 - a) / a) ** 0.5, rtol=0, atol=0)


def test_ddim_and_plms_take_no_schedule_when_matching_a1111():
    with pytest.raises(ValueError, match="takes no schedule"):
        ImageRequest(sampler="ddim", schedule="karras", match="a1111").checked()
    with pytest.raises(ValueError, match="match must be one of"):
        ImageRequest(match="comfy").checked()
    assert ImageRequest(sampler="ddim", schedule="karras").checked().schedule == "karras"  # diffusers: allowed


# --- from the command line -------------------------------------------------------------------------------


def test_cli_records_match_and_an_a1111_text_is_read_with_a1111s_numerics(tmp_path, folder):
    """`--match a1111` is written as `Match: a1111` and read back; an A1111 text (no Match key, not ldm's)
    runs with A1111's numerics; A1111's text of the same settings makes the same pixels."""
    from click.testing import CliRunner
    from PIL import Image, PngImagePlugin

    from ldmcli.cli import cli

    def run(*args):
        result = CliRunner().invoke(cli, ["generate", "-m", str(folder), "--json", *map(str, args)])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]

    settings = ["--steps", "3", "-W", SIZE, "-H", SIZE, "-s", 9, "--sampler", "euler", "--cfg-scale", 5]
    (ours,) = run("a cat", *settings, "--match", "a1111", "--rng", "nv", "--no-pad-conds", "-o", tmp_path / "ours.png")
    (plain,) = run("a cat", *settings, "--rng", "nv", "--no-pad-conds", "-o", tmp_path / "plain.png")
    text = Image.open(ours["path"]).text["parameters"]
    assert ", Match: a1111" in text and "Match" not in Image.open(plain["path"]).text["parameters"]
    assert ours["match"] == "a1111" and plain["match"] == "diffusers"

    (again,) = run("--from-png", ours["path"], "-o", tmp_path / "again.png")  # ldm's record
    foreign = text.replace(", Match: a1111", "").replace(", Version: ldm", ", Version: v1.10.1").replace(
        ", Pad conds: False", "")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", foreign)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    (theirs,) = run("--from-png", tmp_path / "a1111.png", "-o", tmp_path / "theirs.png")
    assert again["match"] == theirs["match"] == "a1111"
    made = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("ours", "plain", "again", "theirs")}
    assert np.array_equal(made["ours"], made["again"]) and np.array_equal(made["ours"], made["theirs"])
    assert not np.array_equal(made["ours"], made["plain"])


def test_generate_and_the_command_line_truncate_pixels_when_matching_a1111(tmp_path, folder, ours):
    """The pixel quantization reaches the images made: `pipeline.generate` and `ldm generate`."""
    from click.testing import CliRunner
    from PIL import Image

    from ldmcli.cli import cli

    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, cfg_scale=CFG, sampler="euler",
                           width=SIZE, height=SIZE, match="a1111").checked()
    latents = pipeline.sample_latents(ours, request, [SEED])
    truncated, rounded = pipeline.decode_latents(ours, latents, match="a1111"), pipeline.decode_latents(ours, latents)
    assert torch.equal(pipeline.generate(ours, request, [SEED]), truncated)
    result = CliRunner().invoke(cli, ["generate", PROMPT, "-n", NEGATIVE, "-m", str(folder), "--dtype", "fp32", "--steps",
                                      "3", "--cfg-scale", str(CFG), "--sampler", "euler", "-W", str(SIZE), "-H", str(SIZE),
                                      "-s", str(SEED), "--match", "a1111", "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    made = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png")))
    # the command line's optimised kernels round a little differently: nearly every value is the truncated one
    assert (made == truncated[0]).double().mean() > 0.999 and (made == rounded[0]).double().mean() < 0.9


@pytest.mark.parametrize("version, sampler, said", [
    ("v1.10.1", "Euler a", []), ("v1.7.0", "Euler a", ["before 1.8"]), ("v1.5.2", "DDIM", ["before 1.8", "before 1.6"]),
    ("v1.6.0", "DPM++ 2M SDE", ["Brownian tree", "before 1.8"]), ("ComfyUI", "Euler", []),
])
def test_what_an_a1111_text_cannot_reproduce_is_said(version, sampler, said):
    """Older A1111 versions sampled on other numbers (fp16 alphas_cumprod before 1.8, CompVis's DDIM/PLMS
    before 1.6); DPM++ SDE samplers draw from a Brownian tree: each is named, not passed off as reproduced."""
    from ldmcli.metadata import read_png_parameters

    text = f"a cat\nSteps: 4, Sampler: {sampler}, CFG scale: 5, Seed: 1, Size: 64x64, Version: {version}"
    found = read_png_parameters({"parameters": text}, "x.png")
    whys = [n.why for n in found.notes if not n.honoured]
    assert len(whys) == len(said) and all(any(s in why for why in whys) for s in said), whys
    assert found.request.match == "a1111"


def test_an_a1111_request_for_a_brownian_tree_sampler_is_noted(tmp_path):
    from ldmcli.jobs import command_line_job, read_prompt_file

    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a cat", "sampler_name": "DPM++ 2M SDE", "seed": 1}\n')
    (job,) = read_prompt_file(str(path), command_line_job({}))
    assert any("Brownian tree" in n.why and not n.honoured for n in job.notes)
