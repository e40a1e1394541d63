"""LCM (latent consistency models): the lcm sampler, LCM-distilled U-Nets and their detection, against diffusers.

Oracles: diffusers' `LCMScheduler` (configured here, from the model's scheduler config as a diffusers user
does with `LCMScheduler.from_config(pipe.scheduler.config)`, never from ldm's registry), run in the loop
StableDiffusionPipeline runs; `StableDiffusionPipeline` with `LCMScheduler` swapped in on the tiny SD1 model
(LCM-LoRA's setting: an ordinary U-Net at CFG 1-2); `LatentConsistencyModelPipeline` on a tiny U-Net with a
guidance embedding (time_cond_proj_dim), saved as a diffusers folder and as an LDM single file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import diffusers  # a required oracle: a missing one fails, it never skips
from diffusers.utils.torch_utils import randn_tensor

from ldmcli import pipeline, text_conditioning
from ldmcli.denoiser import CFGDenoiser, Denoiser
from ldmcli.detect import detect_spec
from ldmcli.errors import UnsupportedModelError
from ldmcli.keymap.unet import unet_config_from_diffusers, unet_config_to_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from ldmcli.layout import Components, split_single_file
from ldmcli.lcm import boundary_scalings, embedded_guidance, guidance_embedding, lcm_timesteps
from ldmcli.models.unet import UNetModel, unet_config_from_shapes
from ldmcli.request import ImageRequest
from ldmcli.samplers import SAMPLERS, resolve_sampler_name, sample
from ldmcli.schedule import DiffusionSchedule
from sd_fixtures import (
    MANIFESTS, SD15_SCHEDULER_CONFIG, SD21_SCHEDULER_CONFIG, TINY_TEXT, TINY_UNET, TINY_VAE, _spread_norms,
    assert_latents_match, assert_pixels_match, diffusers_latents_and_pixels, ldm_single_file_state_dict,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

# The oracle: which diffusers scheduler LCM is, and how a diffusers user makes it from a model's config.
DIFFUSERS_LCM = ("LCMScheduler", {})

SHAPE = (2, 4, 8, 8)
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
SEED = 1234
GUIDANCE_DIM = 32  # time_cond_proj_dim of the tiny distilled U-Net (256 in LCM_Dreamshaper_v7)


def _oracle(config: dict):
    cls, kwargs = DIFFUSERS_LCM
    return getattr(diffusers, cls).from_config(config, **kwargs)


class FakeEps(nn.Module):
    """A deterministic nonlinear eps (or v) network of (x, t[, context]), mostly ~x as a real one at high noise."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4321)
        self.w = nn.Parameter(torch.randn(4, 4, 3, 3, generator=g) * 0.3)
        self.p = nn.Parameter(torch.randn(4, 8, generator=g) * 0.5)
        self.seen_t: list[float] = []

    def forward(self, x, t, context=None):
        t = torch.as_tensor(t).float().reshape(-1, 1, 1, 1)
        self.seen_t.append(t.reshape(-1)[0].item())
        h = nn.functional.conv2d(x, self.w, padding=1) * (1 + 0.3 * torch.sin(t / 150)) + 0.2 * torch.cos(t / 70)
        if context is not None:
            h = h + (context.mean(1) @ self.p.T)[:, :, None, None]
        return 0.9 * x + 0.3 * torch.tanh(h)


