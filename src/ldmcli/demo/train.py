"""Train the bundled demo model: a small Stable Diffusion 1.x-architecture latent diffusion model.

    python -m ldmcli.demo.train --stage vae --threads 1                      # then two diffusion phases:
    python -m ldmcli.demo.train --stage diffusion ...                         # see docs/demo-model.md
    python -m ldmcli.demo.train --evaluate weights/ldm-demo.safetensors     # adherence rates
    python -m ldmcli.demo.train --contact-sheet docs/demo-contact-sheet.png

The recipe of latent diffusion (Rombach et al. 2022) at toy scale, on `shapes.py`'s captioned
images, with the same classes the SD pipeline loads:

1. VAE (`AutoencoderKL`): L1 + L2 reconstruction and a small KL term on fresh random images. Flat
   shapes need no perceptual or adversarial loss.
2. A fixed pool of scenes is encoded once (posterior mean and std); the latent scale factor is
   1 / std of sampled latents, as SD computed its 0.18215.
3. Text encoder (`CLIPTextModel`, real CLIP BPE, 77 tokens) and U-Net (`UNetModel`) jointly, with
   the epsilon loss (Ho et al. 2020) on SD's scaled_linear schedule, offset noise, 10 % of captions
   replaced by "" so classifier-free guidance (Ho & Salimans 2022) works, and an EMA of the weights,
   which is what ships. In two phases: "layout" with extra loss weight on the high-noise steps (a
   truncated v-prediction weighting, after Min-SNR: Hang et al. 2023), then "shapes", continued
   with `--init` on the plain epsilon loss.
4. Export: one LDM-layout safetensors file (fp16), `__metadata__` saying what shapes cannot.

Every random draw comes from generators seeded by `--seed` and the stage, so stages run separately
(`--stage`) give the same result as one run (with the same thread count). bf16 autocast on CPU (AMX)
roughly halves the time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmcli.demo import sampling_defaults, shapes
from ldmcli.models.clip import CLIPTextConfig, CLIPTextModel
from ldmcli.models.unet import UNetConfig, UNetModel
from ldmcli.models.vae import AutoencoderKL, VAEConfig
from ldmcli.schedule import DiffusionSchedule


@dataclass(frozen=True)
class Architecture:
    """Network sizes of the demo model: SD 1.x's structure at toy widths."""

    image_size: int = 64  # pixels; the model's native size
    # 3 levels: 64 -> 16 latent pixels (factor 4); widths multiples of 32 for GroupNorm32. Only the
    # 16-pixel level is 64 wide: at 64 and 32 pixels each extra channel costs 4-16x more compute.
    vae: VAEConfig = VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1)
    # The U-Net sees 16x16x4 latents: levels 32/64/128 wide at 16, 8, 4 pixels (each conv costs about
    # the same at every level). Cross-attention at every level; 32-channel heads (stated in the
    # file's metadata, as SD1's fixed 8 heads would make 4-channel heads at this width).
    unet: UNetConfig = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        transformer_depth=(1, 1, 1),
        context_dim=64,
        num_heads=None,
        head_dim=32,
    )
    # Width 64 = one 64-channel head (the CLIP rule detect.py relies on); must equal context_dim.
    # The 49408 x 64 token embedding (3.2M) is most of it; only a few dozen rows are ever used.
    text: CLIPTextConfig = CLIPTextConfig(width=64, layers=2, heads=1, intermediate=256)


