"""Hostile and careless files (issue 15): models, configs, shard indexes, the hash cache and PNGs that
are damaged, of the wrong kind or built to hurt. Each is refused through the real CLI with one line and
exit 2 before any weights load, or read correctly; none may hang ldm, crash it with a raw exception,
or make it read outside the model's folder. Each test failed (or hung) before its fix.

The files are built by hand where the format allows what the normal writers would refuse: the
safetensors layout (u64 little-endian header length, JSON header, data), PNG chunks (length, type,
data, CRC-32), pickles with keys and values no model has.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ldmcli.cli import cli
from ldmcli.limits import MAX_METADATA_CHARS, MAX_TEXT_CHUNK_BYTES

A1111_TEXT = "a red circle\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64"


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def refused(result, *messages: str) -> None:
    """Exit 2 with one line (`ldm: error: ...`) holding every message, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("ldm: error: ") and len(result.output.strip().splitlines()) == 1, result.output
    for message in messages:
        assert message in result.output, result.output


def timed(*args, env=None):
    started = time.perf_counter()
    result = invoke(*args, env=env)
    return result, time.perf_counter() - started


# --- 1. FIFOs and devices given as files ------------------------------------------------------------


@contextmanager
def unblocked_after(fifo: Path, seconds: float = 10.0):
    """A helper process that opens the FIFO's writing end after `seconds`. If ldm blocks opening the
    FIFO for reading (the bug), that releases it, so the test fails on its clock instead of hanging the
    suite (safetensors opens files holding the GIL: no thread of this process could do it). With the
    fix nothing opens the FIFO, the helper blocks in its own open, and is killed."""
    helper = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds}); open({str(fifo)!r}, 'wb').close()"])
    try:
        yield
    finally:
        helper.kill()
        helper.wait()