def _diffusers_loop(config: dict, steps: int, model: nn.Module, seed: int, cond=None, uncond=None, scale=1.0):
    """StableDiffusionPipeline's denoising loop with LCMScheduler (randn * init_noise_sigma, scale_model_input,
    CFG on the network output, step(..., generator=))."""
    sched = _oracle(config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = randn_tensor(SHAPE, generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            if uncond is None:
                out = model(sched.scale_model_input(latents, t), t, context=cond)
            else:
                out_u, out_c = model(sched.scale_model_input(torch.cat([latents] * 2), t), t,
                                     context=torch.cat([uncond, cond])).chunk(2)
                out = out_u + scale * (out_c - out_u)
            latents = sched.step(out, t, latents, generator=g).prev_sample
    return latents


def _ours(config: dict, steps: int, model: nn.Module, seed: int, cond=None, uncond=None, scale=1.0, sampler="lcm"):
    schedule = DiffusionSchedule.from_diffusers_config(config)
    denoiser = Denoiser(model, schedule)
    if cond is not None:
        denoiser = CFGDenoiser(denoiser, cond, uncond, scale)
    g = torch.Generator().manual_seed(seed)
    return sample(sampler, schedule, steps, denoiser, lambda: torch.randn(SHAPE, generator=g))


def _check(ours, ref, label, atol=1e-5):
    err = (ours - ref).abs().max().item()
    print(f"\n{label}: max abs err {err:.2e} (|x| max {ref.abs().max().item():.2f})", end="")
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-5)


# --- the schedule and the step ------------------------------------------------------------------------


def test_timesteps_are_lcm_schedulers_for_every_step_count():
    sched = _oracle(SD15_SCHEDULER_CONFIG)
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        assert lcm_timesteps(steps) == sched.timesteps.tolist(), steps
    assert lcm_timesteps(4) == [999, 759, 499, 259]  # not "trailing"'s 999, 749, 499, 249
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(51)


def test_boundary_scalings_are_lcm_schedulers():
    sched = _oracle(SD15_SCHEDULER_CONFIG)
    for t in (0, 1, 19, 259, 999):
        ours = boundary_scalings(t)
        theirs = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert ours == pytest.approx([float(v) for v in theirs], rel=1e-6, abs=1e-12), t
    assert boundary_scalings(0) == (1.0, 0.0)  # f(x, 0) = x: the consistency boundary condition


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25, 50])
def test_sampler_equals_lcm_scheduler(steps):
    """50 steps end at t=19, where c_skip (~7e-6 scaled, ~7e-4 unscaled) shows in the result."""
    model = FakeEps()
    ref = _diffusers_loop(SD15_SCHEDULER_CONFIG, steps, model, seed=7)
    ref_t = model.seen_t[:]
    model.seen_t.clear()
    _check(_ours(SD15_SCHEDULER_CONFIG, steps, model, seed=7), ref, f"lcm/{steps}")
    assert model.seen_t == ref_t  # the network is fed LCMScheduler's timesteps, call for call


@pytest.mark.parametrize("scale", [1.5, 8.0])
def test_sampler_with_cfg_and_v_prediction(scale):
    """Guidance amplifies float32 noise: at scale 8 ours and diffusers are each ~1e-4 from the same loop in
    float64 (measured 1.3e-4 and 7.4e-5; 5e-7 and 3e-7 at 1.5), so the tolerance grows with the scale."""
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    for config in (SD15_SCHEDULER_CONFIG, SD21_SCHEDULER_CONFIG):
        ref = _diffusers_loop(config, 6, FakeEps(), 11, cond, uncond, scale)
        _check(_ours(config, 6, FakeEps(), 11, cond, uncond, scale), ref,
               f"lcm cfg {scale} {config['prediction_type']}", atol=2e-5 * scale)


def test_fresh_noise_after_the_model_on_every_step_but_the_last():
    schedule = DiffusionSchedule()
    events = []

    def model(x, sigma, t=None):
        events.append(("model", float(t)))
        return torch.zeros_like(x)

    def noise():
        events.append(("noise",))
        return torch.ones(1, 4, 2, 2)

    out = sample("lcm", schedule, 3, model, noise)
    assert events == [("noise",), ("model", 999.0), ("noise",), ("model", 679.0), ("noise",), ("model", 339.0)]
    # x0 = 0 everywhere: each step keeps only c_skip of its input, the last adds no noise
    assert out.abs().max() < 1e-6


def test_names_and_what_lcm_refuses():
    assert resolve_sampler_name("LCM") == resolve_sampler_name("k_lcm") == ("lcm", None)
    assert SAMPLERS["lcm"].display_name == "LCM"
    zero = lambda x, s, t=None: torch.zeros_like(x)  # noqa: E731
    unit = lambda: torch.ones(1, 4, 2, 2)  # noqa: E731
    with pytest.raises(ValueError, match="takes no schedule"):
        sample("lcm", DiffusionSchedule(), 4, zero, unit, spacing="karras")
    with pytest.raises(ValueError, match="1 to 50 steps"):
        sample("lcm", DiffusionSchedule(), 60, zero, unit)
    with pytest.raises(ValueError, match="1000-timestep"):
        sample("lcm", DiffusionSchedule(num_train_timesteps=500), 4, zero, unit)


def test_guidance_embedding_is_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.5, 7.5])
    for dim in (32, 33, 256):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), expected), dim
    assert torch.equal(embedded_guidance(8.5, 2, 32)["timestep_cond"], guidance_embedding(torch.tensor([7.5, 7.5]), 32))


# --- LCM-LoRA's setting: an ordinary SD 1.x model, StableDiffusionPipeline with LCMScheduler ------------


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)


