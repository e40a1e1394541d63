"""PromptTokenizer: known ids, framing (BOS/EOS/pad/truncation), and equality with two references:
transformers' fast CLIP tokenizer built from the same files (the oracle: our BPE must give its ids),
and an independent re-implementation of OpenAI's SimpleTokenizer BPE (github.com/openai/CLIP,
clip/simple_tokenizer.py), which differs from HF only in the cases of HF_ONLY_PROMPTS."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
import unicodedata
from importlib import resources
from pathlib import Path

import pytest
import torch

from ldmcli.tokenizer import (
    BOS_TOKEN as BOS,
    EOS_TOKEN as EOS,
    NUM_MERGES,
    VOCAB_SIZE,
    PromptTokenizer,
    TokenizerFileError,
    bytes_to_unicode,
    convert_openai_bpe,
)

DATA = Path(str(resources.files("ldmcli") / "data"))
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
    "(masterpiece:1.2), a cat's hat!!, [[blurry]], (((best quality)))",
    "x² 10³ ½ ① Ⅻ ٣٤ १२ 𝟙",  # unicode digits are single-digit words
    "nbsp\u00a0em\u2003ideographic\u3000space\x0bvt\x85nel\u200bzwsp\ufeffbom",
    "x<|endoftext|>> a<|startoftext|>b",
    "ﬁne ﬀ Å K µ ǅ İstanbul Straße",  # compatibility characters are not NFKC-folded
]


@pytest.fixture(scope="module")
def tok() -> PromptTokenizer:
    return PromptTokenizer()


# Where OpenAI's SimpleTokenizer and HF differ, we follow HF (what diffusers runs):
HF_ONLY_PROMPTS = [
    "ΟΔΟΣ ΣΑΣ",  # HF lowercases per code point: final capital sigma -> "σ", not "ς"
    "it'ſ",  # the regex is case-sensitive in HF: "'ſ" (long s) is no "'s" contraction
    "<|ENDOFTEXT|> <|Startoftext|>",  # only exact specials are special; these are BPE text
    "!<|endoftext|>!",  # specials are cut out first; OpenAI's regex reads "!<|" as one word
    "file\x1cseparator",  # U+001C..U+001F: whitespace to Python's str.split and re, not to Unicode/HF
]


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import CLIPTokenizerFast  # the Rust `tokenizers` BPE (transformers 5: = CLIPTokenizer)

    return CLIPTokenizerFast(str(DATA / "vocab.json"), str(DATA / "merges.txt"))


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


def test_conversion_reproduces_shipped_files(tmp_path: Path) -> None:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz is a header line and 262,144 merges of which CLIP uses
    the first 48,894; rebuilt here from the shipped merges (plus later merges that must be dropped), the
    conversion must give back the shipped vocab.json and merges.txt byte for byte."""
    merges = (DATA / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    later = [f"{a} {b}" for a, b in (("zz", "q"), ("qq", "zz</w>"), ("ðŁ", "ĺ"))]
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges, *later]).encode()))
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
    with pytest.raises(TokenizerFileError, match=r"merges.txt: no such file"):
        PromptTokenizer(folder)