@pytest.mark.parametrize("command", ["info", "generate"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_fifo_given_as_a_model_is_refused_without_opening_it(tmp_path, command, suffix):
    fifo = tmp_path / f"model{suffix}"
    os.mkfifo(fifo)
    args = ["info", fifo] if command == "info" else ["generate", "a cat", "-m", fifo, "-o", tmp_path / "x.png"]
    with unblocked_after(fifo):
        result, seconds = timed(*args)
    assert seconds < 5, f"blocked {seconds:.0f} s on the FIFO"
    refused(result, f"{fifo}: not a file but a FIFO (named pipe)")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_device_given_as_a_model_is_refused(tmp_path, device):
    link = tmp_path / "model.ckpt"  # a symlink to a device: its stat() is the device's
    link.symlink_to(device)
    refused(invoke("info", link), f"{link}: not a file but a character device")


@pytest.mark.parametrize("member", ["unet/config.json", "model_index.json", "scheduler/scheduler_config.json",
                                    "tokenizer/tokenizer.json"])
def test_fifo_inside_a_diffusers_folder_is_refused(tmp_path, tiny_folder, member):
    folder = linked_copy(tiny_folder, tmp_path / "model")
    target = folder / member
    target.unlink()
    os.mkfifo(target)
    with unblocked_after(target):
        result, seconds = timed("info", folder)
    assert seconds < 5, f"blocked {seconds:.0f} s on the FIFO"
    refused(result, f"{target}: not a file but a FIFO (named pipe)")


@pytest.mark.parametrize("command", ["info", "from-png"])
def test_fifo_given_as_a_png_is_refused(tmp_path, tiny_single_file, command):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    args = (["info", fifo] if command == "info"
            else ["generate", "--from-png", fifo, "-m", tiny_single_file, "-o", tmp_path / "out.png"])
    with unblocked_after(fifo):
        result, seconds = timed(*args)
    assert seconds < 5, f"blocked {seconds:.0f} s on the FIFO"
    refused(result, f"{fifo}: not a file but a FIFO (named pipe)")


# --- 1b. what is already at an output path ---------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--skip-existing"]])
@pytest.mark.parametrize("kind, shown", [("fifo", "a FIFO (named pipe)"), ("folder", "a folder"),
                                         ("device", "a character device")])
def test_output_path_that_is_not_a_file_is_refused_whatever_the_flags(tmp_path, tiny_folder, kind, shown, flags):
    """--skip-existing opened a FIFO there to see whether it was a finished PNG, and blocked forever;
    --overwrite put an image in place of a FIFO or device link, and failed on a folder after loading."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "00000-1.png"
    {"fifo": os.mkfifo, "folder": Path.mkdir, "device": lambda p: p.symlink_to("/dev/null")}[kind](target)
    with unblocked_after(target) if kind == "fifo" else nullcontext():
        result, seconds = timed("generate", "a cat", "-s", "1", "-m", tiny_folder, "-W", "64", "-H", "64",
                                "-o", f"{out}/", *flags)
    assert seconds < 5, f"blocked {seconds:.0f} s"
    refused(result, f"{target}: not a file but {shown}")
    assert kind != "device" or target.is_symlink()


@pytest.mark.parametrize("link_to", ["nowhere.png", "00000-1.png"])  # dangling, and a loop
def test_dangling_symlink_at_an_output_path_counts_as_existing(tmp_path, tiny_folder, link_to):
    """exists() follows links: a link to nothing was "free", and the no-clobber rename failed after loading."""
    out = tmp_path / "out"
    out.mkdir()
    link = out / "00000-1.png"
    link.symlink_to(out / link_to)
    refused(invoke("generate", "a cat", "-s", "1", "-m", tiny_folder, "-W", "64", "-H", "64", "-o", f"{out}/"),
            f"{link} exists: use --skip-existing to keep it or --overwrite to replace it")


def test_overwrite_replaces_a_dangling_symlink_not_its_target(tmp_path, tiny_single_file):
    out = tmp_path / "out"
    out.mkdir()
    link = out / "00000-1.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    result = invoke("generate", "a cat", "-s", "1", "-m", tiny_single_file, "-W", "64", "-H", "64", "--steps", "1",
                    "-o", f"{out}/", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not link.is_symlink() and link.is_file() and not (tmp_path / "elsewhere.png").exists()


def linked_copy(folder: Path, to: Path) -> Path:
    """A copy of a model folder made of symlinks to its files (cheap; as in the Hugging Face cache)."""
    for source in folder.rglob("*"):
        if source.is_file():
            target = to / source.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return to


# --- 2 and 3. safetensors tensors of unsupported dtypes or the wrong shape --------------------------


def read_safetensors(path: Path) -> dict[str, list]:
    """{name: [dtype, shape, raw bytes]} of a safetensors file, in file order."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    body = data[8 + length:]
    return {k: [v["dtype"], v["shape"], body[slice(*v["data_offsets"])]] for k, v in header.items()}


def write_safetensors(path: Path, entries: dict[str, list], metadata: dict | None = None) -> Path:
    """The safetensors layout by hand: u64 little-endian header length, the JSON header
    ({name: {dtype, shape, data_offsets}}, padded to 8 bytes), then the data."""
    header, offset = {}, 0
    for key, (dtype, shape, raw) in entries.items():
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(raw for _, _, raw in entries.values()))
    return path


@pytest.fixture(scope="module")
def tiny_entries(tiny_single_file) -> dict[str, list]:
    return read_safetensors(tiny_single_file)


def with_tensor(entries: dict, key: str, dtype: str, shape: list[int], path: Path) -> Path:
    """The tiny model with `key` replaced by a tensor of `dtype` and `shape` (zero bytes, sized right)."""
    itemsize = {"F32": 4, "I32": 4, "U32": 4, "F16": 2, "U16": 2, "U64": 8, "I64": 8}.get(dtype, 1)
    return write_safetensors(path, {**entries, key: [dtype, shape, b"\0" * (itemsize * math.prod(shape))]})


OUT_BIAS = "model.diffusion_model.out.2.bias"


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "U16", "U32", "U64", "BOOL"])
def test_safetensors_dtype_ldm_does_not_load_is_named(tmp_path, tiny_entries, dtype):
    path = with_tensor(tiny_entries, OUT_BIAS, dtype, [4], tmp_path / "m.safetensors")
    refused(invoke("info", path), f"tensor {OUT_BIAS} has dtype {dtype}, which ldm does not load")


