"""SDXL base and Turbo: both text encoders, the U-Net's vector conditioning, detection of real
layouts, and whole-pipeline parity with diffusers' StableDiffusionXLPipeline.

Oracles: transformers' CLIP models (bigG filled by diffusers' own OpenCLIP converter), diffusers'
UNet2DConditionModel with `added_cond_kwargs`, StableDiffusionXLPipeline (from the folder, and
`from_single_file(config=folder)` for single files). Tolerances: fp32; latents within
sd_fixtures.LATENT_TOL and PNG pixels (diffusers' own output_type="pil") within sd_fixtures'
measured bounds, U-Net outputs UNET_TOL, text encoders 1e-5. The pipeline parity runs at a
non-square size, where a height/width swap in the size conditioning changes the image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmcli import pipeline, text_conditioning
from ldmcli.request import ImageRequest
from ldmcli.conditioning import SizeConditioning, sdxl_vector
from ldmcli.detect import detect_spec
from ldmcli.errors import UnsupportedModelError
from ldmcli.keymap.clip import clip_hf_to_canonical, clip_openclip_to_canonical
from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
from ldmcli.layout import Components, split_single_file
from ldmcli.models.clip import CLIPTextModel, clip_config_from_shapes
from ldmcli.models.unet import UNetModel
from ldmcli.models.vae import AutoencoderKL
from ldmcli.tokenizer import PromptTokenizer
from sd_fixtures import (  # noqa: E402
    MANIFESTS,
    SDXL_SCHEDULER_CONFIG,
    SDXL_TURBO_SCHEDULER_CONFIG,
    TINY_SDXL_TIME_DIM,
    TINY_SDXL_UNET,
    assert_latents_match,
    assert_pixels_match,
    assert_state_dicts_equal,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
    diffusers_scheduler,
    diffusers_text_model_from_openclip,
    ldm_sdxl_single_file_state_dict,
    random_openclip_tower,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
SEED = 1234
# U-Net with the vector conditioning, fp32: measured max abs err 0 (bit-identical, |out| ~ 2).
UNET_TOL = dict(atol=1e-6, rtol=1e-6)
PROMPTS = ["a photo of a cat", "", " ".join(f"word{i}" for i in range(100))]


pytestmark = pytest.mark.usefixtures("one_thread")


def _ours(sd: dict, act: str) -> CLIPTextModel:
    config = clip_config_from_shapes({k: v.shape for k, v in sd.items()}, activation=act)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# --- text encoders ----------------------------------------------------------------------------------


@torch.no_grad()
def test_bigg_tower_hidden_and_pooled_parity():
    """OpenCLIP bigG under `conditioner.embedders.1.model.`: penultimate hidden states (raw) and the
    pooled EOS state through the transposed text_projection, vs CLIPTextModelWithProjection."""
    tower = random_openclip_tower(128, 3, seed=5, projection=96)
    reference = diffusers_text_model_from_openclip(tower, "conditioner.embedders.1.model.", layers=3, projection=True)
    ours = _ours(clip_openclip_to_canonical(tower, keep_projection=True), "gelu")
    ids = PromptTokenizer(pad_token_id=0)(PROMPTS)
    ref = reference(ids, output_hidden_states=True)
    out = ours(ids)
    errors = {}
    for name, got, want in (("penultimate", out.penultimate, ref.hidden_states[-2]), ("pooled", out.pooled, ref.text_embeds)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        errors[name] = (got - want).abs().max().item()
    print(f"\nbigG tower max abs err {errors}")
    assert out.pooled.shape == (3, 96)


@torch.no_grad()
def test_clip_l_penultimate_parity():
    """SDXL's first encoder: CLIP ViT-L's raw penultimate hidden states (no final LN)."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel

    torch.manual_seed(0)
    reference = HFModel(HFConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=2,
                                 hidden_act="quick_gelu", attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = _ours(clip_hf_to_canonical(reference.state_dict()), "quick_gelu")
    ids = PromptTokenizer()(PROMPTS)
    want = reference(ids, output_hidden_states=True).hidden_states[-2]
    got = ours(ids).penultimate
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    print(f"\nCLIP-L penultimate max abs err {(got - want).abs().max().item():.2e}")


# --- U-Net with the added (micro-)conditioning -----------------------------------------------------


@torch.no_grad()
def test_unet_vector_conditioning_matches_diffusers_add_time_ids():
    """Our y = [pooled | size sinusoids] through label_emb == diffusers' text_embeds + time_ids."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY_SDXL_UNET).eval()
    g = torch.Generator().manual_seed(1)
    for p in ref.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    config = unet_config_from_diffusers(ref.config)
    with torch.device("meta"):
        ours = UNetModel(config)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), config), strict=True, assign=True)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([999.0, 321.5])
    ctx = torch.randn(2, 7, 192, generator=g)
    pooled = torch.randn(2, 64, generator=g)
    sizes = SizeConditioning(original_size=(96, 80), crop_top_left=(8, 16), target_size=(64, 96))
    time_ids = torch.tensor([[96, 80, 8, 16, 64, 96]] * 2, dtype=torch.float32)
    want = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours(x, t, ctx, y=sdxl_vector(pooled, sizes, TINY_SDXL_TIME_DIM))
    torch.testing.assert_close(got, want, **UNET_TOL)
    print(f"\nSDXL U-Net with y: max abs err {(got - want).abs().max().item():.2e}")
    # the size conditioning is not a no-op: another crop changes the output
    other = ours(x, t, ctx, y=sdxl_vector(pooled, SizeConditioning.for_image(64, 96), TINY_SDXL_TIME_DIM))
    assert (other - got).abs().max() > 1e-3
    assert SizeConditioning.for_image(64, 96).ids() == [64, 96, 0, 0, 64, 96]  # (h, w), crop (top, left), (h, w)


# --- real checkpoint layouts (shapes only) -------------------------------------------------------------


def _module_shapes(cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _check_real_sdxl(spec, components) -> None:
    assert spec.family == "sdxl" and spec.scale_factor == 0.13025 and spec.native_size == 1024
    assert spec.unet.transformer_depth == (0, 2, 10) and spec.unet.middle_transformer_depth == 10
    assert spec.unet.context_dim == 2048 and spec.unet.adm_in_channels == 2816 and spec.unet.head_dim == 64
    assert spec.addition_time_embed_dim == 256 and spec.zero_empty_negative and spec.vae_fp16_unsafe
    assert (spec.text_encoder.width, spec.text_encoder.layers, spec.text_encoder.activation) == (768, 12, "quick_gelu")
    assert (spec.text_encoder_2.width, spec.text_encoder_2.layers, spec.text_encoder_2.activation) == (1280, 32, "gelu")
    assert spec.text_encoder_2.projection_dim == 1280 and (spec.pad_token_id, spec.pad_token_id_2) == (49407, 0)
    assert _module_shapes(UNetModel, spec.unet) == _shapes(components.unet)
    assert _module_shapes(AutoencoderKL, spec.vae) == _shapes(components.vae)
    assert _module_shapes(CLIPTextModel, spec.text_encoder) == _shapes(components.text_encoder)
    assert _module_shapes(CLIPTextModel, spec.text_encoder_2) == _shapes(components.text_encoder_2)


def test_sdxl_single_file_every_key_accounted_for():
    shapes = json.loads((MANIFESTS / "sdxl-single-file.json").read_text())
    components = split_single_file({k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()},
                                   Path("sd_xl_base_1.0.safetensors"))
    spec = detect_spec(components)
    _check_real_sdxl(spec, components)
    assert spec.schedule.timestep_spacing == "leading" and not spec.turbo and not spec.notes
    # 2515 = U-Net + VAE + CLIP-L (+ position_ids) + bigG in OpenCLIP names (+ logit_scale);
    # each fused in_proj becomes q/k/v: +2 tensors x (weight, bias) x 32 blocks.
    placed = len(components.unet) + len(components.vae) + len(components.text_encoder) + len(components.text_encoder_2)
    assert placed + 1 + 1 - 32 * 4 == 2515
    turbo = detect_spec(split_single_file({k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()},
                                          Path("sd_xl_turbo_1.0_fp16.safetensors")))
    assert turbo.turbo and turbo.schedule.timestep_spacing == "trailing" and turbo.native_size == 512
    assert turbo.recommended == {"steps": 1, "cfg_scale": 1.0, "sampler": "euler_a", "width": 512, "height": 512}


def test_sdxl_diffusers_folder_every_key_accounted_for():
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm

    folder = json.loads((MANIFESTS / "sdxl-diffusers-folder.json").read_text())
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    meta = {n: {k: torch.empty(s, device="meta") for k, (s, _) in folder[n]["tensors"].items()} for n in names}
    configs = {n: folder[n]["config"] for n in names}
    components = Components(
        layout="diffusers", path=Path("stable-diffusion-xl-base-1.0"),
        unet=unet_diffusers_to_ldm(meta["unet"], unet_config_from_diffusers(configs["unet"])),
        vae=vae_diffusers_to_ldm(meta["vae"], vae_config_from_diffusers(configs["vae"])),
        text_encoder=clip_hf_to_canonical(meta["text_encoder"]),
        text_encoder_2=clip_hf_to_canonical(meta["text_encoder_2"]),
        scheduler_config=folder["scheduler/scheduler_config.json"], configs=configs,
        pipeline_index=folder["model_index.json"],
    )
    spec = detect_spec(components)
    _check_real_sdxl(spec, components)
    assert sum(len(folder[n]["tensors"]) for n in names) == sum(len(t) for t in components.networks.values())


def test_refiner_is_read_and_unclip_is_named():
    """The refiner's lone bigG is read as text_encoder_2 (it loads: tests/test_inpaint_refiner_models.py);
    unCLIP stays refused."""
    base = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
            "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}
    refiner = split_single_file({**base, "conditioner.embedders.0.model.ln_final.bias": torch.zeros(1)}, Path("r.safetensors"))
    assert refiner.text_encoder is None and list(refiner.text_encoder_2) == ["text_model.final_layer_norm.bias"]
    with pytest.raises(UnsupportedModelError, match="unCLIP"):
        split_single_file({**base, "embedder.model.visual.proj": torch.zeros(1)}, Path("u.safetensors"))


# --- whole pipelines against diffusers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(sdxl_folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True, add_watermarker=False)


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return pipeline.load(sdxl_folder)


@pytest.fixture(scope="module")
def sdxl_single_file(ours, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sdxl-single") / "tiny-sdxl-base.safetensors"
    save_file(ldm_sdxl_single_file_state_dict(ours), path)
    return path


def _reference_latents(reference, steps: int, cfg: float, negative: str | None = NEGATIVE) -> torch.Tensor:
    return reference(
        PROMPT, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images


# Not square, both ways: SDXL conditions on (height, width) twice (original and target size), and a
# swap anywhere on the way to diffusers' add_time_ids changes the image.
@pytest.mark.parametrize(
    "sampler_schedule, height, width",
    [("euler", 64, 96), ("euler_a", 64, 96), ("ddim", 64, 96), ("dpmpp_2m/karras", 64, 96), ("euler", 96, 64)],
)
@torch.inference_mode()
def test_images_equal_diffusers(sampler_schedule, height, width, reference, ours):
    sampler, _, spacing = sampler_schedule.partition("/")
    reference.scheduler = diffusers_scheduler(sampler_schedule, SDXL_SCHEDULER_CONFIG)
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, PROMPT, negative_prompt=NEGATIVE, height=height, width=width, num_inference_steps=8,
        guidance_scale=6.0, generator=torch.Generator().manual_seed(SEED),
    )
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=8, cfg_scale=6.0, sampler=sampler, schedule=spacing or None)
    latents = pipeline.sample_latents(ours, request, [SEED])
    label = f"SDXL {sampler_schedule} {height}x{width}"
    assert_latents_match(latents, expected, "sdxl", label)
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, label)


@torch.inference_mode()
def test_empty_negative_prompt_is_zeros(reference, ours):
    """diffusers zeroes the negative embeddings when no negative prompt is given
    (force_zeros_for_empty_prompt); our empty negative prompt does the same."""
    reference.scheduler = diffusers_scheduler("euler", SDXL_SCHEDULER_CONFIG)
    expected = _reference_latents(reference, 5, 6.0, negative=None)
    latents = pipeline.sample_latents(ours, ImageRequest(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, steps=5, cfg_scale=6.0, sampler="euler"), [SEED])
    assert_latents_match(latents, expected, "sdxl", "SDXL empty negative")
    encoded = _reference_latents(reference, 5, 6.0, negative="")  # the "" prompt encoded: a different image
    assert (encoded - expected).abs().max() > 1e-3


@torch.inference_mode()
def test_single_file_equals_diffusers_from_single_file(sdxl_single_file, sdxl_folder, ours):
    from diffusers import StableDiffusionXLPipeline

    single = pipeline.load(sdxl_single_file)
    assert single.spec == ours.spec  # same model, same spec, whichever the layout
    reference = StableDiffusionXLPipeline.from_single_file(str(sdxl_single_file), config=str(sdxl_folder),
                                                           local_files_only=True)
    reference.scheduler = diffusers_scheduler("dpmpp_2m/karras", SDXL_SCHEDULER_CONFIG)
    expected = _reference_latents(reference, 6, 6.0)
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, cfg_scale=6.0, sampler="dpmpp_2m", schedule="karras")
    latents = pipeline.sample_latents(single, request, [SEED])
    assert_latents_match(latents, expected, "sdxl", "SDXL single file dpmpp_2m/karras")
    for net in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_state_dicts_equal(getattr(single, net).state_dict(), getattr(ours, net).state_dict())


@torch.inference_mode()
def test_turbo_folder_one_step_no_guidance(tmp_path_factory):
    """An SDXL-Turbo folder (EulerAncestral, trailing): 1 step, CFG 1 (no unconditional pass) ==
    diffusers with guidance_scale=0 (its documented Turbo call)."""
    from diffusers import StableDiffusionXLPipeline

    # laid out like the Hugging Face hub cache, with weights as a variant="fp16" download names them
    folder = tmp_path_factory.mktemp("hub") / "models--stabilityai--sdxl-turbo" / "snapshots" / "0123abc"
    build_tiny_sdxl_pipeline(seed=3, scheduler_config=SDXL_TURBO_SCHEDULER_CONFIG).save_pretrained(folder)
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    turbo = pipeline.load(folder)
    assert turbo.spec.schedule.timestep_spacing == "trailing" and turbo.spec.schedule_source == "scheduler/scheduler_config.json"
    assert turbo.spec.turbo and turbo.spec.recommended["cfg_scale"] == 1.0
    for steps in (1, 4):
        expected = reference(PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=0.0,
                             generator=torch.Generator().manual_seed(SEED), output_type="latent").images
        latents = pipeline.sample_latents(turbo, ImageRequest(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, steps=steps, cfg_scale=1.0, sampler="euler_a"), [SEED])
        assert_latents_match(latents, expected, "sdxl", f"SDXL-Turbo {steps} steps")
    leading = ImageRequest(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, steps=1, cfg_scale=1.0, sampler="euler_a", schedule="leading")  # t=1: the wrong start
    assert (pipeline.sample_latents(turbo, leading, [SEED]) - latents).abs().max() > 1e-2


@torch.inference_mode()
def test_turbo_single_file_by_name(sdxl_single_file, sdxl_folder, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    path = tmp_path / "sd_xl_turbo_1.0_fp16.safetensors"
    path.write_bytes(sdxl_single_file.read_bytes())
    turbo = pipeline.load(path)
    assert turbo.spec.turbo and turbo.spec.schedule.timestep_spacing == "trailing" and turbo.spec.notes
    reference = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_folder), local_files_only=True)
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO_SCHEDULER_CONFIG)
    expected = reference(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    latents = pipeline.sample_latents(turbo, ImageRequest(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, steps=1, cfg_scale=1.0, sampler="euler_a"), [SEED])
    assert_latents_match(latents, expected, "sdxl", "SDXL-Turbo single file")


@torch.inference_mode()
def test_fp16_keeps_the_sdxl_vae_in_fp32(sdxl_folder):
    half = pipeline.load(sdxl_folder, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows in fp16
    pixels = pipeline.decode_latents(half, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert pixels.dtype == torch.uint8 and not half.warnings


def test_missing_bigg_projection_is_refused(sdxl_single_file, tmp_path):
    tensors = {k: v for k, v in load_file(sdxl_single_file).items() if k != "conditioner.embedders.1.model.text_projection"}
    path = tmp_path / "noproj.safetensors"
    save_file(tensors, path)
    with pytest.raises(UnsupportedModelError, match="text_projection"):
        pipeline.load(path)


@pytest.mark.parametrize("negative", [NEGATIVE, ""])  # "" conditions on zeros
@torch.inference_mode()
def test_prompts_encoded_up_front_give_the_same_images(sdxl_folder, negative):
    """Both encoders released after the run's prompts are encoded: context, pooled vector and pixels unchanged."""
    model = pipeline.load(sdxl_folder)
    request = ImageRequest(prompt=PROMPT, negative_prompt=negative, width=SIZE, height=SIZE, steps=2, cfg_scale=5.0, sampler="euler")
    before = pipeline.generate(model, request, [SEED])
    text_conditioning.encode_up_front(model, [request])
    assert model.text_encoder is None and model.text_encoder_2 is None
    assert torch.equal(pipeline.generate(model, request, [SEED]), before)