@dataclass(frozen=True)
class Recipe:
    """Training hyperparameters. Defaults: the first (layout) phase; a second phase continues with --init."""

    seed: int = 0
    # torch intra-op threads: both cores of this machine. On a quiet machine one process with two
    # threads is 2.2x one thread (0.46 vs 1.03 s per batch of 32); two single-thread processes
    # lose about as much to the gradient all-reduce. On a busy machine use 1: two threads then
    # wait on each other at every op barrier.
    threads: int = 2
    bf16: bool = True  # CPU autocast to bfloat16 for the forward passes
    two_shape_fraction: float = 0.25  # share of scenes with two shapes
    # Stage 1: VAE
    vae_steps: int = 1500
    vae_batch: int = 8
    # Random crops (pixels) of the 64-pixel images: the autoencoder is convolutional, and a crop
    # costs a quarter of the full image, so 4x the steps fit in the same time. The last
    # `vae_full_steps` see whole images, so the borders and the mid-block attention adapt to 64 px.
    vae_crop: int = 32
    vae_full_steps: int = 500
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4  # on KL summed over latent elements / image elements (L1/L2 are means)
    # Stage 2: latent pool
    pool_size: int = 12000  # scenes encoded once; every step draws a fresh posterior sample and caption
    # Stage 3: text encoder + U-Net
    procs: int = 1  # data-parallel processes (gradients averaged over gloo); set threads to cores / procs
    steps: int = 4000
    batch: int = 64  # per process: 0.58 s per step here, 1.8x the samples per second of batch 32
    lr: float = 1e-3
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10 % (the pilot placed shapes
    # on the named side only once the rate came down, between 80 and 100 % of the run)
    caption_dropout: float = 0.1  # captions replaced by "" (the unconditional prompt for CFG)
    snr_gamma: float = 5.0  # Min-SNR-gamma truncation of the loss weights at low noise
    # How the per-timestep epsilon MSE is weighted, as a weight on the implied x0 error:
    #   "eps":         SNR                  (the plain epsilon loss of Ho et al. 2020)
    #   "min_snr":     min(SNR, gamma)      (Hang et al. 2023)
    #   "min_snr_v":   min(SNR, gamma) + 1  (the v-prediction loss, SNR + 1, truncated the same way)
    #   "eps_min_snr_v": the larger of "eps" and "min_snr_v"
    # Layout and colours are decided at t > 900, where SNR < 0.015: epsilon-style weights give those
    # steps almost no say, and the pilot learned neither positions nor backgrounds from the text.
    # Min-SNR weights in turn starve the low-noise end (0.006 of the epsilon loss's weight at t=0),
    # and a model trained so left grainy backgrounds and soft edges. The default keeps both.
    loss_weighting: str = "eps_min_snr_v"
    # Offset noise (Guttenberg 2023): a per-image, per-channel constant added to the noise. SD's
    # schedule leaves 7 % of the signal at t=999, from which a 16x16 latent's mean colour can be
    # read; without this the pilot learned the background colour from that leak instead of from the
    # caption, and sampling from pure noise gave every image the same background.
    offset_noise: float = 0.3
    # Multi-resolution ("pyramid") noise (Whitaker 2023): the same idea at coarser scales, noise at
    # 8, 4, 2 latent pixels weighted discount**level (0 = off), renormalised to unit variance.
    pyramid_discount: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    checkpoint_every: int = 500  # write an intermediate model to the work dir (0: never)
    # Continue from this demo model file's text encoder and U-Net instead of a random start (its
    # training record is kept in the new file's metadata). The VAE and latent pool must be the same.
    init: str = ""
    # Sampling defaults written into the file (what `ldm generate` should use).
    default_steps: int = 20
    default_cfg_scale: float = 5.0
    default_sampler: str = "dpmpp_2m"


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _generator(seed: int, stage: int) -> tuple[random.Random, torch.Generator]:
    """Independent (data, torch) generators per stage, so stages can run separately."""
    return random.Random(seed * 1000 + stage), torch.Generator().manual_seed(seed * 1000 + stage)


def _to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of `peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(recipe: Recipe):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16)


def _training_attention():
    """Plain (math) attention for training. At these sizes (77 and 256 tokens, one 32- or 64-wide
    head) the CPU flash-attention kernel's bf16 backward took 40 % of a training step; with
    the math kernel the whole step is 1.6x faster. Sampling keeps the default kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# --- stage 1: VAE -----------------------------------------------------------------------------


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, var) || N(0, 1)) summed over latent elements, per sample [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def _random_crops(x: Tensor, size: int, rng: random.Random) -> Tensor:
    """An independent random `size` x `size` crop of each image [B, C, H, W]."""
    if size >= x.shape[-1]:
        return x
    offsets = [(rng.randrange(x.shape[-2] - size + 1), rng.randrange(x.shape[-1] - size + 1)) for _ in range(len(x))]
    return torch.stack([img[:, i : i + size, j : j + size] for img, (i, j) in zip(x, offsets)])


def train_vae(arch: Architecture, recipe: Recipe) -> AutoencoderKL:
    """Reconstruction (L1 + L2) + small KL on fresh random scenes every step."""
    rng, gen = _generator(recipe.seed, 1)
    torch.manual_seed(recipe.seed * 1000 + 1)
    vae = AutoencoderKL(arch.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    start, running = time.time(), None
    for step in range(recipe.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.vae_steps, recipe.vae_lr, 100)
        images, _ = shapes.random_batch(rng, recipe.vae_batch, arch.image_size, two_shape_fraction=0.5)
        crop = recipe.vae_crop if step < recipe.vae_steps - recipe.vae_full_steps else arch.image_size
        x = _random_crops(_to_tensor(images), crop, rng)
        with _autocast(recipe):
            mean, logvar = vae.encode(x)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen)
            recon = vae.decode(z).float()
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = kl_divergence(mean.float(), logvar.float()).mean() / (3 * crop**2)
        loss = rec + recipe.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), recipe.grad_clip)
        opt.step()
        running = rec.item() if running is None else 0.98 * running + 0.02 * rec.item()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            _log(f"vae {step}/{recipe.vae_steps} rec {running:.4f} kl {kl.item():.3f} ({time.time() - start:.0f} s)")
    return vae.eval()


# --- stage 2: latent pool ---------------------------------------------------------------------


@dataclass
class LatentPool:
    """Encoded scenes: posterior mean and std [N, 4, h, w] (unscaled), and the scenes for captions."""

    mean: Tensor
    std: Tensor
    scenes: list[shapes.Scene] = field(repr=False)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, arch: Architecture, recipe: Recipe, batch: int = 256) -> LatentPool:
    rng, _ = _generator(recipe.seed, 2)
    scenes = [shapes.random_scene(rng, recipe.two_shape_fraction) for _ in range(recipe.pool_size)]
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        x = _to_tensor(np.stack([shapes.draw(s, arch.image_size) for s in scenes[i : i + batch]]))
        with _autocast(recipe):
            mean, logvar = vae.encode(x)
        means.append(mean.float())
        stds.append((0.5 * logvar.float()).exp())
    return LatentPool(torch.cat(means), torch.cat(stds), scenes)


def latent_scale_factor(pool: LatentPool, generator: torch.Generator) -> float:
    """1 / std of sampled latents (how SD's 0.18215 was chosen): unit-variance diffusion inputs."""
    z = pool.mean + pool.std * torch.randn(pool.mean.shape, generator=generator)
    return float(1 / z.std())


# --- stage 3: text encoder + U-Net ------------------------------------------------------------


def loss_weights(snr: Tensor, scheme: str, gamma: float) -> Tensor:
    """Per-timestep weights of the epsilon MSE. An epsilon error is sqrt(SNR) times the x0 error it
    implies, so an x0-space weight lambda becomes lambda / SNR here."""
    if scheme == "eps":
        return torch.ones_like(snr)
    if scheme == "min_snr":
        return snr.clamp(max=gamma) / snr
    if scheme == "min_snr_v":
        return (snr.clamp(max=gamma) + 1) / snr
    if scheme == "eps_min_snr_v":
        return ((snr.clamp(max=gamma) + 1) / snr).clamp(min=1)
    raise ValueError(f"unknown loss weighting {scheme!r}")


def training_noise(shape: tuple[int, ...], recipe: Recipe, gen: torch.Generator) -> Tensor:
    """Gaussian noise [B, C, h, w], plus offset noise and optional multi-resolution noise."""
    b, c, h, w = shape
    eps = torch.randn(shape, generator=gen)
    if recipe.pyramid_discount:
        level, side = 1, h // 2
        while side >= 2:
            coarse = torch.randn((b, c, side, side), generator=gen)
            eps = eps + recipe.pyramid_discount**level * F.interpolate(coarse, size=(h, w), mode="bilinear")
            level, side = level + 1, side // 2
        eps = eps / eps.std(dim=(1, 2, 3), keepdim=True)
    return eps + recipe.offset_noise * torch.randn((b, c, 1, 1), generator=gen)


class EMA:
    """Exponential moving average of parameters (with the usual warm-up of the decay)."""

    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[nn.Module]) -> None:
        for p, s in zip((p for m in modules for p in m.parameters()), self.shadow):
            p.copy_(s)


def train_diffusion(
    arch: Architecture, recipe: Recipe, pool: LatentPool, scale_factor: float, checkpoint=None, rank: int = 0, world: int = 1
) -> tuple[CLIPTextModel, UNetModel]:
    """Joint text encoder + U-Net training with the epsilon loss; returns the EMA weights.

    With `world` > 1 (an initialised process group), every process draws its own batches and the
    gradients are averaged before each step, so all processes hold the same weights.
    """
    from ldmcli.tokenizer import PromptTokenizer

    rng, gen = _generator(recipe.seed, 3 + 100 * rank)
    torch.manual_seed(recipe.seed * 1000 + 3)  # same initial weights in every process
    text, unet = CLIPTextModel(arch.text), UNetModel(arch.unet)
    if recipe.init:
        load_networks(Path(recipe.init), text, unet)
    tokenizer = PromptTokenizer()  # SD1 framing: BOS, BPE, EOS, EOS padding to 77
    params = [*text.parameters(), *unet.parameters()]
    # fused: one kernel for all parameters (the per-tensor loop was 12 % of a step).
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0, fused=True)
    ema = EMA([text, unet], recipe.ema_decay)
    schedule = DiffusionSchedule()
    alphas = schedule.alphas_cumprod()
    snr = alphas / (1 - alphas)
    weights = loss_weights(snr, recipe.loss_weighting, recipe.snr_gamma)
    start, running = time.time(), None
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        idx = torch.randint(len(pool.scenes), (recipe.batch,), generator=gen)
        z0 = (pool.mean[idx] + pool.std[idx] * torch.randn(pool.mean[idx].shape, generator=gen)) * scale_factor
        captions = ["" if rng.random() < recipe.caption_dropout else shapes.caption(pool.scenes[i], rng) for i in idx.tolist()]
        t = torch.randint(schedule.num_train_timesteps, (recipe.batch,), generator=gen)
        eps = training_noise(z0.shape, recipe, gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with _autocast(recipe), _training_attention():
            context = text(tokenizer(captions)).hidden_states
            pred = unet(zt, t.float(), context).float()
        loss = ((pred - eps).pow(2).mean(dim=(1, 2, 3)) * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(params, world)
        nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        ema.update()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if rank == 0 and (step % 50 == 0 or step == recipe.steps - 1):
            rate = (step + 1) / (time.time() - start)
            _log(f"diffusion {step}/{recipe.steps} loss {running:.4f} {rate:.2f} it/s eta {(recipe.steps - step) / rate / 60:.1f} min")
        if rank == 0 and checkpoint is not None and recipe.checkpoint_every and (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            checkpoint(step + 1, *_ema_copies(arch, ema))
    return _ema_copies(arch, ema)


def load_networks(path: Path, text: CLIPTextModel, unet: UNetModel) -> None:
    """Text encoder and U-Net weights of an exported demo model (fp32 copies of its fp16 tensors)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for prefix, module in (("cond_stage_model.transformer.", text), ("model.diffusion_model.", unet)):
        module.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce every gradient as one flat buffer (one message, not one per tensor)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def _ema_copies(arch: Architecture, ema: EMA) -> tuple[CLIPTextModel, UNetModel]:
    text, unet = CLIPTextModel(arch.text), UNetModel(arch.unet)
    ema.copy_to([text, unet])
    return text.eval(), unet.eval()


# --- export -----------------------------------------------------------------------------------


def ldm_state_dict(text: CLIPTextModel, unet: UNetModel, vae: AutoencoderKL, dtype: torch.dtype) -> dict[str, Tensor]:
    """The single-file LDM layout SD 1.x checkpoints use."""
    out = {}
    for prefix, module in (
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("cond_stage_model.transformer.", text),  # keys text_model.*, as SD1 files have them
    ):
        out.update({prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()})
    return out


def export(path: Path, text: CLIPTextModel, unet: UNetModel, vae: AutoencoderKL, *, arch: Architecture,
           recipe: Recipe, scale_factor: float, training: dict, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    metadata = {
        "ldm.scale_factor": repr(scale_factor),
        "ldm.native_size": str(arch.image_size),
        "ldm.unet.head_dim": str(arch.unet.head_dim),
        "ldm.default_steps": str(recipe.default_steps),
        "ldm.default_cfg_scale": str(recipe.default_cfg_scale),
        "ldm.default_sampler": recipe.default_sampler,
        "ldm.training": json.dumps(training, sort_keys=True),
        "ldm.description": "ldm demo model: flat shapes on flat backgrounds, trained by ldmcli.demo.train",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(ldm_state_dict(text, unet, vae, dtype), str(tmp), metadata=metadata)
    tmp.replace(path)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- evaluation and contact sheet ---------------------------------------------------------------


def evaluate(model_path: Path, cfg_scales: list[float], seeds: int, steps: int | None, sampler: str | None) -> None:
    from ldmcli.demo.analysis import adherence, adherence_cases
    from ldmcli.pipeline import load

    model = load(model_path)
    for cfg in cfg_scales:
        t = time.time()
        rates, _ = adherence(model, adherence_cases(), range(seeds), cfg_scale=cfg, steps=steps, sampler=sampler)
        print(f"cfg {cfg}: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()) + f" ({time.time() - t:.1f} s)", flush=True)


def contact_sheet(model_path: Path, out: Path, seed: int = 0) -> None:
    """Generated samples in a captioned grid: the test prompts, then a few free-form ones."""
    from PIL import Image, ImageDraw, ImageFont

    from ldmcli.demo.analysis import adherence_cases
    from ldmcli.pipeline import generate, load
    from ldmcli.request import ImageRequest

    model = load(model_path)
    defaults = sampling_defaults(model_path)
    prompts = [shapes.caption(c) for c in adherence_cases()]
    prompts += [
        "a red circle on a blue background",
        "a small white star in the center, black background",
        "a yellow square on the left and a green circle on the right, purple background",
        "a large orange triangle at the bottom on a white background",
    ]
    scale, cols, label = 3, 4, 44  # 64 px images shown at 192 px, 4 per row, caption strip below
    side = 64 * scale
    rows = -(-len(prompts) // cols)
    sheet = Image.new("RGB", (cols * side, rows * (side + label)), "white")
    pen, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for i, prompt in enumerate(prompts):
        request = ImageRequest(prompt=prompt, width=64, height=64, steps=defaults["steps"], cfg_scale=defaults["cfg_scale"], sampler=defaults["sampler"])
        image = Image.fromarray(generate(model, request, [seed])[0].numpy()).resize((side, side), Image.NEAREST)
        x, y = (i % cols) * side, (i // cols) * (side + label)
        sheet.paste(image, (x, y))
        words, lines = prompt.split(), [""]
        for w in words:  # greedy wrap to the tile width
            trial = f"{lines[-1]} {w}".strip()
            if pen.textlength(trial, font=font) > side - 6 and lines[-1]:
                lines.append(w)
            else:
                lines[-1] = trial
        pen.multiline_text((x + 3, y + side + 2), "\n".join(lines[:3]), fill="black", font=font, spacing=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldmcli.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("weights/ldm-demo.safetensors"), help="model file to write")
    p.add_argument("--workdir", type=Path, default=Path("outputs/demo-train"), help="intermediate files (VAE, checkpoints)")
    p.add_argument("--stage", choices=("all", "vae", "diffusion"), default="all",
                   help="vae: train and save the VAE only; diffusion: reuse the work dir's VAE")
    for f in Recipe.__dataclass_fields__.values():
        if f.type == "str":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=str, default=f.default)
        elif f.type in ("bool",):
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--evaluate", type=Path, metavar="MODEL", help="print adherence rates of MODEL instead of training")
    p.add_argument("--cfg", type=float, nargs="*", default=[5.0, 1.0], help="CFG scales for --evaluate")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt for --evaluate")
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--eval-sampler", type=str, default=None)
    p.add_argument("--contact-sheet", type=Path, metavar="PNG", help="write a grid of samples of --out instead of training")
    return p


def _train_parallel(arch: Architecture, recipe: Recipe, pool: LatentPool, scale: float, checkpoint):
    """train_diffusion in `recipe.procs` forked processes; the EMA weights come back from rank 0."""
    if recipe.procs <= 1:
        return train_diffusion(arch, recipe, pool, scale, checkpoint)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free local port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ema.pt"  # rank 0 leaves the EMA weights here
        mp.start_processes(_worker, args=(recipe.procs, port, arch, recipe, pool, scale, checkpoint, result),
                           nprocs=recipe.procs, start_method="fork")
        text_sd, unet_sd = torch.load(result, weights_only=True)
    text, unet = CLIPTextModel(arch.text), UNetModel(arch.unet)
    text.load_state_dict(text_sd)
    unet.load_state_dict(unet_sd)
    return text.eval(), unet.eval()


def _worker(rank: int, world: int, port: int, arch, recipe, pool, scale, checkpoint, result) -> None:
    import torch.distributed as dist

    torch.set_num_threads(recipe.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        text, unet = train_diffusion(arch, recipe, pool, scale, checkpoint, rank=rank, world=world)
        if rank == 0:
            torch.save((text.state_dict(), unet.state_dict()), result)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in Recipe.__dataclass_fields__})
    torch.set_num_threads(recipe.threads)
    if args.evaluate:
        return evaluate(args.evaluate, args.cfg, args.seeds, args.eval_steps, args.eval_sampler)
    if args.contact_sheet:
        return contact_sheet(args.out, args.contact_sheet)
    arch = Architecture()
    args.workdir.mkdir(parents=True, exist_ok=True)
    vae_file = args.workdir / "vae.pt"
    command = "python -m ldmcli.demo.train " + " ".join(argv if argv is not None else sys.argv[1:])
    vae_command = command
    t0 = time.time()
    if args.stage in ("all", "vae"):
        vae = train_vae(arch, recipe)
        torch.save({"state_dict": vae.state_dict(), "seconds": time.time() - t0, "command": command}, vae_file)
        if args.stage == "vae":
            return
        vae_seconds = time.time() - t0
    else:
        saved = torch.load(vae_file, weights_only=True)
        vae = AutoencoderKL(arch.vae)
        vae.load_state_dict(saved["state_dict"])
        vae.eval()
        vae_seconds = saved["seconds"]
        vae_command = saved.get("command", "")
    t1 = time.time()
    pool = encode_pool(vae, arch, recipe)
    scale = latent_scale_factor(pool, _generator(recipe.seed, 2)[1])
    _log(f"pool of {len(pool.scenes)} latents encoded in {time.time() - t1:.0f} s; scale factor {scale:.5f}")
    continued_from = None
    if recipe.init:
        from ldmcli.checkpoint import read_safetensors_metadata

        init_meta = read_safetensors_metadata(Path(recipe.init))
        continued_from = json.loads(init_meta["ldm.training"])
        init_scale = float(init_meta["ldm.scale_factor"])
        if abs(init_scale - scale) > 0.02 * init_scale:  # a VAE that is not the init model's
            raise SystemExit(f"--init {recipe.init}: its latent scale {init_scale} differs from this VAE's {scale}")
        scale = init_scale

    def training_record(diffusion_steps: int) -> dict:
        return {
            "command": command.strip(),
            "vae_command": vae_command.strip(),  # differs when the stages ran separately (--stage)
            "seed": recipe.seed,
            "recipe": asdict(recipe),  # steps: the run's planned length, which the LR schedule follows
            "steps_done": diffusion_steps,  # fewer for an intermediate checkpoint
            "architecture": {"image_size": arch.image_size, "vae": asdict(arch.vae), "unet": asdict(arch.unet), "text": asdict(arch.text)},
            "data": "ldmcli.demo.shapes: 1-2 flat shapes (circle/square/triangle/star; 8 colours; small/large;"
                    " left/right/top/bottom/center) on a flat background, 64x64, 4x supersampled; random captions",
            "seconds": {"vae": round(vae_seconds), "pool_and_diffusion": round(time.time() - t1)},
            "torch": torch.__version__,
            "continued_from": continued_from,  # the --init model's own training record
        }

    def checkpoint(step: int, text: CLIPTextModel, unet: UNetModel) -> None:
        path = args.workdir / f"ldm-demo-step{step}.safetensors"
        export(path, text, unet, vae, arch=arch, recipe=recipe, scale_factor=scale, training=training_record(step))
        _log(f"checkpoint {path}")

    text, unet = _train_parallel(arch, recipe, pool, scale, checkpoint)
    export(args.out, text, unet, vae, arch=arch, recipe=recipe, scale_factor=scale, training=training_record(recipe.steps))
    sizes = {n: count_parameters(m) for n, m in (("unet", unet), ("vae", vae), ("text", text))}
    _log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, parameters {sizes}) in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
