"""PromptTokenizer: known ids, framing (BOS/EOS/pad/truncation), and equality with two references:
transformers' CLIPTokenizer built from the same files, and an independent re-implementation of
OpenAI's SimpleTokenizer BPE (github.com/openai/CLIP, clip/simple_tokenizer.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch

from ldmcli.tokenizer import (
    NUM_MERGES,
    VOCAB_SIZE,
    PromptTokenizer,
    bytes_to_unicode,
    convert_openai_bpe,
)

DATA = Path(str(resources.files("ldmcli") / "data"))
OPEN_CLIP_WHEEL = Path("/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl")
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

TRICKY_PROMPTS = [
    "a photo of a cat",
    "(cat:1.2), [dog], {bird}, ((masterpiece)), <lora:foo:0.8>",
    "A  Photo\tOF\n\nA   CAT  ",
    "   leading and trailing spaces   ",
    "masterpiece, best quality, 8k, 1girl, 4K UHD, f/1.8, 35mm, 1920x1080",
    "3.14159 and 2024-05-17 and 1,000,000",
    "it's don't we're they've I'm you'll he'd IT'S",
    "café naïve résumé Ångström ÀÉÎ",
    "e\u0301 (decomposed e-acute) vs \u00e9",
    "東京の夜景, 서울, Москва, القاهرة",
    "🐱🐶 emoji 👩‍🚀 🇯🇵 ❤️",
    "a-b_c/d\\e|f~g`h^i",
    "<|startoftext|> literal specials <|endoftext|>",
    "word!!! ??? ... --- ***",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer()


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"))


class OpenAIReferenceBPE:
    """OpenAI's SimpleTokenizer, re-implemented from the paper's code for the tests.

    Cleaning differs from the original only where it needs packages we lack: ftfy.fix_text is
    replaced by NFC normalisation (what ftfy does to well-formed text) and HTML entities are not
    unescaped (HF does not unescape them either; no test prompt contains one).
    """

    def __init__(self, vocab: dict[str, int], merges: list[str]) -> None:
        import regex

        self.encoder = vocab
        self.byte_encoder = bytes_to_unicode()
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
            r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        ids = []
        for token in self.pat.findall(text):
            if token in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.encoder[token])
                continue
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


@pytest.fixture(scope="module")
def openai_reference() -> OpenAIReferenceBPE:
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    merges = (DATA / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    return OpenAIReferenceBPE(vocab, merges)


def test_a_photo_of_a_cat(tok: PromptTokenizer) -> None:
    ids = tok(["a photo of a cat"])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0].tolist() == CAT_IDS + [49407] * 70


def test_sd1_pads_with_eos_and_sd2_with_zero(tok: PromptTokenizer) -> None:
    sd2 = PromptTokenizer(pad_token_id=0)
    prompts = ["a photo of a cat", "a dog"]
    sd1_ids, sd2_ids = tok(prompts), sd2(prompts)
    assert sd1_ids.shape == sd2_ids.shape == (2, 77)
    assert sd1_ids[0].tolist() == CAT_IDS + [49407] * 70
    assert sd2_ids[0].tolist() == CAT_IDS + [0] * 70
    dog = [49406, *tok.tokenize("a dog"), 49407]
    assert sd1_ids[1].tolist() == dog + [49407] * (77 - len(dog))
    assert sd2_ids[1].tolist() == dog + [0] * (77 - len(dog))


def test_empty_prompt_is_bos_eos_then_padding(tok: PromptTokenizer) -> None:
    assert tok([""])[0].tolist() == [49406, 49407] + [49407] * 75
    assert PromptTokenizer(pad_token_id=0)([""])[0].tolist() == [49406, 49407] + [0] * 75


def test_truncation_keeps_eos_last(tok: PromptTokenizer) -> None:
    prompt = " ".join(f"word{i}" for i in range(100))  # ~200 tokens
    tokens = tok.tokenize(prompt)
    assert len(tokens) > 75
    row = tok([prompt])[0].tolist()
    assert len(row) == 77
    assert row == [49406, *tokens[:75], 49407]
    short = PromptTokenizer(max_length=8)([prompt])[0].tolist()
    assert short == [49406, *tokens[:6], 49407]


def test_rejects_a_bare_string(tok: PromptTokenizer) -> None:
    with pytest.raises(TypeError):
        tok("a photo of a cat")  # type: ignore[arg-type]


def test_vocab_size_and_special_ids(tok: PromptTokenizer) -> None:
    assert tok.vocab_size == VOCAB_SIZE == 49408
    assert tok.bos_token_id == 49406
    assert tok.eos_token_id == 49407


def test_shipped_files_follow_openai_layout() -> None:
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    lines = (DATA / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + NUM_MERGES == 48895
    by_id = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in by_id] == list(range(49408))
    symbols = list(bytes_to_unicode().values())
    assert by_id[:256] == symbols
    assert by_id[256:512] == [s + "</w>" for s in symbols]
    assert by_id[512:49406] == ["".join(m.split()) for m in lines[1:]]
    assert by_id[49406:] == ["<|startoftext|>", "<|endoftext|>"]
    assert (DATA / "LICENSE-clip-bpe.txt").read_text().count("Copyright (c) 2021 OpenAI") == 1


@pytest.mark.skipif(not OPEN_CLIP_WHEEL.is_file(), reason="no open_clip wheel with the original gz")
def test_conversion_reproduces_shipped_files(tmp_path: Path) -> None:
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with zipfile.ZipFile(OPEN_CLIP_WHEEL) as whl:
        gz.write_bytes(whl.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    convert_openai_bpe(gz, tmp_path / "out")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (DATA / name).read_bytes(), name


@pytest.mark.parametrize("prompt", TRICKY_PROMPTS)
def test_matches_references(
    tok: PromptTokenizer, hf_reference, openai_reference: OpenAIReferenceBPE, prompt: str
) -> None:
    ours = tok([prompt])[0].tolist()
    expected = [49406, *openai_reference.encode(prompt), 49407]
    assert len(expected) <= 77
    assert ours == expected + [49407] * (77 - len(expected))
    assert hf_reference(prompt)["input_ids"] == expected


def test_batch_equals_rows(tok: PromptTokenizer) -> None:
    batch = tok(TRICKY_PROMPTS)
    rows = torch.cat([tok([p]) for p in TRICKY_PROMPTS])
    assert torch.equal(batch, rows)


def test_loads_from_a_diffusers_tokenizer_folder(tmp_path: Path, tok: PromptTokenizer) -> None:
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA / name, folder / name)
    assert torch.equal(PromptTokenizer(folder)(TRICKY_PROMPTS), tok(TRICKY_PROMPTS))
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        PromptTokenizer(folder)


def test_import_does_not_load_transformers() -> None:
    code = "import sys, ldmcli.tokenizer; assert 'transformers' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True)
