"""Read tensors from model files: safetensors (memory-mapped), pickled .ckpt (weights only), diffusers folders.

This module only reads. Which tensor belongs to which network, and under what name, is `layout.py`'s job.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ldmcli.errors import CheckpointError
from ldmcli.unsupported import refuse_unknown_format

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def read_state_dict(path: Path, *, meta: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one weights file, by key. Raises CheckpointError naming the file on any problem.

    meta=True gives shape-and-dtype-only tensors, read from a safetensors header without the data.
    dtype: floating-point tensors come back in this dtype, cast one tensor at a time as they are read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if path.suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors_header(path) if meta else _read_safetensors(path, dtype)
    if path.suffix in PICKLE_SUFFIXES:
        tensors = _read_pickle(path)
        return tensors if dtype is None else {k: _cast(v, dtype) for k, v in tensors.items()}
    refuse_unknown_format(path)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors header ({} when absent)."""
    with _open_safetensors(path) as f:
        return dict(f.metadata() or {})


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read tensor by tensor with plain file reads, casting each as it arrives.

    Not through safetensors' memory map: every page of a mapped file that is touched counts in the
    process's RSS until the map closes, so mapping a 2 GB fp16 file and copying it out (to cast or
    to own the memory) peaks at twice the weights. Reading into one tensor at a time peaks at the
    weights plus the largest tensor; the file's pages stay in the page cache for the next run.
    """
    with _open_safetensors(path) as f:  # validates the header and the file's length first
        keys = list(f.keys())
    with open(path, "rb") as stream:
        header_len = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_len))
        data_start = 8 + header_len
        tensors = {}
        for key in keys:
            entry = header[key]
            begin, end = entry["data_offsets"]
            buffer = bytearray(end - begin)
            stream.seek(data_start + begin)
            if stream.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path}: truncated while reading {key}")
            file_dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if file_dtype is None:
                raise CheckpointError(f"{path}: {key} has unsupported dtype {entry['dtype']}")
            tensor = torch.frombuffer(buffer, dtype=file_dtype) if buffer else torch.empty(0, dtype=file_dtype)
            tensors[key] = _cast(tensor.reshape(entry["shape"]), dtype)
        return tensors


def _read_safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    with _open_safetensors(path) as f:
        tensors = {}
        for key in f.keys():
            piece = f.get_slice(key)
            tensors[key] = torch.empty(piece.get_shape(), dtype=_SAFETENSORS_DTYPES[piece.get_dtype()], device="meta")
        return tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


@contextmanager
def _open_safetensors(path: Path):
    """safe_open, with any failure (bad header, truncated data) turned into a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from exc


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: the unpickler may rebuild tensors and plain containers, nothing else.
    # A checkpoint that needs any other class is refused: we never run a checkpoint's code.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: it needs more than tensors ({_refused_global(exc)}); "
            "convert it to .safetensors with a tool you trust"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(exc)})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def read_sharded_or_single(
    folder: Path, stems: tuple[str, ...], *, meta: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """Weights of one diffusers component folder: the first of `stems` found, safetensors preferred.

    Handles sharded files (`<stem>.safetensors.index.json`) too.
    """
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                tensors: dict[str, torch.Tensor] = {}
                for shard in shards:
                    tensors.update(read_state_dict(folder / shard, meta=meta, dtype=dtype))
                return tensors, index
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return read_state_dict(single, meta=meta, dtype=dtype), single
    raise CheckpointError(f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in stems)})")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({_one_line(exc)})") from exc


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _refused_global(exc: BaseException) -> str:
    """The class or function a weights_only unpickler refused, as torch names it."""
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    return f"it wants {match.group(1)}" if match else _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
