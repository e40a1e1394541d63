"""Split a checkpoint into its networks, under our canonical names.

Canonical names: LDM names for the U-Net and VAE (what single files use, prefix stripped) and
HF CLIP names (`text_model.*`) for the text encoders. Two layouts reach this module:

- single files (`.safetensors`/`.ckpt`): one flat dict, networks told apart by prefix
  (SD1 `cond_stage_model.transformer.`, SD2 `cond_stage_model.model.` (OpenCLIP), SDXL
  `conditioner.embedders.0.transformer.` + `conditioner.embedders.1.model.`, the SDXL refiner
  `conditioner.embedders.0.model.` alone: its bigG, our `text_encoder_2`);
- diffusers folders: one subfolder per network, diffusers names, renamed by `keymap`
  (SDXL adds `text_encoder_2/` and `tokenizer_2/`; the refiner has those and no `text_encoder/`,
  `model_index.json` saying `"text_encoder": [null, null]`).

Every key of the input is either placed, or named in an explicit ignore rule, or an error. Files and
folders this version does not run are refused first, by `unsupported`.
"""

from __future__ import annotations

import re
import reprlib
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
from ldmcli.files import check_regular_file, is_present
from ldmcli.limits import MAX_CONFIG_STRUCTURE
from ldmcli.unsupported import (
    check_supported_folder,
    check_supported_single_file,
    refuse_unknown_format,
    refuse_vae_alone,
)

# Single-file prefix -> (network, key format of that network).
SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": ("unet", "ldm"),
    "first_stage_model.": ("vae", "ldm"),
    "cond_stage_model.transformer.": ("text_encoder", "hf"),  # SD1: OpenAI CLIP ViT-L in HF names
    "cond_stage_model.model.": ("text_encoder", "openclip"),  # SD2: OpenCLIP ViT-H
    "conditioner.embedders.0.transformer.": ("text_encoder", "hf"),  # SDXL: CLIP ViT-L
    "conditioner.embedders.0.model.": ("text_encoder", "openclip"),  # SD2 in Stability's sgm layout (SD-Turbo)
    "conditioner.embedders.1.model.": ("text_encoder_2", "openclip"),  # SDXL: OpenCLIP ViT-bigG
}

# The SDXL refiner (Stability's sd_xl_refiner.yaml) conditions on OpenCLIP bigG alone, stored as its first
# embedder: the prefix SD-Turbo's sgm file gives its SD2 ViT-H. The refiner's U-Net has vector conditioning
# (label_emb: pooled bigG + size, crop and aesthetic-score embeddings), SD 2.x's none; diffusers tells them
# apart by the bigG width instead (single_file_utils: "xl_refiner" by a 32nd resblock's key).
REFINER_TEXT_PREFIX = "conditioner.embedders.0.model."
REFINER_MARKER = "model.diffusion_model.label_emb.0.0.weight"

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

# Marker tensors: no weights, but they say something about the model (recorded in `markers`).
# `v_pred`: ComfyUI/Forge save an empty tensor of that name in v-prediction checkpoints.
MARKER_KEYS = frozenset({"v_pred"})

# U-Net tensors whose VALUES detection needs (ComfyUI's SD2 v-prediction statistic reads the
# last output transformer's norm1 bias). With meta=True they are still read, from the header offsets.
PROBE_KEY = re.compile(r"model\.diffusion_model\.output_blocks\.\d+\.1\.transformer_blocks\.0\.norm1\.bias")


