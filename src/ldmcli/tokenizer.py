"""Prompt -> token ids for the CLIP text encoders (byte-level BPE, Radford et al. 2021).

The vocabulary is OpenAI's ``bpe_simple_vocab_16e6`` (MIT), shipped with this package as
``data/vocab.json`` + ``data/merges.txt`` in the layout ``transformers.CLIPTokenizer`` reads;
``convert_openai_bpe`` documents (and reproduces) how those two files were made.

The BPE itself is ``transformers``' tokenizer; this module only fixes the framing Stable
Diffusion expects: ``[BOS] tokens [EOS] pad...`` of exactly ``max_length`` ids, where the pad id
depends on the family (SD1 pads with EOS 49407, SD2/OpenCLIP pads with 0).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Size of the OpenAI CLIP vocabulary: 512 byte symbols + 48,894 merges + 2 special tokens.
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 512 - 2  # 48,894


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
        if directory is None:
            data = resources.files("ldmcli") / "data"
            with resources.as_file(data / "vocab.json") as vocab:
                with resources.as_file(data / "merges.txt") as merges:
                    self._hf = _load_hf_tokenizer(Path(vocab), Path(merges))
        elif (Path(directory) / "vocab.json").is_file() or not (Path(directory) / "tokenizer.json").is_file():
            directory = Path(directory)
            self._hf = _load_hf_tokenizer(directory / "vocab.json", directory / "merges.txt")
        else:  # transformers >= 5 saves only the fast tokenizer's single file
            self._hf = _load_hf_tokenizer_file(Path(directory) / "tokenizer.json")
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
        return len(self._hf)

    def _special_id(self, token: str) -> int:
        token_id = self._hf.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or self._hf.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"tokenizer vocabulary has no {token!r}")
        return token_id

    def tokenize(self, prompt: str) -> list[int]:
        """BPE ids of ``prompt`` without BOS/EOS and without truncation."""
        return list(self._hf(prompt, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Ids ``[B, max_length]`` (int64): BOS, tokens, EOS, then padding.

        Prompts longer than ``max_length - 2`` tokens are cut so that EOS is always present
        (the pooled output of CLIP is read at the EOS position).
        """
        if isinstance(prompts, str):
            raise TypeError("PromptTokenizer expects a sequence of prompts, not a single str")
        rows = []
        for ids in self._hf(list(prompts), add_special_tokens=False)["input_ids"]:
            row = [self.bos_token_id, *ids[: self.max_length - 2], self._eos_token_id]
            rows.append(row + [self.pad_token_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)


def _load_hf_tokenizer(vocab: Path, merges: Path) -> Any:
    missing = [str(p) for p in (vocab, merges) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer file(s) not found: {', '.join(missing)}")
    # Imported here, not at module level: transformers takes seconds to import and the CLI
    # must start instantly for --help.
    try:  # the Rust `tokenizers` BPE; transformers 5 calls it CLIPTokenizer (Fast is an alias)
        from transformers import CLIPTokenizerFast as HFCLIPTokenizer
    except ImportError:  # a future transformers without the alias
        from transformers import CLIPTokenizer as HFCLIPTokenizer
    # Built from the two files directly (not from tokenizer_config.json) so that every
    # folder tokenizes identically; padding/truncation is done by PromptTokenizer itself.
    return HFCLIPTokenizer(str(vocab), str(merges))


def _load_hf_tokenizer_file(tokenizer_json: Path) -> Any:
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast(tokenizer_file=str(tokenizer_json))


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
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == VOCAB_SIZE == len(set(vocab))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
