"""Inpainting checkpoints (9-channel U-Nets: SD 1.5, SD 2.x and SDXL inpainting) and the SDXL refiner
(sd_xl_refiner_1.0: OpenCLIP bigG alone, aesthetic-score conditioning) load, in both layouts, and
compute what diffusers computes.

Oracles: diffusers' UNet2DConditionModel (9 input channels; the refiner's text_time embedding with 5 ids),
StableDiffusionInpaintPipeline.prepare_mask_latents (a white mask over a black image: the masked image is
0 everywhere), StableDiffusionXLImg2ImgPipeline.encode_prompt with `text_encoder=None`. Real sizes: the
key/shape manifests of SD 1.5, SD 2.1 and SDXL (tests/data), the refiner's U-Net built on the meta device
from Stability's sd_xl_refiner.yaml numbers and diffusers' refiner unet/config.json, and its key names
checked by diffusers' own single-file converter.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline, text_conditioning
from ldmcli.conditioning import (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SizeConditioning, sdxl_vector,
                                 vector_conditioning)
from ldmcli.denoiser import CFGDenoiser, Denoiser
from ldmcli.detect import detect_spec
from ldmcli.errors import CheckpointError, UnsupportedModelError
from ldmcli.info import describe_model
from ldmcli.inpaint_model import inpaint_txt2img_conditioning
from ldmcli.keymap.clip import clip_canonical_to_openclip
from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from ldmcli.layout import read_components, split_single_file
from ldmcli.models.unet import UNetModel
from ldmcli.request import ImageRequest
from sd_fixtures import (  # noqa: E402
    MANIFESTS,
    SDXL_SCHEDULER_CONFIG,
    TINY_SD2_UNET,
    TINY_SDXL_TEXT_2,
    TINY_SDXL_UNET,
    TINY_UNET,
    TINY_VAE,
    _spread_norms,
    _tokenizer,
    build_tiny_sd1_pipeline,
    build_tiny_sd2_pipeline,
    build_tiny_sdxl_pipeline,
    ldm_sd2_single_file_state_dict,
    ldm_sdxl_single_file_state_dict,
    ldm_single_file_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# U-Net outputs, fp32, ours vs diffusers' (same weights, same inputs): measured max abs err 0 to ~1e-6.
UNET_TOL = dict(atol=1e-5, rtol=1e-5)
# Text encoders, fp32 (transformers' attention kernel vs ours): measured max abs err ~1e-6.
TEXT_TOL = dict(atol=1e-5, rtol=1e-5)
SIZE = 64


def _load_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# =====================================================================================================
# Inpainting U-Nets
# =====================================================================================================


def build_tiny_inpaint_pipeline(family: str, seed: int = 0):
    """The tiny SD1 / SD2 / SDXL pipeline of sd_fixtures with a 9-channel U-Net, as the diffusers
    inpainting pipeline class its real folder names (runwayml/stable-diffusion-inpainting,
    stabilityai/stable-diffusion-2-inpainting, diffusers/stable-diffusion-xl-1.0-inpainting-0.1)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    base = {"sd1": build_tiny_sd1_pipeline, "sd2": build_tiny_sd2_pipeline, "sdxl": build_tiny_sdxl_pipeline}[family](seed)
    torch.manual_seed(seed + 1)
    unet_config = {"sd1": TINY_UNET, "sd2": TINY_SD2_UNET, "sdxl": TINY_SDXL_UNET}[family]
    unet = UNet2DConditionModel(**{**unet_config, "in_channels": 9})
    _spread_norms(unet)
    parts = dict(base.components, unet=unet)
    if family == "sdxl":
        parts = {k: v for k, v in parts.items() if k not in ("image_encoder", "feature_extractor")}
        return StableDiffusionXLInpaintPipeline(**parts, requires_aesthetics_score=False,
                                                force_zeros_for_empty_prompt=True).to(torch.float32)
    return StableDiffusionInpaintPipeline(**{**parts, "safety_checker": None, "feature_extractor": None},
                                          requires_safety_checker=False).to(torch.float32)


_SINGLE_FILE = {"sd1": ldm_single_file_state_dict, "sd2": ldm_sd2_single_file_state_dict,
                "sdxl": ldm_sdxl_single_file_state_dict}


