"""Read tensors from model files: safetensors (memory-mapped), pickled .ckpt (weights only), diffusers folders.

This module only reads. Which tensor belongs to which network, and under what name, is `layout.py`'s job.

Files are untrusted input: only regular files are opened (`files.py`), a tensor of a dtype we do not load is
refused by name, a pickle's keys must be strings and its weights tensors, a shard index may only name files
beside it, and JSON is read up to MAX_JSON_BYTES. Every problem is a one-line CheckpointError naming the file.
"""

from __future__ import annotations

import pickle
import re
import reprlib
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ldmcli.errors import CheckpointError, name_keys
from ldmcli.files import check_regular_file, is_present, json_type, loads_json, read_bounded
from ldmcli.unsupported import refuse_unknown_format
from ldmcli.limits import MAX_JSON_BYTES

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def read_state_dict(path: Path, *, meta: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one weights file, by key. Raises CheckpointError naming the file on any problem.

    meta=True gives shape-and-dtype-only tensors, read from a safetensors header without the data.
    dtype: floating-point tensors come back in this dtype, cast one tensor at a time as they are read.
    """
    path = check_regular_file(Path(path), CheckpointError, missing="not a file")
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
    with SafetensorsReader(path) as reader:
        return {key: reader.read(key, dtype) for key in reader.keys}


class SafetensorsReader:
    """The tensors of one safetensors file, read on demand by plain file reads (`_read_safetensors`
    says why not by memory map); a context manager that keeps the file open between reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with _open_safetensors(self.path) as f:  # validates the header and the file's length first
            self.keys = list(f.keys())
        self._stream = open(self.path, "rb")
        try:
            # The format: an unsigned 64-bit little-endian header length N, N bytes of JSON header
            # ({name: {"dtype", "shape", "data_offsets": [begin, end]}} relative to the data), the data.
            header_len = int.from_bytes(self._stream.read(8), "little")
            self._header = loads_json(self._stream.read(header_len))
        except BaseException:
            self._stream.close()
            raise
        self._data_start = 8 + header_len

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `key`, its own memory, floating point cast to `dtype` if given."""
        entry = self._header.get(key)
        if entry is None or key == "__metadata__":
            raise CheckpointError(f"{self.path}: no tensor {key}")
        file_dtype = _loadable_dtype(self.path, key, entry["dtype"])
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        self._stream.seek(self._data_start + begin)
        if self._stream.readinto(buffer) != len(buffer):
            raise CheckpointError(f"{self.path}: truncated while reading {key}")
        tensor = torch.frombuffer(buffer, dtype=file_dtype) if buffer else torch.empty(0, dtype=file_dtype)
        return _cast(tensor.reshape(entry["shape"]), dtype)


def _read_safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    with _open_safetensors(path) as f:
        tensors = {}
        for key in f.keys():
            piece = f.get_slice(key)
            dtype = _loadable_dtype(path, key, piece.get_dtype())
            tensors[key] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
        return tensors


# The safetensors dtypes ldm loads. Weights are floating point; integers occur in buffers (CLIP's
# position_ids). The format has more (BOOL, U16, U32, U64, F8_E4M3, F8_E5M2, ...): no Stable Diffusion
# checkpoint this version runs stores them, and 8-bit floats would need their scales to mean anything,
# so a file holding one is refused by name rather than half-loaded. Pickled checkpoints follow the same list.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}
_LOADABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())


def _loadable_dtype(path: Path, key: str, name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name; a CheckpointError naming the tensor for any other."""
    dtype = _SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key} has dtype {name}, which ldm does not load "
                              f"(it loads {', '.join(_SAFETENSORS_DTYPES)})")
    return dtype


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
    obj = _unpickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint: the weights beside epoch, optimizer state, ...
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    return _pickled_tensors(path, obj)


