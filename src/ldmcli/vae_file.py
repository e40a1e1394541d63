"""A VAE given on its own (`--vae`): read it under canonical LDM names, and put it in a model's place.

What `read_vae` reads, told apart by what the path is and by the key names:

- single files in the original LDM layout, `.safetensors` or a pickle (`.ckpt`/`.pt`/`.pth`/`.bin`, read
  with weights_only=True, a training checkpoint's `state_dict` unwrapped): bare `encoder.`/`decoder.`/
  `quant_conv.`/`post_quant_conv.` keys (`vae-ft-mse-840000-ema-pruned`, `sdxl_vae.safetensors`, the
  fp16-fix VAE's `sdxl.vae.safetensors`), or the same under `first_stage_model.` (a VAE cut out of a
  checkpoint with its prefix kept);
- diffusers `AutoencoderKL` folders (`config.json` + `diffusion_pytorch_model.safetensors`, `.bin`, `.fp16`
  variants or shards): `stabilityai/sd-vae-ft-mse`, `madebyollin/sdxl-vae-fp16-fix`, a pipeline's `vae/`;
- a diffusers-named weights file alone (a folder's weights downloaded and renamed): its structure is read
  from its shapes (from the config.json beside it when it is still in its folder).

Strict, as `layout` is: every key is a VAE tensor, a known training leftover (`loss.*`, `model_ema.*`:
ignored, and said in `notes`), or an error naming it; missing tensors and wrong shapes are named. What is
not a VAE file (a whole checkpoint, a LoRA, a pipeline folder, an SD3/Flux VAE) is refused by `unsupported`.

`replace_vae` swaps a model's VAE tensors for the file's. SD 1.x, 2.x and SDXL VAEs share one architecture;
a VAE of another (other latent channels or scale, other widths) is refused. What is not in the file stays
the model's (decisions, with what they rest on):

- the latent scale factor (0.18215 for SD 1.x/2.x, 0.13025 for SDXL) belongs to the model family: it is
  what the U-Net's latents were scaled by in training. A1111 keeps the model's (`scale_factor` is the
  LatentDiffusion's, a VAE file only replaces first_stage_model's weights), and so does ComfyUI (the
  model's `latent_format`). diffusers takes `pipe.vae.config.scaling_factor`, which is the same thing
  when the VAE was made for the model. A diffusers VAE folder's scaling_factor is therefore never used;
  it only tells which family the VAE was made for.
- an SD 1.x/2.x VAE on SDXL, or SDXL's on SD 1.x/2.x, is allowed (A1111 and ComfyUI allow it; the shapes
  are identical), with a note that their latent spaces differ, when the VAE's config (scaling_factor)
  or its name says which family it was made for.
- whether the VAE is safe to run in fp16: SDXL's VAE overflows in fp16 (`ModelSpec.vae_fp16_unsafe`,
  decoded in fp32), madebyollin's fp16-fix VAE does not. A diffusers config's `force_upcast` says so
  (diffusers' AutoencoderKL docs point at the fp16-fix VAE for `force_upcast=False`); single files
  carry no such field (no standard safetensors metadata key), so a name containing "fp16-fix" (the
  file, its folder, or its Hugging Face repository) counts as saying it. Nothing else is guessed: the
  family's rule applies. A wrong "safe" costs little, because a non-finite decode is redone in fp32
  (`vae_decode`).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmcli.checkpoint import (
    WEIGHT_SUFFIXES,
    read_json,
    read_sharded_or_single,
    read_state_dict,
)
from ldmcli.errors import (
    CheckpointError,
    ModelNotFoundError,
    UnsupportedModelError,
    name_keys,
)
from ldmcli.files import check_regular_file, is_present
from ldmcli.layout import Components, check_structure, check_weights, checked_rename, is_vae_folder
from ldmcli.models.vae import AutoencoderKL, VAEConfig, vae_config_from_shapes
from ldmcli.unsupported import (
    VAE_PREFIX,
    VAE_ROOTS,
    VAE_TRAINING_LEFTOVERS,
    check_supported_vae,
    check_supported_vae_class,
    refuse_pipeline_folder_as_vae,
    refuse_unknown_format,
    refuse_vae_without_quant_convs,
)

# The weights file stems of a diffusers VAE folder, preferred first (as `layout` reads `vae/`).
FOLDER_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")

# Every tensor name an LDM AutoencoderKL has (`models/vae.py`), levels and blocks numbered.
_RESNET = r"(?:norm1|conv1|norm2|conv2|nin_shortcut)"
LDM_VAE_KEY = re.compile(
    r"(?:(?:en|de)coder\.(?:conv_in|conv_out|norm_out"
    rf"|mid\.(?:block_[12]\.{_RESNET}|attn_1\.(?:norm|q|k|v|proj_out))"
    rf"|down\.\d+\.(?:block\.\d+\.{_RESNET}|downsample\.conv)"
    rf"|up\.\d+\.(?:block\.\d+\.{_RESNET}|upsample\.conv))"
    r"|(?:post_)?quant_conv)\.(?:weight|bias)"
)
# diffusers AutoencoderKL names, told apart from LDM names by their block containers.
_DIFFUSERS_KEY = re.compile(r"(?:en|de)coder\.(?:down_blocks|up_blocks|mid_block|conv_norm_out)\.")

# The latent scale factors the families train with (`detect.Family.scale_factor`), for telling which
# family a VAE folder was made for.
_FAMILY_OF_SCALE = {0.18215: "sd", 0.13025: "sdxl"}
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL"}
_FP16_FIX_NAME = re.compile(r"fp16[-_. ]?fix", re.IGNORECASE)
# Names of the VAEs people download for each family (lower case, searched in file/folder/repo names).
_SD_VAE_NAMES = ("vae-ft-mse", "vae-ft-ema", "sd-vae-ft")  # Stability's SD 1.x/2.x VAEs


@dataclass
class VaeFile:
    """A VAE read from a file or folder: its tensors under canonical LDM names, and what it says."""

    path: Path  # what was given
    source: Path  # the weights file read (what A1111's "VAE hash" hashes; a sharded folder: its index)
    layout: str  # "single-file" | "single-file (first_stage_model.)" | "diffusers" | "diffusers-file"
    tensors: dict[str, torch.Tensor]
    config: VAEConfig
    dtype: torch.dtype  # the file's floating-point dtype (the most common one)
    fp16_safe: bool | None = None  # True/False when the file says so (see the module doc), None otherwise
    fp16_source: str = ""  # where fp16_safe came from
    family: str | None = None  # "sd" (SD 1.x/2.x) or "sdxl" when the config or the name says so
    family_source: str = ""
    scaling_factor: float | None = None  # a diffusers config's, never used for decoding (see the module doc)
    notes: list[str] = field(default_factory=list)  # what the user should hear (training leftovers ignored)

    @property
    def name(self) -> str:
        """The VAE's name as A1111 writes it in `VAE: ...` (the file's name; a folder's name)."""
        return self.path.name


