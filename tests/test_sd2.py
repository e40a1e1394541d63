"""Stable Diffusion 2.x: OpenCLIP text tower, detection (incl. the v-prediction guess), and
whole-pipeline parity with diffusers' StableDiffusionPipeline configured for v-prediction.

Oracles: transformers' CLIPTextModel filled by diffusers' own OpenCLIP converter, diffusers'
StableDiffusionPipeline (from the folder, and `from_single_file(config=folder)` for single files).
Tolerances: fp32; latents within sd_fixtures.LATENT_TOL and PNG pixels (diffusers' own
output_type="pil") within sd_fixtures' measured bounds; 1e-5 on the text tower.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline
from ldmcli.request import ImageRequest
from ldmcli.detect import detect_spec
from ldmcli.errors import CheckpointError
from ldmcli.keymap.clip import clip_canonical_to_openclip, clip_openclip_to_canonical
from ldmcli.layout import Components, split_single_file
from ldmcli.models.clip import CLIPTextModel, clip_config_from_shapes
from ldmcli.models.unet import UNetModel
from ldmcli.models.vae import AutoencoderKL
from ldmcli.tokenizer import PromptTokenizer
from sd_fixtures import (  # noqa: E402
    MANIFESTS,
    SD21_SCHEDULER_CONFIG,
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sd2_pipeline,
    diffusers_latents_and_pixels,
    diffusers_scheduler,
    diffusers_text_model_from_openclip,
    ldm_sd2_single_file_state_dict,
    random_openclip_tower,
)

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
SEED = 1234
PROMPTS = ["a photo of a cat", "", " ".join(f"word{i}" for i in range(100))]  # short, empty, truncated


pytestmark = pytest.mark.usefixtures("one_thread")


# --- text encoder ------------------------------------------------------------------------------------


def _ours_from_openclip(tower: dict, *, keep_projection: bool) -> CLIPTextModel:
    sd = clip_openclip_to_canonical(tower, keep_projection=keep_projection)
    config = clip_config_from_shapes({k: v.shape for k, v in sd.items()}, activation="gelu")
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def test_openclip_tower_parity_with_diffusers_converter():
    """SD2's conditioning = the penultimate block, then ln_final; checked against transformers'
    CLIPTextModel filled by diffusers' converter from the same OpenCLIP tensors (fused qkv split there)."""
    tower = random_openclip_tower(128, 4, seed=3)
    reference = diffusers_text_model_from_openclip(tower, "cond_stage_model.model.", layers=4, projection=False)
    ours = _ours_from_openclip(tower, keep_projection=False)
    assert ours.text_projection is None and ours.config.heads == 2
    ids = PromptTokenizer(pad_token_id=0)(PROMPTS)
    ref = reference(ids, output_hidden_states=True)
    final_ln = getattr(reference, "text_model", reference).final_layer_norm
    expected = final_ln(ref.hidden_states[-2])
    got = ours(ids, skip_last_layers=1).hidden_states
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(ids).hidden_states, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    print(f"\nOpenCLIP (SD2) tower: max abs err penultimate+LN {(got - expected).abs().max().item():.2e}")
    # guard: skipping nothing is a different (wrong for SD2) answer
    assert (ours(ids).hidden_states - expected).abs().max() > 1e-2


def test_openclip_key_map_round_trip_and_ignores():
    tower = random_openclip_tower(64, 2, seed=0)
    canonical = clip_openclip_to_canonical(tower, keep_projection=False)
    assert "text_projection.weight" not in canonical  # SD2: unused, dropped explicitly with logit_scale
    assert len(canonical) == 4 + 2 * 16
    with_proj = clip_openclip_to_canonical(tower, keep_projection=True)
    torch.testing.assert_close(with_proj["text_projection.weight"], tower["text_projection"].T)
    back = clip_canonical_to_openclip(with_proj)
    assert back.keys() == tower.keys() - {"logit_scale"}
    assert all(torch.equal(back[k], tower[k]) for k in back)
    with pytest.raises(ValueError, match="transformer.resblocks.0.attn.qkv.weight"):
        clip_openclip_to_canonical({**tower, "transformer.resblocks.0.attn.qkv.weight": torch.zeros(1)}, keep_projection=False)


