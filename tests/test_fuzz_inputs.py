"""Fuzzing the readers of files ldm is given (issue 15): whatever the bytes, a reader returns what it
promises or raises an LdmError (one line for the CLI), never anything else, and every example finishes
within the deadline (2 s; the parsers are linear and every read is bounded).

Readers: A1111's infotext (`parse_a1111`, and `a1111_pairs` against A1111's own regex), the `ldm` JSON
record (`request_from_png_text`), safetensors headers and data, pickled checkpoints, a diffusers shard
index, the model-hash cache, and PNG text chunks. Arbitrary bytes find the framing bugs; structured
but wrong inputs (valid JSON of the wrong shape, valid chunks with hostile contents, a real model with
one tensor changed) reach the code behind the framing.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ldmcli.checkpoint import read_json, read_safetensors_metadata, read_state_dict, shard_files
from ldmcli.errors import CheckpointError, ImageMetadataError, LdmError
from ldmcli.metadata import (
    A1111_KEY,
    A1111_PARAM,
    LDM_KEY,
    MODEL_RECORD_KEYS,
    a1111_pairs,
    a1111_quote,
    parse_a1111,
    read_png_text,
    request_from_png_text,
)
from ldmcli.request import ImageRequest, field_names

FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder for the files examples are written to (hypothesis runs many examples per test call,
    so a function's tmp_path would be shared anyway)."""
    return tmp_path_factory.mktemp("fuzz")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# Text rich in what the infotext grammar cares about, and arbitrary text.
INFOTEXT_CHARS = st.sampled_from(list('ab1_ :,"\\-/\n\t\r\x0bé٣\u3000\u2028Z'))
INFOTEXT = st.one_of(st.text(INFOTEXT_CHARS, max_size=60), st.text(max_size=60))


# --- A1111 infotext --------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=2000)
@given(line=INFOTEXT)
def test_linear_pair_scan_finds_what_a1111s_regex_finds(line):
    assert a1111_pairs(line) == A1111_PARAM.findall(line)


A1111_KEYS = st.sampled_from(["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                              "Version", "Denoising strength", "Hires upscale", "Lora hashes", "TI hashes"])


@st.composite
def infotexts(draw) -> str:
    """Infotexts as A1111 writes them, with hostile values: quoted, unquoted, numbers that are not."""
    pairs = draw(st.lists(st.tuples(A1111_KEYS | st.text(max_size=10), INFOTEXT | st.sampled_from(
        ["64x64", "4", "7.5", "-3", "1e400", "nan", "9" * 5000, "Euler a", "DPM++ 2M", "64xx", '"\\q"', '"a" "b"'])),
        max_size=8))
    last = ", ".join(f"{k}: {a1111_quote(v) if draw(st.booleans()) else v}" for k, v in pairs)
    lines = [draw(INFOTEXT)]
    if draw(st.booleans()):
        lines.append("Negative prompt: " + draw(INFOTEXT))
    return "\n".join([*lines, last])


@FUZZ
@given(text=st.one_of(infotexts(), st.text(max_size=300)))
def test_a1111_text_parses_or_is_refused_in_one_line(text):
    params = parse_a1111(text)
    assert {"Prompt", "Negative prompt"} <= params.keys() and all(isinstance(v, str) for v in params.values())
    try:
        request, given_fields, model = request_from_png_text({A1111_KEY: text}, "x.png")
    except ImageMetadataError:
        return
    assert isinstance(request, ImageRequest) and given_fields <= set(field_names())
    hashes = {k: model.pop(k) for k in ("lora_hashes", "ti_hashes") if k in model}  # name -> hash
    assert all(isinstance(x, str) for names in hashes.values() for pair in names.items() for x in pair)
    assert all(v is None or isinstance(v, str) for v in model.values())


# --- the ldm JSON record ----------------------------------------------------------------------------


FIELD_VALUES = st.one_of(JSON, st.integers(min_value=-(2**70), max_value=2**70), st.just(float("nan")))
RECORDS = st.fixed_dictionaries({}, optional={
    **{name: FIELD_VALUES for name in field_names()},
    "model": JSON | st.fixed_dictionaries({}, optional={key: JSON for key in MODEL_RECORD_KEYS}),
    "version": JSON,
})


@FUZZ
@given(record=st.one_of(RECORDS.map(json.dumps), JSON.map(json.dumps), st.text(max_size=200),
                        st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth)))
def test_ldm_record_is_understood_or_refused_in_one_line(record):
    try:
        request, given_fields, model = request_from_png_text({LDM_KEY: record}, "x.png")
    except ImageMetadataError:
        return
    assert isinstance(request, ImageRequest) and given_fields <= set(field_names())
    assert set(model) <= set(MODEL_RECORD_KEYS) and all(v is None or isinstance(v, str) for v in model.values())


# --- safetensors ---------------------------------------------------------------------------------


DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
               "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64", "X"]
