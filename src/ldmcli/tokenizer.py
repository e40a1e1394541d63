"""Prompt -> token ids for the CLIP text encoders: byte-level BPE (Radford et al. 2021), our own code.

Only the vocabulary comes from files: OpenAI's ``bpe_simple_vocab_16e6`` (MIT), shipped with this
package as ``data/vocab.json`` + ``data/merges.txt`` (the layout ``transformers.CLIPTokenizer``
reads; ``convert_openai_bpe`` documents and reproduces how they were made), or a diffusers
``tokenizer/`` folder with the same two files or only a ``tokenizer.json``.

The algorithm reproduces, id for id, Hugging Face's fast CLIP tokenizer (what diffusers runs, and
the oracle of our tests), which is OpenAI's ``clip/simple_tokenizer.py`` without ftfy/html cleaning:

1. special tokens (``<|startoftext|>``, ``<|endoftext|>``) are cut out of the raw text;
2. each piece between them is NFC-normalised and lowercased;
3. words are the matches of the CLIP regex, their UTF-8 bytes spelled with GPT-2's byte symbols;
4. each word is BPE-merged, lowest merge rank first, with ``</w>`` on its last symbol; a symbol
   missing from the vocabulary becomes ``<|endoftext|>`` (HF's ``unk_token``).

Lowercasing and the regex's letter/digit classes use the Unicode tables of Python and ``regex``;
they agree with HF's (Rust, Oniguruma) on every code point assigned in Python's Unicode database
(14.0 on Python 3.11), and may differ on characters of newer Unicode versions.

``PromptTokenizer`` then frames the ids as Stable Diffusion expects: ``[BOS] tokens [EOS] pad...`` of
exactly ``max_length`` ids, where the pad id depends on the family (SD1 pads with EOS 49407,
SD2/OpenCLIP pads with 0).
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from math import inf
from pathlib import Path

import regex
import torch

from ldmcli.errors import CheckpointError
from ldmcli.files import json_type, loads_json, read_bounded
from ldmcli.limits import MAX_TOKENIZER_FILE_BYTES

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Size of the OpenAI CLIP vocabulary: 512 byte symbols + 48,894 merges + 2 special tokens.
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 512 - 2  # 48,894
END_OF_WORD = "</w>"

# CLIP's pre-tokenizer. Case-sensitive, as in HF: the text is already lowercase, and IGNORECASE
# would also let "'ſ" (long s) match "'s".
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# A special token that only appears after lowercasing ("<|ENDOFTEXT|>") is a word of the regex
# above, but HF's second pre-tokenizer (GPT-2's byte-level regex) cuts it at letter/punctuation
# boundaries and it is BPE-encoded as text.
_SPELLED_SPECIALS = {tok: ("<|", tok[2:-2], "|>") for tok in (BOS_TOKEN, EOS_TOKEN)}


class PromptTokenizer:
    """CLIP tokenizer framing prompts as fixed-length id rows for Stable Diffusion.

    ``directory`` is a folder with ``vocab.json`` and ``merges.txt``, or only ``tokenizer.json``
    (e.g. a diffusers folder's ``tokenizer/``); ``None`` uses the vocabulary bundled with this package.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        pad_token_id: int = 49407,  # SD1 pads with EOS; SD2/OpenCLIP pads with 0 ("!")
        max_length: int = 77,  # CLIP's context length (position embeddings)
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        folder = None if directory is None else Path(directory)
        self.source = "the bundled tokenizer" if folder is None else str(folder)
        if folder is None:
            self._bpe = _bundled_bpe()
        elif (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            self._bpe = BytePairEncoder.from_vocab_and_merges(folder / "vocab.json", folder / "merges.txt")
        else:  # transformers >= 5 saves only the fast tokenizer's single file
            self._bpe = BytePairEncoder.from_tokenizer_json(folder / "tokenizer.json")
        self.bos_token_id: int = self._special_id(BOS_TOKEN)
        self._eos_token_id: int = self._special_id(EOS_TOKEN)
        self.pad_token_id = pad_token_id
        self.max_length = max_length

    @property
    def eos_token_id(self) -> int:
        """Id of ``<|endoftext|>`` (49407 in the OpenAI vocabulary)."""
        return self._eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids including the special tokens (49408 for OpenAI's vocabulary)."""
        return len(self._bpe.vocab)

    @property
    def largest_id(self) -> int:
        """The largest id the tokenizer can produce: the text encoder's embedding table must hold it."""
        return max(self._bpe.vocab.values())

    def _special_id(self, token: str) -> int:
        if token not in self._bpe.vocab:
            raise TokenizerFileError(f"{self.source}: the vocabulary has no {token!r}")
        return self._bpe.vocab[token]

    def tokenize(self, prompt: str) -> list[int]:
        """BPE ids of ``prompt`` without BOS/EOS and without truncation."""
        return self._bpe.encode(prompt)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Ids ``[B, max_length]`` (int64): BOS, tokens, EOS, then padding.

        Prompts longer than ``max_length - 2`` tokens are cut so that EOS is always present
        (the pooled output of CLIP is read at the EOS position).
        """
        if isinstance(prompts, str):
            raise TypeError("PromptTokenizer expects a sequence of prompts, not a single str")
        rows = [self.frame(self.tokenize(prompt)[: self.max_length - 2]) for prompt in prompts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def frame(self, ids: Sequence[int]) -> list[int]:
        """``[BOS] ids [EOS] pad...``: exactly ``max_length`` ids; ``ids`` must leave room for BOS and EOS."""
        if len(ids) > self.max_length - 2:
            raise ValueError(f"{len(ids)} ids do not fit in {self.max_length} with BOS and EOS")
        row = [self.bos_token_id, *ids, self._eos_token_id]
        return row + [self.pad_token_id] * (self.max_length - len(row))

    @property
    def comma_id(self) -> int | None:
        """Id of a word-final comma (``,</w>``, 267 in OpenAI's vocabulary): where long prompts may be cut."""
        return self._bpe.vocab.get(",</w>")


class BytePairEncoder:
    """CLIP's byte-level BPE (see the module docstring) over a vocabulary and a ranked merge list.

    ``merges`` are "left right" strings, lowest rank first; ``specials`` are the tokens cut out of
    the raw text before normalisation (HF's special added tokens).
    """

    # Words seen per encoder before the cache is emptied: bounds memory for endless inputs.
    CACHE_SIZE = 100_000

    def __init__(self, vocab: dict[str, int], merges: Iterable[str], specials: Iterable[str]) -> None:
        self.vocab = vocab
        # Keyed by "left right" as merges.txt spells it: byte symbols never contain a space.
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._unk_id = vocab.get(EOS_TOKEN)
        # Longest first, so that the leftmost match is also the longest (HF's leftmost-longest).
        specials = sorted((s for s in specials if s in vocab), key=len, reverse=True)
        self._specials_re = regex.compile("(" + "|".join(map(regex.escape, specials)) + ")") if specials else None
        self._byte_symbols = str.maketrans({chr(b): s for b, s in bytes_to_unicode().items()})
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_vocab_and_merges(cls, vocab_json: Path, merges_txt: Path) -> BytePairEncoder:
        """Read ``vocab.json`` ({token: id}) and ``merges.txt`` ("#version" line, then "a b" by rank)."""
        vocab = _vocabulary(_read_json(vocab_json), vocab_json, "")
        lines = _read_text(merges_txt).splitlines()
        merges = [line for line in lines if line and not line.startswith("#version")]
        _check_merges(merges, merges_txt)
        # tokenizer_config.json is not read, so that every such folder tokenizes alike: HF would
        # make its pad token ("!" for SD2 and SDXL's tokenizer_2) special as well.
        return cls(vocab, merges, specials=(BOS_TOKEN, EOS_TOKEN))

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: Path) -> BytePairEncoder:
        """Read ``model.vocab``, ``model.merges`` and the special added tokens of an HF ``tokenizer.json``.

        Every special added token is cut out of the text, as HF does: files that transformers 5
        writes for a tokenizer padding with "!" (SD2, SDXL's ``tokenizer_2``) list "!" among them,
        so there each "!" is id 0 instead of being merged ("!!" -> 748 with ``vocab.json``).
        """
        data = _read_json(tokenizer_json)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise TokenizerFileError(f"{tokenizer_json}: has no \"model\" object")
        vocab = _vocabulary(model.get("vocab"), tokenizer_json, "model.vocab ")
        merges = model.get("merges")
        if not isinstance(merges, list):
            raise TokenizerFileError(f"{tokenizer_json}: model.merges is {json_type(merges)}, not an array")
        # tokenizers >= 0.20 writes each merge as a ["a", "b"] pair, older versions as "a b".
        merges = [" ".join(m) if isinstance(m, list) and all(isinstance(x, str) for x in m) else m for m in merges]
        _check_merges(merges, tokenizer_json)
        added = data.get("added_tokens", [])
        if not isinstance(added, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and _is_id(t.get("id")) for t in added
        ):
            raise TokenizerFileError(f"{tokenizer_json}: added_tokens is not an array of {{content, id}} objects")
        added = [t for t in added if t.get("special") and not t.get("normalized")]
        for token in added:
            vocab.setdefault(token["content"], token["id"])
        return cls(vocab, merges, specials=[t["content"] for t in added])

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: special tokens cut out first, the pieces between them BPE-encoded."""
        if self._specials_re is None:
            return self._encode_text(text)
        ids: list[int] = []
        # split() with a capturing group alternates text, special, text, ...
        for i, piece in enumerate(self._specials_re.split(text)):
            if i % 2:
                ids.append(self.vocab[piece])
            elif piece:
                ids += self._encode_text(piece)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        text = _lowercase(unicodedata.normalize("NFC", text))
        # HF also replaces whitespace runs by one space here; the regex drops whitespace anyway.
        ids: list[int] = []
        for word in _WORD_RE.findall(text):
            for part in _SPELLED_SPECIALS.get(word, (word,)):
                ids += self._encode_word(part)
        return ids

    def _encode_word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is None:
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            symbols = self._merge(word.encode("utf-8").decode("latin-1").translate(self._byte_symbols))
            cached = self._cache[word] = [self.vocab.get(s, self._unk_id) for s in symbols]
        return cached

    def _merge(self, word: str) -> list[str]:
        """BPE: repeatedly join every occurrence (left to right) of the adjacent pair of lowest rank."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            pairs = [f"{a} {b}" for a, b in zip(symbols, symbols[1:])]
            best = min(pairs, key=lambda pair: ranks.get(pair, inf))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(pairs) and pairs[i] == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols


@lru_cache(maxsize=1)
def _bundled_bpe() -> BytePairEncoder:
    """The OpenAI vocabulary shipped in ``ldmcli/data``, read once per process."""
    data = resources.files("ldmcli") / "data"
    with resources.as_file(data / "vocab.json") as vocab, resources.as_file(data / "merges.txt") as merges:
        return BytePairEncoder.from_vocab_and_merges(Path(vocab), Path(merges))


class TokenizerFileError(CheckpointError):
    """A tokenizer file that is there but unusable: not UTF-8 or JSON, or not a vocabulary."""


# Largest token id accepted; the text encoder's embedding table must also hold it (pipeline checks).
MAX_TOKEN_ID = 2**31 - 1


def _read_text(path: Path) -> str:
    try:
        return read_bounded(path, MAX_TOKENIZER_FILE_BYTES, TokenizerFileError).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _read_json(path: Path) -> object:
    try:
        return loads_json(_read_text(path))
    except ValueError as exc:
        raise TokenizerFileError(f"{path}: not JSON ({exc})") from None


def _is_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_TOKEN_ID


def _vocabulary(value: object, path: Path, where: str) -> dict[str, int]:
    """A {token: id} mapping, checked: the encoder indexes the text encoder's table with these ids."""
    if not isinstance(value, dict):
        raise TokenizerFileError(f"{path}: {where}is {json_type(value)}, not a {{token: id}} object")
    bad = next((token for token, id_ in value.items() if not _is_id(id_)), None)
    if bad is not None:
        raise TokenizerFileError(f"{path}: {where}id of {bad!r} is {value[bad]!r}, not a whole number 0..{MAX_TOKEN_ID}")
    return dict(value)


def _check_merges(merges: list, path: Path) -> None:
    """Each merge is two symbols separated by one space; anything else could never match a pair."""
    for rank, merge in enumerate(merges):
        if not isinstance(merge, str) or len(merge.split(" ")) != 2 or "" in merge.split(" "):
            raise TokenizerFileError(f"{path}: merge {rank} is {merge!r}, not two symbols separated by a space")


def _lowercase(text: str) -> str:
    """Lowercase code point by code point, as Rust's ``char::to_lowercase`` in HF's normaliser.

    ``str.lower`` differs only by the context rule for a word-final capital sigma (-> "ς"); HF
    maps every "Σ" to "σ".
    """
    if "Σ" in text:
        return "".join(c.lower() for c in text)
    return text.lower()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (Radford et al. 2019)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def convert_openai_bpe(gz_path: str | Path, out_dir: str | Path) -> None:
    """Write ``vocab.json`` + ``merges.txt`` from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

    Not used at runtime: this is how ``ldmcli/data`` was produced (the gz ships inside the
    ``open_clip_torch`` wheel as ``open_clip/bpe_simple_vocab_16e6.txt.gz``). The vocabulary
    order is OpenAI's ``SimpleTokenizer``: the 256 byte symbols, the same with ``</w>``, the
    joined merges, then BOS (49406) and EOS (49407).
    """
    lines = gzip.open(gz_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == VOCAB_SIZE == len(set(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
