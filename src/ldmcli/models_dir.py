"""Find models by name: ./weights, $LDM_MODELS_DIR and the local Hugging Face cache.

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
    places = [str(folder) for _, folder in search_dirs()] + [str(hf_hub_cache())]
    raise ModelNotFoundError(f"model {text!r} not found: not a path, and not in {', '.join(places)}")


def demo_model() -> Path | None:
    """The bundled demo model, if present (weights/ldm-demo.safetensors of the repository)."""
    for _, folder in search_dirs():
        if (folder / DEMO_MODEL).is_file():
            return folder / DEMO_MODEL
    return None
