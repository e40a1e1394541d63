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


# --- the files people add to a checkpoint: LoRAs, embeddings, VAEs ----------------------------------------


@dataclass(frozen=True)
class ExtraKind:
    """A kind of file added to a checkpoint, and where ldm looks for one by name."""

    label: str  # for messages: "LoRA"
    flag: str  # the command-line flag naming its folder
    env: str  # the environment variable naming its folder (the flag's default)
    subfolders: tuple[str, ...]  # its folder's names beside the model folders (ldm's, A1111's, ComfyUI's)
    suffixes: tuple[str, ...]
    folders: bool = False  # a diffusers folder (config.json) is one too (a VAE)
    recursive: bool = False  # files in subfolders count too (embeddings, as A1111 lists them)


EXTRA_KINDS: dict[str, ExtraKind] = {
    "lora": ExtraKind("LoRA", "--lora-dir", "LDM_LORA_DIR", ("loras", "Lora", "lora"), (".safetensors", ".pt", ".ckpt", ".bin")),
    "embedding": ExtraKind("embedding", "--embeddings-dir", "LDM_EMBEDDINGS_DIR", ("embeddings",), (".safetensors", ".pt", ".bin"),
                           recursive=True),
    "vae": ExtraKind("VAE", "--vae-dir", "LDM_VAE_DIR", ("vae", "VAE"), (".safetensors", ".ckpt", ".pt", ".pth", ".bin"),
                     folders=True),
}


def extra_dirs(kind: str, explicit: Path | None = None) -> list[Path]:
    """Where files of `kind` are looked up by name, in order: `explicit` (its flag), else its
    environment variable; then its subfolders beside the model folders (weights/loras, $LDM_MODELS_DIR/loras)."""
    info = EXTRA_KINDS[kind]
    first = explicit if explicit is not None else (Path(os.environ[info.env]) if os.environ.get(info.env) else None)
    dirs = [first] if first is not None else []
    dirs += [folder / sub for _, folder in search_dirs() for sub in info.subfolders]
    unique, seen = [], set()
    for folder in dirs:
        key = folder.resolve()
        if key not in seen and folder.is_dir():
            seen.add(key)
            unique.append(folder)
    return unique


def list_extras(kind: str, explicit: Path | None = None) -> list[Path]:
    """Every file (or, for a VAE, diffusers folder) of `kind` in its folders, first folder first."""
    info = EXTRA_KINDS[kind]
    found = []
    for folder in extra_dirs(kind, explicit):
        entries = sorted(folder.rglob("*") if info.recursive else folder.iterdir())
        for entry in entries:
            if entry.is_file() and entry.suffix.lower() in info.suffixes:
                found.append(entry)
            elif info.folders and entry.is_dir() and (entry / "config.json").is_file():
                found.append(entry)
    return found


def extra_name(path: Path) -> str:
    """The name A1111 gives such a file, and that prompts and records use: its stem (a folder's name)."""
    return path.name if path.is_dir() else path.stem


def resolve_extra(kind: str, name: str, explicit: Path | None = None) -> Path:
    """A path as given if it exists, else the file of that name (its stem, or its name with suffix) in
    `kind`'s folders: the exact name first, else the one name that matches ignoring case. Raises
    ModelNotFoundError naming where it looked."""
    info = EXTRA_KINDS[kind]
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            check_regular_file(path, CheckpointError)
        return path
    candidates = list_extras(kind, explicit)
    exact = [p for p in candidates if name in (extra_name(p), p.name)]
    if exact:
        return exact[0]  # the first folder's, as models are found
    folded = [p for p in candidates if name.casefold() in (extra_name(p).casefold(), p.name.casefold())]
    if len(folded) == 1:
        return folded[0]
    if folded:
        raise ModelNotFoundError(f"{info.label} {name!r}: more than one matches ignoring case "
                                 f"({', '.join(str(p) for p in folded[:4])}): give its exact name or path")
    dirs = extra_dirs(kind, explicit)
    where = (f"not in {', '.join(str(d) for d in dirs)}" if dirs else
             f"no {info.label} folder exists ({info.flag}, ${info.env}, or {info.subfolders[0]}/ beside the models)")
    raise ModelNotFoundError(f"{info.label} {name!r} not found: not a path, and {where}")


@dataclass(frozen=True)
class FoundExtra:
    path: Path
    by: str  # "hash" | "name" (with a recorded hash: no file has it)


def find_recorded_extra(kind: str, name: str | None, recorded_hash: str | None, explicit: Path | None = None) -> FoundExtra:
    """The file of `kind` an image records (--from-png): the one with its hash (A1111's short hash of that
    kind, `hashing`), else the one of its name (`by` says which); ModelNotFoundError naming both and where
    ldm looked."""
    from ldmcli.hashing import embedding_hash, lora_hash, vae_hash

    hasher = {"lora": lora_hash, "vae": vae_hash, "embedding": embedding_hash}[kind]
    info = EXTRA_KINDS[kind]
    wanted = (recorded_hash or "").strip().lower()
    given = Path(name.strip()) if name and name.strip() else None
    if given is not None and given.is_file():  # named by its path (`--lora /x/y.safetensors`)
        check_regular_file(given, CheckpointError)
        return FoundExtra(given, "hash" if wanted and hasher(given) == wanted else "name")
    candidates = list_extras(kind, explicit)
    # A1111 records a VAE as "x.safetensors"; a name's own dots ("detail_v1.5") stay
    stem = None if given is None else (given.stem if given.suffix.lower() in info.suffixes else given.name).casefold()
    named = [p for p in candidates if stem is not None and extra_name(p).casefold() == stem]
    if wanted:  # the named ones are hashed first: the usual case hashes one file
        for path in [*named, *(p for p in candidates if p not in named)]:
            if path.is_file() and hasher(path) == wanted:
                return FoundExtra(path, "hash")
    if named:
        return FoundExtra(named[0], "name")
    dirs = extra_dirs(kind, explicit)
    where = f"not in {', '.join(str(d) for d in dirs)}" if dirs else f"no {info.label} folder exists ({info.flag}, ${info.env})"
    instead = ", or give --vae to use another" if kind == "vae" else f" (or in a folder given with {info.flag})"
    raise ModelNotFoundError(f"the image was made with {info.label} {name!r} (hash {recorded_hash or 'not recorded'}): "
                             f"{where}; put it there{instead}")
