"""Textual-inversion embeddings (issue 17): read in each file layout, called by name, chunked and weighted
as A1111 does, placed where the text encoder takes its token embeddings.

Oracles: diffusers' `load_textual_inversion` (the embedding's vectors added to the tokenizer and the
text encoder's table as new tokens) and its `encode_prompt` / whole pipeline, for plain prompts; for
weights and long prompts, transformers' CLIP with those added tokens, fed ids and weights written out
here by A1111's rules (`modules/sd_hijack_clip.py`), the "Original" emphasis as three lines of arithmetic.
Random vectors, tiny SD1 and SDXL models; nothing is downloaded.
"""

from __future__ import annotations

import copy
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline, text_conditioning
from ldmcli.embeddings import EmbeddingError, EmbeddingLibrary, widths_of
from ldmcli.errors import LdmError
from ldmcli.prompt_encoding import chunk_prompt
from ldmcli.request import ImageRequest
from sd_fixtures import (
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sd1_pipeline,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SEED = 11
BOS, EOS = 49406, 49407
CAT, COMMA, DOG, A = 2368, 267, 1929, 320
NAME = "ldmstyle"  # not one token of CLIP's vocabulary (diffusers refuses a name that is)


# --- the models and the oracle -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers pipeline, ours) of the tiny SD1 model; the final LayerNorm's bias off zero, so that the
    emphasis's mean (which it divides by) is not near zero (as in test_prompt_weighting)."""
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_sd1_pipeline(seed=3)
    with torch.no_grad():
        pipe.text_encoder.final_layer_norm.bias += 0.5
    path = tmp_path_factory.mktemp("ti-sd1")
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe, pipeline.load(path)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    pipe = build_tiny_sdxl_pipeline(seed=5)
    path = tmp_path_factory.mktemp("ti-sdxl")
    pipe.save_pretrained(path, safe_serialization=True)
    return pipe, pipeline.load(path)


def vectors(count: int, width: int, seed: int) -> torch.Tensor:
    # token embeddings of the tiny encoders have std ~0.02 (transformers' init); a TI vector is larger
    return torch.randn((count, width), generator=torch.Generator().manual_seed(seed)) * 0.5


def write(folder, name: str, layout: str, data) -> os.PathLike:
    """An embedding file of `layout`, as the tools that make them write it."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "a1111.pt":  # A1111's Embedding.save
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": data}, "name": name, "step": 500,
                    "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "tiny"}, path)
    elif layout == "kohya.safetensors":  # kohya-ss sd-scripts (A1111 reads it as a one-tensor dict)
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": data.contiguous()}, path)
    elif layout == "diffusers.bin":  # learned_embeds.bin, renamed as people do: {token: vector(s)}
        path = folder / f"{name}.bin"
        torch.save({f"<{name}>": data[0] if data.shape[0] == 1 else data}, path)
    elif layout == "diffusers.safetensors":
        path = folder / f"{name}.safetensors"
        save_file({f"<{name}>": (data[0] if data.shape[0] == 1 else data).contiguous()}, path)
    elif layout == "sdxl.safetensors":
        path = folder / f"{name}.safetensors"
        save_file({"clip_l": data[0].contiguous(), "clip_g": data[1].contiguous()}, path)
    elif layout == "sdxl.pt":
        path = folder / f"{name}.pt"
        torch.save({"clip_l": data[0], "clip_g": data[1]}, path)
    else:
        raise ValueError(layout)
    return path


def library(model, folder) -> EmbeddingLibrary:
    model.embeddings = EmbeddingLibrary.from_dir(folder, widths=widths_of(model.spec))
    return model.embeddings


def text_copy(reference):
    """The diffusers pipeline with copies of its tokenizers and text encoders (the rest shared), for
    `load_textual_inversion` to change."""
    parts = {k: copy.deepcopy(v) if k.startswith(("tokenizer", "text_encoder")) else v
             for k, v in reference.components.items()}
    return reference.__class__(**parts)


def with_embeddings(reference, embeddings: dict[str, torch.Tensor]):
    """The diffusers SD1 pipeline with `embeddings` loaded by diffusers' own loader (into copies)."""
    pipe = text_copy(reference)
    for name, data in embeddings.items():
        pipe.load_textual_inversion(data, token=name)
    return pipe


def oracle_ids(pipe, prompt: str) -> list[int]:
    """The ids diffusers feeds its text encoder for `prompt` (multi-vector names spelled out), no BOS/EOS."""
    return pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids[1:-1]


def a1111_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: multiply each token's vector, restore the mean."""
    before = z.mean()
    z = z * weights[None, :, None]
    return z * (before / z.mean())


@torch.inference_mode()
def oracle_chunk(pipe, ids: list[int], weights: list[float]) -> torch.Tensor:
    """One 77-id SD1 chunk through transformers' CLIP (TI tokens in its table): [BOS] ids [EOS] EOS..."""
    row = torch.tensor([[BOS, *ids] + [EOS] * (76 - len(ids))])
    z = pipe.text_encoder(row).last_hidden_state
    return a1111_emphasis(z, torch.tensor([1.0, *weights] + [1.0] * (76 - len(weights))))


# --- parity with diffusers' load_textual_inversion, every layout ----------------------------------

SD1_LAYOUTS = ["a1111.pt", "kohya.safetensors", "diffusers.bin", "diffusers.safetensors"]


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("layout", SD1_LAYOUTS)
@torch.inference_mode()
def test_sd1_conditioning_equals_diffusers_load_textual_inversion(layout, count, sd1, tmp_path):
    reference, ours = sd1
    data = vectors(count, 64, seed=count)
    write(tmp_path, NAME, layout, data)
    library(ours, tmp_path)
    prompt = f"a photo of {NAME}, on a table"
    expected = with_embeddings(reference, {NAME: data}).encode_prompt(prompt, "cpu", 1, False)[0]
    got = text_conditioning.encode_text(ours, [prompt]).context
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, reference.encode_prompt(prompt, "cpu", 1, False)[0], atol=1e-3)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("layout", ["sdxl.safetensors", "sdxl.pt"])
@torch.inference_mode()
def test_sdxl_conditioning_equals_diffusers_with_clip_l_and_clip_g_loaded_in_their_encoders(layout, count, sdxl,
                                                                                           tmp_path):
    reference, ours = sdxl
    clip_l, clip_g = vectors(count, 64, seed=10 + count), vectors(count, 128, seed=20 + count)
    write(tmp_path, NAME, layout, (clip_l, clip_g))
    library(ours, tmp_path)
    pipe = text_copy(reference)
    pipe.load_textual_inversion(clip_l, token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    prompt = f"a {NAME} cat"
    context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    got = text_conditioning.encode_text(ours, [prompt])
    torch.testing.assert_close(got.context, context, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, pooled, atol=5e-5, rtol=1e-5)


@torch.inference_mode()
def test_images_with_embeddings_in_both_prompts_equal_diffusers(sd1, tmp_path):
    reference, ours = sd1
    style, negative = vectors(3, 64, seed=5), vectors(2, 64, seed=6)
    write(tmp_path, NAME, "a1111.pt", style)
    write(tmp_path, "shinyneg", "kohya.safetensors", negative)
    library(ours, tmp_path)
    pipe = with_embeddings(reference, {NAME: style, "shinyneg": negative})
    prompt, negative_prompt = f"a {NAME} circle", "shinyneg, blurry"
    expected, expected_pixels = diffusers_latents_and_pixels(
        pipe, prompt, negative_prompt=negative_prompt, height=SIZE, width=SIZE, num_inference_steps=6,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED))
    request = ImageRequest(prompt=prompt, negative_prompt=negative_prompt, width=SIZE, height=SIZE, steps=6,
                           cfg_scale=7.5, sampler="euler")
    latents = pipeline.sample_latents(ours, request, [SEED])
    assert_latents_match(latents, expected, "sd1", "embeddings")
    assert_pixels_match(pipeline.decode_latents(ours, latents), expected_pixels, "embeddings")
    assert [e.name for e in text_conditioning.used_embeddings(ours, request.checked())] == [NAME, "shinyneg"]