def test_integer_network_weight_is_refused_before_loading(tmp_path, tiny_entries):
    path = with_tensor(tiny_entries, OUT_BIAS, "I32", [4], tmp_path / "m.safetensors")
    refused(invoke("info", path), f"{OUT_BIAS} has dtype int32; network weights are floating point")


@pytest.mark.parametrize("key, shape, message", [
    # tensors the shape rules index into, of the wrong rank: were IndexError / ValueError
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", [32],
     "U-Net tensor input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight has shape [32]; this layer's weight has 2 dimensions"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", [49408],
     "text encoder tensor text_model.embeddings.token_embedding.weight has shape [49408]; this layer's weight has 2"),
    # an empty dimension: was ZeroDivisionError
    ("first_stage_model.encoder.conv_in.weight", [0, 3, 3, 3],
     "first_stage_model.encoder.conv_in.weight has shape [0, 3, 3, 3] (no elements)"),
    # shapes that do not make a U-Net: was a raw ValueError
    ("model.diffusion_model.input_blocks.0.0.weight", [40, 4, 3, 3],
     "U-Net: level widths [32, 64] are not multiples of model_channels=40"),
])
def test_tensor_of_the_wrong_shape_is_named_before_loading(tmp_path, tiny_entries, key, shape, message):
    path = with_tensor(tiny_entries, key, "F32", shape, tmp_path / "m.safetensors")
    refused(invoke("info", path), message)
    refused(invoke("generate", "a cat", "-m", path, "-W", 64, "-H", 64, "--steps", 1, "-o", tmp_path / "x.png"), message)
    assert not (tmp_path / "x.png").exists()


def test_tensor_that_does_not_fit_its_layer_names_both_shapes(tmp_path, tiny_entries):
    path = with_tensor(tiny_entries, OUT_BIAS, "F32", [5], tmp_path / "m.safetensors")
    refused(invoke("generate", "a cat", "-m", path, "-W", 64, "-H", 64, "--steps", 1, "-o", tmp_path / "x.png"),
            "U-Net: out.2.bias has shape [5], the detected architecture expects [4]")


# --- 4. pickled checkpoints whose state dict is not {name: tensor} -----------------------------------


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_single_file) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(tiny_single_file)


@pytest.mark.parametrize("extra, message", [
    ({1: torch.zeros(1)}, "a state dict key is not a string: 1 (int)"),
    ({("a", "b"): torch.zeros(1)}, "a state dict key is not a string: ('a', 'b') (tuple)"),
    ({OUT_BIAS: 3}, f"{OUT_BIAS} is not a tensor but a value of type int"),
    ({OUT_BIAS: [0.0, 0.0, 0.0, 0.0]}, f"{OUT_BIAS} is not a tensor but a value of type list"),
    ({OUT_BIAS: torch.zeros(4, dtype=torch.complex64)}, f"tensor {OUT_BIAS} has dtype complex64, which ldm does not load"),
    ({OUT_BIAS: torch.zeros(4).to(torch.float8_e4m3fn)}, f"tensor {OUT_BIAS} has dtype float8_e4m3fn"),
    ({OUT_BIAS: torch.zeros(4, dtype=torch.bool)}, f"tensor {OUT_BIAS} has dtype bool"),
    ({OUT_BIAS: torch.zeros(4).to_sparse()}, f"tensor {OUT_BIAS} is a sparse_coo tensor; ldm loads dense tensors"),
    ({OUT_BIAS: torch.empty(4, device="meta")}, f"tensor {OUT_BIAS} has no data (a meta tensor)"),
])
def test_ckpt_state_dict_of_the_wrong_types_is_refused(tmp_path, tiny_state_dict, extra, message):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tiny_state_dict, **extra}, "global_step": 5}, path)
    refused(invoke("info", path), message)