@pytest.fixture(scope="module")
def inpaint_models(tmp_path_factory):
    """family -> (diffusers pipeline, its folder, the same model as an original-layout single file)."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        reference = build_tiny_inpaint_pipeline(family)
        folder = tmp_path_factory.mktemp(f"tiny-{family}-inpainting")
        reference.save_pretrained(folder, safe_serialization=True)
        single = folder.parent / f"{folder.name}.safetensors"
        save_file(_SINGLE_FILE[family](pipeline.load(folder)), single)
        out[family] = (reference, folder, single)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_inpainting_model_loads_and_says_so(inpaint_models, family, layout):
    reference, folder, single = inpaint_models[family]
    path = folder if layout == "diffusers" else single
    model = pipeline.load(path)
    spec = model.spec
    assert spec.inpainting and spec.unet.in_channels == 9 and spec.unet.out_channels == 4
    assert spec.family == family and spec.display_name.endswith(" Inpainting") and not spec.refiner
    assert spec.recommended == {}  # the family's defaults, unchanged
    assert model.unet.input_blocks[0][0].weight.shape[1] == 9
    described = describe_model(str(path))
    assert described["inpainting"] is True and described["refiner"] is False
    assert described["unet_config"]["in_channels"] == 9 and "masked-image latents" in described["unet_inputs"]
    if layout == "diffusers":
        assert json.loads((folder / "model_index.json").read_text())["_class_name"].endswith("InpaintPipeline")


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_inpainting_unet_matches_diffusers(inpaint_models, family, layout):
    """Our U-Net on [latents | mask | masked-image latents] == diffusers' UNet2DConditionModel on the
    same 9 channels (diffusers' StableDiffusionInpaintPipeline concatenates them in this order)."""
    reference, folder, single = inpaint_models[family]
    ours = pipeline.load(folder if layout == "diffusers" else single)
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 12, generator=g)
    extra = torch.randn(2, 5, 8, 12, generator=g)
    x = torch.cat([latents, extra], dim=1)  # diffusers' order: latents, mask, masked-image latents
    t = torch.tensor([999.0, 321.5])
    ctx = torch.randn(2, 77, ours.spec.unet.context_dim, generator=g)
    kwargs, added = {}, None
    if family == "sdxl":
        pooled = torch.randn(2, ours.spec.text_encoder_2.projection_dim, generator=g)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)}
        kwargs["y"] = vector_conditioning(ours.spec, pooled, 64, 96)
    want = reference.unet(x, t, ctx, added_cond_kwargs=added).sample
    got = ours.unet(x, t, ctx, **kwargs)
    torch.testing.assert_close(got, want, **UNET_TOL)
    print(f"\n{family} inpainting U-Net ({layout}): max abs err {(got - want).abs().max().item():.2e}")


