"""Image inputs at full SD 1.5 size (random weights): img2img, 4-channel inpainting and a 9-channel
inpainting checkpoint, ldm's `img2img.sample_from_image` vs diffusers' pipelines. Minutes; run with -m slow.

tests/test_img2img.py pins every sampler, strength and draw order on tiny models; this file runs the same
code paths through SD 1.5's real architecture (320-1280 channels, 8 heads, 768-wide CLIP, the 4-level
VAE) at 256x256, where the VAE encoder, the mask at latent size and the 9-channel U-Net see real shapes:

- img2img: `StableDiffusionImg2ImgPipeline`, Euler and DPM++ 2M Karras, strength 0.6;
- inpainting with SD 1.5 itself (4 channels, blended after every step): `StableDiffusionInpaintPipeline`,
  Euler, strength 0.6;
- an SD 1.5 inpainting checkpoint (runwayml/stable-diffusion-inpainting's U-Net: SD 1.5's config with
  in_channels=9), saved as a diffusers `StableDiffusionInpaintPipeline` folder, detected by `pipeline.load`,
  sampled vs `StableDiffusionInpaintPipeline` (Euler, strength 1); and the same networks as an original single file
  (model.diffusion_model.input_blocks.0.0.weight [320, 9, 3, 3]) loading to the same tensors.

Same weights on both sides (ldm reads the folder diffusers wrote), fp32, one seed. Memory: at most two
full fp32 copies (~4.3 GB each) at a time: each class's models go when the class ends, the folders are
deleted when the module ends (measured peak RSS 8.8 GiB). Time: ~430 s of CPU (user + system); 9.5 min
of wall time on the 2-core box with other jobs competing for it.
"""

from __future__ import annotations

import resource
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldmcli import img2img, pipeline
from ldmcli.request import ImageRequest
from sd_fixtures import (
    SD15_SCHEDULER_CONFIG,
    _spread_norms,
    assert_latents_match,
    assert_pixels_match,
    assert_state_dicts_equal,
    diffusers_latents_and_pixels,
    ldm_single_file_state_dict,
)
from test_pipeline_full import _sd15_config, sd15_folder  # noqa: F401  (the full-size SD 1.5 folder fixture)

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 256
STEPS = 5
CFG = 7.5
SEED = 1234