TENSOR_NAMES = ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight",
                "model.diffusion_model.output_blocks.2.1.transformer_blocks.0.norm1.bias",  # read even with meta=True
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "alphas_cumprod", "v_pred"]
HEADER_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(DTYPE_NAMES) | JSON,
    "shape": st.lists(st.integers(-2, 2**66), max_size=4) | st.lists(st.integers(0, 4), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-1, 80), max_size=3) | st.tuples(st.integers(0, 8), st.integers(0, 80)) | JSON,
})


ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "C64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


@st.composite
def consistent_entries(draw) -> tuple[dict, bytes]:
    """Entries whose offsets agree with their dtype and shape, as a writer makes them: the file is valid
    safetensors, and only what it holds (a dtype we do not load, an odd shape) can be wrong."""
    header, data = {}, b""
    for key in draw(st.lists(st.sampled_from(TENSOR_NAMES), unique=True, max_size=3)):
        dtype, shape = draw(st.sampled_from(DTYPE_NAMES[:-1])), draw(st.lists(st.integers(0, 3), max_size=3))
        size = ITEMSIZE.get(dtype, 1) * int(torch.tensor(shape).prod()) if dtype != "F4" else 0
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += draw(st.binary(min_size=size, max_size=size))
    return header, data


@st.composite
def safetensors_files(draw) -> bytes:
    """The format's framing with hostile contents: a header of real-looking entries (any dtype, shape and
    offsets, or consistent ones), maybe `__metadata__` of any JSON, a length field that may lie, any data."""
    if draw(st.booleans()):
        header, data = draw(consistent_entries())
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + data
    header = draw(st.dictionaries(st.sampled_from(TENSOR_NAMES) | st.text(max_size=12), HEADER_ENTRY | JSON, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | JSON)
    text = json.dumps(header).encode()
    length = draw(st.sampled_from([len(text), 0, len(text) + 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=96))


@FUZZ
@given(data=st.one_of(safetensors_files(), st.binary(max_size=300)))
def test_safetensors_reader_returns_tensors_or_refuses(scratch, data):
    from ldmcli.layout import read_components

    path = write(scratch / "fuzz.safetensors", data)
    for read in (read_safetensors_metadata, lambda p: read_state_dict(p, meta=True), read_state_dict,
                 lambda p: read_state_dict(p, dtype=torch.bfloat16), lambda p: read_components(p, meta=True)):
        try:
            read(path)
        except CheckpointError:
            pass


# --- a real model with one tensor changed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_meta(tiny_single_file) -> dict[str, torch.Tensor]:
    return read_state_dict(tiny_single_file, meta=True)


SHAPES = st.lists(st.integers(0, 80), max_size=5)
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8])


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_model_with_tensors_of_other_shapes_is_detected_or_refused(tiny_meta, data):
    """Detection reads shapes: a model whose tensors have other shapes or dtypes (or are missing) is
    described or refused with a CheckpointError, never an IndexError from a shape rule."""
    from ldmcli.detect import detect_spec
    from ldmcli.layout import split_single_file

    state = dict(tiny_meta)
    keys = sorted(state)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(keys))
        if data.draw(st.booleans()):
            state[key] = torch.empty(data.draw(SHAPES), dtype=data.draw(DTYPES), device="meta")
        else:
            state.pop(key, None)
    try:
        detect_spec(split_single_file(state, Path("fuzz.safetensors")))
    except CheckpointError:
        pass


# --- pickled checkpoints ------------------------------------------------------------------------------


def _saved(obj, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


VALID_CKPTS = [_saved({"state_dict": {"a.weight": torch.ones(2, 3)}, "global_step": 1}),
               _saved({"a.weight": torch.ones(2, 3)}, legacy=True)]
TENSORS = st.sampled_from([torch.ones(2), torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool),
                           torch.ones(2, dtype=torch.complex64), torch.ones(2).to(torch.float8_e5m2), torch.ones(2).to_sparse(),
                           torch.empty(2, device="meta"), torch.ones(0), torch.tensor(1.0)])