# --- real checkpoint layouts (shapes only) ---------------------------------------------------------------


def _meta(manifest: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((MANIFESTS / manifest).read_text())
    return {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in shapes.items()}


def _module_shapes(cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def test_sd21_single_file_every_key_accounted_for():
    components = split_single_file(_meta("sd21-single-file.json"), Path("v2-1_768-ema-pruned.safetensors"))
    spec = detect_spec(components)
    assert (spec.family, spec.clip_skip, spec.pad_token_id) == ("sd2", 1, 0)
    assert (spec.text_encoder.width, spec.text_encoder.layers, spec.text_encoder.activation) == (1024, 24, "gelu")
    assert spec.unet.head_dim == 64 and spec.unet.use_linear_projection and spec.unet.context_dim == 1024
    assert spec.unet.upcast_attention
    assert _module_shapes(UNetModel, spec.unet) == _shapes(components.unet)
    assert _module_shapes(AutoencoderKL, spec.vae) == _shapes(components.vae)
    assert _module_shapes(CLIPTextModel, spec.text_encoder) == _shapes(components.text_encoder)
    # 1240 = U-Net + VAE + 294 OpenCLIP tensors (24 blocks x 12 + 4 + text_projection + logit_scale)
    # + 12 schedule buffers. Each fused in_proj becomes 3 tensors: +2 x 2 per block.
    text = len(components.text_encoder) - 24 * 4
    assert len(components.unet) + len(components.vae) + text + 2 + 12 == 1240
    # meta tensors carry no values: the v-prediction statistic cannot be read, and we say so
    assert spec.schedule.prediction_type == "epsilon" and "guess" in spec.prediction_source and spec.notes


def test_sd21_diffusers_folder_every_key_accounted_for():
    from ldmcli.keymap.clip import clip_hf_to_canonical
    from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm

    folder = json.loads((MANIFESTS / "sd21-diffusers-folder.json").read_text())
    meta = {name: {k: torch.empty(s, device="meta") for k, (s, _) in folder[name]["tensors"].items()}
            for name in ("unet", "vae", "text_encoder")}
    configs = {name: folder[name]["config"] for name in ("unet", "vae", "text_encoder")}
    components = Components(
        layout="diffusers", path=Path("stable-diffusion-2-1"),
        unet=unet_diffusers_to_ldm(meta["unet"], unet_config_from_diffusers(configs["unet"])),
        vae=vae_diffusers_to_ldm(meta["vae"], vae_config_from_diffusers(configs["vae"])),
        text_encoder=clip_hf_to_canonical(meta["text_encoder"]),
        scheduler_config=folder["scheduler/scheduler_config.json"], configs=configs,
        pipeline_index=folder["model_index.json"],
    )
    spec = detect_spec(components)
    assert (spec.family, spec.clip_skip, spec.text_encoder.layers) == ("sd2", 0, 23)  # diffusers cut block 24
    assert spec.schedule.prediction_type == "v_prediction" and spec.native_size == 768
    assert spec.prediction_source == "scheduler/scheduler_config.json" and not spec.notes
    assert _module_shapes(UNetModel, spec.unet) == _shapes(components.unet)
    assert _module_shapes(AutoencoderKL, spec.vae) == _shapes(components.vae)
    assert _module_shapes(CLIPTextModel, spec.text_encoder) == _shapes(components.text_encoder)
    assert len(components.unet) == 686 and len(components.vae) == 248 and len(components.text_encoder) == 372


# --- prediction type: what a single file says, or the guess ----------------------------------------------


def _tiny_sd2_components(name: str = "model.safetensors", probe_std: float = 0.2, **extra) -> Components:
    """A tiny SD2 single file's components (random weights), the probe bias set to a given std."""
    tower = random_openclip_tower(64, 2)
    unet_keys = {"input_blocks.0.0.weight": (64, 4, 3, 3), "out.2.weight": (4, 64, 3, 3)}
    state = {"model.diffusion_model." + k: torch.zeros(s) for k, s in unet_keys.items()}
    state["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"] = torch.randn(
        1024, generator=torch.Generator().manual_seed(0)) * probe_std
    state.update({"first_stage_model.decoder.conv_out.bias": torch.zeros(3)})
    state.update({"cond_stage_model.model." + k: v for k, v in tower.items()})
    state.update(extra.pop("tensors", {}))
    return split_single_file(state, Path(name), extra.get("metadata"))


@pytest.mark.parametrize(
    "name, probe_std, extra, expected, source",
    [
        ("v2-1_768-ema-pruned.safetensors", 0.2, {}, "v_prediction", "ComfyUI's rule"),
        ("v2-1_512-ema-pruned.safetensors", 0.03, {}, "epsilon", "ComfyUI's rule"),
        ("model.safetensors", 0.03, {"tensors": {"v_pred": torch.tensor([])}}, "v_prediction", "'v_pred' marker"),
        ("model.safetensors", 0.2, {"metadata": {"modelspec.prediction_type": "epsilon"}}, "epsilon", "modelspec.prediction_type"),
        ("sd_turbo.safetensors", 0.2, {}, "epsilon", "SD-Turbo"),
    ],
)
def test_single_file_prediction_rules(name, probe_std, extra, expected, source):
    from ldmcli.detect import _prediction, SD2, _says_turbo

    components = _tiny_sd2_components(name, probe_std, **extra)
    notes: list[str] = []
    got, how = _prediction(components, SD2, _says_turbo(components), None, notes)
    assert (got, source in how) == (expected, True), how
    if "rule" in source:  # a guess from the weights is explained to the user
        assert notes and "ComfyUI" in notes[0] and f"{probe_std:.1f}"[:3] in notes[0]
    override, how = _prediction(components, SD2, False, "v" if expected == "epsilon" else "eps", [])
    assert override != expected and how == "override"


# --- whole pipelines against diffusers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd2")
    build_tiny_sd2_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def reference(sd2_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd2_folder, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="module")
def ours(sd2_folder):
    return pipeline.load(sd2_folder)


@pytest.fixture(scope="module")
def sd2_single_file(ours, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd2-single") / "tiny-sd21-768-v.safetensors"
    save_file(ldm_sd2_single_file_state_dict(ours), path)
    return path


def _reference_latents(reference, steps: int, cfg: float, negative: str | None = NEGATIVE) -> torch.Tensor:
    return reference(
        PROMPT, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator().manual_seed(SEED), output_type="latent",
    ).images


@pytest.mark.parametrize("sampler_schedule", ["euler", "euler_a", "ddim", "dpmpp_2m/karras"])
@torch.inference_mode()
def test_v_prediction_images_equal_diffusers(sampler_schedule, reference, ours):
    assert ours.spec.family == "sd2" and ours.spec.schedule.prediction_type == "v_prediction"
    sampler, _, spacing = sampler_schedule.partition("/")
    reference.scheduler = diffusers_scheduler(sampler_schedule, SD21_SCHEDULER_CONFIG)
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=8,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED),
    )
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=8, cfg_scale=7.5, sampler=sampler, schedule=spacing or None)
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd2", f"SD2 v-pred {sampler_schedule}")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, f"SD2 v-pred {sampler_schedule}")


