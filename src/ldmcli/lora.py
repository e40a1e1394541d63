"""LoRA and LyCORIS files, merged into a checkpoint's weights before the networks are built.

`read_lora(path)` reads one file into `LoraFile`: its layers (`Adapter`s), each a module as the file
names it plus the factors that make its weight change, and the file's safetensors metadata (kohya's
`ss_*` keys). Every key is accounted for: a key of a kind this version does not merge (DoRA, OFT,
(IA)^3, GLoRA, norms, bundled embeddings) is named, never dropped. `apply_loras(components, loras)`
finds every layer's tensor among the canonical `Components` names, checks that every change fits
(all LoRAs first, so a LoRA for another family is refused before anything changes), then adds
each change in float32 to the weight upcast to float32 and stores it back in the weight's dtype,
in place, a block of rows at a time, so merging holds no second copy of any weight (the goal: peak
memory grows by no more than the LoRA file). Components are the caller's own fresh copy of the
weights; another set of LoRAs is merged into freshly read weights (`run.py`), never subtracted.

Key layouts (the part before the role is the module, the role says which factor):

- kohya-ss / A1111 / LyCORIS: `lora_unet_<module>`, `lora_te_<module>` (SD1/SD2), SDXL
  `lora_te1_`/`lora_te2_`, the module's dots written as underscores. U-Net modules are named by
  diffusers' module names (kohya's SD 1.x/2.x: `down_blocks_0_attentions_0_..._attn1_to_q`) or by
  the original LDM names (kohya's SDXL: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`); text
  encoders by Hugging Face CLIP names (`text_model_encoder_layers_0_self_attn_q_proj`; SDXL's te2 is
  OpenCLIP bigG in those names, as ldm's `text_encoder_2` is).
- diffusers / PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>` with dots,
  or bare U-Net modules; roles `lora_A.weight`/`lora_B.weight` (+ `lora_B.bias`), `lora.down/up.weight`,
  `lora_linear_layer.down/up.weight`, and the old attention-processor spelling
  `attn1.processor.to_q_lora.down.weight`. A `lora_adapter_metadata` header (diffusers' LoraConfig)
  gives `lora_alpha`, `alpha_pattern` and `use_rslora`; without it the scale is 1.

Roles and the change each makes to a weight W (out x in [x kh x kw]), as A1111's
`extensions-builtin/Lora/network_*.py` and LyCORIS compute them:

- LoRA/LoCon: `lora_up` (out x r [x 1 x 1]) @ `lora_down` (r x in [x kh x kw]); with `lora_mid`
  (r x r x kh x kw, LoCon's Tucker/CP form, `lora_down` 1x1): sum_{n,m} up[i,n] mid[n,m,k,l] down[m,j].
  Scale alpha / r (r = lora_down's rows), 1 without alpha (kohya: alpha defaults to r).
- LoHa: (w1a @ w1b) * (w2a @ w2b) elementwise; with `hada_t1`/`hada_t2` (Tucker) each product is
  sum_{i,j} t[i,j,k,l] wa[i,p] wb[j,r]. Scale alpha / r (r = hada_w1_b's rows).
- LoKr: kron(w1, w2), w1 = `lokr_w1` or `lokr_w1_a @ lokr_w1_b`, w2 = `lokr_w2`, `lokr_w2_a @
  lokr_w2_b`, or with `lokr_t2` the Tucker form above. Scale alpha / r where r is the rank of a
  decomposed factor (lokr_w2_b's rows, else lokr_w1_b's); with both factors full there is no rank
  and the scale is 1, whatever alpha says (LyCORIS: "use scale = 1").
- full: `diff` added to the weight, `diff_b` to the bias (scale 1).

Each change is then multiplied by the user's weight: the text-encoder weight for text encoder
layers, the U-Net weight for U-Net layers (A1111's `<lora:NAME:te=W1:unet=W2>`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmcli.checkpoint import SafetensorsReader, read_safetensors_metadata, read_state_dict
from ldmcli.errors import CheckpointError, LdmError, name_keys
from ldmcli.lora_uses import LoraError, tag_weights  # noqa: F401  (A1111's tag weights; re-exported)


LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
# What diffusers' `save_lora_weights` writes into a folder.
DIFFUSERS_LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

TEXT_NETWORKS = ("text_encoder", "text_encoder_2")
NETWORK_LABELS = {"unet": "U-Net", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}

# role suffix as files spell it -> (kind, role). Longest suffixes are tried first.
ROLES: dict[str, tuple[str | None, str]] = {
    # kohya-ss / A1111 / LyCORIS LoCon
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    # PEFT / diffusers
    "lora_A.weight": ("lora", "down"),
    "lora_B.weight": ("lora", "up"),
    "lora_B.bias": ("lora", "up_bias"),
    "lora.down.weight": ("lora", "down"),
    "lora.up.weight": ("lora", "up"),
    "lora_linear_layer.down.weight": ("lora", "down"),
    "lora_linear_layer.up.weight": ("lora", "up"),
    "alpha": (None, "alpha"),
    # LyCORIS LoHa
    "hada_w1_a": ("loha", "w1a"),
    "hada_w1_b": ("loha", "w1b"),
    "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"),
    "hada_t1": ("loha", "t1"),
    "hada_t2": ("loha", "t2"),
    # LyCORIS LoKr
    "lokr_w1": ("lokr", "w1"),
    "lokr_w1_a": ("lokr", "w1a"),
    "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"),
    "lokr_w2_a": ("lokr", "w2a"),
    "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    # full weight differences (LyCORIS "full", A1111 network_full)
    "diff": ("full", "diff"),
    "diff_b": ("full", "diff_b"),
}
_ROLE_SUFFIXES = sorted(ROLES, key=len, reverse=True)

# Keys of kinds other tools merge that this version does not: named in the error, never dropped.
UNSUPPORTED_ROLES = {
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "lora_embedding_A": "LoRA on embeddings",
    "lora_embedding_B": "LoRA on embeddings",
    "w_norm": "LyCORIS norm layers (w_norm)",
    "b_norm": "LyCORIS norm layers (b_norm)",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "rescale": "OFT/BOFT",
    "on_input": "(IA)^3",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "lokr_t1": "LoKr with lokr_t1",
    "scale": "a per-layer scale",
    "bias_indices": "LyCORIS sparse bias",
    "bias_values": "LyCORIS sparse bias",
    "bias_size": "LyCORIS sparse bias",
    "dyn_up": "DyLoRA",
    "dyn_down": "DyLoRA",
}
_UNSUPPORTED_SUFFIXES = sorted(UNSUPPORTED_ROLES, key=len, reverse=True)

# Roles each kind needs (one of each tuple) and may have.
REQUIRED = {
    "lora": (("up",), ("down",)),
    "loha": (("w1a",), ("w1b",), ("w2a",), ("w2b",)),
    "lokr": (("w1", "w1a"), ("w2", "w2a")),
    "full": (("diff", "diff_b"),),
}

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
                   "model.diffusion_model.": "unet", "diffusion_model.": "unet"}

# diffusers' attention-processor LoRA (before PEFT): `attn1.processor.to_q_lora.down.weight`.
_ATTN_PROCESSOR = re.compile(r"(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight")
_PROCESSOR_NAMES = {  # network -> old projection name -> module name
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers: the LoraConfig of each component, as JSON


@dataclass
class Adapter:
    """One layer's change as a file stores it."""

    network: str  # "unet" | "text_encoder" | "text_encoder_2"
    name: str  # the module as the file names it, network prefix removed (underscored for kohya keys)
    kohya: bool  # kohya-style name (dots written as underscores)
    kind: str  # "lora" | "loha" | "lokr" | "full"
    tensors: dict[str, torch.Tensor]  # role -> factor; shape-only (meta) while the file is `lazy`
    alpha: float | None
    label: str  # the file's spelling of the module, for messages
    scale: float = 1.0  # alpha / rank as the kind defines it; the user's weight comes on top
    shape: tuple[int, ...] = ()  # shape of the weight change (before fitting it to the layer)
    bias_shape: tuple[int, ...] | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> the file's key