CONTENTS = st.recursive(st.none() | st.integers() | st.text(max_size=6) | TENSORS,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                            st.text(max_size=8) | st.integers() | st.sampled_from(["a.weight", "state_dict"]), inner, max_size=3),
                        max_leaves=8)


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), *(damaged(v) for v in VALID_CKPTS), CONTENTS.map(_saved)))
def test_ckpt_reader_returns_tensors_or_refuses(scratch, data):
    path = write(scratch / "fuzz.ckpt", data)
    try:
        tensors = read_state_dict(path)
    except CheckpointError:
        return
    assert tensors and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())


# --- JSON files of a model folder, and the hash cache --------------------------------------------------


@FUZZ
@given(data=st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                      st.dictionaries(st.text(max_size=8), JSON | st.text(max_size=20), max_size=4).map(
                          lambda m: json.dumps({"weight_map": m}).encode())))
def test_json_and_shard_index_readers_return_objects_or_refuse(scratch, data):
    path = write(scratch / "model.safetensors.index.json", data)
    try:
        assert isinstance(read_json(path), dict)
        shards = shard_files(path, ".safetensors")
    except CheckpointError:
        return
    assert all("/" not in name and "\\" not in name and name not in (".", "..") for name in shards)


@FUZZ
@given(data=st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_hash_cache_reader_keeps_only_digests(scratch, data):
    from ldmcli.hashing import _read_cache

    cache = _read_cache(write(scratch / "hashes.json", data))
    assert all(isinstance(k, str) and len(v) == 64 and int(v, 16) >= 0 for k, v in cache.items())


# --- PNG text chunks ----------------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 1)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


TEXT_BODIES = st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda b: b"\0" + zlib.compress(b)),  # zTXt
    st.tuples(st.sampled_from([b"\0\0", b"\1\0", b"\1\1", b"\2"]), st.binary(max_size=12), st.binary(max_size=40)).map(
        lambda t: t[0] + t[1] + b"\0\0" + (zlib.compress(t[2]) if t[0] == b"\1\0" else t[2])),  # iTXt
)


@st.composite
def png_files(draw) -> bytes:
    """A PNG's framing with chunks of any kind: text chunks with our keywords and hostile bodies, image
    chunks that declare any size, bad CRCs, lengths that lie, a missing IEND."""
    chunks = [chunk(b"IHDR", struct.pack(">IIBBBBB", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1)), 8, 2, 0, 0, 0))]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt", b"IDAT", b"IEND", b"abcd", b"\0\0\0\0"]))
        keyword = draw(st.sampled_from([b"parameters", b"ldm", b"other", b"", b"x" * 90]))
        body = keyword + b"\0" + draw(TEXT_BODIES) if kind in (b"tEXt", b"zTXt", b"iTXt") else draw(st.binary(max_size=30))
        chunks.append(chunk(kind, body, crc_ok=draw(st.booleans()) or draw(st.booleans())))
    if draw(st.booleans()):
        chunks.append(struct.pack(">I", draw(st.integers(0, 2**32 - 1))) + b"tEXt" + b"parameters\0")  # lying length
    if draw(st.booleans()):
        chunks.append(chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@FUZZ
@given(data=st.one_of(png_files(), st.binary(max_size=200), st.binary(max_size=100).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)))
def test_png_text_reader_returns_text_or_refuses(scratch, data):
    try:
        text = read_png_text(write(scratch / "fuzz.png", data))
    except ImageMetadataError:
        return
    assert set(text) <= {A1111_KEY, LDM_KEY} and all(isinstance(v, str) for v in text.values())
    try:
        request_from_png_text(text, "fuzz.png")
    except LdmError:
        pass


PNG_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)


@FUZZ
@given(values=st.dictionaries(st.sampled_from([A1111_KEY, LDM_KEY, "workflow", "Comment"]), PNG_TEXT, max_size=4),
       how=st.sampled_from(["text", "ztxt", "itxt", "itxt-zip"]), after_image=st.booleans())