# --- weights and chunks: A1111's rules written out -------------------------------------------------


@torch.inference_mode()
def test_attention_weight_applies_to_every_vector_of_the_embedding(sd1, tmp_path):
    reference, ours = sd1
    data = vectors(3, 64, seed=7)
    write(tmp_path, NAME, "a1111.pt", data)
    library(ours, tmp_path)
    pipe = with_embeddings(reference, {NAME: data})
    # "a " x1, the embedding's 3 vectors x1.2, " cat" x1
    ids = oracle_ids(pipe, f"a {NAME} cat")
    assert len(ids) == 5 and ids[0] == A and ids[-1] == CAT
    expected = oracle_chunk(pipe, ids, [1.0, 1.2, 1.2, 1.2, 1.0])
    got = text_conditioning.encode_text(ours, [f"a ({NAME}:1.2) cat"]).context
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def chunk_cases(name_ids: list[int]):
    """Chunks by A1111's `tokenize_line`, derived by hand, for a 5-vector embedding (`name_ids`: the
    5 TI tokens diffusers gave it, standing for its vectors). Each case: prompt -> [(ids, weights)]."""
    five = name_ids
    return {
        # 70 cats + 5 vectors = 75: the embedding just fits; the dog starts chunk 2
        " ".join(["cat"] * 70) + f" {NAME} dog": [([CAT] * 70 + five, None), ([DOG], None)],
        # 71 cats + 5 > 75: the embedding starts chunk 2 whole, chunk 1 ends after 71 cats
        " ".join(["cat"] * 71) + f" {NAME} dog": [([CAT] * 71, None), (five + [DOG], None)],
        # weighted, 73 + 5 > 75: chunk 2 holds the 5 vectors x1.3, then the dog
        " ".join(["cat"] * 73) + f" ({NAME}:1.3) dog": [([CAT] * 73, None), (five + [DOG], [1.3] * 5 + [1.0])],
    }