def read_vae(path: Path, *, dtype: torch.dtype | None = None) -> VaeFile:
    """Read a VAE file or folder (see the module doc). dtype: cast floating-point tensors to it."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, dtype)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such VAE file or folder")
    check_regular_file(path, CheckpointError)
    if path.suffix not in WEIGHT_SUFFIXES:
        refuse_unknown_format(path)
    if path.name.startswith(FOLDER_STEMS[0]) and is_vae_folder(path.parent):
        return _read_folder(path.parent, dtype, weights=path)  # a diffusers folder's weights: its config says more
    state_dict = read_state_dict(path)
    check_supported_vae(state_dict.keys(), path)
    file_dtype = _file_dtype(state_dict)
    tensors, layout, notes = _strip(path, state_dict)
    if any(_DIFFUSERS_KEY.match(k) for k in tensors):
        config = checked_rename(path, "VAE", _diffusers_config_from_shapes, {k: tuple(t.shape) for k, t in tensors.items()})
        tensors = _from_diffusers(path, tensors, config)
        layout = "diffusers-file"
    vae = _checked(path, path, layout, tensors, file_dtype, dtype)
    vae.notes[:0] = notes
    _says(vae, config={})
    return vae


def _read_folder(folder: Path, dtype: torch.dtype | None, weights: Path | None = None) -> VaeFile:
    """A diffusers AutoencoderKL folder: config.json + its weights (renamed to LDM names)."""
    from ldmcli.keymap.vae import vae_config_from_diffusers

    if is_present(folder / "model_index.json", CheckpointError):
        refuse_pipeline_folder_as_vae(folder)
    config_file = folder / "config.json"
    if not is_present(config_file, CheckpointError):
        raise CheckpointError(f"{folder}: a folder without a VAE (no config.json beside "
                              f"{FOLDER_STEMS[0]}.safetensors)")
    config = check_structure(config_file, read_json(config_file))
    check_supported_vae_class(folder, config.get("_class_name"))
    if config.get("use_quant_conv") is False or config.get("use_post_quant_conv") is False:
        refuse_vae_without_quant_convs(folder, config.get("latent_channels"))
    for key, ours in (("norm_num_groups", 32), ("act_fn", "silu")):
        if config.get(key, ours) != ours:
            raise UnsupportedModelError(f"{config_file}: {key} {config[key]!r}; the VAEs ldm runs have {ours!r}")
    if weights is None:
        tensors, source = read_sharded_or_single(folder, FOLDER_STEMS)
    else:
        tensors, source = read_state_dict(weights), weights
    check_supported_vae(tensors.keys(), source)
    file_dtype = _file_dtype(tensors)
    structure = checked_rename(config_file, "config", vae_config_from_diffusers, config)
    vae = _checked(folder, source, "diffusers", _from_diffusers(source, tensors, structure), file_dtype, dtype)
    _says(vae, config=config)
    return vae


def _strip(path: Path, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The VAE's tensors without a `first_stage_model.` prefix and without training leftovers (counted
    in a note); the layout found."""
    prefixed = [k for k in state_dict if k.startswith(VAE_PREFIX)]
    bare = [k for k in state_dict if k.split(".")[0] in VAE_ROOTS]
    if prefixed and bare:
        raise CheckpointError(f"{path}: VAE tensors both bare ({min(bare)}) and under {VAE_PREFIX!r} "
                              f"({min(prefixed)}): two VAEs in one file?")
    tensors: dict[str, torch.Tensor] = {}
    leftovers: Counter[str] = Counter()
    for key, tensor in state_dict.items():
        name = key.removeprefix(VAE_PREFIX) if prefixed else key
        leftover = next((p for p in VAE_TRAINING_LEFTOVERS if name.startswith(p)), None)
        if leftover is not None:
            leftovers[leftover + "*"] += 1
        else:
            tensors[name] = tensor
    notes = []
    if leftovers:
        counted = ", ".join(f"{n} {what}" for what, n in sorted(leftovers.items()))
        notes.append(f"{path.name}: ignored training leftovers no decoder uses ({counted}), as A1111 does")
    return tensors, "single-file (first_stage_model.)" if prefixed else "single-file", notes


