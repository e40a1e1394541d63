"""Which LoRAs a request asks for, and the files they are.

A request's LoRAs are its prompt's ``<lora:NAME:...>`` tags (A1111's syntax; ``<lyco:...>``, the LyCORIS
extension's, is the same thing, as in A1111 1.5+), in order; ``--lora`` and a JSONL line's ``lora`` key
add such tags to the prompt (`with_lora_tags`), so the prompt is their one home and an A1111 text of the
image names them as A1111 does. Tags in the negative prompt are words, as in A1111. Names are found
by `models_dir.resolve_extra` (``--lora-dir``, ``$LDM_LORA_DIR``, ``loras/`` beside the models) before any
model is loaded; the merge itself is `lora.apply_loras`. No torch here: prompts are read before
anything heavy is imported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldmcli.errors import LdmError
from ldmcli.prompt_syntax import extra_network_tags

LORA_TAG_KINDS = ("lora", "lyco")


class LoraError(LdmError):
    """A LoRA/LyCORIS file that cannot be used: unreadable, keys of unknown kinds, factors that do not
    fit together, layers this model does not have (another family's LoRA), or a bad weight. Exit 2."""


@dataclass(frozen=True)
class LoraUse:
    """One LoRA a request applies: its name as written, the file found for it, and its two weights."""

    name: str
    path: Path
    te_weight: float
    unet_weight: float


LoraSet = tuple[LoraUse, ...]
"""The LoRAs a job merges into the model, in the order its prompt names them; () for none."""


def hashes_name(name: str) -> str:
    """A LoRA's name as A1111 writes it in "Lora hashes" (and reads it back): without ':' and ','."""
    return name.replace(":", "").replace(",", "")


def lora_tags(prompt: str) -> list[tuple[str, tuple[str, ...]]]:
    """(name, arguments) of each LoRA tag of `prompt`, in order."""
    _, tags = extra_network_tags(prompt)
    return [(tag.name, tag.args) for tag in tags if tag.kind.lower() in LORA_TAG_KINDS]


def with_lora_tags(prompt: str, loras: Sequence[str]) -> str:
    """`prompt` with a tag for each ``NAME[:W]`` (or ``NAME:te=W1:unet=W2``) of `loras` appended, as
    A1111 users write them: ``--lora film:0.8`` is ``<lora:film:0.8>`` at the prompt's end."""
    tags = "".join(f" <lora:{lora}>" for lora in loras)
    return prompt + tags if prompt or not tags else tags.lstrip()


def check_lora_spec(spec: str) -> str:
    """A ``--lora``/JSONL value checked as a tag's contents (name, then A1111's weights); raises LoraError."""
    name, *args = spec.split(":")
    if not name.strip() or any(c in spec for c in "<>"):
        raise LoraError(f"LoRA {spec!r}: expected NAME, NAME:W or NAME:te=W1:unet=W2")
    try:
        tag_weights(args)
    except LoraError as exc:
        raise LoraError(f"LoRA {spec!r}: {exc}") from None
    return spec


def resolve_loras(prompt: str, lora_dir: Path | None = None, found: Mapping[str, Path] | None = None) -> LoraSet:
    """The LoRAs `prompt` names, each found as a file and its weights read (A1111's rules: `tag_weights`).
    `found`: tag names whose files are known already (--from-png's, found by hash).

    The same file named twice is merged twice, as A1111 applies each tag. Raises LoraError for weights
    it cannot read and ModelNotFoundError for a name it cannot find.
    """
    from ldmcli.models_dir import resolve_extra

    uses = []
    for name, args in lora_tags(prompt):
        te, unet = tag_weights(args)
        path = (found or {}).get(name) or resolve_extra("lora", name, lora_dir)
        uses.append(LoraUse(name, Path(path).resolve(), te, unet))
    return tuple(uses)


def tag_weights(args: Sequence[str]) -> tuple[float, float]:
    """(text-encoder weight, U-Net weight) of `<lora:NAME:args...>` as A1111 reads them: positional
    `W` sets both, a second positional sets the U-Net's; `te=W1`, `unet=W2` override. A1111's `dyn=`
    (DyLoRA rank) and block weights are refused, not ignored."""
    positional, named = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(arg)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 2:
        what = f"{unknown[0]}=" if unknown else f"a third argument {positional[2]!r}"
        raise LoraError(f"<lora:...:{':'.join(args)}>: {what} is not supported (weights: W, W_te:W_unet, te=W, unet=W)")
    te = _weight(named.get("te", positional[0] if positional else "1"), args)
    unet = _weight(named["unet"], args) if "unet" in named else _weight(positional[1], args) if len(positional) > 1 else te
    return te, unet


def _weight(text: str, args: Sequence[str]) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LoraError(f"<lora:...:{':'.join(args)}>: {text!r} is not a weight (a finite number)")
    return value