@dataclass
class LoraFile:
    path: Path
    adapters: list[Adapter]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header (kohya's ss_* keys)
    # Factors not read yet: the adapters hold shape-only tensors and `apply_loras` reads each layer's
    # factors from `path` when it merges that layer, so the file is never in memory whole.
    lazy: bool = False

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def format(self) -> str:
        """What the file holds, for people: kohya-ss LoRA/LoCon, diffusers/PEFT LoRA, LyCORIS LoHa or LoKr,
        full diff ("+"-joined when mixed)."""
        names = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "full": "full diff"}
        kinds = []
        for a in self.adapters:
            kind = names.get(a.kind) or ("kohya-ss LoRA" if a.kohya else "diffusers/PEFT LoRA")
            if a.kind == "lora" and len(a.shape) == 4 and a.shape[2:] != (1, 1):
                kind = kind.replace("LoRA", "LoCon")
            if kind not in kinds:
                kinds.append(kind)
        return " + ".join(sorted(kinds))

    @property
    def networks(self) -> set[str]:
        return {a.network for a in self.adapters}


@dataclass(frozen=True)
class AppliedLora:
    """What `apply_loras` did with one file."""

    path: Path
    format: str
    te_weight: float
    unet_weight: float
    layers: dict[str, int]  # network -> number of its layers changed