def _unpickle(path: Path) -> object:
    """torch.load with weights_only=True: the unpickler may rebuild tensors and plain containers, nothing
    else. A checkpoint that needs any other class is refused: we never run a checkpoint's code.

    A damaged file makes torch.load fail in many ways (fuzzing found RuntimeError, EOFError, IndexError,
    KeyError, AssertionError, struct.error, UnicodeDecodeError, BadZipFile, ...); since nothing of the
    file ran, each is reported as an unreadable checkpoint. Its warnings (e.g. "Detected pickle
    protocol 98") would break the one-line error, so they are silenced.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        # torch words a global of an allowed-listable module "Unsupported global: GLOBAL x", one of a blocked
        # module ("os", "posix", "subprocess", ...) "unsupported GLOBAL x whose module ... is blocked"
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc)) or re.search(
            r"unsupported GLOBAL (\S+) whose module", str(exc))
        if refused:
            raise CheckpointError(
                f"{path}: refused to unpickle: it needs more than tensors (it wants {refused.group(1)}); "
                "convert it to .safetensors with a tool you trust"
            ) from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_unpickler_reason(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(exc)})") from exc


def _pickled_tensors(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an unpickled state dict, held to what a safetensors header guarantees.

    Keys must be strings; every tensor dense, on the CPU, of a dtype we load. A non-tensor value is refused
    under a dotted key (every weight's name is a dotted module path: `model.diffusion_model.out.2.bias`);
    under a plain one (`global_step`, `epoch`) it is training bookkeeping and skipped.
    """
    tensors = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a state dict key is not a string: {reprlib.repr(key)} ({type(key).__name__})")
        if isinstance(value, torch.Tensor):
            _check_pickled_tensor(path, key, value)
            tensors[key] = value
        elif "." in key:
            raise CheckpointError(f"{path}: {key} is not a tensor but a value of type {type(value).__name__}")
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _check_pickled_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    if tensor.is_quantized or tensor.layout != torch.strided:
        kind = "quantized" if tensor.is_quantized else f"a {str(tensor.layout).removeprefix('torch.')} tensor"
        raise CheckpointError(f"{path}: tensor {key} is {kind}; ldm loads dense tensors")
    if tensor.device.type != "cpu":  # a meta tensor pickles without data
        raise CheckpointError(f"{path}: tensor {key} has no data (a {tensor.device.type} tensor)")
    if tensor.dtype not in _LOADABLE_DTYPES:
        dtypes = ", ".join(str(d).removeprefix("torch.") for d in _SAFETENSORS_DTYPES.values())
        raise CheckpointError(f"{path}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                              f"which ldm does not load (it loads {dtypes})")


def read_sharded_or_single(
    folder: Path, stems: tuple[str, ...], *, meta: bool = False, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], Path]:
    """Weights of one diffusers component folder: the first of `stems` found, safetensors preferred.

    Handles sharded files (`<stem>.safetensors.index.json`) too.
    """
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            index = folder / f"{stem}{suffix}.index.json"
            if is_present(index, CheckpointError):
                return _read_shards(index, suffix, meta=meta, dtype=dtype), index
            single = folder / f"{stem}{suffix}"
            if is_present(single, CheckpointError):
                return read_state_dict(single, meta=meta, dtype=dtype), single
    raise CheckpointError(f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in stems)})")


def _read_shards(index: Path, suffix: str, *, meta: bool, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded component, each tensor found in the shard the index names for it."""
    tensors: dict[str, torch.Tensor] = {}
    for name, keys in sorted(shard_files(index, suffix).items()):
        found = read_state_dict(index.parent / name, meta=meta, dtype=dtype)
        absent = [k for k in keys if k not in found]
        if absent:
            raise CheckpointError(f"{index}: {name} does not hold {name_keys(absent)}")
        twice = found.keys() & tensors.keys()
        if twice:
            raise CheckpointError(f"{index.parent}: {name_keys(twice)} in more than one shard")
        tensors.update(found)
    return tensors


def shard_files(index: Path, suffix: str) -> dict[str, list[str]]:
    """{shard file name: the tensors the index maps to it} of a `<stem><suffix>.index.json`.

    The index (written by diffusers/transformers `save_pretrained`) is {"metadata": ..., "weight_map":
    {tensor name: shard file name}}, the shards beside it. A shard name is data, so it must be a plain
    file name ending in `suffix`: "../x" or "/etc/x" is refused, and no file outside the folder is read.
    """
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no \"weight_map\" object (tensor name -> shard file)")
    shards: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not (isinstance(name, str) and _is_file_name(name) and name.endswith(suffix)):
            raise CheckpointError(
                f"{index}: {key} is mapped to {reprlib.repr(name)}, not the name of a {suffix} file in this folder"
            )
        shards.setdefault(name, []).append(key)
    return shards


def _is_file_name(name: str) -> bool:
    """A name of a file in the folder itself: no separator, not `.` or `..`, no NUL."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_json(path: Path) -> dict:
    """A JSON object from a model folder (model_index.json, a config, a shard index)."""
    try:
        value = loads_json(read_bounded(path, MAX_JSON_BYTES, CheckpointError))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not readable JSON ({_one_line(exc)})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object but {json_type(value)}")
    return value


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _unpickler_reason(exc: BaseException) -> str:
    """What torch's weights_only unpickler objected to, from its long message."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return match.group(1).strip() if match else _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
