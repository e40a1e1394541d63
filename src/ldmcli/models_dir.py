"""Find models by name: ./weights, $LDM_MODELS_DIR and the local Hugging Face cache; and the model an
image records, by its A1111 hash or name (`find_recorded_model`, for --from-png).

People who already downloaded a model with diffusers have it under
`~/.cache/huggingface/hub/models--ORG--NAME/snapshots/REV/`: we use it in place, nothing is downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldmcli.errors import CheckpointError, ModelNotFoundError
from ldmcli.files import check_regular_file

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the repository, for an editable install
DEMO_MODEL = "ldm-demo.safetensors"


@dataclass(frozen=True)
class FoundModel:
    name: str
    path: Path
    where: str  # "weights", "LDM_MODELS_DIR", "huggingface cache"


def search_dirs() -> list[tuple[str, Path]]:
    """(label, folder) in lookup order."""
    dirs = [("weights", Path("weights")), ("weights", PACKAGE_ROOT / "weights")]
    if os.environ.get("LDM_MODELS_DIR"):
        dirs.append(("LDM_MODELS_DIR", Path(os.environ["LDM_MODELS_DIR"])))
    unique, seen = [], set()
    for label, folder in dirs:
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((label, folder))
    return unique


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def list_models() -> list[FoundModel]:
    """Every model file or diffusers folder in the search folders and the HF cache."""
    found = []
    for label, folder in search_dirs():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix in WEIGHT_SUFFIXES:
                found.append(FoundModel(entry.stem, entry, label))
            elif entry.is_dir() and (entry / "model_index.json").is_file():
                found.append(FoundModel(entry.name, entry, label))
    cache = hf_hub_cache()
    if cache.is_dir():
        for repo in sorted(cache.glob("models--*")):
            snapshots = sorted((repo / "snapshots").glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
            if snapshots:
                name = repo.name.removeprefix("models--").replace("--", "/")
                found.append(FoundModel(name, snapshots[-1].parent, "huggingface cache"))
    return found


def resolve_model(name: str | os.PathLike) -> Path:
    """A path as given if it exists, else a model of that name (file stem, folder name or HF repo id).

    A path must be a regular file or a folder: a FIFO, socket or device given as a model would
    block the first read forever (a FIFO without a writer) or never end (/dev/zero).
    """
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            check_regular_file(path, CheckpointError)
        return path
    text = str(name)
    for model in list_models():
        if text in (model.name, model.path.name, model.name.split("/")[-1]):
            return model.path
    raise ModelNotFoundError(f"model {text!r} not found: not a path, and not in {places()}")


@dataclass(frozen=True)
class RecordedModel:
    """The model ldm found for the one an image records: how it matched, and its hash."""

    model: FoundModel
    by: str  # "hash" or "name"
    hash: str | None  # its A1111 hash (None for a diffusers folder)


def find_recorded_model(name: str | None, recorded_hash: str | None) -> RecordedModel | None:
    """The model an image records, among `list_models()`: the one with its hash (`hashing.hash_matches`:
    A1111's 10-digit hash or the older 8-digit one), else one of its name (the file's stem, as A1111's
    `Model` is, or a folder's or HF repo's name, case-insensitively); None when neither is found.

    Models whose name matches are hashed first, so the usual case hashes one file; the others only if
    needed (once each: `hashing` caches by path, size and mtime).
    """
    from ldmcli.hashing import hash_matches, model_hash

    models = list_models()
    named = [m for m in models if _is_named(m, name)]
    if recorded_hash:
        for model in [*named, *(m for m in models if m not in named)]:
            if hash_matches(model.path, recorded_hash):
                return RecordedModel(model, "hash", model_hash(model.path))
    if named:
        return RecordedModel(named[0], "name", model_hash(named[0].path))
    return None


def _is_named(model: FoundModel, name: str | None) -> bool:
    if not name or not name.strip():
        return False
    wanted = name.strip().casefold()
    stems = {model.name, model.path.name, model.path.stem, model.name.split("/")[-1]}
    return wanted in {s.casefold() for s in stems}


def places() -> str:
    """Where ldm looks for models by name, for messages."""
    return ", ".join([str(folder) for _, folder in search_dirs()] + [str(hf_hub_cache())])


def demo_model() -> Path | None:
    """The bundled demo model, if present (weights/ldm-demo.safetensors of the repository)."""
    for _, folder in search_dirs():
        if (folder / DEMO_MODEL).is_file():
            return folder / DEMO_MODEL
    return None