def test_damaged_ckpt_is_one_line_without_torch_warnings(tmp_path):
    path = tmp_path / "damaged.ckpt"  # a legacy pickle claiming protocol 20: torch warns, then fails
    path.write_bytes(b"\x80\x14" + b"\x00" * 64)
    refused(invoke("info", path), "not a readable PyTorch checkpoint")


# --- 5. diffusers folders with a damaged shard index ---------------------------------------------------


SHARD = "diffusion_pytorch_model-00001-of-00001.safetensors"


def sharded_folder(tiny_folder: Path, to: Path, index: str | None) -> Path:
    """The tiny folder with its U-Net weights as one shard named by `diffusion_pytorch_model.safetensors.index.json`."""
    folder = linked_copy(tiny_folder, to)
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / SHARD)
    if index is not None:
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    return folder


def unet_keys(tiny_folder: Path) -> list[str]:
    return list(read_safetensors(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sharded_folder_reads(tmp_path, tiny_folder):
    index = json.dumps({"metadata": {}, "weight_map": {k: SHARD for k in unet_keys(tiny_folder)}})
    result = invoke("info", sharded_folder(tiny_folder, tmp_path / "m", index))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("index, message", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "not a JSON object but an array"),
    ("{}", 'no "weight_map" object'),
    ('{"weight_map": [1]}', 'no "weight_map" object'),
    ('{"weight_map": {"conv_in.bias": 5}}', "conv_in.bias is mapped to 5, not the name of a .safetensors file in this folder"),
    ("[" * 100_000, "not readable JSON (nested too deeply)"),
])
def test_damaged_shard_index_is_refused(tmp_path, tiny_folder, index, message):
    folder = sharded_folder(tiny_folder, tmp_path / "m", index)
    refused(invoke("info", folder), f"{folder / 'unet' / 'diffusion_pytorch_model.safetensors.index.json'}: {message}")


@pytest.mark.parametrize("shard", ["../../outside.safetensors", "ABSOLUTE"])
def test_shard_index_never_sends_ldm_outside_the_folder(tmp_path, tiny_folder, shard):
    outside = tmp_path / "outside.safetensors"  # a readable U-Net: before, ldm read it and went on
    outside.write_bytes((tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    shard = str(outside) if shard == "ABSOLUTE" else shard
    index = json.dumps({"weight_map": {k: shard for k in unet_keys(tiny_folder)}})
    folder = sharded_folder(tiny_folder, tmp_path / "m", index)
    refused(invoke("info", folder), "is mapped to", "not the name of a .safetensors file in this folder")


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_config_describing_a_huge_structure_is_refused(tmp_path, tiny_folder, part):
    # Key tables are generated from the config: 1e30 blocks a level made ldm fill memory until killed.
    folder = linked_copy(tiny_folder, tmp_path / "m")
    config = folder / part / "config.json"
    values = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**values, "layers_per_block": 1e30 if part == "vae" else 10**9}))
    refused(invoke("info", folder), f"{config}: layers_per_block", "states more than 64 levels, blocks or layers")


