"""Tiny Stable Diffusion 1.x models built in diffusers/transformers with random weights.

Same block structure and family rules as SD 1.5 (8 U-Net heads, 64-channel CLIP heads, a
4-level VAE that downsamples by 8), small widths, so whole pipelines run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "src" / "ldmcli" / "data"
# Key -> [shape, dtype] manifests of the real SD1.5 / SD2.1 / SDXL checkpoints (tests/data/MANIFESTS.md).
# Required inputs: a test that cannot find one fails (FileNotFoundError), it never skips.
MANIFESTS = Path(__file__).resolve().parent / "data"

# SD 1.5's scheduler/scheduler_config.json (tests/data/sd15-diffusers-folder.json).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,  # diffusers' name for SD1's 8 heads
    norm_num_groups=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)

TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,  # one 64-channel head, the CLIP rule
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
)


def build_tiny_sd1_pipeline(seed: int = 0):
    """A diffusers StableDiffusionPipeline with random weights in the tiny SD1 structure."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    _spread_norms(unet, vae, text_encoder)
    tokenizer = CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77)
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float32)


def _spread_norms(*modules: torch.nn.Module) -> None:
    """Randomise norm affine parameters and zero-initialised convs so no path is trivially identity."""
    g = torch.Generator().manual_seed(1234)
    for module in modules:
        for name, p in module.named_parameters():
            if p.abs().sum() == 0 or (p == 1).all():  # zero-init out convs, unit norm weights
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if (p == 1).all() else 0.0))


def save_tiny_sd1_folder(folder: Path, seed: int = 0) -> Path:
    pipe = build_tiny_sd1_pipeline(seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        assert json.load(f)["timestep_spacing"] == "leading"
    return folder


def ldm_single_file_state_dict(model) -> dict[str, torch.Tensor]:
    """Our loaded networks (an `ldmcli.pipeline.StableDiffusion`) under the original LDM single-file prefixes."""
    parts = {"model.diffusion_model.": model.unet, "first_stage_model.": model.vae,
             "cond_stage_model.transformer.": model.text_encoder}
    return {prefix + k: v.contiguous() for prefix, net in parts.items() for k, v in net.state_dict().items()}


# --- SD 2.x -----------------------------------------------------------------------------------------

# SD 2.1's scheduler/scheduler_config.json (tests/data/sd21-diffusers-folder.json): DDIM, v-prediction.
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

# SD2 rules at tiny widths: 64-channel heads (1 then 2 heads), linear proj_in/out, attention upcast,
# attention on all levels but the last.
TINY_SD2_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=(1, 2),  # diffusers' name for the number of heads: width / 64
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=32,
)

# OpenCLIP ViT-H rules: gelu, 64-channel heads. diffusers folders hold all but the last block.
TINY_SD2_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=64,
)


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77, pad_token=pad_token)