def test_png_text_reader_reads_what_pillow_writes(scratch, values, how, after_image):
    """Equivalence with Pillow on the files it writes (ldm's and A1111's writer): tEXt (or iTXt for
    text beyond Latin-1), zTXt, iTXt, compressed or not; before or after the image data."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in values.items():
        if how.startswith("itxt"):
            info.add_itxt(key, value, zip=how == "itxt-zip")
        else:
            info.add_text(key, value, zip=how == "ztxt")
    path = scratch / "pillow.png"
    Image.new("RGB", (3, 2)).save(path, pnginfo=info)
    if after_image:  # move the text chunks after IDAT, where Pillow needs load() to see them
        chunks = split_chunks(path.read_bytes())
        text = [c for c in chunks if c[4:8] in (b"tEXt", b"zTXt", b"iTXt")]
        rest = [c for c in chunks if c not in text]
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(rest[:-1] + text + rest[-1:]))  # IEND stays last
    with Image.open(path) as image:
        expected = {k: v for k, v in image.text.items() if k in (A1111_KEY, LDM_KEY)}
    assert read_png_text(path) == expected == {k: v for k, v in values.items() if k in (A1111_KEY, LDM_KEY)}


def split_chunks(png: bytes) -> list[bytes]:
    """A PNG's chunks (length, type, data and CRC each), after the signature."""
    chunks, at = [], 8
    while at < len(png):
        end = at + 12 + struct.unpack(">I", png[at:at + 4])[0]
        chunks.append(png[at:end])
        at = end
    return chunks


# --- prompt-file lines ----------------------------------------------------------------------------------

LINE_CHARS = st.sampled_from(list("a#- \t\r\n\x0b\x0c\x1c\x85\xa0\u2028\u3000\ufeff{}é") + ["\ud800"])


@settings(max_examples=1000, deadline=2000)
@given(text=st.one_of(st.text(LINE_CHARS, max_size=40), st.text(max_size=40)))
def test_prompt_file_lines_are_the_lines_split_at_newline(text):
    """The regex that skips blank and comment lines in C gives what the plain reading does: split at
    "\\n" only, strip (str.strip's whitespace), skip "" and "#...", number from 1."""
    from ldmcli.jobs import _content_lines

    expected = [(number, line.strip()) for number, line in enumerate(text.split("\n"), 1)
                if line.strip() and not line.strip().startswith("#")]
    assert list(_content_lines(text)) == expected


# --- ldm info prints whatever a PNG records ---------------------------------------------------------------

# Any code point, lone surrogates included: JSON's escapes ("\ud800") carry them through a PNG's text.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)  # the default leaves out Cs


@st.composite
def recorded_texts(draw) -> tuple[str, str]:
    """(PNG text key, value): ldm's record or A1111's text, with arbitrary strings where strings go."""
    if draw(st.booleans()):
        record = {"prompt": draw(ANY_TEXT), "seed": 1, "steps": 1, "sampler": "euler", "width": 64, "height": 64}
        if draw(st.booleans()):
            record["negative_prompt"] = draw(ANY_TEXT)
        if draw(st.booleans()):
            record["model"] = {"name": draw(ANY_TEXT), "hash": draw(ANY_TEXT), "path": draw(ANY_TEXT)}
        return LDM_KEY, json.dumps(record)  # ASCII: every character escaped, lone surrogates too
    quoted = json.dumps(draw(ANY_TEXT))
    last = draw(st.sampled_from([f"Model: {quoted}", f"Model hash: {quoted}", f"Sampler: {quoted}", f"Extra: {quoted}"]))
    prompt = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=12))
    return A1111_KEY, f"{prompt}\nSteps: 2, Seed: 1, Size: 64x64, {last}"


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(recorded=recorded_texts(), as_json=st.booleans())
@example(recorded=(LDM_KEY, '{"prompt": "a\\ud800b", "seed": 1}'), as_json=False)
@example(recorded=(A1111_KEY, 'a\nSteps: 2, Seed: 1, Model: "\\udfff"'), as_json=True)
def test_ldm_info_prints_any_recorded_text(scratch, recorded, as_json):
    """`ldm info` shows what a PNG records or refuses it in one line (exit 2), never `ldm: failed`
    (a lone surrogate was a UnicodeEncodeError, exit 1); --json is always valid JSON."""
    from click.testing import CliRunner

    from ldmcli.cli import cli
    from ldmcli.image import save_png

    key, text = recorded
    path = scratch / "info.png"
    save_png(__import__("numpy").zeros((2, 2, 3), "uint8"), path, text={key: text}, overwrite=True)
    result = CliRunner().invoke(cli, ["info", str(path), *(["--json"] if as_json else [])])
    assert result.exit_code in (0, 2) and "ldm: failed" not in result.output, result.output
    if result.exit_code == 0 and as_json:
        described = json.loads(result.stdout)
        if key == LDM_KEY:
            assert described["prompt"] == json.loads(text)["prompt"]
