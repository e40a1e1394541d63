"""Model hashes as A1111 writes them: the first 10 hex digits of the file's SHA-256 ("AutoV2").

Hashing a 2-7 GB file takes seconds, so results are cached by (path, size, mtime) in
~/.cache/ldm/hashes.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm" / "hashes.json"


def file_sha256(path: Path) -> str:
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_path)
    except OSError:
        pass  # an unwritable cache only costs time
    return cache[key]


def model_hash(path: Path) -> str | None:
    """A1111's short hash of a single-file model; None for a diffusers folder (A1111 has no such hash)."""
    path = Path(path)
    return file_sha256(path)[:10] if path.is_file() else None
