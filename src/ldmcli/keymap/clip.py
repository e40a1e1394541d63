"""Key maps for CLIP text encoders into our canonical names (those of ``models.clip``).

Canonical = Hugging Face ``CLIPTextModel`` names with the ``text_model.`` prefix, plus an
optional top-level ``text_projection.weight``. Each source layout gets one ``*_to_canonical``
function; every one fails loudly on unknown keys, naming them (``unknown_keys_error``;
``check_canonical`` checks a finished mapping against ``CANONICAL_KEY``).
Known extras are dropped by an explicit list, never by a pattern that could hide a real weight.

Layouts handled here:
- HF / diffusers ``text_encoder/`` (and SD1 single files after stripping
  ``cond_stage_model.transformer.``): ``clip_hf_to_canonical``.
- OpenCLIP text towers (SD2 ``cond_stage_model.model.``, SD2 in Stability's sgm layout
  ``conditioner.embedders.0.model.``, SDXL's bigG ``conditioner.embedders.1.model.``):
  ``clip_openclip_to_canonical`` renames, splits the fused ``in_proj_weight``/``in_proj_bias``
  into q/k/v and transposes ``text_projection`` (OpenCLIP multiplies ``x @ P``, a Linear stores
  ``P.T``). ``clip_canonical_to_openclip`` is its inverse (used to write test single files).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")

PREFIX = "text_model."

# Every parameter name of models.clip.CLIPTextModel, as one pattern.
CANONICAL_KEY = re.compile(
    r"text_model\.("
    r"embeddings\.(token|position)_embedding\.weight"
    r"|encoder\.layers\.\d+\.(layer_norm1|layer_norm2|self_attn\.[qkv]_proj|self_attn\.out_proj"
    r"|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|final_layer_norm\.(weight|bias))"
    r"|text_projection\.weight"
)

# Saved by older transformers (a buffer [1, 77] of 0..76) and by SD1 single files; we compute
# positions in forward instead.
IGNORED_HF_KEYS = frozenset({"text_model.embeddings.position_ids"})

# Top-level children of ``text_model``: recent transformers save CLIPTextModel without the
# ``text_model.`` prefix, so keys starting with these get it added.
_UNPREFIXED_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def unknown_keys_error(keys: Iterable[str], *, source: str) -> ValueError:
    """The error for keys no map knows: names them (the first 20 and the count)."""
    unknown = sorted(keys)
    shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
    return ValueError(f"unknown keys in {source} CLIP text encoder state dict: {shown}")


def check_canonical(keys: Iterable[str], *, source: str) -> None:
    """Raise ValueError naming every key that is not a canonical CLIP text parameter."""
    unknown = [k for k in keys if not CANONICAL_KEY.fullmatch(k)]
    if unknown:
        raise unknown_keys_error(unknown, source=source)


def clip_hf_to_canonical(sd: Mapping[str, T]) -> dict[str, T]:
    """Normalise an HF/diffusers CLIP text encoder state dict to canonical names.

    Accepts both ``text_model.``-prefixed and unprefixed spellings, drops ``position_ids``, and
    raises ValueError on any unknown key or on a key present in both spellings.
    """
    out: dict[str, T] = {}
    unknown = []
    for key, value in sd.items():
        name = PREFIX + key if key.startswith(_UNPREFIXED_CHILDREN) else key
        if name in IGNORED_HF_KEYS:
            continue
        if not CANONICAL_KEY.fullmatch(name):
            unknown.append(key)  # report the key as the file spells it
        elif name in out:
            raise ValueError(f"CLIP text key {name!r} occurs both with and without {PREFIX!r}")
        out[name] = value
    if unknown:
        raise unknown_keys_error(unknown, source="HF")
    return out


# --- OpenCLIP ------------------------------------------------------------------------------------

# OpenCLIP name -> canonical name, outside the transformer blocks.
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# Inside ``transformer.resblocks.N.``: OpenCLIP suffix -> canonical suffix (in_proj handled apart).
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
# The contrastive temperature: CLIP training only, never used for conditioning.
OPENCLIP_IGNORED = frozenset({"logit_scale"})


def clip_openclip_to_canonical(sd: Mapping[str, T], *, keep_projection: bool) -> dict[str, T]:
    """Rename an OpenCLIP text tower (prefix stripped) to canonical names.

    keep_projection: SDXL's bigG pools through ``text_projection`` (kept, transposed to a Linear
    weight); SD2 conditions on hidden states only, so there it is dropped like ``logit_scale``.
    Raises ValueError naming unknown keys.
    """
    out: dict = {}
    unknown = []
    for key, value in sd.items():
        if key in OPENCLIP_IGNORED or (key == "text_projection" and not keep_projection):
            continue
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()  # [width, proj] (x @ P) -> Linear weight [proj, width]
        elif m := _IN_PROJ.fullmatch(key):
            # Fused [3C, C] (or [3C]) in q, k, v order, as torch.nn.MultiheadAttention stores it.
            layer, kind = m.groups()
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{layer}.self_attn.{name}_proj.{kind}"] = part
        elif (m := _RESBLOCK.fullmatch(key)) and m.group(2) in _OPENCLIP_BLOCK:
            layer, module, kind = m.groups()
            out[f"text_model.encoder.layers.{layer}.{_OPENCLIP_BLOCK[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown, source="OpenCLIP")
    check_canonical(out, source="OpenCLIP")
    return out


def clip_canonical_to_openclip(sd: Mapping[str, T]) -> dict[str, T]:
    """Inverse of ``clip_openclip_to_canonical`` (q/k/v fused again, projection transposed back)."""
    import torch

    check_canonical(sd, source="canonical")
    top = {v: k for k, v in _OPENCLIP_TOP.items()}
    block = {v: k for k, v in _OPENCLIP_BLOCK.items()}
    layer_key = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
    out: dict = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        else:
            layer, module, kind = layer_key.fullmatch(key).groups()  # type: ignore[union-attr]
            if module.startswith("self_attn.") and module[-6:] in ("q_proj", "k_proj", "v_proj"):
                if module.startswith("self_attn.q"):  # emit the fused tensor once, at q
                    parts = [sd[f"text_model.encoder.layers.{layer}.self_attn.{n}_proj.{kind}"] for n in "qkv"]
                    out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)  # type: ignore[arg-type]
            else:
                out[f"transformer.resblocks.{layer}.{block[module]}.{kind}"] = value
    return out