@pytest.mark.parametrize("member, key, value, message", [
    ("unet/config.json", "in_channels", float("inf"), "cannot convert float infinity to integer"),  # was OverflowError
    ("vae/config.json", "scaling_factor", "x", "vae/config.json scaling_factor is 'x', not a positive number"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**9, "num_train_timesteps 1000000000 is not a whole"),
    ("scheduler/scheduler_config.json", "beta_start", "x", "beta_start 'x' is not a number between 0 and 1"),
    ("scheduler/scheduler_config.json", "prediction_type", "sample", "prediction_type 'sample'"),
    # were "config: list index out of range" and "not all arguments converted during string formatting"
    ("unet/config.json", "block_out_channels", [], "unet/config.json: block_out_channels is [], not a non-empty list "
                                                   "of positive whole numbers, one a level"),
    ("unet/config.json", "block_out_channels", "abc", "block_out_channels is 'abc', not a non-empty list"),
    ("vae/config.json", "block_out_channels", [0], "vae/config.json: block_out_channels is [0], not a non-empty"),
    ("vae/config.json", "block_out_channels", [64, True], "block_out_channels is [64, True], not a non-empty"),
    ("unet/config.json", "down_block_types", "DownBlock2D", "down_block_types is 'DownBlock2D', not a non-empty "
                                                            "list of block type names"),
])
def test_config_value_that_would_fail_later_is_refused_now(tmp_path, tiny_folder, member, key, value, message):
    # Each was accepted by `ldm info` (or crashed it) and failed only once sampling or decoding began.
    folder = linked_copy(tiny_folder, tmp_path / "m")
    config = folder / member
    values = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**values, key: value}))
    refused(invoke("info", folder), message)


# --- 5b. tokenizer files ---------------------------------------------------------------------------

EOS = "<|endoftext|>"
BUNDLED = Path(__file__).resolve().parents[1] / "src" / "ldmcli" / "data"


def with_tokenizer_files(tiny_folder: Path, to: Path, files: dict[str, str | bytes]) -> Path:
    """A copy of the tiny folder whose tokenizer/ holds exactly `files` (text or bytes)."""
    folder = linked_copy(tiny_folder, to)
    for old in (folder / "tokenizer").iterdir():
        old.unlink()
    for name, content in files.items():
        target = folder / "tokenizer" / name
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def generate_with(folder: Path, tmp_path: Path):
    return invoke("generate", "a cat", "-m", folder, "-W", 64, "-H", 64, "--steps", 1, "-o", tmp_path / "x.png")


MERGES = "#version: 0.2\ni n\n"
VOCAB = json.dumps({"<|startoftext|>": 1, EOS: 2, "i": 3, "n</w>": 4})


@pytest.mark.parametrize("files, member, message", [
    ({"vocab.json": b"\xff{}", "merges.txt": MERGES}, "vocab.json", "not UTF-8 text (byte 0)"),
    ({"vocab.json": "{", "merges.txt": MERGES}, "vocab.json", "not JSON"),
    ({"vocab.json": "[" * 100_000, "merges.txt": MERGES}, "vocab.json", "not JSON (nested too deeply)"),
    ({"vocab.json": "[1, 2]", "merges.txt": MERGES}, "vocab.json", "is an array, not a {token: id} object"),
    ({"vocab.json": json.dumps({EOS: "2"}), "merges.txt": MERGES}, "vocab.json", "id of '<|endoftext|>' is '2'"),
    ({"vocab.json": json.dumps({EOS: -1}), "merges.txt": MERGES}, "vocab.json", "id of '<|endoftext|>' is -1"),
    ({"vocab.json": json.dumps({EOS: True}), "merges.txt": MERGES}, "vocab.json", "id of '<|endoftext|>' is True"),
    ({"vocab.json": VOCAB}, "merges.txt", "no such file"),
    ({"vocab.json": VOCAB, "merges.txt": "#version: 0.2\nabc\n"}, "merges.txt", "merge 0 is 'abc', not two symbols"),
    ({"vocab.json": VOCAB, "merges.txt": b"i n\n\xc3"}, "merges.txt", "not UTF-8 text"),
    ({"vocab.json": json.dumps({EOS: 2}), "merges.txt": MERGES}, "tokenizer", "the vocabulary has no '<|startoftext|>'"),
    ({"vocab.json": json.dumps({"<|startoftext|>": 1, EOS: 2, "x": 10**9}), "merges.txt": MERGES}, "tokenizer",
     "the vocabulary has id 1000000000; the text encoder has"),
    ({"tokenizer.json": "{}"}, "tokenizer.json", 'has no "model" object'),
    ({"tokenizer.json": json.dumps({"model": {"vocab": {EOS: 2}, "merges": "i n"}})}, "tokenizer.json",
     "model.merges is a string, not an array"),
    ({"tokenizer.json": json.dumps({"model": {"vocab": [], "merges": []}})}, "tokenizer.json",
     "model.vocab is an array"),
    ({"tokenizer.json": json.dumps({"model": {"vocab": {EOS: 2}, "merges": [["i", "n", "x"]]}})}, "tokenizer.json",
     "merge 0 is 'i n x'"),
    ({"tokenizer.json": json.dumps({"model": {"vocab": {EOS: 2}, "merges": [[1, 2]]}})}, "tokenizer.json",
     "merge 0 is [1, 2]"),
    ({"tokenizer.json": json.dumps({"model": {"vocab": {EOS: 2}, "merges": []}, "added_tokens": [{"id": 1}]})},
     "tokenizer.json", "added_tokens is not an array of {content, id} objects"),
])
def test_damaged_tokenizer_file_is_named(tmp_path, tiny_folder, files, member, message):
    # Each was a raw JSONDecodeError, UnicodeDecodeError, KeyError, TypeError or a ValueError traceback
    # once the model loaded, or (an id beyond the embedding table) an IndexError in the middle of the run.
    folder = with_tokenizer_files(tiny_folder, tmp_path / "m", files)
    where = folder / "tokenizer" / member if member != "tokenizer" else folder / "tokenizer"
    refused(generate_with(folder, tmp_path), f"{where}: {message}")
    assert not (tmp_path / "x.png").exists()


