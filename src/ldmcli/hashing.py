"""Model hashes as A1111 writes them: the first 10 hex digits of the file's SHA-256 ("AutoV2"); images
from A1111 before late 2022 carry its older 8-digit hash (`legacy_model_hash`), which `hash_matches` knows.

Hashing a 2-7 GB file takes seconds, so results are cached by (path, size, mtime) in
$XDG_CACHE_HOME/ldm/hashes.json (~/.cache/ldm/hashes.json). The cache is only an optimisation: one
that is unreadable, not a regular file, too large, not a JSON object, or holding values that are not
SHA-256 digests is ignored (the entries that are not digests dropped) and rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from ldmcli.limits import MAX_CACHE_BYTES

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm" / "hashes.json"


def file_sha256(path: Path) -> str:
    """The SHA-256 of the whole file, cached."""
    return _cached_digest(path, "", 0)


def safetensors_data_sha256(path: Path) -> str:
    """The SHA-256 of a .safetensors file's tensor data, its header left out: kohya-ss's "addnet" hash,
    which A1111 records for LoRAs (so that editing the metadata does not change it). Cached."""
    with open(Path(path), "rb") as f:
        header_bytes = int.from_bytes(f.read(8), "little")
    return _cached_digest(path, "data|", 8 + header_bytes)


def _cached_digest(path: Path, kind: str, offset: int) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    file_key = f"{kind}{path}|"
    key = f"{file_key}{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    # The file changed (or is new): its older entries can never be hit again.
    cache = {k: v for k, v in cache.items() if not k.startswith(file_key)}
    cache[key] = digest.hexdigest()
    _write_cache(cache_path, cache)
    return cache[key]


def _read_cache(cache_path: Path) -> dict[str, str]:
    """The cached digests by key; {} for a cache that is missing or cannot be used, and without the
    entries that are not digests (a cache edited or damaged by hand must not make up a hash)."""
    from ldmcli.errors import LdmError
    from ldmcli.files import loads_json, read_bounded

    try:
        cache = loads_json(read_bounded(cache_path, MAX_CACHE_BYTES))
    except (LdmError, ValueError):  # missing, a FIFO, too large, not JSON
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str) and _SHA256.fullmatch(v)}


def _write_cache(cache_path: Path, cache: dict[str, str]) -> None:
    """Replace the cache file atomically (a temporary file per process, then a rename)."""
    tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:  # an unwritable cache only costs time
        with contextlib.suppress(OSError):
            tmp.unlink()


def model_hash(path: Path) -> str | None:
    """A1111's short hash of a single-file model; None for a diffusers folder (A1111 has no such hash)."""
    path = Path(path)
    return file_sha256(path)[:10] if path.is_file() else None


def lora_hash(path: Path) -> str:
    """A1111's short LoRA hash (`Lora hashes`): 12 hex digits of the data hash of a .safetensors file
    (`safetensors_data_sha256`), of the whole file's SHA-256 for other formats (its `network.py`)."""
    path = Path(path)
    digest = safetensors_data_sha256(path) if path.suffix.lower() == ".safetensors" else file_sha256(path)
    return digest[:12]


def embedding_hash(path: Path) -> str:
    """A1111's textual-inversion hash (`TI hashes`): 12 hex digits of the file's SHA-256."""
    return file_sha256(path)[:12]


def vae_hash(path: Path) -> str:
    """A1111's `VAE hash`: 10 hex digits of the VAE file's SHA-256 (its `sd_vae.get_loaded_vae_hash`)."""
    return file_sha256(path)[:10]


# A1111's first model hash (until late 2022; still in many images' `Model hash`): SHA-256 of 64 KiB
# read at 1 MiB into the file, 8 hex digits. Cheap: nothing to cache.
LEGACY_HASH_OFFSET, LEGACY_HASH_BYTES, LEGACY_HASH_DIGITS = 0x100000, 0x10000, 8


def legacy_model_hash(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(f.read(LEGACY_HASH_BYTES)).hexdigest()[:LEGACY_HASH_DIGITS]


_HEX = re.compile(r"[0-9a-f]{8,64}")


def hash_matches(path: Path, recorded: str | None) -> bool:
    """Whether the single-file model at `path` has the hash an image records: A1111's 10-digit hash
    (or any longer prefix of the SHA-256, up to all of it), or its 8-digit legacy hash. A folder, or a
    recorded value that is not such a hash, never matches."""
    wanted = (recorded or "").strip().lower()
    path = Path(path)
    if not _HEX.fullmatch(wanted) or not path.is_file():
        return False
    try:
        if len(wanted) == LEGACY_HASH_DIGITS:
            return legacy_model_hash(path) == wanted
        return file_sha256(path).startswith(wanted)
    except OSError:  # unreadable: not the model, as far as anyone can tell
        return False