@dataclass
class Components:
    """The tensors of each network, canonically named, plus what the checkpoint says about sampling."""

    layout: str  # "single-file" | "diffusers"
    path: Path
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None  # None: the SDXL refiner (bigG only, as text_encoder_2)
    text_encoder_2: dict[str, torch.Tensor] | None = None  # SDXL's OpenCLIP bigG
    # Key format the first text encoder was stored in: "hf" or "openclip". An OpenCLIP tower is
    # complete (SD2 conditions on its penultimate block); diffusers ship SD2's already cut to 23.
    text_encoder_format: str = "hf"
    alphas_cumprod: torch.Tensor | None = None
    scheduler_config: dict | None = None
    tokenizer_dir: Path | None = None
    tokenizer_2_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # network -> file it came from
    configs: dict[str, dict] = field(default_factory=dict)  # diffusers: network -> its config.json
    pipeline_index: dict = field(default_factory=dict)  # diffusers: model_index.json
    markers: frozenset[str] = frozenset()  # MARKER_KEYS present in a single file

    @property
    def networks(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every network's tensors by name (each text encoder only when present)."""
        nets = {"unet": self.unet, "vae": self.vae}
        for name, tensors in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
            if tensors is not None:
                nets[name] = tensors
        return nets


def read_components(path: Path, *, meta: bool = False, dtype: torch.dtype | None = None) -> Components:
    """Read a single file or a diffusers folder into canonically named networks.

    meta=True reads shapes only where the format allows (safetensors headers): for `ldm info`.
    dtype: cast floating-point tensors to it while reading (one copy of the weights, never two).
    """
    path = Path(path)
    if path.is_dir():
        if is_present(path / "model_index.json", CheckpointError) or (path / "unet").is_dir():
            return read_diffusers_folder(path, meta=meta, dtype=dtype)
        if is_vae_folder(path):
            refuse_vae_alone(path)
        raise CheckpointError(f"{path}: a folder without a model (no model_index.json or unet/)")
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder")
    check_regular_file(path, CheckpointError)  # a FIFO or device would block or never end
    if path.suffix not in WEIGHT_SUFFIXES:
        refuse_unknown_format(path)
    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    state_dict = read_state_dict(path, meta=meta, dtype=dtype)
    if meta and path.suffix == ".safetensors":
        _read_probes(path, state_dict)
    return split_single_file(state_dict, path, metadata)


def is_vae_folder(folder: Path) -> bool:
    """Whether a folder is a diffusers VAE alone: a config.json of class AutoencoderKL (`vae/` of a
    pipeline, madebyollin/sdxl-vae-fp16-fix, stabilityai/sd-vae-ft-mse)."""
    config = folder / "config.json"
    return is_present(config, CheckpointError) and read_json(config).get("_class_name") == "AutoencoderKL"


def _read_probes(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the (few, small) PROBE_KEY meta tensors with their real values."""
    from safetensors import safe_open

    keys = [k for k in state_dict if PROBE_KEY.fullmatch(k)]
    if keys:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in keys:
                state_dict[key] = f.get_tensor(key)


def split_single_file(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Components:
    """Sort an LDM/sgm-layout single file's keys into networks by prefix, each renamed to canonical names."""
    check_supported_single_file(state_dict.keys(), path)
    table = _single_file_prefixes(state_dict)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    formats: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    unknown = []
    for key, tensor in state_dict.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is not None:
            network, fmt = table[prefix]
            if prefixes.setdefault(network, prefix) != prefix:
                raise CheckpointError(
                    f"{path}: two {network.replace('_', ' ')}s (keys under {prefixes[network]!r} and {prefix!r})"
                )
            formats[network] = fmt
            parts.setdefault(network, {})[key[len(prefix):]] = tensor
        elif key in SCHEDULE_BUFFERS or key in IGNORED_KEYS or key in MARKER_KEYS or key.startswith(IGNORED_PREFIXES):
            continue
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path}: unknown keys {name_keys(unknown)}")
    refiner = prefixes.get("text_encoder_2") == REFINER_TEXT_PREFIX  # bigG alone: no first text encoder
    for name in ("unet", "vae") if refiner else ("unet", "vae", "text_encoder"):
        if not parts.get(name):
            where = " or ".join(repr(p) for p, (n, _) in SINGLE_FILE_PREFIXES.items() if n == name)
            raise CheckpointError(f"{path}: no {name.replace('_', ' ')} weights (keys under {where})")
    text = {}
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            # SDXL pools bigG through its text_projection; SD2 never uses the projection.
            rename = _text_encoder_map(formats[name], keep_projection=name == "text_encoder_2")
            text[name] = checked_rename(path, name.replace("_", " "), rename, parts[name])
    for name, tensors in {**parts, **text}.items():
        # U-Net and VAE keys are the file's without its prefix; the text encoders' are renamed.
        check_weights(path, tensors, prefixes[name] if name in ("unet", "vae") else f"{name.replace('_', ' ')} tensor ")
    return Components(
        layout="single-file",
        path=path,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=text.get("text_encoder"),
        text_encoder_2=text.get("text_encoder_2"),
        text_encoder_format=formats.get("text_encoder", "hf"),
        alphas_cumprod=state_dict.get("alphas_cumprod"),
        metadata=metadata or {},
        sources={name: str(path) for name in parts},
        markers=frozenset(k for k in MARKER_KEYS if k in state_dict),
    )


def _single_file_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """SINGLE_FILE_PREFIXES, with the lone `conditioner.embedders.0.model.` read as bigG (`text_encoder_2`)
    when the U-Net has vector conditioning: an SDXL refiner, not an SD 2.x file in sgm's layout."""
    if REFINER_MARKER not in state_dict or any(k.startswith("conditioner.embedders.1.") for k in state_dict):
        return SINGLE_FILE_PREFIXES
    return {**SINGLE_FILE_PREFIXES, REFINER_TEXT_PREFIX: ("text_encoder_2", "openclip")}


def _text_encoder_map(fmt: str, *, keep_projection: bool):
    from ldmcli.keymap.clip import clip_hf_to_canonical, clip_openclip_to_canonical

    if fmt == "hf":
        return clip_hf_to_canonical
    return lambda sd: clip_openclip_to_canonical(sd, keep_projection=keep_projection)


def read_diffusers_folder(folder: Path, *, meta: bool = False, dtype: torch.dtype | None = None) -> Components:
    """Read `unet/`, `vae/`, `text_encoder/` (SDXL: + `text_encoder_2/`), tokenizers and `scheduler/`
    of a diffusers pipeline folder."""
    from ldmcli.keymap.clip import clip_hf_to_canonical
    from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from ldmcli.keymap.vae import vae_config_from_diffusers, vae_diffusers_to_ldm

    index = read_json(folder / "model_index.json") if is_present(folder / "model_index.json", CheckpointError) else {}
    check_supported_folder(folder, index)
    names = ["unet", "vae"]
    sdxl = index.get("_class_name", "").startswith("StableDiffusionXL")
    # The SDXL refiner's model_index.json says `"text_encoder": [null, null]`: it has bigG alone.
    if not (_declared_absent(index, "text_encoder") and (sdxl or (folder / "text_encoder_2").is_dir())):
        names.append("text_encoder")
    if sdxl or (folder / "text_encoder_2").is_dir():
        names.append("text_encoder_2")
    # Weight file stems, preferred first; `.fp16` variants are what `from_pretrained(variant="fp16")`
    # downloads (the only files of such a download).
    unet_stems = ("diffusion_pytorch_model", "diffusion_pytorch_model.fp16")
    stems = {"unet": unet_stems, "vae": unet_stems}
    networks = {}
    sources = {}
    configs = {}
    for name in names:
        sub = folder / name
        if not sub.is_dir():
            raise CheckpointError(f"{folder}: missing {name}/ folder")
        tensors, source = read_sharded_or_single(sub, stems.get(name, ("model", "pytorch_model", "model.fp16")), meta=meta, dtype=dtype)
        networks[name] = tensors
        sources[name] = str(source)
        config = sub / "config.json"
        if name in ("unet", "vae") or is_present(config, CheckpointError):  # theirs say how keys are renamed
            configs[name] = check_structure(config, read_json(config))

    # The rename tables are generated from the structure the folder's configs describe.
    unet_config = checked_rename(folder / "unet", "config", unet_config_from_diffusers, configs["unet"])
    vae_config = checked_rename(folder / "vae", "config", vae_config_from_diffusers, configs["vae"])
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    tokenizer_dir, tokenizer_2_dir = folder / "tokenizer", folder / "tokenizer_2"
    renamed = {
        "unet": checked_rename(folder / "unet", "U-Net", lambda sd: unet_diffusers_to_ldm(sd, unet_config), networks["unet"]),
        "vae": checked_rename(folder / "vae", "VAE", lambda sd: vae_diffusers_to_ldm(sd, vae_config), networks["vae"]),
        **{
            name: checked_rename(folder / name, "text encoder", clip_hf_to_canonical, networks[name])
            for name in ("text_encoder", "text_encoder_2")
            if name in networks
        },
    }
    labels = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
    for name, tensors in renamed.items():
        check_weights(Path(sources[name]), tensors, f"{labels[name]} tensor ")
    return Components(
        layout="diffusers",
        path=folder,
        unet=renamed["unet"],
        vae=renamed["vae"],
        text_encoder=renamed.get("text_encoder"),
        text_encoder_2=renamed.get("text_encoder_2"),
        scheduler_config=read_json(scheduler_file) if is_present(scheduler_file, CheckpointError) else None,
        tokenizer_dir=tokenizer_dir if _has_tokenizer(tokenizer_dir) else None,
        tokenizer_2_dir=tokenizer_2_dir if _has_tokenizer(tokenizer_2_dir) else None,
        sources=sources,
        configs=configs,
        pipeline_index=index,
    )


def _declared_absent(index: dict, name: str) -> bool:
    """Whether model_index.json declares a pipeline component absent: `[null, null]` (library, class),
    as diffusers saves a component passed as None."""
    entry = index.get(name)
    return isinstance(entry, list) and all(item is None for item in entry)


# The diffusers config keys that state counts, each with whether its numbers are counts: a list has an
# entry per level, so its length always is; block_out_channels holds widths and the block types names.
STRUCTURE_KEYS = {"block_out_channels": False, "down_block_types": False, "up_block_types": False,
                  "layers_per_block": True, "transformer_layers_per_block": True,
                  "reverse_transformer_layers_per_block": True}


def check_structure(where: Path, config: dict) -> dict:
    """`config` (a U-Net or VAE config.json), unless it states more than MAX_CONFIG_STRUCTURE of something,
    or its levels are not lists: block_out_channels one positive width a level, the block types one
    name a level (`[]` and `"abc"` failed deep in the key maps with "list index out of range" and "not
    all arguments converted during string formatting")."""
    for key, numbers_count in STRUCTURE_KEYS.items():
        if key in config and _largest_count(config[key], numbers_count) > MAX_CONFIG_STRUCTURE:
            raise CheckpointError(f"{where}: {key} {reprlib.repr(config[key])} states more than {MAX_CONFIG_STRUCTURE} "
                                  "levels, blocks or layers: beyond any model this version runs")
    for key, (kind, what) in LEVEL_LISTS.items():
        value = config.get(key)
        if key in config and not (isinstance(value, list) and value and all(kind(item) for item in value)):
            raise CheckpointError(f"{where}: {key} is {reprlib.repr(value)}, not a non-empty list of {what}, "
                                  "one a level")
    return config


def _is_width(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Config keys that list one entry per resolution level, with what each entry must be.
LEVEL_LISTS = {"block_out_channels": (_is_width, "positive whole numbers"),
               "down_block_types": (lambda item: isinstance(item, str), "block type names"),
               "up_block_types": (lambda item: isinstance(item, str), "block type names")}


def _largest_count(value, numbers_count: bool) -> float:
    """The largest list length anywhere in a JSON value (lists nest: per-level, per-block depths), and
    the largest number if `numbers_count`."""
    largest, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            largest = max(largest, len(item))
            pending.extend(item)
        elif numbers_count and isinstance(item, (int, float)) and not isinstance(item, bool):
            largest = max(largest, item)
    return largest


# The files `tokenizer.py` reads from a tokenizer folder (vocab.json + merges.txt, or tokenizer.json).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def _has_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a tokenizer; any of its files that is there but not a regular file (a FIFO
    would block the tokenizer's read forever) is refused now, before the weights are read."""
    present = {name for name in TOKENIZER_FILES if is_present(folder / name, CheckpointError)}
    return "vocab.json" in present or "tokenizer.json" in present


def check_weights(where: Path, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Refuse a network tensor that no layer can hold: not floating point, a scalar, or empty.

    The networks' weights and buffers are all floating point with at least one element in every
    dimension (checked on SD 1.5, 2.1 and SDXL); integer buffers such as position_ids are on the
    ignore lists. Checked before detection reads shapes, so a damaged file is refused naming the
    tensor instead of failing later with an IndexError or a division by zero.
    """
    for key, tensor in tensors.items():
        shape = list(tensor.shape)
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"{where}: {prefix}{key} has dtype {dtype}; network weights are floating point")
        if not shape or 0 in shape:
            kind = "a single number" if not shape else "no elements"
            raise CheckpointError(f"{where}: {prefix}{key} has shape {shape} ({kind}), which no layer's weight has")


def checked_rename(where: Path, what: str, rename, tensors):
    """Apply a key map (or a config or shape rule), turning its complaint into a CheckpointError naming the file.

    Key maps raise KeyError/ValueError for keys or configs they do not cover; a config or tensor of the
    wrong type or rank makes them fail with TypeError, IndexError, OverflowError (int(inf)) or (torch's
    reshape) RuntimeError.
    """
    try:
        return rename(tensors)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, ArithmeticError, RuntimeError) as exc:
        # A KeyError's str() is the repr of its message: use the message itself.
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
        lines = message.strip().splitlines() or [type(exc).__name__]
        raise CheckpointError(f"{where}: {what}: {lines[0]}") from exc