def test_bundled_vocabulary_files_still_load(tmp_path, tiny_folder):
    # The checks accept the real files: vocab.json + merges.txt as shipped (OpenAI's vocabulary).
    files = {name: (BUNDLED / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    folder = with_tokenizer_files(tiny_folder, tmp_path / "m", files)
    result = generate_with(folder, tmp_path)
    assert result.exit_code == 0, result.output


# --- 6. the model-hash cache ---------------------------------------------------------------------


@pytest.mark.parametrize("cache", [
    "[1, 2]", '"text"', "5", "null", "[" * 100_000,
    "{KEY: 5}", "{KEY: [1]}", '{KEY: "zz"}',  # this model's entry, of the wrong type or not a digest
    "FIFO",
])
def test_unusable_hash_cache_is_ignored_and_rewritten(tmp_path, tiny_single_file, cache):
    digest = hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()
    path = tmp_path / "cache" / "ldm" / "hashes.json"
    path.parent.mkdir(parents=True)
    if cache == "FIFO":
        os.mkfifo(path)
    else:
        model = tiny_single_file.resolve()
        key = f"{model}|{model.stat().st_size}|{model.stat().st_mtime_ns}"
        path.write_text(cache.replace("KEY", json.dumps(key)))
    with unblocked_after(path):
        result, seconds = timed("info", tiny_single_file, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert seconds < 5, f"blocked {seconds:.0f} s on the FIFO"
    assert result.exit_code == 0, result.output
    assert f"hash: {digest[:10]}\n" in result.output
    assert digest in json.loads(path.read_text()).values()


# --- 7. PNG metadata -------------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk (spec 5.3): big-endian length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def text_chunk(key: str, value: str) -> bytes:
    return chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))


def png(*text: bytes, after: tuple[bytes, ...] = (), width: int = 1, height: int = 1) -> bytes:
    """A PNG: signature, IHDR (8-bit RGB), text chunks, one IDAT of a few zero rows, `after`, IEND.

    The IDAT holds at most 8 rows: for a huge declared size it is not a decodable image, which only
    matters to a reader that decodes pixels."""
    rows = zlib.compress((b"\0" + b"\0" * 3 * min(width, 64)) * min(height, 8))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(text) + chunk(b"IDAT", rows) + b"".join(after)
            + chunk(b"IEND", b""))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_long_last_line_parses_in_linear_time(tmp_path):
    # A1111's pattern under findall rescans a run of key characters from each of its positions:
    # this line took 26 s before (10 MB would take days).
    image = write(tmp_path / "x.png", png(text_chunk("parameters", "a cat\n" + "a" * 80_000)))
    result, seconds = timed("info", image)
    assert result.exit_code == 0, result.output
    assert seconds < 2, f"{seconds:.1f} s"