@torch.no_grad()
def test_inpaint_txt2img_conditioning_matches_diffusers_white_mask(inpaint_models):
    """A white mask over a black image (diffusers' inpainting pipelines: masked_image = image * (mask < 0.5)
    is 0 everywhere, A1111's 0.5-gray image after `x * 2 - 1`) gives diffusers' prepare_mask_latents:
    a ones mask and the scaled VAE latents of a 0 image, drawn with the same generator."""
    reference, folder, _ = inpaint_models["sd1"]
    ours = pipeline.load(folder)
    batch, height, width = 2, 64, 96
    image = torch.zeros(1, 3, height, width)  # diffusers' preprocessed black image in [-1, 1] is -1
    mask = torch.ones(1, 1, height, width)
    masked_image = (image * 2 - 1) * (mask < 0.5)
    assert masked_image.abs().max() == 0  # the region to repaint is everything: 0 (mid-gray) in the VAE's range
    want_mask, want_latents = reference.prepare_mask_latents(
        mask, masked_image, batch, height, width, torch.float32, torch.device("cpu"),
        torch.Generator().manual_seed(7), do_classifier_free_guidance=False)
    factor = ours.spec.vae.downsample_factor
    # diffusers' DiagonalGaussianDistribution.sample draws randn_tensor(mean.shape, generator) for the batch of one
    noise = torch.randn((1, 4, height // factor, width // factor), generator=torch.Generator().manual_seed(7))
    got = inpaint_txt2img_conditioning(ours.vae, ours.spec.scale_factor, batch, height, width,
                                       noise=noise.expand(batch, -1, -1, -1))
    assert got.shape == (batch, 5, height // factor, width // factor) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, :1], want_mask)
    torch.testing.assert_close(got[:, 1:], want_latents, atol=1e-5, rtol=1e-5)
    print(f"\nmasked-image latents: max abs err {(got[:, 1:] - want_latents).abs().max().item():.2e}")
    # without noise: the encoder's mean (its mode), what the draw scatters around
    mean = inpaint_txt2img_conditioning(ours.vae, ours.spec.scale_factor, 1, height, width)
    mode = reference.vae.encode(masked_image).latent_dist.mode() * reference.vae.config.scaling_factor
    torch.testing.assert_close(mean[:, 1:], mode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean[:, :1], torch.ones(1, 1, height // factor, width // factor))


@torch.no_grad()
def test_inpaint_txt2img_conditioning_with_a1111_formula(inpaint_models):
    """A1111's txt2img_image_conditioning: a 0.5-gray image in [0, 1], encoded (x * 2 - 1), scaled,
    and F.pad(..., (0, 0, 0, 0, 1, 0), value=1.0): the mask channel first."""
    _, folder, _ = inpaint_models["sdxl"]
    ours = pipeline.load(folder)
    gray = torch.ones(1, 3, 64, 64) * 0.5
    mean, _ = ours.vae.encode(gray * 2 - 1)
    a1111 = torch.nn.functional.pad(mean * ours.spec.scale_factor, (0, 0, 0, 0, 1, 0), value=1.0)
    got = inpaint_txt2img_conditioning(ours.vae, ours.spec.scale_factor, 3, 64, 64)
    assert ours.spec.scale_factor == 0.13025
    torch.testing.assert_close(got, a1111.expand(3, -1, -1, -1))


@pytest.mark.parametrize("manifest", ["sd15-single-file.json", "sd21-single-file.json", "sdxl-single-file.json"])
def test_real_inpainting_single_files_are_detected(manifest):
    """sd-v1-5-inpainting, 512-inpainting-ema and the SDXL inpainting checkpoints are their family's
    files with a [320, 9, 3, 3] conv_in (shapes only: meta tensors)."""
    shapes = json.loads((MANIFESTS / manifest).read_text())
    tensors = {k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()}
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    spec = detect_spec(split_single_file(tensors, Path("inpainting.safetensors")))
    family = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[manifest[:4]]
    assert spec.inpainting and spec.unet.in_channels == 9 and spec.family == family
    assert not spec.refiner and spec.recommended == {}


def test_real_inpainting_diffusers_folder_is_detected():
    """runwayml/stable-diffusion-inpainting: the SD 1.5 folder with unet in_channels 9."""
    from ldmcli.keymap.clip import clip_hf_to_canonical
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm
    from ldmcli.layout import Components

    folder = json.loads((MANIFESTS / "sd15-diffusers-folder.json").read_text())
    meta = {n: {k: torch.empty(s, device="meta") for k, (s, _) in folder[n]["tensors"].items()}
            for n in ("unet", "vae", "text_encoder")}
    meta["unet"]["conv_in.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    configs = {n: folder[n]["config"] for n in ("unet", "vae", "text_encoder")}
    configs["unet"] = {**configs["unet"], "in_channels": 9}
    unet_config = unet_config_from_diffusers(configs["unet"])
    components = Components(
        layout="diffusers", path=Path("stable-diffusion-inpainting"),
        unet=unet_diffusers_to_ldm(meta["unet"], unet_config),
        vae=vae_diffusers_to_ldm(meta["vae"], vae_config_from_diffusers(configs["vae"])),
        text_encoder=clip_hf_to_canonical(meta["text_encoder"]), configs=configs,
        scheduler_config=folder["scheduler/scheduler_config.json"],
        pipeline_index={**folder["model_index.json"], "_class_name": "StableDiffusionInpaintPipeline"},
    )
    spec = detect_spec(components)
    assert spec.inpainting and spec.family == "sd1" and spec.display_name == "Stable Diffusion 1.x Inpainting"


def test_other_channel_counts_stay_refused(inpaint_models, tmp_path):
    """InstructPix2Pix (8 channels) and other inputs are still refused, naming what they are."""
    from safetensors.torch import load_file

    tensors = load_file(inpaint_models["sd1"][2])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    for channels, name in ((8, "an InstructPix2Pix U-Net"), (6, "a 6-channel U-Net")):
        tensors[key] = torch.zeros(tensors[key].shape[0], channels, 3, 3)
        path = tmp_path / f"in{channels}.safetensors"
        save_file(tensors, path)
        with pytest.raises(UnsupportedModelError, match=f": {name} \\({channels} input channels\\)"):
            pipeline.load(path)


# =====================================================================================================
# The SDXL refiner
# =====================================================================================================

# The refiner's structure (sd_xl_refiner.yaml; diffusers' stable-diffusion-xl-refiner-1.0 unet/config.json)
# at tiny widths: 4 levels, attention on the middle two only, the same transformer depth there and in the
# middle block (4 in the real model: `transformer_depth: 4` with attention_resolutions [4, 2]), 64-channel
# heads, linear projections, context = bigG's width alone, y = pooled bigG + 5 sinusoids (original size,
# crop top-left, aesthetic score): 1280 + 5 x 256 = 2560 in the real model.
TINY_REFINER_TIME_DIM = 32
TINY_REFINER_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=2,  # one number, as the real config's 4: the middle block takes it too
    cross_attention_dim=TINY_SDXL_TEXT_2["hidden_size"],
    attention_head_dim=(1, 1, 2, 2),  # diffusers' name for the number of heads: width / 64 (level 0 unused)
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_REFINER_TIME_DIM,
    projection_class_embeddings_input_dim=TINY_SDXL_TEXT_2["projection_dim"] + 5 * TINY_REFINER_TIME_DIM,
    norm_num_groups=32,
)

# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json (the structural entries).
REAL_REFINER_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[6, 12, 24, 24], block_out_channels=[384, 768, 1536, 1536], center_input_sample=False,
    class_embed_type=None, conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05,
    norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2560, sample_size=128,
    transformer_layers_per_block=4, up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True,
)


def build_tiny_refiner_pipeline(seed: int = 0):
    """A diffusers StableDiffusionXLImg2ImgPipeline in the tiny refiner structure, random weights: no
    text_encoder/tokenizer (None: saved as [null, null]), bigG as text_encoder_2, aesthetic scores on."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_REFINER_UNET)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_2))
    _spread_norms(unet, vae, text_encoder_2)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=_tokenizer("!"),
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,  # as the refiner's model_index.json
    ).to(torch.float32)


def ldm_refiner_single_file_state_dict(model) -> dict[str, torch.Tensor]:
    """Our loaded refiner under sd_xl_refiner_1.0's single-file prefixes: bigG in OpenCLIP names as the
    conditioner's first (and only text) embedder, `conditioner.embedders.0.model.`."""
    parts = {"model.diffusion_model.": model.unet, "first_stage_model.": model.vae}
    out = {prefix + k: v.contiguous() for prefix, net in parts.items() for k, v in net.state_dict().items()}
    bigg = clip_canonical_to_openclip({k: v.contiguous() for k, v in model.text_encoder_2.state_dict().items()})
    out.update({"conditioner.embedders.0.model." + k: v.contiguous() for k, v in bigg.items()})
    out["conditioner.embedders.0.model.logit_scale"] = torch.tensor(4.6052)
    return out


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    """(diffusers pipeline, its folder, the same model as an original-layout single file)."""
    reference = build_tiny_refiner_pipeline()
    folder = tmp_path_factory.mktemp("tiny-sdxl-refiner")
    reference.save_pretrained(folder, safe_serialization=True)
    single = folder.parent / "tiny_sd_xl_refiner.safetensors"
    save_file(ldm_refiner_single_file_state_dict(pipeline.load(folder)), single)
    return reference, folder, single


def _path(refiner, layout: str) -> Path:
    return refiner[1] if layout == "diffusers" else refiner[2]


LAYOUTS = ["diffusers", "single-file"]


def test_refiner_folder_is_what_diffusers_saves(refiner):
    _, folder, _ = refiner
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert not (folder / "text_encoder").exists() and (folder / "text_encoder_2").is_dir()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_refiner_loads_as_sdxl_refiner(refiner, layout):
    model = pipeline.load(_path(refiner, layout))
    spec = model.spec
    assert spec.family == "sdxl" and spec.refiner and not spec.inpainting and not spec.turbo
    assert spec.display_name == "Stable Diffusion XL Refiner"
    assert spec.text_encoder is None and model.text_encoder is None and model.tokenizer is None
    assert (spec.text_encoder_2.width, spec.text_encoder_2.projection_dim, spec.text_encoder_2.activation) == (128, 64, "gelu")
    assert spec.pad_token_id_2 == 0 and model.tokenizer_2 is not None and model.text_encoder_2 is not None
    unet = spec.unet
    assert unet.transformer_depth == (0, 2, 2, 0) and unet.middle_transformer_depth == 2 and unet.head_dim == 64
    assert unet.context_dim == 128 and unet.adm_in_channels == 64 + 5 * 32 and spec.addition_time_embed_dim == 32
    assert spec.scale_factor == 0.13025 and spec.vae_fp16_unsafe and spec.native_size == 1024
    assert not spec.zero_empty_negative  # the refiner's force_zeros_for_empty_prompt: false
    assert spec.max_clip_skip == spec.text_encoder_2.layers - 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_refiner_info(refiner, layout):
    described = describe_model(str(_path(refiner, layout)))
    assert described["family"] == "sdxl" and described["refiner"] is True and described["inpainting"] is False
    assert described["name"] == "Stable Diffusion XL Refiner"
    assert "text_encoder_config" not in described and "text_encoder_parameters" not in described
    assert described["text_encoder_2_config"]["width"] == 128 and described["text_encoder_2_parameters"] > 0
    assert "aesthetic score" in described["vector_conditioning"]


@torch.no_grad()
@pytest.mark.parametrize("layout", LAYOUTS)
def test_refiner_unet_matches_diffusers(refiner, layout):
    """Our U-Net with y = [pooled | f(h) f(w) f(top) f(left) f(aesthetic)] == diffusers' with
    text_embeds + the 5 time_ids StableDiffusionXLImg2ImgPipeline._get_add_time_ids builds."""
    reference = refiner[0]
    ours = pipeline.load(_path(refiner, layout))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 24, generator=g)
    t = torch.tensor([999.0, 200.5])
    ctx = torch.randn(2, 77, 128, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    sizes = SizeConditioning(original_size=(128, 192), crop_top_left=(8, 16), aesthetic_score=5.5)
    time_ids = torch.tensor([[128.0, 192, 8, 16, 5.5]] * 2)
    want = reference.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours.unet(x, t, ctx, y=sdxl_vector(pooled, sizes, TINY_REFINER_TIME_DIM))
    torch.testing.assert_close(got, want, **UNET_TOL)
    print(f"\nrefiner U-Net ({layout}): max abs err {(got - want).abs().max().item():.2e}")
    # the aesthetic score is not a no-op
    lower = ours.unet(x, t, ctx, y=sdxl_vector(pooled, SizeConditioning((128, 192), (8, 16), aesthetic_score=2.5),
                                                TINY_REFINER_TIME_DIM))
    assert (lower - got).abs().max() > 1e-3


def test_refiner_time_ids_are_diffusers():
    """vector_conditioning's numbers are _get_add_time_ids' with requires_aesthetics_score: (h, w), (0, 0),
    then 6.0 for the prompt and 2.5 for the negative prompt."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    assert (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE) == tuple(
        inspect.signature(StableDiffusionXLImg2ImgPipeline.__call__).parameters[name].default
        for name in ("aesthetic_score", "negative_aesthetic_score"))
    assert SizeConditioning.for_refiner(64, 96).ids() == [64, 96, 0, 0, 6.0]
    assert SizeConditioning.for_refiner(64, 96, NEGATIVE_AESTHETIC_SCORE).ids() == [64, 96, 0, 0, 2.5]
    assert SizeConditioning.for_image(64, 96).ids() == [64, 96, 0, 0, 64, 96]  # SDXL base unchanged


@torch.no_grad()
@pytest.mark.parametrize("layout", LAYOUTS)
def test_refiner_text_conditioning_matches_encode_prompt(refiner, layout):
    """context = bigG's penultimate hidden states alone, pooled = its projected EOS state: what
    StableDiffusionXLImg2ImgPipeline.encode_prompt gives with text_encoder=None; the empty negative prompt
    is encoded as "" (force_zeros_for_empty_prompt false), not zeroed."""
    reference = refiner[0]
    ours = pipeline.load(_path(refiner, layout))
    for prompt, negative in (("a red circle on a blue background", "blurry"), ("a photo of a cat", "")):
        want = reference.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                       do_classifier_free_guidance=True, negative_prompt=negative)
        cond = text_conditioning.encode_text(ours, [prompt])
        uncond = text_conditioning.encode_text(ours, [negative])
        for label, got, expected in (("context", cond.context, want[0]), ("negative context", uncond.context, want[1]),
                                     ("pooled", cond.pooled, want[2]), ("negative pooled", uncond.pooled, want[3])):
            assert got.shape == expected.shape, (label, got.shape, expected.shape)
            torch.testing.assert_close(got, expected, **TEXT_TOL, msg=lambda m: f"{label}: {m}")
        print(f"\nrefiner text ({layout}, {negative!r}): max abs err "
              f"{max((cond.context - want[0]).abs().max(), (cond.pooled - want[2]).abs().max()).item():.2e}")
        assert cond.context.shape == (1, 77, 128) and cond.pooled.shape == (1, 64)
    request = ImageRequest(prompt="a cat", negative_prompt="", width=SIZE, height=SIZE, steps=4, cfg_scale=5.0,
                           sampler="euler")
    _, uncond_schedule = text_conditioning.request_conditioning(ours, request)
    assert uncond_schedule[0][1].context.abs().max() > 0  # not zeroed


@torch.no_grad()
@pytest.mark.parametrize("layout", LAYOUTS)
def test_refiner_guided_step_matches_diffusers(refiner, layout):
    """One CFG evaluation, cond and uncond batched through our U-Net in one pass though their `y` differ
    (aesthetic score 6.0 vs 2.5), == diffusers' two U-Net calls with add_time_ids / add_neg_time_ids
    guided as StableDiffusionXLImg2ImgPipeline guides them."""
    reference = refiner[0]
    ours = pipeline.load(_path(refiner, layout))
    prompt, negative, scale, height, width = "a red circle", "blurry", 5.0, 64, 96
    cond_text = text_conditioning.encode_text(ours, [prompt])
    uncond_text = text_conditioning.encode_text(ours, [negative])
    cond = {"context": cond_text.context, "y": vector_conditioning(ours.spec, cond_text.pooled, height, width)}
    uncond = {"context": uncond_text.context,
              "y": vector_conditioning(ours.spec, uncond_text.pooled, height, width, negative=True)}
    assert not torch.equal(cond["y"][:, 64:], uncond["y"][:, 64:])  # the aesthetic score's sinusoid differs
    calls = []
    unet = ours.unet

    def counting(x, t, **kwargs):
        calls.append(x.shape[0])
        return unet(x, t, **kwargs)

    denoiser = CFGDenoiser(Denoiser(counting, ours.spec.schedule), cond, uncond, scale)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, height // 8, width // 8, generator=g) * 3.0
    sigma, t = torch.tensor(3.0), torch.tensor(600.0)
    got = denoiser(x, sigma, t=t)
    assert calls == [2]  # one batch of [uncond, cond]

    p, n, pp, npool = reference.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=True, negative_prompt=negative)
    add, add_neg = reference._get_add_time_ids(
        (height, width), (0, 0), (height, width), 6.0, 2.5, (height, width), (0, 0), (height, width),
        dtype=torch.float32, text_encoder_projection_dim=64)
    model_in = x / (sigma**2 + 1) ** 0.5
    eps_c = reference.unet(model_in, t, p, added_cond_kwargs={"text_embeds": pp, "time_ids": add}).sample
    eps_u = reference.unet(model_in, t, n, added_cond_kwargs={"text_embeds": npool, "time_ids": add_neg}).sample
    want = x - sigma * (eps_u + scale * (eps_c - eps_u))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    print(f"\nrefiner CFG x0 ({layout}): max abs err {(got - want).abs().max().item():.2e}")


@pytest.mark.skipif("negative" not in inspect.signature(pipeline.unet_conditioning).parameters,
                    reason="pipeline.unet_conditioning does not take the negative prompt's aesthetic score yet "
                           "(the patch in the issue-18 model-loading report)")
@torch.no_grad()
def test_refiner_guidance_conditioning_through_pipeline(refiner):
    ours = pipeline.load(refiner[1])
    request = ImageRequest(prompt="a cat", negative_prompt="blurry", width=SIZE, height=SIZE, steps=4, cfg_scale=5.0,
                           sampler="euler")
    cond, uncond = pipeline.guidance_conditioning(ours, request, 2)
    c, u = cond.at(0), uncond.at(0)
    assert c["y"].shape == u["y"].shape == (2, 64 + 5 * 32)
    torch.testing.assert_close(c["y"][:, 64:], vector_conditioning(ours.spec, torch.zeros(2, 64), SIZE, SIZE)[:, 64:])
    torch.testing.assert_close(u["y"][:, 64:], vector_conditioning(ours.spec, torch.zeros(2, 64), SIZE, SIZE,
                                                                   negative=True)[:, 64:])
    latents = pipeline.sample_latents(ours, ImageRequest(prompt="a cat", negative_prompt="blurry", width=SIZE,
                                                         height=SIZE, steps=2, cfg_scale=5.0, sampler="euler"), [1])
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@torch.no_grad()
def test_refiner_encodes_up_front_then_releases(refiner):
    ours = pipeline.load(refiner[1])
    request = ImageRequest(prompt="a cat", negative_prompt="", width=SIZE, height=SIZE, steps=4, cfg_scale=5.0,
                           sampler="euler")
    before = text_conditioning.request_conditioning(ours, request)
    assert text_conditioning.text_encoder_bytes(ours) > 0
    text_conditioning.encode_up_front(ours, [request])
    assert ours.text_encoder is None and ours.text_encoder_2 is None
    after = text_conditioning.request_conditioning(ours, request)
    torch.testing.assert_close(after[0][0][1].context, before[0][0][1].context)
    torch.testing.assert_close(after[1][0][1].pooled, before[1][0][1].pooled)
    with pytest.raises(RuntimeError, match="released"):
        text_conditioning.encode_text(ours, ["another prompt"])


def test_refiner_strict_loading_names_unknown_keys(refiner, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(refiner[2])
    tensors["conditioner.embedders.0.model.mystery"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="mystery"):
        pipeline.load(path)


def test_refiner_mismatches_are_refused(refiner, tmp_path):
    """A U-Net vector input that is not pooled + 5 sinusoids, and a model_index.json that says the
    opposite of the weights about aesthetic scores, are refused naming the mismatch."""
    import shutil

    folder = tmp_path / "lying"
    shutil.copytree(refiner[1], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    with pytest.raises(UnsupportedModelError, match="requires_aesthetics_score"):
        detect_spec(read_components(folder, meta=True))
    tensors = ldm_refiner_single_file_state_dict(pipeline.load(refiner[1]))
    key = "model.diffusion_model.label_emb.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 64 + 6 * 32)  # SDXL base's 6 ids beside bigG alone
    with pytest.raises(UnsupportedModelError, match=r"pooled width 64 \+ 5 size/crop/aesthetic-score embeddings"):
        detect_spec(split_single_file(tensors, Path("odd.safetensors")))


def test_sd_turbo_sgm_layout_is_still_sd2():
    """`conditioner.embedders.0.model.` is SD-Turbo's ViT-H too (sgm layout): without vector conditioning
    in the U-Net it stays SD 2.x's first text encoder."""
    shapes = json.loads((MANIFESTS / "sd21-single-file.json").read_text())
    tensors = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): torch.empty(s, device="meta")
               for k, (s, _) in shapes.items()}
    components = split_single_file(tensors, Path("sd_turbo.safetensors"))
    assert components.text_encoder is not None and components.text_encoder_2 is None
    assert detect_spec(components).family == "sd2"


def test_unclip_stays_refused():
    base = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}
    with pytest.raises(UnsupportedModelError, match="unCLIP"):
        split_single_file({**base, "embedder.model.visual.proj": torch.zeros(1)}, Path("u.safetensors"))


# --- the real refiner's shapes (meta device) ---------------------------------------------------------------


def _real_refiner_single_file() -> dict[str, torch.Tensor]:
    """sd_xl_refiner_1.0.safetensors' keys and shapes: its U-Net's LDM names from diffusers' refiner config
    (through our key map, checked against diffusers' own converter below), and SDXL base's VAE and bigG
    (the refiner's are the same networks: sd_xl_refiner.yaml's first_stage_config and FrozenOpenCLIPEmbedder2
    ViT-bigG-14), bigG as the conditioner's first embedder."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_REFINER_UNET)
    ldm = unet_diffusers_to_ldm(unet.state_dict(), unet_config_from_diffusers(REAL_REFINER_UNET))
    shapes = json.loads((MANIFESTS / "sdxl-single-file.json").read_text())
    tensors = {"model.diffusion_model." + k: v for k, v in ldm.items()}
    for key, (shape, _) in shapes.items():
        if key.startswith("first_stage_model."):
            tensors[key] = torch.empty(shape, device="meta")
        elif key.startswith("conditioner.embedders.1.model."):
            tensors[key.replace("embedders.1.", "embedders.0.")] = torch.empty(shape, device="meta")
    return tensors


def test_real_refiner_single_file_detected():
    """The numbers of sd_xl_refiner.yaml: model_channels 384, channel_mult [1, 2, 4, 4], attention at
    ds 2 and 4 with depth 4 (and in the middle block), context 1280, adm_in_channels 2560."""
    tensors = _real_refiner_single_file()
    components = split_single_file(tensors, Path("sd_xl_refiner_1.0.safetensors"))
    assert components.text_encoder is None and components.text_encoder_2 is not None
    spec = detect_spec(components)
    u = spec.unet
    assert spec.family == "sdxl" and spec.refiner and spec.display_name == "Stable Diffusion XL Refiner"
    assert (u.model_channels, u.channel_mult, u.num_res_blocks) == (384, (1, 2, 4, 4), 2)
    assert u.transformer_depth == (0, 4, 4, 0) and u.middle_transformer_depth == 4 and u.output_transformer_depth is None
    assert (u.context_dim, u.adm_in_channels, u.head_dim, u.use_linear_projection) == (1280, 2560, 64, True)
    assert spec.addition_time_embed_dim == 256 and spec.scale_factor == 0.13025
    t2 = spec.text_encoder_2
    assert (t2.width, t2.layers, t2.projection_dim, t2.activation) == (1280, 32, 1280, "gelu")
    for network, cls, config in (("unet", UNetModel, spec.unet),):
        with torch.device("meta"):
            built = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        assert built == {k: tuple(v.shape) for k, v in getattr(components, network).items()}
    # every key placed: U-Net + VAE + bigG (fused in_proj split into q/k/v: +4 per block; logit_scale dropped)
    assert len(components.unet) + len(components.vae) + len(components.text_encoder_2) - 32 * 4 + 1 == len(tensors)


def test_real_refiner_unet_names_are_diffusers_single_file_names():
    """Our LDM names of the refiner U-Net are the ones diffusers' single-file converter reads:
    convert_ldm_unet_checkpoint maps them onto exactly UNet2DConditionModel's keys and shapes."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = unet_config_from_diffusers(REAL_REFINER_UNET)
    with torch.device("meta"):
        ours = UNetModel(config).state_dict()
        reference = UNet2DConditionModel(**REAL_REFINER_UNET).state_dict()
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ours.items()},
                                            dict(REAL_REFINER_UNET))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert unet_ldm_to_diffusers(ours, config).keys() == reference.keys()
    assert "middle_block.1.transformer_blocks.3.attn2.to_k.weight" in ours
    assert "output_blocks.0.1.conv.weight" not in ours and "output_blocks.2.1.conv.weight" in ours  # no attention at ds 8
    assert tuple(ours["label_emb.0.0.weight"].shape) == (1536, 2560)
    assert tuple(ours["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (768, 1280)


@pytest.mark.slow
def test_real_refiner_folder_every_key_accounted_for():
    """stabilityai/stable-diffusion-xl-refiner-1.0 as diffusers saves it: unet/ of the real config, SDXL's
    vae/ and text_encoder_2/ (bigG with projection), no text_encoder/: read by layout into canonical names,
    detected, and the networks we build have exactly those shapes (meta tensors, no weights)."""
    from diffusers import UNet2DConditionModel
    from ldmcli.keymap.clip import clip_hf_to_canonical
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm
    from ldmcli.layout import Components
    from ldmcli.models.clip import CLIPTextModel
    from ldmcli.models.vae import AutoencoderKL

    folder = json.loads((MANIFESTS / "sdxl-diffusers-folder.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL_REFINER_UNET).state_dict()
    meta = {n: {k: torch.empty(s, device="meta") for k, (s, _) in folder[n]["tensors"].items()}
            for n in ("vae", "text_encoder_2")}
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "force_zeros_for_empty_prompt": False,
             "requires_aesthetics_score": True, "text_encoder": [None, None], "tokenizer": [None, None]}
    configs = {"unet": REAL_REFINER_UNET, "vae": folder["vae"]["config"], "text_encoder_2": folder["text_encoder_2"]["config"]}
    components = Components(
        layout="diffusers", path=Path("stable-diffusion-xl-refiner-1.0"),
        unet=unet_diffusers_to_ldm(unet, unet_config_from_diffusers(REAL_REFINER_UNET)),
        vae=vae_diffusers_to_ldm(meta["vae"], vae_config_from_diffusers(configs["vae"])),
        text_encoder=None, text_encoder_2=clip_hf_to_canonical(meta["text_encoder_2"]),
        scheduler_config=folder["scheduler/scheduler_config.json"], configs=configs, pipeline_index=index,
    )
    spec = detect_spec(components)
    assert spec.refiner and spec.unet.transformer_depth == (0, 4, 4, 0) and not spec.zero_empty_negative
    for network, cls, config in (("unet", UNetModel, spec.unet), ("vae", AutoencoderKL, spec.vae),
                                 ("text_encoder_2", CLIPTextModel, spec.text_encoder_2)):
        with torch.device("meta"):
            built = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        assert built == {k: tuple(v.shape) for k, v in getattr(components, network).items()}, network
    parameters = sum(v.numel() for v in components.unet.values())
    print(f"\nSDXL refiner U-Net: {parameters / 1e9:.3f} B parameters")
    assert 2.2e9 < parameters < 2.4e9  # the refiner's U-Net: 2.3 B parameters


def test_sdxl_base_without_clip_l_is_not_a_refiner(tmp_path):
    """An SDXL base file missing its CLIP-L (bigG under `embedders.1.`) is refused as incomplete, not read
    as a refiner."""
    shapes = json.loads((MANIFESTS / "sdxl-single-file.json").read_text())
    tensors = {k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()
               if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(CheckpointError, match="no text encoder weights"):
        split_single_file(tensors, Path("broken.safetensors"))