@pytest.mark.parametrize("case", range(3))
@torch.inference_mode()
def test_a_multi_vector_embedding_counts_its_vectors_and_stays_in_one_chunk(case, sd1, tmp_path):
    reference, ours = sd1
    data = vectors(5, 64, seed=8)
    write(tmp_path, NAME, "kohya.safetensors", data)
    library(ours, tmp_path)
    pipe = with_embeddings(reference, {NAME: data})
    five = oracle_ids(pipe, NAME)
    assert len(five) == 5 and min(five) >= 49408
    prompt, chunks = list(chunk_cases(five).items())[case]
    expected = torch.cat([oracle_chunk(pipe, ids, weights or [1.0] * len(ids)) for ids, weights in chunks], dim=1)
    got = text_conditioning.encode_text(ours, [prompt]).context
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@torch.inference_mode()
def test_comma_wrap_moves_an_embeddings_places_but_its_vectors_stay_as_in_a1111(sd1, tmp_path):
    """A1111's comma wrap moves the tokens after the chunk's last comma to the next chunk, the
    embedding's placeholder ids (0, "!") with them, but not its `fixes`: the vectors are placed in the
    first chunk at their old offset, over its padding."""
    reference, ours = sd1
    data = vectors(5, 64, seed=9)
    write(tmp_path, NAME, "a1111.pt", data)
    library(ours, tmp_path)
    pipe = with_embeddings(reference, {NAME: data})
    five = oracle_ids(pipe, NAME)
    # 60 cats, comma (60), the embedding (61-65), 9 dogs (66-74); the 10th dog finds the chunk full with
    # its comma 15 <= 20 tokens back: chunk 1 ends after the comma, chunk 2 is 5 "!" + 11 dogs.
    prompt = " ".join(["cat"] * 60) + f", {NAME} " + " ".join(["dog"] * 11)
    first = [CAT] * 60 + [COMMA] + [EOS] * 14
    first[61:66] = five  # the vectors, where the embedding was placed (EOS padding there)
    expected = torch.cat([oracle_chunk(pipe, first, [1.0] * 75), oracle_chunk(pipe, [0] * 5 + [DOG] * 11, [1.0] * 16)],
                         dim=1)
    got = text_conditioning.encode_text(ours, [prompt]).context
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


