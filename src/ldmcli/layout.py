"""Split a checkpoint into its networks, under our canonical names.

Canonical names: LDM names for the U-Net and VAE (what single files use, prefix stripped) and
HF CLIP names (`text_model.*`) for the text encoder. Two layouts reach this module:

- single files (`.safetensors`/`.ckpt`): one flat dict, networks told apart by prefix;
- diffusers folders: one subfolder per network, diffusers names, renamed by `keymap`.

Every key of the input is either placed, or named in an explicit ignore rule, or an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmcli.checkpoint import (
    WEIGHT_SUFFIXES,
    read_json,
    read_safetensors_metadata,
    read_sharded_or_single,
    read_state_dict,
)
from ldmcli.errors import CheckpointError, ModelNotFoundError, name_keys
from ldmcli.detect import check_supported_single_file

# Single-file prefix -> network.
SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.transformer.": "text_encoder",
}

# LDM training buffers stored beside the weights. `alphas_cumprod` is read; the rest follow from it.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    }
)

# Known extras in the wild that no network uses: EMA copies kept by training runs, and the
# LDM `logvar` buffer some trainers save.
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = frozenset({"logvar", "model_ema.decay", "model_ema.num_updates"})


@dataclass
class Components:
    """The tensors of each network, canonically named, plus what the checkpoint says about sampling."""

    layout: str  # "single-file" | "diffusers"
    path: Path
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    alphas_cumprod: torch.Tensor | None = None
    scheduler_config: dict | None = None
    tokenizer_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # network -> file it came from


def read_components(path: Path, *, meta: bool = False) -> Components:
    """Read a single file or a diffusers folder into canonically named networks.

    meta=True reads shapes only where the format allows (safetensors headers): for `ldm info`.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return read_diffusers_folder(path, meta=meta)
        raise CheckpointError(f"{path}: a folder without a model (no model_index.json or unet/)")
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r} (expected .safetensors or .ckpt)")
    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return split_single_file(read_state_dict(path, meta=meta), path, metadata)


def split_single_file(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Components:
    """Sort an LDM-layout single file's keys into networks by prefix."""
    from ldmcli.keymap.clip import clip_hf_to_canonical

    check_supported_single_file(state_dict.keys(), path)
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in SINGLE_FILE_PREFIXES.values()}
    unknown = []
    for key, tensor in state_dict.items():
        prefix = next((p for p in SINGLE_FILE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            parts[SINGLE_FILE_PREFIXES[prefix]][key[len(prefix):]] = tensor
        elif key in SCHEDULE_BUFFERS or key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {name_keys(unknown)}")
    for name, tensors in parts.items():
        if not tensors:
            raise CheckpointError(f"{path}: no {name} weights (keys under {_prefix_of(name)!r})")
    return Components(
        layout="single-file",
        path=path,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=_named(path, "text encoder", clip_hf_to_canonical, parts["text_encoder"]),
        alphas_cumprod=state_dict.get("alphas_cumprod"),
        metadata=metadata or {},
        sources={name: str(path) for name in parts},
    )


def read_diffusers_folder(folder: Path, *, meta: bool = False) -> Components:
    """Read `unet/`, `vae/`, `text_encoder/` (+ `tokenizer/`, `scheduler/`) of a diffusers pipeline folder."""
    from ldmcli.keymap.clip import clip_hf_to_canonical
    from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm

    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    check_supported_folder(folder, index)
    networks = {}
    sources = {}
    for name, stems in (
        ("unet", ("diffusion_pytorch_model",)),
        ("vae", ("diffusion_pytorch_model",)),
        ("text_encoder", ("model", "pytorch_model")),
    ):
        sub = folder / name
        if not sub.is_dir():
            raise CheckpointError(f"{folder}: missing {name}/ folder")
        tensors, source = read_sharded_or_single(sub, stems, meta=meta)
        networks[name] = tensors
        sources[name] = str(source)

    # The rename tables are generated from the structure the folder's configs describe.
    unet_config = _named(folder / "unet", "config", unet_config_from_diffusers, read_json(folder / "unet" / "config.json"))
    vae_config = _named(folder / "vae", "config", vae_config_from_diffusers, read_json(folder / "vae" / "config.json"))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    tokenizer_dir = folder / "tokenizer"
    return Components(
        layout="diffusers",
        path=folder,
        unet=_named(folder / "unet", "U-Net", lambda sd: unet_diffusers_to_ldm(sd, unet_config), networks["unet"]),
        vae=_named(folder / "vae", "VAE", lambda sd: vae_diffusers_to_ldm(sd, vae_config), networks["vae"]),
        text_encoder=_named(folder / "text_encoder", "text encoder", clip_hf_to_canonical, networks["text_encoder"]),
        scheduler_config=read_json(scheduler_file) if scheduler_file.is_file() else None,
        tokenizer_dir=tokenizer_dir if _has_tokenizer(tokenizer_dir) else None,
        sources=sources,
    )


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def check_supported_folder(folder: Path, index: dict) -> None:
    """Refuse pipeline classes we cannot run, naming them, before reading gigabytes."""
    cls = index.get("_class_name", "StableDiffusionPipeline")
    if cls != "StableDiffusionPipeline":
        from ldmcli.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{folder}: a {cls} folder; this version runs StableDiffusionPipeline (SD 1.x)")


def _named(where: Path, what: str, rename, tensors: dict) -> dict:
    """Apply a key map, turning its complaint about unknown keys into a CheckpointError naming the file."""
    try:
        return rename(tensors)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise CheckpointError(f"{where}: {what}: {message}") from exc


def _prefix_of(network: str) -> str:
    return next(p for p, n in SINGLE_FILE_PREFIXES.items() if n == network)