def _from_diffusers(where: Path, tensors: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    from ldmcli.keymap.vae import vae_diffusers_to_ldm

    return checked_rename(where, "VAE", lambda sd: vae_diffusers_to_ldm(sd, config), tensors)


def _diffusers_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    """The structure of diffusers-named VAE tensors, from their shapes (a file without its config.json)."""
    from ldmcli.keymap.vae import vae_config_from_diffusers

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise KeyError(f"cannot infer the VAE's structure: missing key {key!r}")
        return shapes[key]

    widths = []
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in shapes:
        widths.append(shape(f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight")[0])
    layers = 0
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in shapes:
        layers += 1
    return vae_config_from_diffusers({
        "block_out_channels": widths or [shape("encoder.down_blocks.0.resnets.0.conv1.weight")[0]],
        "layers_per_block": layers,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
    })


def _checked(path: Path, source: Path, layout: str, tensors: dict[str, torch.Tensor], file_dtype: torch.dtype,
             dtype: torch.dtype | None) -> VaeFile:
    """A VaeFile of LDM-named tensors that are exactly one AutoencoderKL's: every key known, none missing,
    every shape the one its structure (read from the shapes) calls for."""
    unknown = [k for k in tensors if not LDM_VAE_KEY.fullmatch(k)]
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {name_keys(unknown)} (a VAE file holds encoder.*, decoder.*, "
                              "quant_conv.* and post_quant_conv.*)")
    if "quant_conv.weight" not in tensors and "post_quant_conv.weight" not in tensors:
        conv_in = tensors.get("decoder.conv_in.weight")
        refuse_vae_without_quant_convs(path, conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else None)
    check_weights(source, tensors, "VAE tensor ")
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    for key, shape in shapes.items():  # the shape rule indexes these as convolutions
        if key.endswith(".weight") and "conv" in key and len(shape) != 4:
            raise CheckpointError(f"{path}: VAE tensor {key} has shape {list(shape)}; a convolution's weight has 4 dimensions")
    config = checked_rename(path, "VAE", vae_config_from_shapes, shapes)
    with torch.device("meta"):  # shapes only: no weights allocated or initialised worth speaking of (~15 ms)
        module = checked_rename(path, "VAE", AutoencoderKL, config)
    expected = {k: tuple(t.shape) for k, t in module.state_dict().items()}
    missing, extra = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or extra:
        found = [f"missing {name_keys(missing)}"] * bool(missing) + [f"beyond its structure {name_keys(extra)}"] * bool(extra)
        raise CheckpointError(f"{path}: not a complete VAE: {'; '.join(found)}")
    misfits = sorted(k for k in expected if shapes[k] != expected[k])
    if misfits:
        key, more = misfits[0], len(misfits) - 1
        raise CheckpointError(f"{path}: VAE tensor {key} has shape {list(shapes[key])}, the VAE's structure calls for "
                              f"{list(expected[key])}" + (f" (and {more} more differ)" if more else ""))
    if dtype is not None:
        for key, tensor in tensors.items():
            tensors[key] = tensor.to(dtype)
    return VaeFile(path=path, source=source, layout=layout, tensors=tensors, config=config, dtype=file_dtype)


def _says(vae: VaeFile, *, config: dict) -> None:
    """Fill in what the VAE's config or name says: fp16 safety and the family it was made for."""
    names = _names(vae.path)
    force_upcast = config.get("force_upcast")
    if isinstance(force_upcast, bool):
        vae.fp16_safe, vae.fp16_source = not force_upcast, f"its config.json (force_upcast {str(force_upcast).lower()})"
    elif any(_FP16_FIX_NAME.search(n) for n in names):
        vae.fp16_safe, vae.fp16_source = True, "its name (the fp16-fix VAE)"
    scale = config.get("scaling_factor")
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        vae.scaling_factor = float(scale)
        family = _FAMILY_OF_SCALE.get(round(float(scale), 5))
        if family is not None:
            vae.family, vae.family_source = family, f"its config.json (scaling_factor {scale})"
            return
    lowered = [n.lower() for n in names]
    if any("sdxl" in n or "sd_xl" in n for n in lowered):
        vae.family, vae.family_source = "sdxl", "its name"
    elif any(hint in n for n in lowered for hint in _SD_VAE_NAMES):
        vae.family, vae.family_source = "sd", "its name"


def _names(path: Path) -> list[str]:
    """The names that may say what a VAE is: its own, its folder's (a clone of the repository), and the
    repository's in a Hugging Face cache (`models--madebyollin--sdxl-vae-fp16-fix/snapshots/<commit>/...`)."""
    path = path.absolute()
    names = [path.name, path.parent.name]
    for parent in path.parents:
        if parent.name == "snapshots":
            names.append(parent.parent.name)
            break
    return names


def _file_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in tensors.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


# --- putting it in a model's place ---------------------------------------------------------------------


def replace_vae(components: Components, vae: VaeFile) -> list[str]:
    """Put `vae` in place of the model's VAE, in `components` (tensors, source, the fp16 statement).

    Refuses (UnsupportedModelError, one line) a VAE whose structure differs from the model's: other
    latent channels (SD3/Flux: 16), another scale (the x4 upscaler's VAE: 4), other widths or depths.
    Returns notes for the user: a VAE made for another family, the training leftovers ignored.
    """
    own = checked_rename(components.path, "VAE", vae_config_from_shapes, {k: tuple(t.shape) for k, t in components.vae.items()})
    _check_fits(vae, own)
    notes = list(vae.notes)
    sdxl = components.text_encoder_2 is not None  # the family rule of `detect`: two text encoders are SDXL
    model_family = "sdxl" if sdxl else "sd"
    if vae.family is not None and vae.family != model_family:
        notes.append(
            f"{vae.name}: a VAE made for {FAMILY_NAMES[vae.family]} (by {vae.family_source}) on a "
            f"{FAMILY_NAMES[model_family]} model: their latent spaces differ, so colours and detail may come "
            "out wrong; decoded with the model's own scale factor, as A1111 and ComfyUI do"
        )
    components.vae = vae.tensors
    components.sources["vae"] = str(vae.source)
    # What the model's own VAE said about fp16 (a folder's force_upcast) no longer holds; what this VAE
    # says does. scaling_factor stays the model's.
    config = {k: v for k, v in components.configs.get("vae", {}).items() if k != "force_upcast"}
    if vae.fp16_safe is not None:
        config["force_upcast"] = not vae.fp16_safe
    if config or "vae" in components.configs:
        components.configs["vae"] = config
    return notes


def check_latent_space(path: Path, what: str, channels: int, factor: int, own: VAEConfig) -> None:
    """Refuse (UnsupportedModelError, one line) `what` (a VAE, a TAESD) at `path` whose latents have other
    channels (SD3's and Flux's: 16) or another scale than the model's VAE `own`."""
    if channels != own.embed_dim:
        guess = " (one made for SD3 or Flux?)" if channels == 16 else ""
        raise UnsupportedModelError(f"{path}: {what} with {channels} latent channels{guess}; this model's latents "
                                    f"have {own.embed_dim}")
    if factor != own.downsample_factor:
        raise UnsupportedModelError(f"{path}: {what} that scales images down by {factor}; this model's scales them "
                                    f"by {own.downsample_factor}")


def _check_fits(vae: VaeFile, own: VAEConfig) -> None:
    new = vae.config
    check_latent_space(vae.path, "a VAE", new.embed_dim, new.downsample_factor, own)
    if new != own:
        def describe(c: VAEConfig) -> str:
            widths = ", ".join(str(c.ch * m) for m in c.ch_mult)
            return f"widths {widths}, {c.num_res_blocks} ResNet blocks a level, {c.in_channels}->{c.out_channels} image channels"

        raise UnsupportedModelError(f"{vae.path}: a VAE of another architecture ({describe(new)}) than this "
                                    f"model's ({describe(own)})")