# --- reading --------------------------------------------------------------------------------------


def read_lora(path: Path | str) -> LoraFile:
    """Read a LoRA/LyCORIS file (.safetensors; .pt/.ckpt/.bin via torch.load(weights_only=True)), or a
    diffusers LoRA folder (pytorch_lora_weights.*). Raises LoraError naming the file on any problem:
    unreadable, a pickle wanting code, keys of unknown or unsupported kinds, factors that do not fit."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in DIFFUSERS_LORA_FILES if (path / n).is_file()]
        if not found:
            raise LoraError(f"{path}: a folder without {' or '.join(DIFFUSERS_LORA_FILES)}")
        path = found[0]
    if not path.exists():
        raise LoraError(f"{path}: no such LoRA file")
    if path.suffix.lower() not in LORA_SUFFIXES:
        raise LoraError(f"{path}: not a LoRA file (ldm reads {', '.join(LORA_SUFFIXES)})")
    lazy = path.suffix == ".safetensors"
    try:
        metadata = read_safetensors_metadata(path) if lazy else {}
        tensors = read_state_dict(path, meta=lazy)
        if lazy:  # scalars (alphas) now, for their values; factors when merged
            with SafetensorsReader(path) as reader:
                tensors.update({key: reader.read(key) for key, t in tensors.items() if t.numel() <= 1})
    except CheckpointError as exc:
        # torch >= 2.6 names what a pickle wanted on a later line than checkpoint.py reads
        wanted = re.search(r"unsupported GLOBAL (\S+)", str(exc.__cause__ or ""))
        if wanted and "refused to unpickle" not in str(exc):
            raise LoraError(f"{path}: refused to unpickle: it needs more than tensors (it wants {wanted.group(1)}); "
                            "convert it to .safetensors with a tool you trust") from exc
        raise LoraError(str(exc)) from exc
    lora = parse_lora(tensors, path, metadata)
    lora.lazy = lazy
    return lora


def parse_lora(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> LoraFile:
    """A LoraFile from a state dict already read (see `read_lora`)."""
    metadata = dict(metadata or {})
    groups: dict[tuple[str, str, bool], dict[str, tuple[str | None, torch.Tensor, str]]] = {}
    unknown, unsupported = [], {}
    for key, tensor in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            kind = _unsupported_kind(key)
            if kind is not None:
                unsupported.setdefault(kind, []).append(key)
            else:
                unknown.append(key)
            continue
        network, name, kohya, kind, role = parsed
        roles = groups.setdefault((network, name, kohya), {})
        if role in roles:
            raise LoraError(f"{path}: {key} and {roles[role][2]} are the same factor of one layer")
        roles[role] = (kind, tensor, key)
    if unsupported:
        kind, keys = next(iter(sorted(unsupported.items())))
        count = f"{len(keys)} key{'s' * (len(keys) > 1)}"
        raise LoraError(f"{path}: not supported yet: {kind} ({count}: {name_keys(keys, 2)})")
    if unknown:
        raise LoraError(f"{path}: keys of no LoRA/LyCORIS kind ldm knows: {name_keys(unknown, 4)}")
    if not groups:
        raise LoraError(f"{path}: holds no LoRA layers")
    peft_config = _peft_metadata(path, metadata)
    adapters = [_adapter(path, network, name, kohya, roles, peft_config)
                for (network, name, kohya), roles in groups.items()]
    return LoraFile(path=path, adapters=adapters, metadata=metadata)


def _parse_key(key: str) -> tuple[str, str, bool, str | None, str] | None:
    """(network, module name, kohya-style, kind, role) of a key, or None for a key of no known role."""
    if m := _ATTN_PROCESSOR.fullmatch(key):
        network, name = _dotted_network(m["module"])
        proj = _PROCESSOR_NAMES["unet" if network == "unet" else "text"][m["proj"]]
        return network, f"{name}.{proj}", False, "lora", m["role"]
    for suffix in _ROLE_SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            module = key[: -len(suffix) - 1]
            kind, role = ROLES[suffix]
            if "." not in module:
                prefix = next((p for p in KOHYA_PREFIXES if module.startswith(p)), None)
                if prefix is not None and len(module) > len(prefix):
                    return KOHYA_PREFIXES[prefix], module[len(prefix):], True, kind, role
            network, name = _dotted_network(module)
            return network, name, False, kind, role
    return None


def _dotted_network(module: str) -> tuple[str, str]:
    """A dotted module's network (by its prefix; bare modules are the U-Net's, as diffusers reads
    them) and its name below it, diffusers' `.processor` segments dropped."""
    network = "unet"
    for prefix, net in DOTTED_PREFIXES.items():
        if module.startswith(prefix):
            network, module = net, module[len(prefix):]
            break
    return network, module.replace(".processor.", ".")


