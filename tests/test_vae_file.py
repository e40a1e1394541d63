"""--vae: a VAE file or folder in place of the model's (`vae_file.read_vae`, `vae_file.replace_vae`).

Oracle: diffusers' pipeline with the VAE swapped in (`StableDiffusionPipeline(..., vae=...)`), the VAE
read by diffusers' own code: `AutoencoderKL.from_single_file(file, config=<the model's vae/>)` (diffusers'
LDM converter) for single files, `AutoencoderKL.from_pretrained(folder)` for folders; its own output path
(output_type="pil"). ldm decodes diffusers' final latents after `replace_vae` + `load_components` with
`decode_latents`. fp32; PNG pixels within sd_fixtures' measured bounds (at most 1/255 apart).

The replacement VAEs are random (norms spread by `_spread_norms`) with the tiny model's structure: the
LDM-named ones are built as ldm's own module (its names are the LDM names, so no key map of ours makes
the test files), the diffusers ones by diffusers.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_fixtures import (
    TINY_VAE,
    _spread_norms,
    assert_pixels_match,
    assert_state_dicts_equal,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
)

from ldmcli import pipeline
from ldmcli.detect import detect_spec
from ldmcli.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from ldmcli.keymap.vae import vae_config_from_diffusers
from ldmcli.layout import read_components
from ldmcli.models.vae import AutoencoderKL as LdmAutoencoderKL
from ldmcli.models.vae import VAEConfig
from ldmcli.vae_file import read_vae, replace_vae

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a blue background"
SIZE = 64
SEED = 77
CPU = torch.device("cpu")


def _ldm_vae_tensors(seed: int, config: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """A random VAE as LDM-named tensors (ldm's module names are the original LDM names)."""
    torch.manual_seed(seed)
    module = LdmAutoencoderKL(config or vae_config_from_diffusers(TINY_VAE))
    _spread_norms(module)
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def _diffusers_vae(seed: int, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_VAE, **config})
    _spread_norms(vae)
    return vae


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One random LDM-named VAE in each single-file container, and a diffusers VAE as a folder and as its
    weights file alone (renamed, without its config)."""
    root = tmp_path_factory.mktemp("vaes")
    tensors = _ldm_vae_tensors(21)
    save_file(tensors, root / "bare.safetensors")
    save_file({"first_stage_model." + k: v for k, v in tensors.items()}, root / "prefixed.safetensors")
    # A training checkpoint as vae-ft-mse-840000-ema-pruned.ckpt is: a state_dict with the EMA bookkeeping
    # and a loss module's tensor beside the weights, and a plain step counter beside the state_dict.
    leftovers = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840001),
                 "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": {**tensors, **leftovers}, "global_step": 840001}, root / "vae.ckpt")
    folder = root / "sd-vae-ft-mse-tiny"
    _diffusers_vae(22).save_pretrained(folder, safe_serialization=True)
    alone = root / "alone"
    alone.mkdir()
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", alone / "renamed-vae.safetensors")
    return {"bare": root / "bare.safetensors", "prefixed": root / "prefixed.safetensors", "ckpt": root / "vae.ckpt",
            "folder": folder, "diffusers-file": alone / "renamed-vae.safetensors", "tensors": tensors}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL diffusers pipeline and its folder (its VAE config: scaling_factor 0.13025, force_upcast)."""
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    reference = build_tiny_sdxl_pipeline()
    reference.save_pretrained(folder, safe_serialization=True)
    return reference, folder


@pytest.fixture(scope="module")
def sd1_reference(tiny_folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True, safety_checker=None)


def _oracle_vae(kind: str, files: dict, model_folder):
    """The replacement VAE as diffusers reads it."""
    from diffusers import AutoencoderKL

    if kind in ("folder", "diffusers-file"):
        return AutoencoderKL.from_pretrained(files["folder"], local_files_only=True)
    return AutoencoderKL.from_single_file(str(files[kind]), config=str(model_folder / "vae"), local_files_only=True)