def test_tokenizing_does_not_load_transformers() -> None:
    code = (
        "import sys, ldmcli.cli, ldmcli.pipeline\n"
        "from ldmcli.tokenizer import PromptTokenizer\n"
        "assert PromptTokenizer()(['a photo of a cat'])[0, :7].tolist() == %r\n"
        "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules\n" % CAT_IDS
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("prompt", HF_ONLY_PROMPTS)
def test_follows_hf_where_openai_differs(
    tok: PromptTokenizer, hf_reference, openai_reference: OpenAIReferenceBPE, prompt: str
) -> None:
    expected = hf_reference(prompt, add_special_tokens=False)["input_ids"]
    assert tok.tokenize(prompt) == expected
    assert openai_reference.encode(prompt) != expected  # else the prompt belongs in TRICKY_PROMPTS


# Generated prompts for the comparison with HF: Stable Diffusion style prompts (weights, LoRA tags,
# numbers, contractions, case, whitespace runs, accents, CJK, emoji, combining marks, unicode
# digits, specials, up to ~120 tokens so that truncation happens) and random strings.
WORDS = (
    "a photo of cat dog astronaut riding horse on mars portrait woman castle forest night sunset highly "
    "detailed masterpiece best quality 8k uhd octane render trending artstation by greg rutkowski "
    "cinematic lighting bokeh dslr sharp focus intricate concept art oil painting anime girl cyberpunk"
).split()
EXOTIC = [
    "café", "naïve", "Ångström", "Straße", "ΟΔΟΣ", "Σίσυφος", "İstanbul", "Москва", "東京", "夜景", "서울",
    "القاهرة", "हिन्दी", "ﬁne", "Ⅻ", "²", "٣", "१२", "🐱", "👩‍🚀", "🇯🇵", "❤️", "e\u0301", "n\u0303o", "ǅ",
    "'ſ", "K", "µ", "½", "①", "𝔘𝔫𝔦", "\u200b", "\ufeff", "it's", "don't", "we're", "they've", "I'M",
    "you'll", "he'd", "o'clock", "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "|>",
]
SPACES = [" ", "  ", "\t", "\n", " \n\t ", "\r\n", "\x0b", "\x1c", "\x85", "\u00a0", "\u2003", "\u3000"]
PUNCTUATION = list(",.!?:;()[]{}<>|/\\-_'\"`~@#$%^&*+=")
ALPHABET = (
    "abcxyzABCXYZ0123456789 \t\n.,;:!?'\"()[]{}<>|/\\-_*&^%$#@~`+=éèêëàÄÖÜßçñøåæœΣσςΑαΩωЖжЯя日本語中文한국어"
    "ابتअआक٠١٢٣०१२²³¹½⅓①Ⅻ\u0301\u0308\u0327\u200d🙂🐱🏻👍🏿\u00a0\u2003\u3000\u200b\ufeff\x1c\x85ſKǅﬁ<|>"
)


def sd_prompt(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.6:
            piece = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        elif kind < 0.75:
            piece = rng.choice(EXOTIC)
        elif kind < 0.85:
            piece = rng.choice([
                str(rng.randint(0, 10 ** rng.randint(1, 7))), f"{rng.random() * 100:.3f}",
                f"{rng.randint(1, 4096)}x{rng.randint(1, 4096)}", f"f/{rng.uniform(1, 22):.1f}",
                f"<lora:{rng.choice(WORDS)}_v{rng.randint(1, 9)}:0.{rng.randint(1, 9)}>",
            ])
        else:
            piece = rng.choice(PUNCTUATION) * rng.randint(1, 3)
        style = rng.random()
        if style < 0.2:
            piece = f"({piece}:{rng.uniform(0.3, 2):.{rng.randint(1, 2)}f})"
        elif style < 0.3:
            piece = rng.choice(["(({}))", "[{}]", "{{{}}}"]).format(piece)
        elif style < 0.4:
            piece = rng.choice([str.upper, str.title, str.swapcase])(piece)
        pieces.append(piece)
    prompt = pieces[0]
    for piece in pieces[1:]:
        prompt += rng.choice([", ", " ", ",", ". ", "|", "", rng.choice(SPACES)]) + piece
    return prompt


def random_prompt(rng: random.Random) -> str:
    return "".join(rng.choices(ALPHABET, k=rng.randint(0, 120)))


def generated_prompts(n_sd: int, n_random: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sd_prompt(rng) for _ in range(n_sd)] + [random_prompt(rng) for _ in range(n_random)]


def test_matches_hf_on_generated_prompts(tok: PromptTokenizer, hf_reference) -> None:
    prompts = generated_prompts(3000, 2000, seed=0)
    expected = hf_reference(prompts, add_special_tokens=False)["input_ids"]
    mismatches = [(p, e) for p, e in zip(prompts, expected) if tok.tokenize(p) != e]
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ, first: {mismatches[0]!r}"
    assert sum(len(e) > 75 for e in expected) > 100  # truncation is exercised below
    # Framing, as diffusers asks HF for it: BOS, at most 75 tokens, EOS, padding with EOS.
    rows = hf_reference(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok(prompts).tolist() == rows


@pytest.mark.parametrize("merge_format", ["pairs", "strings"])
def test_loads_a_tokenizer_json_folder(tmp_path: Path, tok: PromptTokenizer, hf_reference, merge_format: str) -> None:
    from transformers import CLIPTokenizerFast

    data = json.loads(hf_reference.backend_tokenizer.to_str())
    assert isinstance(data["model"]["merges"][0], list)  # what tokenizers >= 0.20 writes
    if merge_format == "strings":  # what older tokenizers wrote
        data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ours = PromptTokenizer(tmp_path, pad_token_id=0)
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id) == (49408, 49406, 49407)
    prompts = TRICKY_PROMPTS + HF_ONLY_PROMPTS + generated_prompts(600, 400, seed=1)
    hf = CLIPTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert [ours.tokenize(p) for p in prompts] == hf(prompts, add_special_tokens=False)["input_ids"]
    assert torch.equal(ours(prompts), PromptTokenizer(pad_token_id=0)(prompts))


def test_tokenizer_json_specials_are_cut_out_as_in_hf(tmp_path: Path) -> None:
    """transformers 5 saves SD2's tokenizer (pad "!") with "!" as a special added token; HF then
    never merges "!" ("!!" is 0, 0 instead of 748) and neither do we, for the same ids as diffusers."""
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), pad_token="!").save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()
    hf = CLIPTokenizer.from_pretrained(tmp_path)
    ours = PromptTokenizer(tmp_path, pad_token_id=0)
    prompts = ["hello!! world!", "a!b !! <|endoftext|>!"] + generated_prompts(200, 100, seed=2)
    assert [ours.tokenize(p) for p in prompts] == hf(prompts, add_special_tokens=False)["input_ids"]
    assert ours.tokenize("hi!!") == [1883, 0, 0] and PromptTokenizer().tokenize("hi!!") == [1883, 748]