def _unsupported_kind(key: str) -> str | None:
    if key.startswith("bundle_emb."):
        return "textual-inversion embeddings bundled in a LoRA (bundle_emb.*)"
    for suffix in _UNSUPPORTED_SUFFIXES:
        if key.endswith((f".{suffix}", f".{suffix}.weight")):
            return UNSUPPORTED_ROLES[suffix]
    module, _, last = key.rpartition(".")
    if last == "weight" and "." not in module and module.startswith(tuple(KOHYA_PREFIXES)):
        return "(IA)^3"  # LyCORIS (IA)^3 stores `<lora name>.weight` (+ on_input)
    return None


def _adapter(path: Path, network: str, name: str, kohya: bool, roles: dict, peft_config: dict) -> Adapter:
    prefix = next((p for p, n in KOHYA_PREFIXES.items() if n == network), "") if kohya else f"{network}."
    label = (prefix + name) if kohya else (name if network == "unet" else f"{network}.{name}")
    kinds = {kind for kind, _, _ in roles.values() if kind is not None}
    if not kinds:
        raise LoraError(f"{path}: {label}: an alpha with no weights")
    if len(kinds) > 1:
        raise LoraError(f"{path}: {label} mixes {' and '.join(sorted(kinds))} keys")
    kind = kinds.pop()
    missing = [alts for alts in REQUIRED[kind] if not any(r in roles for r in alts)]
    if missing:
        have = ", ".join(sorted(k for _, _, k in roles.values()))
        raise LoraError(f"{path}: {label}: a {kind} layer without its {' or '.join(missing[0])} factor (has {have})")
    tensors, keys = {}, {}
    alpha = None
    for role, (_, tensor, key) in roles.items():
        keys[role] = key
        if role == "alpha":
            if tensor.numel() != 1 or tensor.is_complex():
                raise LoraError(f"{path}: {key} has shape {list(tensor.shape)}; an alpha is one number")
            alpha = float(tensor.reshape(()).item())
            if not math.isfinite(alpha):
                raise LoraError(f"{path}: {key} is {alpha}")
        else:
            if not tensor.is_floating_point():
                raise LoraError(f"{path}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                "LoRA factors are floating point")
            if tensor.dim() == 0 or 0 in tensor.shape:
                raise LoraError(f"{path}: {key} has shape {list(tensor.shape)}, which no LoRA factor has")
            tensors[role] = tensor
    if kind == "lokr" and "t2" in tensors and not ("w2a" in tensors and "w2b" in tensors):
        raise LoraError(f"{path}: {label}: lokr_t2 without lokr_w2_a and lokr_w2_b")
    adapter = Adapter(network=network, name=name, kohya=kohya, kind=kind, tensors=tensors, alpha=alpha, label=label,
                      keys=keys)
    adapter.scale = _scale(adapter, peft_config)
    _check_factors(path, adapter)
    return adapter


def _scale(adapter: Adapter, peft_config: dict) -> float:
    """alpha / rank as each kind defines it (see the module docstring)."""
    t, alpha = adapter.tensors, adapter.alpha
    if adapter.kind == "lora":
        rank = t["down"].shape[0]
        if alpha is None and not adapter.kohya:
            config = peft_config.get(adapter.network)
            if config is not None:
                alpha, rslora = _peft_alpha(config, adapter.name)
                return alpha / (math.sqrt(rank) if rslora else rank)
        return 1.0 if alpha is None else alpha / rank
    if adapter.kind == "loha":
        return 1.0 if alpha is None else alpha / t["w1b"].shape[0]
    if adapter.kind == "lokr":
        rank = t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else None
        return 1.0 if alpha is None or rank is None else alpha / rank
    return 1.0


def _peft_metadata(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` header: each component's LoraConfig ({} when absent)."""
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LoraError(f"{path}: {LORA_METADATA_KEY} is not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoraError(f"{path}: {LORA_METADATA_KEY} is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in config.items():
        network, dot, field_name = key.partition(".")
        if not dot or network not in NETWORK_LABELS:  # saved from a bare U-Net: unprefixed
            network, field_name = "unet", key
        out.setdefault(network, {})[field_name] = value
    for network, fields in out.items():
        if fields.get("use_dora"):
            raise LoraError(f"{path}: not supported yet: DoRA (use_dora in {LORA_METADATA_KEY})")
        alpha = fields.get("lora_alpha", fields.get("r"))
        patterns = fields.get("alpha_pattern") or {}
        if not _is_number(alpha) or not isinstance(patterns, dict) or not all(_is_number(v) for v in patterns.values()):
            raise LoraError(f"{path}: {LORA_METADATA_KEY}: {network} lora_alpha/alpha_pattern are not numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LoraError(f"{path}: {LORA_METADATA_KEY}: alpha_pattern key {pattern!r} is not a pattern") from exc
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _peft_alpha(config: dict, module: str) -> tuple[float, bool]:
    """PEFT's alpha for a module: the first alpha_pattern key matching the module's name as PEFT
    matches it (`(.*\\.)?(key)$`), else lora_alpha; and whether rsLoRA (alpha / sqrt(r)) is on."""
    alpha = config.get("lora_alpha", config.get("r"))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return float(alpha), bool(config.get("use_rslora"))


def _check_factors(path: Path, adapter: Adapter) -> None:
    """The factors of one layer fit together: the change is computed on meta tensors (shapes only),
    after the explicit rank checks that make the common mistakes readable."""
    t = adapter.tensors
    where = f"{path}: {adapter.label}"
    if adapter.kind == "lora":
        up, down, mid = t["up"], t["down"], t.get("mid")
        inner = mid.shape[0] if mid is not None else down.shape[0]
        if up.dim() not in (2, 4) or down.dim() not in (2, 4) or (up.dim() == 4 and up.shape[2:] != (1, 1)):
            raise LoraError(f"{where}: up {list(up.shape)} and down {list(down.shape)} are no LoRA pair")
        if up.shape[1] != inner:
            raise LoraError(f"{where}: rank mismatch: up is {list(up.shape)} (rank {up.shape[1]}), "
                            f"{'mid' if mid is not None else 'down'} is "
                            f"{list((mid if mid is not None else down).shape)} (rank {inner})")
        if mid is not None and (mid.dim() != 4 or mid.shape[1] != down.shape[0] or down.shape[2:] not in ((), (1, 1))):
            raise LoraError(f"{where}: rank mismatch: lora_mid is {list(mid.shape)}, lora_down {list(down.shape)}")
        if "up_bias" in t and (t["up_bias"].dim() != 1 or t["up_bias"].shape[0] != up.shape[0]):
            raise LoraError(f"{where}: lora_B.bias is {list(t['up_bias'].shape)} for {up.shape[0]} outputs")
    meta = {role: torch.empty(x.shape, dtype=torch.float32, device="meta") for role, x in t.items()}
    try:
        weight, bias = _delta(adapter.kind, meta)
    except (RuntimeError, ValueError, IndexError) as exc:
        shapes = ", ".join(f"{role} {list(x.shape)}" for role, x in t.items())
        raise LoraError(f"{where}: its {adapter.kind} factors do not fit together ({shapes})") from exc
    adapter.shape = tuple(weight.shape) if weight is not None else ()
    adapter.bias_shape = tuple(bias.shape) if bias is not None else None


# --- the changes ------------------------------------------------------------------------------------


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker/CP rebuild: t [r1, r2, kh, kw], wa [r1, out], wb [r2, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [out, r (,1,1)] @ b [r, in (, kh, kw)] -> [out, in (, kh, kw)] (conv factors flattened)."""
    product = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
    return product.reshape(a.shape[0], *b.shape[1:])


def _delta(kind: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weight change, bias change) in float32, before any scale; None for no change."""
    f = {role: x.float() for role, x in t.items()}
    if kind == "lora":
        if "mid" in f:
            up, down = f["up"].flatten(1), f["down"].flatten(1)
            weight = torch.einsum("nmkl,in,mj->ijkl", f["mid"], up, down)
        else:
            weight = _product(f["up"], f["down"])
        return weight, f.get("up_bias")
    if kind == "loha":
        first = _tucker(f["t1"], f["w1a"], f["w1b"]) if "t1" in f else _product(f["w1a"], f["w1b"])
        second = _tucker(f["t2"], f["w2a"], f["w2b"]) if "t2" in f else _product(f["w2a"], f["w2b"])
        if first.shape != second.shape:
            raise ValueError(f"LoHa halves of shapes {list(first.shape)} and {list(second.shape)}")
        return first * second, None
    if kind == "lokr":
        w1 = f["w1"] if "w1" in f else f["w1a"] @ f["w1b"]
        if "w2" in f:
            w2 = f["w2"]
        elif "t2" in f:
            w2 = _tucker(f["t2"], f["w2a"], f["w2b"])
        else:
            w2 = f["w2a"] @ f["w2b"]
        if w1.dim() != 2:
            raise ValueError(f"lokr_w1 of shape {list(w1.shape)}")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()), None
    return f.get("diff"), f.get("diff_b")


def _fit(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a change of `shape` is a weight of shape `target`: the same, the same but for 1x1
    kernel dims (linear <-> 1x1 conv layers), or a conv kernel flattened as LyCORIS stores it."""
    if shape == target:
        return True
    if _squeeze(shape) == _squeeze(target):
        return True
    return len(shape) == 2 and len(target) == 4 and shape[0] == target[0] and shape[1] == math.prod(target[1:])


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


# --- finding the layers -------------------------------------------------------------------------------


class _Targets:
    """Every name a file may give a layer of this model -> the layer's canonical module name.

    U-Net: LDM names (kohya SDXL, ComfyUI) and diffusers' names (kohya SD1/SD2, PEFT), from
    `keymap.unet`'s table for this U-Net's structure. Text encoders: HF CLIP names, with and without
    `text_model.`. kohya keys are the same names with "_" for ".". A name two modules would share
    underscored is left out (ambiguous), never guessed.
    """

    def __init__(self, components, spec=None):
        self.components = components
        self._spec = spec
        self._tables: dict[str, tuple[dict[str, str | None], dict[str, str | None]]] = {}

    @property
    def spec(self):
        if self._spec is None:
            from ldmcli.detect import detect_spec

            self._spec = detect_spec(self.components)
        return self._spec

    def resolve(self, adapter: Adapter) -> str | None:
        tensors = self.components.networks.get(adapter.network)
        if tensors is None:
            return None
        kohya, dotted = self._table(adapter.network, tensors)
        return (kohya if adapter.kohya else dotted).get(adapter.name)

    def _table(self, network: str, tensors: dict[str, torch.Tensor]):
        if network not in self._tables:
            modules = {k.removesuffix(".weight") for k in tensors if k.endswith(".weight")}
            modules |= {k.removesuffix(".bias") for k in tensors if k.endswith(".bias")}
            names: list[tuple[str, str]] = [(m, m) for m in modules]
            if network == "unet":
                names += self._diffusers_unet_names(tensors)
            else:
                names += [(m.removeprefix("text_model."), m) for m in modules if m.startswith("text_model.")]
            self._tables[network] = (_unambiguous((n.replace(".", "_"), m) for n, m in names), _unambiguous(names))
        return self._tables[network]

    def _diffusers_unet_names(self, tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
        from ldmcli.keymap.unet import unet_ldm_to_diffusers

        try:
            renamed = unet_ldm_to_diffusers({k: k for k in tensors}, self.spec.unet)  # diffusers key -> LDM key
        except (KeyError, ValueError):  # a U-Net the table does not cover: its LDM names only
            return []
        pairs = []
        for dkey, lkey in renamed.items():
            for param in (".weight", ".bias"):
                if dkey.endswith(param) and lkey.endswith(param):
                    pairs.append((dkey.removesuffix(param), lkey.removesuffix(param)))
        return pairs


def _unambiguous(pairs: Iterable[tuple[str, str]]) -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for name, module in pairs:
        table[name] = module if table.get(name, module) == module else None
    return table


# --- applying ---------------------------------------------------------------------------------------


def apply_loras(components, loras: Sequence[tuple[LoraFile, float, float]], *, spec=None) -> list[AppliedLora]:
    """Merge LoRAs into `components`' canonical tensors, in place: `loras` holds (file, text-encoder
    weight, U-Net weight). Every layer of every file is found and checked first; any layer that
    matches nothing, or whose change does not fit its weight, raises one LoraError and nothing is
    changed. Then, per weight, the changes of all files are added in float32 (weight upcast) and
    the sum stored back in the weight's dtype, in place (`_merge`).
    A weight of 0 changes nothing (its layers are still checked). `spec`: the model's ModelSpec if
    already detected (its U-Net structure names diffusers-style U-Net layers; detected otherwise)."""
    targets = _Targets(components, spec)
    plan: dict[tuple[str, str], list[tuple[LoraFile, Adapter, float, str]]] = {}
    reports = []
    for lora, te_weight, unet_weight in loras:
        for weight in (te_weight, unet_weight):
            if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
                raise LoraError(f"{lora.path}: weight {weight!r} is not a finite number")
        _check_fits(lora, components, targets)
        layers: dict[str, int] = {}
        for adapter in lora.adapters:
            multiplier = float(te_weight if adapter.network in TEXT_NETWORKS else unet_weight)
            module = targets.resolve(adapter)
            layers[adapter.network] = layers.get(adapter.network, 0) + 1
            if multiplier == 0:
                continue
            if adapter.shape:
                plan.setdefault((adapter.network, module + ".weight"), []).append((lora, adapter, multiplier, "weight"))
            if adapter.bias_shape is not None:
                plan.setdefault((adapter.network, module + ".bias"), []).append((lora, adapter, multiplier, "bias"))
        reports.append(AppliedLora(lora.path, lora.format, float(te_weight), float(unet_weight), layers))
    networks = components.networks
    overlapping = {network: _shared_storage(networks[network]) for network in {n for n, _ in plan}}
    largest = max((networks[n][k][0].numel() if networks[n][k].dim() else 1 for n, k in plan), default=1)
    scratch = torch.empty(max(largest, MERGE_BLOCK_BYTES // 4), dtype=torch.float32)  # at least one row
    with ExitStack() as stack, torch.no_grad():
        readers = {id(lora): stack.enter_context(_reader(lora)) for lora, *_ in loras if lora.lazy}
        for (network, key), changes in plan.items():
            tensors = networks[network]
            if key in overlapping[network] or not tensors[key].is_contiguous():
                # never write through to another key's storage; rows contiguous for the block view
                tensors[key] = tensors[key].clone(memory_format=torch.contiguous_format)
            _merge(tensors[key], [(_factors(adapter, part, readers.get(id(lora))), adapter.kind, part, multiplier * adapter.scale)
                                  for lora, adapter, multiplier, part in changes], scratch)
    return reports


@contextmanager
def _reader(lora: LoraFile):
    try:
        with SafetensorsReader(lora.path) as reader:
            yield reader
    except CheckpointError as exc:  # changed since it was read
        raise LoraError(str(exc)) from exc


# The roles that hold a bias's change (PEFT's lora_B.bias, a full diff's diff_b): the rest make the weight's.
BIAS_ROLES = ("up_bias", "diff_b")


def _factors(adapter: Adapter, part: str, reader: SafetensorsReader | None) -> dict[str, torch.Tensor]:
    """The factors of the adapter's change to its `part` ("weight" or "bias"), read from its file if the
    file was read lazily (then checked to be what was read before: the file may have changed since)."""
    wanted = {role: t for role, t in adapter.tensors.items() if (role in BIAS_ROLES) == (part == "bias")}
    if reader is None:
        return wanted
    try:
        factors = {role: reader.read(adapter.keys[role]) for role in wanted}
    except CheckpointError as exc:
        raise LoraError(str(exc)) from exc
    if any(factors[role].shape != t.shape or not factors[role].is_floating_point() for role, t in wanted.items()):
        raise LoraError(f"{reader.path}: changed while being merged ({adapter.label})")
    return factors


# Rows of a weight upcast to float32 at once while changes are added: small enough that merging
# adds ~nothing to peak memory, large enough that each addmm is a real matrix product.
MERGE_BLOCK_BYTES = 4 * 1024**2


def _merge(weight: torch.Tensor, changes: list[tuple[dict[str, torch.Tensor], str, str, float]],
           scratch: torch.Tensor) -> None:
    """weight += sum of scale * change, summed in float32 on the weight upcast to float32 and
    rounded to the weight's dtype once, written in place a block of rows at a time through
    `scratch` (float32, MERGE_BLOCK_BYTES). `changes`: per change its factors (role -> tensor), kind,
    part ("weight"/"bias") and scale. A plain LoRA's change is one addmm per block (up[rows] @ down,
    conv kernels flattened); other kinds' change is made whole, then added block by block."""
    rows = weight.view(weight.shape[0], -1)
    adds = []  # per change: block, first row, last row -> block += scale * the change's rows
    for t, kind, part, scale in changes:
        if part == "weight" and kind == "lora" and "mid" not in t:
            up = t["up"].reshape(t["up"].shape[0], -1).float()
            down = t["down"].reshape(t["down"].shape[0], -1).float()
            adds.append(lambda block, a, b, up=up, down=down, scale=scale: block.addmm_(up[a:b], down, alpha=scale))
        elif part == "bias":  # the change itself (lora_B.bias, diff_b)
            whole = next(iter(t.values())).float().reshape(rows.shape)
            adds.append(lambda block, a, b, whole=whole, scale=scale: block.add_(whole[a:b], alpha=scale))
        else:
            whole = _delta(kind, t)[0].reshape(rows.shape)
            adds.append(lambda block, a, b, whole=whole, scale=scale: block.add_(whole[a:b], alpha=scale))
    step = max(1, scratch.numel() // rows.shape[1])
    for a in range(0, rows.shape[0], step):
        b = min(a + step, rows.shape[0])
        block = scratch[: (b - a) * rows.shape[1]].view(b - a, rows.shape[1]).copy_(rows[a:b])
        for add in adds:
            add(block, a, b)
        rows[a:b] = block  # rounded to the weight's dtype once


def _shared_storage(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The keys whose tensor shares its storage with another key's: a pickle may store two keys in one
    storage, and a fused q/k/v split on reading leaves views of one tensor. Such a tensor is written in
    place only if its bytes overlap no other's (the split views do not); otherwise it is copied first."""
    by_storage: dict[int, list[str]] = {}
    for key, tensor in tensors.items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    shared = set()
    for keys in by_storage.values():
        reach, reaching = -1, None  # the furthest end of the spans so far, and whose it is
        for begin, end, key in sorted((tensors[k].data_ptr(), tensors[k].data_ptr() + tensors[k].nbytes, k) for k in keys):
            if begin < reach:
                shared.update((key, reaching))
            if end > reach:
                reach, reaching = end, key
    return shared


def _check_fits(lora: LoraFile, components, targets: _Targets) -> None:
    """Every layer of `lora` names a layer of this model, and its change has that layer's shape."""
    unmatched: list[Adapter] = []
    misfits: list[tuple[Adapter, str, tuple, tuple]] = []
    networks = components.networks
    for adapter in lora.adapters:
        module = targets.resolve(adapter)
        if module is None:
            unmatched.append(adapter)
            continue
        tensors = networks[adapter.network]
        for param, shape in (("weight", adapter.shape), ("bias", adapter.bias_shape)):
            if not shape:
                continue
            key = f"{module}.{param}"
            if key not in tensors:
                misfits.append((adapter, key, shape, ()))
            elif not (_fit(shape, tuple(tensors[key].shape)) if param == "weight" else shape == tuple(tensors[key].shape)):
                misfits.append((adapter, key, shape, tuple(tensors[key].shape)))
    if unmatched or misfits:
        raise LoraError(_mismatch_message(lora, components, targets, unmatched, misfits))


def _mismatch_message(lora: LoraFile, components, targets: _Targets, unmatched, misfits) -> str:
    try:
        model = targets.spec.display_name
    except LdmError:
        model = None
    parts = []
    guess = _family_guess(lora)
    if "text_encoder_2" in lora.networks and components.text_encoder_2 is None:
        parts.append("it changes a second text encoder (an SDXL LoRA), which this model does not have")
    elif guess and model and not model.startswith(guess):
        parts.append(f"it looks made for {guess}")
    if unmatched:
        parts.append(f"{len(unmatched)} of its {len(lora.adapters)} layers match no layer of this model: "
                     + name_keys([a.label for a in unmatched], 3))
    if misfits:
        adapter, key, shape, target = misfits[0]
        has = f"is {list(target)}" if target else "does not exist"
        parts.append(f"{len(misfits)} {'layers do' if len(misfits) > 1 else 'layer does'} not fit, e.g. {adapter.label} "
                     f"changes a {list(shape)} weight; {NETWORK_LABELS[adapter.network]} {key} {has}")
    return f"{lora.path}: not a LoRA for this {model or 'kind of'} model: " + "; ".join(parts)


# The cross-attention context width (the in-features of attn2.to_k / to_v) of each family.
_CONTEXT_FAMILY = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}


def _family_guess(lora: LoraFile) -> str | None:
    """The family a LoRA was made for, when its layers say so: a second text encoder is SDXL's; the
    width its cross-attention keys read is the text encoder's (768 SD1, 1024 SD2, 2048 SDXL)."""
    if "text_encoder_2" in lora.networks:
        return "Stable Diffusion XL"
    for adapter in lora.adapters:
        if adapter.network == "unet" and re.search(r"attn2[._]to_[kv]$", adapter.name) and len(adapter.shape) >= 2:
            family = _CONTEXT_FAMILY.get(adapter.shape[1])
            if family:
                return family
    return None


# --- A1111's tag ----------------------------------------------------------------------------------------