def _diffusers_with(reference, vae, **kwargs):
    """(final latents, pixels) of the reference pipeline with `vae` in place of its own."""
    swapped = type(reference)(**{**reference.components, "vae": vae})
    swapped.set_progress_bar_config(disable=True)
    return diffusers_latents_and_pixels(swapped, PROMPT, height=SIZE, width=SIZE, num_inference_steps=2,
                                        generator=torch.Generator().manual_seed(SEED), **kwargs)


def _ldm_pixels(model_folder, vae_path, latents, **read):
    components = read_components(model_folder)
    vae = read_vae(vae_path, **read)
    notes = replace_vae(components, vae)
    model = pipeline.load_components(components, device=CPU, dtype=torch.float32)
    return pipeline.decode_latents(model, latents), model, vae, notes


# --- parity --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bare", "prefixed", "folder", "ckpt", "diffusers-file"])
@torch.inference_mode()
def test_sd1_pixels_equal_diffusers_with_the_vae_swapped(kind, files, tiny_folder, sd1_reference):
    latents, expected = _diffusers_with(sd1_reference, _oracle_vae(kind, files, tiny_folder))
    ours, model, vae, notes = _ldm_pixels(tiny_folder, files[kind], latents)
    assert_pixels_match(ours, expected, f"SD1 --vae {kind}")
    # The VAE did change the image (a replace that kept the model's VAE would fail above, and here).
    own = pipeline.decode_latents(pipeline.load_components(read_components(tiny_folder), device=CPU,
                                                           dtype=torch.float32), latents)
    assert (own.int() - ours.int()).abs().gt(1).double().mean() > 0.5
    assert model.spec.scale_factor == 0.18215
    if kind in ("bare", "prefixed", "ckpt"):
        assert_state_dicts_equal(vae.tensors, files["tensors"])
    if kind == "ckpt":  # the training leftovers are ignored, and said
        assert any("1 loss.*, 2 model_ema.*" in n for n in notes), notes
    else:
        assert notes == []


@torch.inference_mode()
def test_sdxl_pixels_equal_diffusers_with_the_fp16_fix_vae(tmp_path, sdxl):
    """A bare single file named as madebyollin's fp16-fix VAE, on SDXL: decoded at SDXL's scale factor
    (the model's), and no longer kept in fp32 under fp16 (its name says it is safe)."""
    reference, folder = sdxl
    path = tmp_path / "sdxl-vae-fp16-fix.safetensors"
    save_file(_ldm_vae_tensors(31), path)
    from diffusers import AutoencoderKL

    oracle = AutoencoderKL.from_single_file(str(path), config=str(folder / "vae"), local_files_only=True)
    latents, expected = _diffusers_with(reference, oracle, guidance_scale=5.0)
    ours, model, vae, notes = _ldm_pixels(folder, path, latents)
    assert_pixels_match(ours, expected, "SDXL --vae fp16-fix")
    assert model.spec.scale_factor == 0.13025 and vae.fp16_safe is True and not model.spec.vae_fp16_unsafe
    assert detect_spec(read_components(folder)).vae_fp16_unsafe  # the model's own VAE is not safe
    assert notes == []


# --- what is the model's, what is the file's -------------------------------------------------------------


def test_scale_factor_belongs_to_the_model(tmp_path, files, tiny_folder, sdxl):
    """A VAE folder's scaling_factor is never used: an SDXL VAE (0.13025) on SD1 decodes at SD1's
    0.18215, an SD1 VAE on SDXL at 0.13025; both allowed with a note that the latent spaces differ."""
    sdxl_vae = tmp_path / "sdxl-vae"
    _diffusers_vae(41, scaling_factor=0.13025, force_upcast=True).save_pretrained(sdxl_vae)
    components = read_components(tiny_folder)
    notes = replace_vae(components, read_vae(sdxl_vae))
    assert detect_spec(components).scale_factor == 0.18215
    assert len(notes) == 1 and "made for SDXL" in notes[0] and "Stable Diffusion 1.x/2.x model" in notes[0]

    components = read_components(sdxl[1])
    notes = replace_vae(components, read_vae(files["folder"]))  # its config says 0.18215
    assert detect_spec(components).scale_factor == 0.13025
    assert len(notes) == 1 and "made for Stable Diffusion 1.x/2.x" in notes[0] and "SDXL model" in notes[0]