# --- names ---------------------------------------------------------------------------------------


def called(model, prompt: str) -> list[str]:
    embeddings = model.embeddings.for_encoder(0, model.tokenizer)
    return [p.embedding.name for chunk in chunk_prompt(prompt, model.tokenizer, embeddings) for p in chunk.embeddings]


def test_names_match_as_a1111_matches_tokens_longest_first_case_insensitive(sd1, tmp_path):
    _, ours = sd1
    for name in ("neg", "neg hands", "ShinyNeg"):
        write(tmp_path, name, "kohya.safetensors", vectors(2, 64, seed=1))
    library(ours, tmp_path)
    assert called(ours, "a neg hands cat") == ["neg hands"]  # the longer name wins
    assert called(ours, "a neg cat, neg") == ["neg", "neg"]
    assert called(ours, "(shinyneg:1.1), SHINYNEG") == ["ShinyNeg", "ShinyNeg"]  # CLIP's tokenizer lowercases
    # "negative" is another token; "neg hands" split over two pieces is "neg" and a word
    assert called(ours, "negative, (neg)hands") == ["neg"]


def test_comfyui_references_are_file_names_as_spelled(sd1, tmp_path):
    _, ours = sd1
    write(tmp_path, "ShinyNeg", "kohya.safetensors", vectors(2, 64, seed=1))
    write(tmp_path / "sub", "deep", "a1111.pt", vectors(1, 64, seed=2))
    library(ours, tmp_path)
    assert called(ours, "embedding:ShinyNeg, embedding:sub/deep.pt embedding:deep") == ["ShinyNeg", "deep", "deep"]
    chunk = chunk_prompt("embedding:ShinyNeg, cat", ours.tokenizer, ours.embeddings.for_encoder(0, ours.tokenizer))[0]
    assert chunk.tokens == (0, 0, COMMA, CAT)  # ComfyUI: a trailing comma is text
    with pytest.raises(EmbeddingError, match="embedding:shinyneg: no such embedding"):
        called(ours, "a embedding:shinyneg")  # a file name is spelled as it is


@torch.inference_mode()
def test_a_word_naming_no_file_stays_words_and_only_called_files_are_read(sd1, tmp_path):
    _, ours = sd1
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    (tmp_path / "empty.pt").write_bytes(b"")
    write(tmp_path, NAME, "a1111.pt", vectors(1, 64, seed=3))
    ours.embeddings = None
    plain = {p: text_conditioning.encode_text(ours, [p]).context for p in ("a cat, empty", "a broken cat")}
    lib = library(ours, tmp_path)
    assert set(lib.names) == {"broken", NAME}  # an empty file is skipped, as A1111 skips it
    assert torch.equal(text_conditioning.encode_text(ours, ["a cat, empty"]).context, plain["a cat, empty"])
    assert lib.loaded == {}
    text_conditioning.encode_text(ours, [f"a {NAME}"])
    assert [e.name for e in lib.loaded.values()] == [NAME]  # read when called, not before
    with pytest.raises(EmbeddingError, match="broken.pt: not a readable PyTorch checkpoint"):
        text_conditioning.encode_text(ours, ["a broken cat"])
    ours.embeddings = None
    assert torch.equal(text_conditioning.encode_text(ours, ["a broken cat"]).context, plain["a broken cat"])