def build_tiny_sd2_pipeline(seed: int = 0, scheduler_config: dict | None = None):
    """A diffusers StableDiffusionPipeline in the tiny SD 2.1 structure (v-prediction by default).

    The last output transformer's norm1 bias gets std 0.2: the statistic ComfyUI (and we) read to
    guess v-prediction in single files, as in a real 768-v checkpoint.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SD2_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SD2_TEXT))
    _spread_norms(unet, vae, text_encoder)
    with torch.no_grad():
        probe = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias
        probe.copy_(torch.randn(probe.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.2)
    config = scheduler_config or SD21_SCHEDULER_CONFIG
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=_tokenizer("!"), unet=unet,
        scheduler=DDIMScheduler.from_config(config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float32)


def ldm_sd2_single_file_state_dict(model) -> dict[str, torch.Tensor]:
    """Our loaded SD2 networks as an original SD 2.x single file: OpenCLIP text tower under
    `cond_stage_model.model.` with one more block than diffusers keeps (SD2 conditions on the
    penultimate block), plus the unused `text_projection` and `logit_scale`."""
    from ldmcli.keymap.clip import clip_canonical_to_openclip

    text = {k: v.contiguous() for k, v in model.text_encoder.state_dict().items()}
    n = model.spec.text_encoder.layers
    g = torch.Generator().manual_seed(99)
    for key in [k for k in text if k.startswith("text_model.encoder.layers.0.")]:  # a random last block
        text[key.replace(".layers.0.", f".layers.{n}.")] = torch.randn(text[key].shape, generator=g) * 0.05
    width = model.spec.text_encoder.width
    out = {"model.diffusion_model." + k: v.contiguous() for k, v in model.unet.state_dict().items()}
    out.update({"first_stage_model." + k: v.contiguous() for k, v in model.vae.state_dict().items()})
    out.update({"cond_stage_model.model." + k: v for k, v in clip_canonical_to_openclip(text).items()})
    out["cond_stage_model.model.text_projection"] = torch.randn(width, width, generator=g)
    out["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    return out


# --- SDXL ---------------------------------------------------------------------------------------------

# sd_xl_base_1.0's scheduler/scheduler_config.json (tests/data/sdxl-diffusers-folder.json).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# sdxl-turbo's scheduler: Euler ancestral with "trailing" timesteps (one step starts at t=999).
SDXL_TURBO_SCHEDULER_CONFIG = {**SDXL_SCHEDULER_CONFIG, "_class_name": "EulerAncestralDiscreteScheduler",
                               "timestep_spacing": "trailing"}

# SDXL rules at tiny widths: 3 levels, no attention at level 0, deeper transformers below (1, 2 here
# for 2, 10), 64-channel heads, linear projections, context = CLIP-L width + bigG width, vector
# conditioning y = pooled bigG (64) + 6 size sinusoids (32 each here, 256 in SDXL).
TINY_SDXL_TIME_DIM = 32
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=64 + 128,
    attention_head_dim=(1, 1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_DIM,
    projection_class_embeddings_input_dim=64 + 6 * TINY_SDXL_TIME_DIM,
    norm_num_groups=32,
)
# CLIP ViT-L rules (quick_gelu), and OpenCLIP bigG rules (gelu, text_projection) at tiny widths.
TINY_SDXL_TEXT = dict(TINY_TEXT, num_hidden_layers=3)
TINY_SDXL_TEXT_2 = dict(
    vocab_size=49408,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=64,
)


def build_tiny_sdxl_pipeline(seed: int = 0, scheduler_config: dict | None = None):
    """A diffusers StableDiffusionXLPipeline in the tiny SDXL structure, random weights."""
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_SDXL_TEXT))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2))
    _spread_norms(unet, vae, text_encoder, text_encoder_2)
    config = scheduler_config or SDXL_SCHEDULER_CONFIG
    cls = EulerAncestralDiscreteScheduler if config["_class_name"].startswith("EulerAncestral") else EulerDiscreteScheduler
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer("<|endoftext|>"), tokenizer_2=_tokenizer("!"),  # as sd_xl_base_1.0's folders
        unet=unet, scheduler=cls.from_config(config), force_zeros_for_empty_prompt=True,
    ).to(torch.float32)


def ldm_sdxl_single_file_state_dict(model) -> dict[str, torch.Tensor]:
    """Our loaded SDXL networks under sd_xl_base_1.0's single-file prefixes (bigG in OpenCLIP names)."""
    from ldmcli.keymap.clip import clip_canonical_to_openclip

    parts = {"model.diffusion_model.": model.unet, "first_stage_model.": model.vae,
             "conditioner.embedders.0.transformer.": model.text_encoder}
    out = {prefix + k: v.contiguous() for prefix, net in parts.items() for k, v in net.state_dict().items()}
    bigg = clip_canonical_to_openclip({k: v.contiguous() for k, v in model.text_encoder_2.state_dict().items()})
    out.update({"conditioner.embedders.1.model." + k: v.contiguous() for k, v in bigg.items()})
    out["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)
    out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


# --- shared by the SD2/SDXL parity tests ----------------------------------------------------------------


def diffusers_scheduler(name: str, config: dict):
    """The oracle's own configuration of a sampler ("dpmpp_2m/karras" = with Karras sigmas), from a
    model's scheduler config, as a diffusers user writes it (not taken from our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "ddim": (diffusers.DDIMScheduler, {}),
        "dpmpp_2m/karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }
    cls, kwargs = table[name]
    return cls.from_config(config, **kwargs)


def random_openclip_tower(width: int, layers: int, *, seed: int = 0, projection: int | None = None) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's state dict (`transformer.resblocks.N.attn.in_proj_weight`, ...), random
    but well scaled (unit-variance activations, LayerNorms and biases perturbed), as SD2/SDXL files store it."""
    g = torch.Generator().manual_seed(seed)

    def mat(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp**0.5

    def vec(n: int, mean: float = 0.0, std: float = 0.1) -> torch.Tensor:
        return mean + std * torch.randn(n, generator=g)

    sd = {
        "token_embedding.weight": torch.randn(49408, width, generator=g),
        "positional_embedding": torch.randn(77, width, generator=g),
        "ln_final.weight": vec(width, 1.0, 0.2),
        "ln_final.bias": vec(width),
        "logit_scale": torch.tensor(4.6052),
        "text_projection": mat(width, projection or width),  # [width, proj]: x @ P
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        sd.update({
            b + "ln_1.weight": vec(width, 1.0, 0.2), b + "ln_1.bias": vec(width),
            b + "attn.in_proj_weight": mat(3 * width, width), b + "attn.in_proj_bias": vec(3 * width),
            b + "attn.out_proj.weight": mat(width, width), b + "attn.out_proj.bias": vec(width),
            b + "ln_2.weight": vec(width, 1.0, 0.2), b + "ln_2.bias": vec(width),
            b + "mlp.c_fc.weight": mat(4 * width, width), b + "mlp.c_fc.bias": vec(4 * width),
            b + "mlp.c_proj.weight": mat(width, 4 * width), b + "mlp.c_proj.bias": vec(width),
        })
    return sd


def diffusers_text_model_from_openclip(tower: dict[str, torch.Tensor], prefix: str, *, layers: int, projection: bool):
    """The transformers twin of an OpenCLIP tower, converted by diffusers' own single-file code (the oracle)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width = tower["token_embedding.weight"].shape[1]
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=tower["text_projection"].shape[1], attn_implementation="eager",
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    converted = convert_open_clip_checkpoint(model, {prefix + k: v for k, v in tower.items()}, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 saves CLIPTextModel without text_model.
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    if not projection:
        converted.pop("text_projection.weight", None)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not missing and not [k for k in unexpected if "layers." not in k], (missing, unexpected)
    return model


# --- comparisons shared by the parity tests ---------------------------------------------------------------


def assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, and under each key the same tensor (bitwise): never paired up by position."""
    assert a.keys() == b.keys(), f"only in the first: {sorted(a.keys() - b.keys())[:5]}, only in the second: {sorted(b.keys() - a.keys())[:5]}"
    unequal = [k for k in a if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:5]}"


def diffusers_latents_and_pixels(reference, prompt: str, **kwargs):
    """Run a diffusers pipeline to PIL images, its own output path (VAE decode, `postprocess`,
    `numpy_to_pil`'s `(image * 255).round()`), and catch its final latents on the way (the last
    `callback_on_step_end`). Returns (latents [N, 4, h, w], pixels uint8 [N, H, W, 3])."""
    import numpy as np

    seen: list[torch.Tensor] = []

    def last_latents(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    images = reference(prompt, output_type="pil", callback_on_step_end=last_latents, **kwargs).images
    return seen[-1], torch.from_numpy(np.stack([np.asarray(image) for image in images]))


# PNG pixels (ours from our latents, diffusers' from its latents, both through their own decode and
# rounding), measured over the SD1/SD2/SDXL pipeline tests at 64x64, 64x96 and 96x64: at most 1/255
# apart, in at most 0.024 % of the values (0-4 values per image; float noise in the latents flips a
# value sitting at a .5 boundary). Rounding down instead of to nearest differs in ~48 % of the values.
PIXEL_MAX_DIFF = 1
PIXEL_MAX_FRACTION_DIFFERENT = 1e-3


def assert_pixels_match(ours: torch.Tensor, expected: torch.Tensor, label: str = "") -> None:
    assert ours.dtype == expected.dtype == torch.uint8 and ours.shape == expected.shape, (ours.shape, expected.shape)
    diff = (ours.int() - expected.int()).abs()
    fraction = (diff > 0).double().mean().item()
    print(f"\n{label} pixels: max diff {diff.max().item()}/255, {fraction:.4%} of values differ", end="")
    assert diff.max().item() <= PIXEL_MAX_DIFF, f"{label}: PNG pixels differ by up to {diff.max().item()}/255"
    assert fraction <= PIXEL_MAX_FRACTION_DIFFERENT, f"{label}: {fraction:.2%} of PNG pixel values differ"


# Latents after a whole sampling loop, ours vs diffusers (fp32, one thread). The error is float32
# noise of the loop's arithmetic, roughly the same size everywhere in a latent rather than relative to
# each element. Measured max abs error (over every pipeline parity test of the family; random-weight
# latents reach |x| ~ 30-56 in SD1/SDXL, ~3-4 in SD2):
#   SD1  8.0e-5 (at |x| ~ 51, dpmpp_2m/karras), 3.5e-5 where |x| < 1 (dpmpp_2m_sde);
#   SD2  1.1e-5 (euler, |x| < 1);
#   SDXL 5.7e-5 (at |x| ~ 51), 2.4e-5 where |x| < 1.
# With these tolerances the worst test uses 55 % of its bound (SD1 dpmpp_2m_sde), most 20-35 %.
LATENT_TOL = {
    "sd1": dict(atol=1e-4, rtol=5e-6),
    "sd2": dict(atol=3e-5, rtol=5e-6),
    "sdxl": dict(atol=1e-4, rtol=5e-6),
}


def assert_latents_match(ours: torch.Tensor, expected: torch.Tensor, family: str, label: str = "") -> None:
    tol = LATENT_TOL[family]
    err = (ours - expected).abs()
    used = (err / (tol["atol"] + tol["rtol"] * expected.abs())).max().item()
    print(f"\n{label} latents: max abs err {err.max().item():.2e} (max |latent| {expected.abs().max().item():.1f}), "
          f"{used:.0%} of the tolerance", end="")
    torch.testing.assert_close(ours, expected, **tol, msg=lambda m: f"{label}: {m}")


def unet_pair(config, seed: int = 0):
    """(ours, diffusers') U-Nets of `config` (an ldm UNetConfig) with the same random weights: diffusers'
    init, every tensor then moved by noise (no identity norms, no zero convolutions); eval, fp32."""
    from diffusers import UNet2DConditionModel

    from ldmcli.keymap.unet import unet_config_to_diffusers, unet_diffusers_to_ldm
    from ldmcli.models.unet import UNetModel

    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**unet_config_to_diffusers(config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    with torch.device("meta"):
        ours = UNetModel(config)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), config), strict=True, assign=True)
    return ours.eval(), ref