def test_fp16_safety_comes_from_the_vae_not_the_models_old_vae(tmp_path, files, sdxl):
    fixed = tmp_path / "fixed"
    _diffusers_vae(42, scaling_factor=0.13025, force_upcast=False).save_pretrained(fixed)
    vae = read_vae(fixed)
    assert vae.fp16_safe is True and "force_upcast false" in vae.fp16_source
    components = read_components(sdxl[1])
    replace_vae(components, vae)
    assert not detect_spec(components).vae_fp16_unsafe
    assert components.configs["vae"]["scaling_factor"] == 0.13025  # still the model's
    # A VAE that says nothing, in place of one that said "safe": the family's rule again (SDXL: unsafe).
    plain = tmp_path / "sdxl_vae.safetensors"
    shutil.copy(files["bare"], plain)
    assert read_vae(plain).fp16_safe is None
    replace_vae(components, read_vae(plain))
    assert detect_spec(components).vae_fp16_unsafe
    # The repository's name in a Hugging Face cache says it too.
    snapshot = tmp_path / "models--madebyollin--sdxl-vae-fp16-fix" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    shutil.copy(files["bare"], snapshot / "sdxl_vae.safetensors")
    cached = read_vae(snapshot / "sdxl_vae.safetensors")
    assert cached.fp16_safe is True and cached.family == "sdxl"


def test_replace_records_the_source_and_a_pipelines_vae_folder_is_a_vae(tiny_folder, files):
    components = read_components(tiny_folder)
    own = read_vae(tiny_folder / "vae")
    assert own.layout == "diffusers"
    assert_state_dicts_equal(own.tensors, components.vae)
    replace_vae(components, read_vae(files["bare"]))
    assert components.sources["vae"] == str(files["bare"])
    assert components.sources["unet"].startswith(str(tiny_folder))


def test_dtype_is_the_files_and_casts_on_request(tmp_path, files):
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in files["tensors"].items()}, half)
    vae = read_vae(half)
    assert vae.dtype == torch.float16 and all(t.dtype == torch.float16 for t in vae.tensors.values())
    cast = read_vae(half, dtype=torch.float32)
    assert cast.dtype == torch.float16 and all(t.dtype == torch.float32 for t in cast.tensors.values())


# --- refused, in one line --------------------------------------------------------------------------------