def test_ti_hashes_are_a1111s_short_sha256(sd1, tmp_path, monkeypatch):
    _, ours = sd1
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = write(tmp_path / "emb", "my:neg,v2", "a1111.pt", vectors(2, 64, seed=4))
    lib = library(ours, tmp_path / "emb")
    request = ImageRequest(prompt="a cat", negative_prompt="my:neg,v2", steps=2, width=SIZE, height=SIZE).checked()
    used = text_conditioning.used_embeddings(ours, request)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lib.ti_hashes(used) == f"mynegv2: {digest[:12]}"  # A1111 drops ':' and ',' from the name


# --- files that cannot serve ---------------------------------------------------------------------


def refusal(model, folder, prompt: str) -> str:
    library(model, folder)
    with pytest.raises(EmbeddingError) as info:
        text_conditioning.encode_text(model, [prompt])
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, LdmError) and info.value.exit_code == 2
    return message


def test_an_embedding_of_another_width_is_refused_naming_the_file_and_both_widths(sd1, sdxl, tmp_path):
    _, ours = sd1
    path = write(tmp_path / "a", "narrow", "a1111.pt", vectors(2, 32, seed=1))
    assert refusal(ours, tmp_path / "a", "a narrow cat") == \
        f"{path}: an embedding 32 wide; this model's text encoder is 64 wide"
    path = write(tmp_path / "b", "xl", "sdxl.safetensors", (vectors(2, 64, seed=1), vectors(2, 128, seed=2)))
    assert refusal(ours, tmp_path / "b", "xl") == \
        f"{path}: an SDXL embedding (clip_l 64 + clip_g 128 wide); this model's text encoder is 64 wide"
    _, xl = sdxl
    path = write(tmp_path / "c", "one", "kohya.safetensors", vectors(2, 64, seed=1))
    assert refusal(xl, tmp_path / "c", "one") == \
        f"{path}: an embedding 64 wide, not an SDXL one (clip_l + clip_g); this model's text encoders are 64 + 128 wide"


class _RunsCode:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_wanting_code_is_refused_and_nothing_runs(sd1, tmp_path):
    _, ours = sd1
    payload = _RunsCode()
    payload.marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": payload}}, tmp_path / "evil.pt")
    message = refusal(ours, tmp_path, "evil")
    assert message.startswith(f"{tmp_path / 'evil.pt'}: refused to unpickle") and "system" in message
    assert not payload.marker.exists()


@pytest.mark.parametrize("name, content, expected", [
    ("garbage.pt", b"\x80\x02garbage", "not a readable PyTorch checkpoint"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable safetensors file"),
    ("list.pt", [torch.zeros(2, 64)], "holds a list, not an embedding"),
    ("many.pt", {"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}, "not a textual-inversion embedding (it holds a, b"),
    ("terms.pt", {"string_to_param": {"*": torch.zeros(1, 64), "+": torch.zeros(1, 64)}}, "string_to_param holds 2 terms"),
    ("ints.pt", {"emb": torch.zeros(2, 64, dtype=torch.int64)}, "emb is a 2-D int64 tensor, not vectors"),
    ("long.safetensors", {"emb_params": torch.zeros(76, 64)}, "76 vectors; a prompt chunk holds at most 75"),
])
def test_unreadable_or_unusable_files_are_one_line_errors(name, content, expected, sd1, tmp_path):
    _, ours = sd1
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".safetensors"):
        save_file(content, path)
    else:
        torch.save(content, path)
    message = refusal(ours, tmp_path, f"a {path.stem} cat")
    assert message.startswith(f"{path}: ") and expected in message, message


def test_an_old_parameterdict_embedding_loads(sd1, tmp_path):
    """Files of the original textual-inversion code pickle string_to_param as an nn.ParameterDict."""
    _, ours = sd1
    data = vectors(2, 64, seed=12)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": data})},
               tmp_path / "old.pt")
    library(ours, tmp_path)
    assert torch.equal(ours.embeddings.get("old").vectors[0], data)