@torch.inference_mode()
def test_wrong_prediction_type_is_caught(reference, sd2_folder):
    """Guards the parity test: the same model run as epsilon must not match."""
    eps = pipeline.load(sd2_folder, prediction="eps")
    assert eps.spec.schedule.prediction_type == "epsilon" and eps.spec.prediction_source == "override"
    reference.scheduler = diffusers_scheduler("euler", SD21_SCHEDULER_CONFIG)
    expected = _reference_latents(reference, 4, 7.5)
    latents = pipeline.sample_latents(eps, ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, cfg_scale=7.5, sampler="euler"), [SEED])
    assert (latents - expected).abs().max() > 1e-2


@torch.inference_mode()
def test_single_file_equals_diffusers_from_single_file(sd2_single_file, sd2_folder, ours):
    """An SD 2.x single file (OpenCLIP tower with its 24th-like extra block, v-prediction guessed from
    the weights) against diffusers' own converter configured from the folder."""
    from diffusers import StableDiffusionPipeline

    single = pipeline.load(sd2_single_file)
    spec = single.spec
    assert spec.family == "sd2" and spec.clip_skip == 1 and spec.text_encoder.layers == ours.spec.text_encoder.layers + 1
    assert spec.schedule == ours.spec.schedule and spec.native_size == 768
    assert "ComfyUI" in spec.prediction_source and any("v_prediction" in n for n in spec.notes)
    same = {f.name for f in dataclasses.fields(spec) if f.compare} - {"text_encoder", "clip_skip", "schedule_source"}
    assert all(getattr(spec, n) == getattr(ours.spec, n) for n in same), [n for n in same if getattr(spec, n) != getattr(ours.spec, n)]

    reference = StableDiffusionPipeline.from_single_file(
        str(sd2_single_file), config=str(sd2_folder), local_files_only=True, safety_checker=None
    )
    reference.scheduler = diffusers_scheduler("dpmpp_2m/karras", SD21_SCHEDULER_CONFIG)
    expected = _reference_latents(reference, 6, 7.5)
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=6, cfg_scale=7.5, sampler="dpmpp_2m", schedule="karras")
    latents = pipeline.sample_latents(single, request, [SEED])
    assert_latents_match(latents, expected, "sd2", "SD2 single file dpmpp_2m/karras")
    assert_latents_match(latents, pipeline.sample_latents(ours, request, [SEED]), "sd2", "SD2 single file vs folder")