@pytest.mark.parametrize("cfg", [1.0, 1.5])
@torch.inference_mode()
def test_tiny_sd1_images_equal_diffusers_with_lcm_scheduler(cfg, reference, tiny_folder):
    reference.scheduler = _oracle(dict(reference.scheduler.config))
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=4,
        guidance_scale=cfg, generator=torch.Generator().manual_seed(SEED),
    )
    ours = pipeline.load(tiny_folder)
    request = ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=4, cfg_scale=cfg,
                           sampler="LCM").checked()
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", f"lcm cfg {cfg}")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, f"lcm cfg {cfg}")


# --- LCM-distilled U-Nets (time_cond_proj_dim): LatentConsistencyModelPipeline -------------------------


def _lcm_scheduler_config() -> dict:
    """LCM_Dreamshaper_v7's scheduler config: LCMScheduler, SD's betas, 50 original steps, scaling 10."""
    pndm_only = ("skip_prk_steps",)
    return {**{k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in pndm_only}, "_class_name": "LCMScheduler",
            "original_inference_steps": 50, "timestep_scaling": 10.0, "set_alpha_to_one": True}


@pytest.fixture(scope="module")
def distilled_folder(tmp_path_factory):
    """A tiny LCM-distilled SD 1.x model as LCM_Dreamshaper_v7 ships: a LatentConsistencyModelPipeline folder."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from sd_fixtures import DATA

    torch.manual_seed(5)
    unet = UNet2DConditionModel(**TINY_UNET, time_cond_proj_dim=GUIDANCE_DIM)
    vae, text_encoder = AutoencoderKL(**TINY_VAE), CLIPTextModel(CLIPTextConfig(**TINY_TEXT))
    _spread_norms(unet, vae, text_encoder)
    with torch.no_grad():  # a guidance projection that matters: the embedding is O(1), the features too
        unet.time_embedding.cond_proj.weight.normal_(0, 0.5)
    pipe = LatentConsistencyModelPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet, scheduler=LCMScheduler.from_config(_lcm_scheduler_config()),
        tokenizer=CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), model_max_length=77),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float32)
    folder = tmp_path_factory.mktemp("tiny-lcm") / "LCM_tiny"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _distilled_latents(model, cfg: float, steps: int, seeds: list[int]) -> torch.Tensor:
    """What `ldm generate` runs for an LCM-distilled model once the pipeline routes the CFG scale into the
    U-Net (`lcm.embedded_guidance`): one conditional pass with the guidance embedding, the lcm sampler."""
    context = text_conditioning.encode_text(model, [PROMPT] * len(seeds)).context
    cond = {"context": context, **embedded_guidance(cfg, len(seeds), model.spec.unet.time_cond_proj_dim)}
    denoiser = CFGDenoiser(Denoiser(model.unet, model.spec.schedule), cond, None, 1.0)
    noise = pipeline.noise_source(seeds, (4, SIZE // 8, SIZE // 8), model.device, torch.float32)
    return sample("lcm", model.spec.schedule, steps, denoiser, noise)


@pytest.mark.parametrize("cfg, steps", [(8.5, 4), (1.0, 2)])
@torch.inference_mode()
def test_distilled_folder_equals_latent_consistency_pipeline(cfg, steps, distilled_folder):
    from diffusers import LatentConsistencyModelPipeline

    reference = LatentConsistencyModelPipeline.from_pretrained(distilled_folder, local_files_only=True, safety_checker=None)
    expected, expected_pixels = diffusers_latents_and_pixels(
        reference, PROMPT, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=cfg,
        generator=torch.Generator().manual_seed(SEED),
    )
    ours = pipeline.load(distilled_folder)
    latents = _distilled_latents(ours, cfg, steps, [SEED])
    assert_latents_match(latents, expected, "sd1", f"distilled cfg {cfg}")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, f"distilled cfg {cfg}")


@torch.inference_mode()
def test_distilled_single_file_is_the_same_model(distilled_folder, tmp_path):
    """LCM single files keep the guidance projection under its diffusers name beside the LDM keys
    (`model.diffusion_model.time_embedding.cond_proj.weight`, which stable-diffusion.cpp lists to skip)."""
    folder = pipeline.load(distilled_folder)
    path = tmp_path / "LCM_tiny_4k.safetensors"
    state = ldm_single_file_state_dict(folder)
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in state
    save_file(state, path)
    single = pipeline.load(path)
    assert single.spec.unet == folder.spec.unet and single.spec.unet.time_cond_proj_dim == GUIDANCE_DIM
    torch.testing.assert_close(_distilled_latents(single, 8.5, 4, [SEED, 7]), _distilled_latents(folder, 8.5, 4, [SEED, 7]),
                               atol=0, rtol=0)


def test_distilled_detection_and_info(distilled_folder):
    from ldmcli.info import describe_model

    spec = pipeline.load(distilled_folder).spec
    assert spec.lcm and spec.embedded_guidance and spec.display_name == "Stable Diffusion 1.x LCM"
    assert spec.recommended == {"steps": 4, "cfg_scale": 8.5, "sampler": "lcm"}
    shown = describe_model(str(distilled_folder))
    assert shown["lcm"].startswith("LCM-distilled") and shown["unet_config"]["time_cond_proj_dim"] == GUIDANCE_DIM
    assert shown["recommended"]["sampler"] == "lcm" and any("w = CFG scale - 1" in n for n in shown["notes"])


def test_distilled_unet_needs_its_guidance_embedding(distilled_folder):
    model = pipeline.load(distilled_folder)
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([999.0]), torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="timestep_cond"):
        model.unet(x, t, ctx)  # never trained without it: refused, not run as another model
    with pytest.raises(ValueError, match="timestep_cond"):
        UNetModel(dataclasses.replace(model.spec.unet, time_cond_proj_dim=None))(
            x, t, ctx, timestep_cond=torch.zeros(1, GUIDANCE_DIM))


def test_keymap_round_trips_the_guidance_projection():
    config = unet_config_from_diffusers({**TINY_UNET, "time_cond_proj_dim": 256})
    assert config.time_cond_proj_dim == 256
    assert unet_config_to_diffusers(config)["time_cond_proj_dim"] == 256
    shapes = {k: tuple(v.shape) for k, v in UNetModel(config).state_dict().items()}
    assert shapes["time_embedding.cond_proj.weight"] == (32, 256)
    assert unet_config_from_shapes(shapes, num_heads=8) == config
    names = {k: k for k in shapes}
    assert unet_diffusers_to_ldm(unet_ldm_to_diffusers(names, config), config) == names
    assert unet_ldm_to_diffusers(names, config)["time_embedding.cond_proj.weight"] == "time_embedding.cond_proj.weight"
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_config_from_diffusers({**TINY_UNET, "time_cond_proj_dim": "256"})


# --- detection of real-sized LCM checkpoints (manifests: shapes only) ------------------------------------


def _sd15_single_file(name: str, extra: dict | None = None) -> Components:
    shapes = json.loads((MANIFESTS / "sd15-single-file.json").read_text())
    tensors = {k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()}
    tensors.update(extra or {})
    return split_single_file(tensors, Path(name))


@pytest.mark.parametrize("name, lcm", [
    ("AbsoluteReality_LCM.safetensors", True), ("dreamshaper_8LCM.safetensors", True),
    ("LCM_Dreamshaper_v7_4k.safetensors", True), ("lcm-merged.ckpt", True),
    ("v1-5-pruned-emaonly.safetensors", False), ("glcm_texture_v2.safetensors", False), ("lcmx.safetensors", False),
])
def test_lcm_by_name(name, lcm):
    spec = detect_spec(_sd15_single_file(name))
    assert spec.lcm is lcm and not spec.embedded_guidance
    assert spec.recommended == ({"steps": 4, "cfg_scale": 1.0, "sampler": "lcm"} if lcm else {})
    assert spec.display_name.endswith(" LCM") is lcm


def test_real_sized_distilled_single_file():
    """LCM_Dreamshaper_v7's U-Net: SD 1.5's plus a [320, 256] guidance projection (time_cond_proj_dim 256)."""
    extra = {"model.diffusion_model.time_embedding.cond_proj.weight": torch.empty(320, 256, device="meta")}
    components = _sd15_single_file("model.safetensors", extra)
    spec = detect_spec(components)
    assert spec.unet.time_cond_proj_dim == 256 and spec.lcm and spec.embedded_guidance
    assert spec.recommended == {"steps": 4, "cfg_scale": 8.5, "sampler": "lcm"}
    assert len(components.unet) == len(_sd15_single_file("model.safetensors").unet) + 1  # placed, not ignored


def test_lcm_scheduler_config_marks_lcm_and_its_settings_are_checked(tiny_folder):
    """A folder of a model with LCM-LoRA fused in (lykon/dreamshaper-8-lcm): only its scheduler says LCM."""
    from ldmcli.layout import read_components

    components = read_components(tiny_folder, meta=True)
    assert not detect_spec(components).lcm
    marked = dataclasses.replace(components, scheduler_config=_lcm_scheduler_config())
    spec = detect_spec(marked)
    assert spec.lcm and not spec.embedded_guidance and spec.recommended["sampler"] == "lcm"
    assert any("LCMScheduler" in n for n in spec.notes)
    for key, value in (("original_inference_steps", 8), ("timestep_scaling", 5.0)):
        with pytest.raises(UnsupportedModelError, match=key):
            detect_spec(dataclasses.replace(components, scheduler_config={**_lcm_scheduler_config(), key: value}))
