"""Key maps for CLIP text encoders into our canonical names (those of ``models.clip``).

Canonical = Hugging Face ``CLIPTextModel`` names with the ``text_model.`` prefix, plus an
optional top-level ``text_projection.weight``. Each source layout gets one ``*_to_canonical``
function; every one fails loudly on unknown keys, naming them (``unknown_keys_error``;
``check_canonical`` checks a finished mapping against ``CANONICAL_KEY``).
Known extras are dropped by an explicit list, never by a pattern that could hide a real weight.

Layouts handled here:
- HF / diffusers ``text_encoder/`` (and SD1 single files after stripping
  ``cond_stage_model.transformer.``): ``clip_hf_to_canonical``.
- OpenCLIP (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``): to come,
  as another function here (rename, split the fused ``in_proj_weight``, transpose the projection).
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