def _scheduler(name: str):
    """The oracle's own configuration of each sampler (written here, not taken from our registry)."""
    import diffusers

    table = {
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "dpmpp_2m/karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    }
    cls, kwargs = table[name]
    return cls.from_config(SD15_SCHEDULER_CONFIG, **kwargs)


def _image(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """uint8 [1, H, W, 3]: colour ramps, a bright disc and a little noise."""
    g = torch.Generator().manual_seed(5)
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    base = torch.cat([y.expand(-1, width, 1), x.expand(height, -1, 1), (x + y).expand(height, width, 1) / 2], -1)
    disc = (((y - 0.4) ** 2 + (x - 0.6) ** 2) < 0.05).float()
    image = base * 0.7 + disc * 0.2 + 0.1 * torch.rand(height, width, 3, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)[None]


def _mask(height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    """float [1, 1, H, W]: a rectangle with edges off the 8-pixel grid, soft values on both sides of 0.5
    (binarised by both sides), a small region below 0.5 (kept)."""
    mask = torch.zeros(1, 1, height, width)
    mask[0, :, 37:171, 21:203] = 0.8
    mask[0, :, 190:230, 60:140] = 0.4  # below 0.5: kept
    mask[0, :, 180:187, 150:251] = 1.0
    return mask


def _for_diffusers(image: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1], which diffusers' image processor normalises."""
    return image.permute(0, 3, 1, 2).float() / 255


def _request(sampler: str) -> ImageRequest:
    name, _, spacing = sampler.partition("/")
    return ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                        cfg_scale=CFG, sampler=name, schedule=spacing or None)


def _diffusers(cls, reference, sampler: str):
    parts = {k: v for k, v in reference.components.items() if k != "scheduler"}
    return cls(**parts, scheduler=_scheduler(sampler), requires_safety_checker=False)


def _compare(label: str, theirs, ours, sampler: str, strength: float, mask: torch.Tensor | None) -> None:
    """diffusers' latents and PNG pixels vs ours, for one seed, printed with both tools' times."""
    image = _image()
    kwargs = {} if mask is None else {"mask_image": mask, "height": SIZE, "width": SIZE}
    started = time.perf_counter()
    expected, expected_pixels = diffusers_latents_and_pixels(
        theirs, PROMPT, negative_prompt=NEGATIVE, image=_for_diffusers(image), strength=strength,
        num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), **kwargs)
    diffusers_seconds = time.perf_counter() - started
    started = time.perf_counter()
    latents = img2img.sample_from_image(ours, _request(sampler), [SEED], image, strength=strength, mask=mask)
    pixels = pipeline.decode_latents(ours, latents)
    ours_seconds = time.perf_counter() - started
    print(f"\n{label}: ours {ours_seconds:.1f} s, diffusers {diffusers_seconds:.1f} s", end="")
    assert_latents_match(latents, expected, "sd1", label)
    assert_pixels_match(pixels, expected_pixels, label)


@pytest.fixture(scope="module", autouse=True)
def _report_peak_memory():
    yield
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npeak RSS of this process: {peak_kib / 2**20:.1f} GiB")


@pytest.fixture(scope="module")
def sd15(sd15_folder):  # noqa: F811
    """The full-size SD 1.5 folder (test_pipeline_full's), deleted after the module: 4.3 GB."""
    yield sd15_folder
    shutil.rmtree(sd15_folder, ignore_errors=True)


# --- SD 1.5 itself: img2img and 4-channel inpainting -------------------------------------------------------


# Class-scoped: a class's two models (~8.6 GB) are freed when its last test ends.
@pytest.fixture(scope="class")
def sd15_reference(sd15):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(sd15, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="class")
def sd15_ours(sd15):
    return pipeline.load(sd15)


class TestSD15:
    @pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m/karras"])
    @torch.inference_mode()
    def test_img2img_equals_diffusers(self, sampler, sd15_reference, sd15_ours):
        """5 steps at strength 0.6: the last 3 (DPM++ 2M: first order, second order, first order at the end)."""
        from diffusers import StableDiffusionImg2ImgPipeline

        theirs = _diffusers(StableDiffusionImg2ImgPipeline, sd15_reference, sampler)
        _compare(f"SD 1.5 img2img {SIZE}px {sampler} strength 0.6", theirs, sd15_ours, sampler, 0.6, None)

    @torch.inference_mode()
    def test_inpainting_equals_diffusers(self, sd15_reference, sd15_ours):
        """SD 1.5's own 4-channel U-Net: the kept part replaced by the noised image after every step."""
        from diffusers import StableDiffusionInpaintPipeline

        assert not sd15_ours.spec.inpainting
        theirs = _diffusers(StableDiffusionInpaintPipeline, sd15_reference, "euler")
        _compare(f"SD 1.5 4-channel inpaint {SIZE}px euler strength 0.6", theirs, sd15_ours, "euler", 0.6, _mask())


# --- an SD 1.5 inpainting checkpoint (9-channel U-Net) -----------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_folder(sd15, tmp_path_factory):
    """runwayml/stable-diffusion-inpainting's shape: SD 1.5's VAE and text encoder (those of `sd15`) and a
    random U-Net with SD 1.5's config but 9 input channels, norms given non-trivial gains and biases, saved
    as a diffusers StableDiffusionInpaintPipeline folder."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(3)
    unet = UNet2DConditionModel(**{**_sd15_config("unet"), "in_channels": 9})
    _spread_norms(unet)
    reference = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(sd15, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(sd15, subfolder="text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(sd15, subfolder="tokenizer", local_files_only=True),
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd15-inpainting-random")
    reference.save_pretrained(folder, safe_serialization=True)
    del reference, unet
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="class")
def inpainting_reference(inpainting_folder):
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline.from_pretrained(inpainting_folder, local_files_only=True, safety_checker=None)


@pytest.fixture(scope="class")
def inpainting_ours(inpainting_folder):
    return pipeline.load(inpainting_folder)


class TestInpaintingCheckpoint:
    def test_folder_is_detected_as_inpainting(self, inpainting_reference, inpainting_ours):
        ours = inpainting_ours
        assert inpainting_reference.unet.config.in_channels == 9
        assert ours.spec.inpainting and ours.spec.family == "sd1"
        assert ours.spec.unet.in_channels == 9 and ours.spec.unet.out_channels == 4
        assert ours.spec.display_name.endswith(" Inpainting")
        assert tuple(ours.unet.input_blocks[0][0].weight.shape) == (320, 9, 3, 3)

    @torch.inference_mode()
    def test_inpainting_unet_equals_diffusers(self, inpainting_reference, inpainting_ours):
        """At strength 1 (diffusers' default for inpainting) from pure noise, all 5 steps; the U-Net sees
        [latents | mask | masked-image latents]. Strengths below 1 (the image encoded first): test_img2img."""
        inpainting_reference.scheduler = _scheduler("euler")
        _compare(f"SD 1.5 9-channel inpaint {SIZE}px euler strength 1.0", inpainting_reference, inpainting_ours,
                 "euler", 1.0, _mask())


@torch.inference_mode()
def test_inpainting_single_file_loads_to_the_same_tensors(inpainting_folder, tmp_path):
    """The folder's networks written under the original single file's names (as sd-v1-5-inpainting.ckpt)
    load, detected as inpainting, to bitwise the same tensors."""
    from_folder = pipeline.load(inpainting_folder)
    single = tmp_path / "sd15-inpainting.safetensors"
    save_file(ldm_single_file_state_dict(from_folder), single)
    with safe_open(single, "pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape() == [320, 9, 3, 3]
    try:
        from_file = pipeline.load(single)
        assert from_file.spec.inpainting and from_file.spec.family == "sd1"
        assert from_file.spec.unet == from_folder.spec.unet
        for part in ("unet", "vae", "text_encoder"):
            assert_state_dicts_equal(getattr(from_file, part).state_dict(), getattr(from_folder, part).state_dict())
    finally:
        single.unlink()
