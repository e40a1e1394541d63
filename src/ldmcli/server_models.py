"""The checkpoints and LoRAs a server's clients may name, and how they name them.

A client names a model only by a name `/sdapi/v1/sd-models` lists (A1111's title, its model name, or the
file's name): never by a filesystem path. The list is `models_dir.list_models` (./weights,
$LDM_MODELS_DIR, the Hugging Face cache), read anew on each call, so a file copied into the models folder
is there at the next request (`/sdapi/v1/refresh-checkpoints` has nothing more to do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldmcli.errors import LdmError


class ModelNameError(LdmError):
    """A model name a client gave that is not one `sd-models` lists (a path, `../x`, or unknown): HTTP 422."""


@dataclass(frozen=True)
class ListedModel:
    """One checkpoint as A1111's `/sdapi/v1/sd-models` lists it."""

    title: str  # what `sd_model_checkpoint` says: the file's name ("v1-5.safetensors"), or a folder's / HF repo's
    model_name: str  # the file's stem, a folder's name, an HF repo id
    path: Path
    hash: str | None  # A1111's short hash, when known (the loaded model's); A1111 lists unhashed models as None

    def record(self) -> dict:
        """A1111's SDModelItem."""
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash, "sha256": None,
                "filename": str(self.path), "config": None}


def listed_models(hashes: dict[Path, str | None] | None = None) -> list[ListedModel]:
    """Every model ldm finds by name (`models_dir.list_models`), with the hashes already known (`hashes`:
    resolved path -> short hash). Titles carry no hash, so that a title stays the same whether or not the
    model was hashed yet (A1111 accepts a title with or without its hash, and so does `find_listed`)."""
    from ldmcli.models_dir import list_models

    hashes = hashes or {}
    found, seen = [], set()
    for model in list_models():
        title = model.path.name if model.path.is_file() else model.name
        if title in seen:  # a later folder's model of the same name is not reachable by that name
            continue
        seen.add(title)
        found.append(ListedModel(title, model.name, model.path, hashes.get(model.path.resolve())))
    return found


def title_of(path: Path) -> str:
    """A1111's title of the model at `path` (`listed_models`): the file's name, or the folder's. The entry
    listed at that very path first (a link in the models folder is its own entry), else the one it is."""
    models = listed_models()
    for same in (lambda m: m.path == Path(path), lambda m: m.path.resolve() == Path(path).resolve()):
        found = next((m for m in models if same(m)), None)
        if found is not None:
            return found.title
    return Path(path).name


def find_listed(name: object, what: str = "sd_model_checkpoint") -> Path:
    """The file of the model `name` names: a title, model name or file name of one `listed_models` has
    (A1111's "NAME [hash]" too). Anything else, a path above all, is a ModelNameError; the name is never
    opened as a path, so `../x` or `/etc/passwd` reach nothing."""
    from ldmcli.metadata import checkpoint_name, printable

    if not isinstance(name, str) or not name.strip():
        raise ModelNameError(f"{what} must be the name of a model /sdapi/v1/sd-models lists, got {printable(str(name), 60)!r}")
    wanted = checkpoint_name(name)
    models = listed_models()
    for model in models:
        if wanted in (model.title, model.model_name, model.path.name, model.path.stem):
            return model.path
    if _looks_like_a_path(wanted):
        raise ModelNameError(f"{what} {printable(name, 80)!r} is a path: clients name models only by the names "
                             "/sdapi/v1/sd-models lists")
    shown = ", ".join(m.title for m in models[:8]) + (" ..." if len(models) > 8 else "")
    raise ModelNameError(f"{what} {printable(name, 80)!r} is not a model /sdapi/v1/sd-models lists "
                         f"({shown or 'none found'})")


def _looks_like_a_path(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return os.path.isabs(name) or name.startswith(("~", "\\")) or any(p in (".", "..") for p in parts) or "\0" in name


def listed_loras(folder: Path | None = None) -> list[dict]:
    """A1111's `/sdapi/v1/loras`: every LoRA file in the LoRA folders (`models_dir.extra_dirs`), which a
    prompt's `<lora:NAME:W>` tag names; `folder`: --lora-dir, looked in first."""
    from ldmcli.models_dir import extra_name, list_extras

    return [{"name": extra_name(path), "alias": extra_name(path), "path": str(path), "metadata": {}}
            for path in list_extras("lora", folder)]