def test_unknown_keys_are_named(tmp_path, files):
    path = tmp_path / "extra.safetensors"
    save_file({**files["tensors"], "encoder.mystery.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as excinfo:
        read_vae(path)
    assert "unknown keys encoder.mystery.weight" in _one_line(excinfo)


def test_missing_and_wrong_shaped_tensors_are_named(tmp_path, files):
    tensors = dict(files["tensors"])
    del tensors["decoder.up.0.block.0.conv1.weight"]
    save_file(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_vae(tmp_path / "missing.safetensors")
    assert "missing decoder.up.0.block.0.conv1.weight" in _one_line(excinfo)

    tensors = dict(files["tensors"])
    tensors["decoder.mid.attn_1.q.weight"] = torch.ones(64, 64, 3, 3)
    save_file(tensors, tmp_path / "misfit.safetensors")
    with pytest.raises(CheckpointError) as excinfo:
        read_vae(tmp_path / "misfit.safetensors")
    assert "decoder.mid.attn_1.q.weight has shape [64, 64, 3, 3]" in _one_line(excinfo)
    assert "[64, 64, 1, 1]" in str(excinfo.value)


def test_a_vae_of_another_architecture_does_not_fit(tmp_path, tiny_folder):
    """16 latent channels (with quant convs: read, then refused by the model), other widths; and an
    SD3/Flux-style VAE without quant convs, refused when read."""
    base = vae_config_from_diffusers(TINY_VAE)
    cases = {"wide": (VAEConfig(**{**base.__dict__, "ch": 64}), "another architecture"),
             "sixteen": (VAEConfig(**{**base.__dict__, "z_channels": 16, "embed_dim": 16}), "16 latent channels")}
    for name, (config, expected) in cases.items():
        save_file(_ldm_vae_tensors(51, config), tmp_path / f"{name}.safetensors")
        vae = read_vae(tmp_path / f"{name}.safetensors")
        components = read_components(tiny_folder)
        own = dict(components.vae)
        with pytest.raises(UnsupportedModelError) as excinfo:
            replace_vae(components, vae)
        assert expected in _one_line(excinfo)
        assert components.vae.keys() == own.keys() and all(components.vae[k] is own[k] for k in own)  # untouched
    flux = {k: v for k, v in _ldm_vae_tensors(52, cases["sixteen"][0]).items() if "quant_conv" not in k}
    save_file(flux, tmp_path / "ae.safetensors")
    with pytest.raises(UnsupportedModelError) as excinfo:
        read_vae(tmp_path / "ae.safetensors")
    assert "16 latent channels, no quant_conv/post_quant_conv (an SD3 or Flux VAE?)" in _one_line(excinfo)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_wanting_code_is_refused(tmp_path, files, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": files["tensors"], "callback": _Payload()}, path)
    with pytest.raises(CheckpointError) as excinfo:
        read_vae(path)
    assert "refused to unpickle" in _one_line(excinfo) and "print" in str(excinfo.value)
    assert "must never run" not in capsys.readouterr().out


def test_what_is_not_a_vae_file_is_refused(tmp_path, tiny_single_file, tiny_folder, files):
    cases = [
        (tiny_single_file, UnsupportedModelError, "a whole Stable Diffusion checkpoint, not a VAE file: give it as -m"),
        (tiny_folder, UnsupportedModelError, f"give its VAE folder, {tiny_folder / 'vae'}, as --vae"),
        (tmp_path / "nothing.safetensors", ModelNotFoundError, "no such VAE file or folder"),
        (tmp_path / "vae.onnx", CheckpointError, "unknown weights format '.onnx'"),
    ]
    (tmp_path / "vae.onnx").write_bytes(b"\0" * 16)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, lora)
    cases.append((lora, UnsupportedModelError, "a LoRA, not a VAE file"))
    both = tmp_path / "both.safetensors"
    save_file({**files["tensors"], "first_stage_model.quant_conv.bias": torch.ones(8)}, both)
    cases.append((both, CheckpointError, "both bare (decoder.conv_in.bias) and under 'first_stage_model.' (first_stage_model.quant_conv.bias)"))
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    cases.append((empty, CheckpointError, "a folder without a VAE"))
    for path, error, expected in cases:
        with pytest.raises(error) as excinfo:
            read_vae(path)
        assert expected in _one_line(excinfo), (path, str(excinfo.value))


def test_a_vae_given_as_the_model_points_at_vae(tmp_path, files):
    leftovers = tmp_path / "with-leftovers.safetensors"
    save_file({**load_file(files["prefixed"]), "model_ema.decay": torch.tensor(0.9999)}, leftovers)
    for path in (files["bare"], files["prefixed"], leftovers, files["folder"], files["diffusers-file"]):
        with pytest.raises(UnsupportedModelError) as excinfo:
            read_components(path)
        assert "a VAE alone, not a full model: give it as --vae" in _one_line(excinfo), path