def test_unknown_symbols_become_endoftext_as_in_hf(tmp_path: Path) -> None:
    from transformers import CLIPTokenizerFast

    vocab = {BOS: 0, EOS: 1, "h": 2, "e": 3, "l": 4, "o": 5, "o</w>": 6, "!</w>": 7, "he": 8, "ll": 9, "hell": 10,
             "hello</w>": 11, "x": 12}  # fmt: skip
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n", encoding="utf-8")
    ours = PromptTokenizer(tmp_path)
    hf = CLIPTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    prompts = ["hello", "Hello hxllo!!", "hellö? ell", "zz", "<|endoftext|>hello"]
    assert [ours.tokenize(p) for p in prompts] == hf(prompts, add_special_tokens=False)["input_ids"]
    assert ours.tokenize("Hello hxllo!!") == [11, 2, 12, 9, 6, 1, 7] and ours.vocab_size == 13


def test_missing_special_token_or_files_raise(tmp_path: Path) -> None:
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    del vocab[BOS]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(DATA / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(TokenizerFileError, match="the vocabulary has no .<.startoftext"):
        PromptTokenizer(tmp_path)
    with pytest.raises(TokenizerFileError, match="vocab.json: no such file"):
        PromptTokenizer(tmp_path / "empty")


def test_word_cache_is_bounded(tmp_path: Path) -> None:
    shutil.copy(DATA / "vocab.json", tmp_path / "vocab.json")
    shutil.copy(DATA / "merges.txt", tmp_path / "merges.txt")
    small = PromptTokenizer(tmp_path)
    small._bpe.CACHE_SIZE = 3
    prompt = "a photo of a cat on the moon, a photo of a dog"
    assert small.tokenize(prompt) == small.tokenize(prompt) == PromptTokenizer().tokenize(prompt)
    assert len(small._bpe._cache) <= 3