@torch.inference_mode()
def test_sd_turbo_single_file_one_step(sd2_single_file, sd2_folder, tmp_path):
    """SD-Turbo: Stability's sgm layout (`conditioner.embedders.0.model.`), epsilon, trailing timesteps
    (first step at t=999), no guidance, against diffusers with SD-Turbo's scheduler settings."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    sgm = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
           for k, v in load_file(sd2_single_file).items() if k not in _SCHEDULE_BUFFERS}
    path = tmp_path / "sd_turbo.safetensors"
    save_file(sgm, path)
    turbo = pipeline.load(path)
    spec = turbo.spec
    assert spec.turbo and spec.family == "sd2" and spec.display_name.endswith("Turbo")
    assert spec.schedule.prediction_type == "epsilon" and spec.schedule.timestep_spacing == "trailing"
    assert spec.native_size == 512 and spec.recommended["steps"] == 1 and spec.notes

    reference = StableDiffusionPipeline.from_single_file(
        str(sd2_single_file), config=str(sd2_folder), local_files_only=True, safety_checker=None
    )
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(
        SD21_SCHEDULER_CONFIG, prediction_type="epsilon", timestep_spacing="trailing"
    )
    expected = reference(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=0.0,
                         generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    request = ImageRequest(prompt=PROMPT, negative_prompt="", width=SIZE, height=SIZE, steps=1, cfg_scale=1.0, sampler="euler_a")
    latents = pipeline.sample_latents(turbo, request, [SEED])
    assert_latents_match(latents, expected, "sd2", "SD-Turbo")


_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
}


def test_two_text_encoder_layouts_in_one_file_is_an_error(sd2_single_file, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(sd2_single_file)
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(64)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="two text encoders"):
        pipeline.load(path)


@torch.inference_mode()
def test_fp16_vae_overflow_is_redone_in_fp32(sd2_folder):
    """A decode that overflows fp16 (inf/NaN) is decoded again in fp32, not saved black."""
    half = pipeline.load(sd2_folder, dtype=torch.float16)
    full = pipeline.load(sd2_folder)
    for model in (half, full):  # make the decoder's residual stream exceed fp16's 65504
        with torch.no_grad():
            model.vae.decoder.conv_in.weight.mul_(1e5)
            model.vae.decoder.conv_in.bias.mul_(1e5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = half.vae.decode((latents / half.spec.scale_factor).half())
    assert not torch.isfinite(raw).all()  # the test really overflows
    pixels = pipeline.decode_latents(half, latents.half())
    assert half.warnings and "float32" in half.warnings[0]
    assert next(half.vae.parameters()).dtype == torch.float16  # back to fp16 afterwards
    reference = pipeline.decode_latents(full, latents)
    assert (pixels.int() - reference.int()).abs().max() <= 2  # fp16-rounded weights, fp32 math
    assert pixels.float().std() > 1  # not a flat (black) image