def test_parameters_text_over_the_limit_is_refused(tmp_path, tiny_single_file):
    text = "a cat\n" * (MAX_METADATA_CHARS // 6 + 1) + "Steps: 4, Seed: 1, Size: 64x64"
    image = write(tmp_path / "x.png", png(text_chunk("parameters", text)))
    message = f"A1111 parameters text has {len(text):,} characters, more than the limit of {MAX_METADATA_CHARS:,}"
    refused(invoke("info", image), message)
    refused(invoke("generate", "--from-png", image, "-m", tiny_single_file, "-o", tmp_path / "out.png"), message)


def test_quoted_value_that_is_not_json_is_kept_as_text(tmp_path):
    # A1111's unquote keeps a value that json.loads refuses; before, the JSONDecodeError escaped
    text = 'a cat\nSteps: 4, Sampler: "Euler\\q a", Seed: 42, Size: 64x64'
    result = invoke("info", write(tmp_path / "x.png", png(text_chunk("parameters", text))))
    assert result.exit_code == 0, result.output
    assert 'sampler: "Euler\\q a"' in result.output


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_compressed_text_chunk_over_the_limit_is_refused(tmp_path, kind):
    bomb = zlib.compress(b"a" * (4 * MAX_TEXT_CHUNK_BYTES), 9)  # 4 kB that inflate to 4 MiB
    head = b"\0" if kind == "zTXt" else b"\x01\x00\0\0"  # method 0 | compressed, method 0, no language
    image = write(tmp_path / "x.png", png(chunk(kind.encode(), b"parameters\0" + head + bomb)))
    refused(invoke("info", image), f"{kind} chunk 'parameters' cannot be read",
            f"decompresses to more than {MAX_TEXT_CHUNK_BYTES:,} bytes")


@pytest.mark.parametrize("side", [50_000, 12_000])
def test_decompression_bomb_png_is_read_without_decoding_pixels(tmp_path, tiny_single_file, side):
    # 2.5 G pixels made Pillow raise DecompressionBombError; 144 M pixels warned and decoded them all.
    # Only the text chunks are read, so the declared size costs nothing.
    image = write(tmp_path / "x.png", png(text_chunk("parameters", A1111_TEXT), width=side, height=side))
    result = invoke("info", image)
    assert result.exit_code == 0 and "Warning" not in result.output, result.output
    assert "prompt: a red circle" in result.output


def test_text_after_the_image_data_is_read(tmp_path):
    image = write(tmp_path / "x.png", png(after=(text_chunk("parameters", A1111_TEXT),)))
    result = invoke("info", image)
    assert result.exit_code == 0 and "prompt: a red circle" in result.output, result.output


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "model": {"path": 5}}, '"model.path" must be a string or null, got a number'),
    ({"prompt": "a", "model": {"prediction_type": ["v"]}}, '"model.prediction_type" must be a string or null, got an array'),
    ({"prompt": "a", "model": {"prediction_type": "banana"}}, '"model.prediction_type" must be one of'),
    ([[[[1]]]], "not a JSON object but an array"),
    ("[" * 50_000, "nested too deeply"),
])
def test_ldm_record_of_the_wrong_types_is_refused(tmp_path, tiny_single_file, record, message):
    text = record if isinstance(record, str) else json.dumps(record)
    image = write(tmp_path / "x.png", png(text_chunk("ldm", text)))
    refused(invoke("generate", "--from-png", image, "-m", tiny_single_file, "-o", tmp_path / "out.png"),
            f"{image}: ldm metadata not understood", message)
    refused(invoke("info", image), message)
