"""Model hashes as A1111 writes them: the first 10 hex digits of the file's SHA-256 ("AutoV2").

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
    path = Path(path).resolve()
    stat = path.stat()
    file_key = f"{path}|"
    key = f"{file_key}{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
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
