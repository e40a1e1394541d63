"""Prompts encoded the way AUTOMATIC1111's webui encodes them: weights, long prompts, BREAK.

The reference semantics are A1111's `modules/sd_hijack_clip.py` (`tokenize_line`, `process_tokens`)
with its default "Original" emphasis (`modules/sd_emphasis.py`); the syntax is `prompt_syntax.py`'s.

1. The prompt is split into pieces of equal weight and BREAKs (`parse_attention`): "a (red:1.3) cat"
   is "a " x1, "red" x1.3, " cat" x1. Each piece is tokenized on its own.
2. The tokens fill chunks of 75. When a chunk is full and its last comma lies within its last 20
   tokens, the tokens after that comma move to the next chunk, so a phrase is not cut in two
   (A1111's `comma_padding_backtrack`, default 20). BREAK ends the chunk it is in.
3. Each chunk is framed as CLIP expects, ``[BOS] tokens [EOS] padding`` (77 ids), the frame weighted 1.
4. Each chunk goes through the text encoder on its own. Its output is multiplied token by token by
   the weights, then scaled so that its mean equals the unweighted output's mean (A1111: "restoring
   original mean is likely not correct, but it seems to work well to prevent artifacts").
5. The chunks' outputs are concatenated along the token axis (77 x chunks tokens: the U-Net's
   cross-attention takes any length). SDXL's pooled vector is the first chunk's.

Textual-inversion embeddings (`embeddings.py`) enter at step 2, as in A1111's `tokenize_line`: where a
piece's ids spell an embedding's name, its N vectors take N token places (placeholder ids whose token
embeddings the encoder replaces: `models.clip.Vectors`), weighted like the piece. An embedding does not
straddle chunks: one that does not fit in what is left of the chunk starts the next. The comma wrap moves
the placeholders of an embedding after the comma, but not its vectors, which stay in the chunk they
were placed in, over its padding (A1111 does not move its `fixes`); the wrapped placeholders are then
plain id-0 tokens.

Several texts encoded together (the texts of one prompt's editing schedule) go chunk by chunk as one
batch, the shorter ones filled with empty chunks, and the mean in step 4 is the batch's, as in A1111.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldmcli.prompt_syntax import BREAK, parse_attention
from ldmcli.tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from ldmcli.embeddings import Embedding, EncoderEmbeddings
    from ldmcli.models.clip import Vectors

# Tokens a chunk holds between its BOS and EOS: CLIP's 77 positions less those two.
CHUNK_TOKENS = 75
# How far back from a full chunk's end a comma may be for the words after it to move to the next
# chunk (A1111's "Prompt word wrap length limit", default 20; 0 turns it off).
COMMA_BACKTRACK = 20
# The id a chunk holds where an embedding's vectors go (A1111's: its EmbeddingsWithFixes replaces their rows).
PLACEHOLDER_ID = 0


@dataclass(frozen=True, eq=False)
class Placed:
    """An embedding's vectors [N, width] for this chunk's encoder, from the chunk's token `offset` on."""

    offset: int
    embedding: Embedding
    vectors: Tensor


@dataclass(frozen=True)
class Chunk:
    """Up to CHUNK_TOKENS token ids of a prompt (no BOS/EOS), the weight of each, and the embeddings
    whose vectors replace some of them."""

    tokens: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    embeddings: tuple[Placed, ...] = ()


def chunk_prompt(prompt: str, tokenizer: PromptTokenizer, embeddings: EncoderEmbeddings | None = None) -> list[Chunk]:
    """The prompt's chunks, by A1111's rules (steps 1 and 2 of the module docstring); at least one.
    `embeddings`: the textual-inversion embeddings the prompt may call, as this tokenizer's encoder sees them."""
    comma = tokenizer.comma_id
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    placed: list[Placed] = []
    last_comma = -1  # index in `tokens` of the current chunk's last comma

    def close() -> None:
        nonlocal tokens, weights, placed, last_comma
        chunks.append(Chunk(tuple(tokens), tuple(weights), tuple(placed)))
        tokens, weights, placed, last_comma = [], [], [], -1

    for text, weight in parse_attention(prompt):
        if text is BREAK:
            close()
            continue
        items = tokenizer.tokenize(text) if embeddings is None else embeddings.tokenize(text)
        position = 0
        while position < len(items):
            if items[position] == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the comma stays; what follows it starts the next chunk
                moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved_tokens, moved_weights
            if len(tokens) == CHUNK_TOKENS:
                close()
            found = None if embeddings is None else embeddings.match(items, position)
            if found is None:
                tokens.append(items[position])
                weights.append(weight)
                position += 1
                continue
            embedding, length = found
            vectors = embeddings.vectors(embedding)
            if len(tokens) + len(vectors) > CHUNK_TOKENS:
                close()
            placed.append(Placed(len(tokens), embedding, vectors))
            tokens += [PLACEHOLDER_ID] * len(vectors)
            weights += [weight] * len(vectors)
            position += length
    if tokens or not chunks:
        close()
    return chunks


def framed_weights(chunk: Chunk, length: int) -> list[float]:
    """The weights of a chunk framed to `length` ids: 1 for BOS, EOS and the padding."""
    return [1.0, *chunk.weights] + [1.0] * (length - 1 - len(chunk.weights))


def emphasize(z: Tensor, weights: Tensor, counts: Tensor | None = None) -> Tensor:
    """A1111's "Original" emphasis: z [B, T, C] times weights [B, T], rescaled to z's mean over the
    whole batch, as A1111 takes it. counts [B]: how many times each row stands in A1111's batch (a
    text an alternation repeats is encoded once here), so the batch mean is A1111's. Computed in
    float32; a batch without weights is returned as is (the rescale would be by exactly 1)."""
    if bool((weights == 1).all()):
        return z
    counts = torch.ones(z.shape[0], device=z.device) if counts is None else counts.to(z.device, torch.float32)

    def batch_mean(t: Tensor) -> Tensor:
        return (t.mean(dim=(1, 2)) * counts).sum() / counts.sum()

    z32 = z.float()
    original_mean = batch_mean(z32)
    weighted = z32 * weights[..., None]
    return (weighted * (original_mean / batch_mean(weighted))).to(z.dtype)


Encoder = Callable[[Tensor, "Vectors | None"], tuple[Tensor, Tensor | None]]
"""(ids [B, 77], embeddings' vectors placed over them or None) -> (token states [B, 77, C], pooled [B, P]
or None): one text encoder at its layer."""


def encode_chunks(
    encoder: Encoder,
    tokenizer: PromptTokenizer,
    texts_chunks: Sequence[Sequence[Chunk]],
    *,
    device: torch.device,
    chunk_count: int | None = None,
    counts: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Encode texts given as chunks: [B, 77 * chunks, C] and the first chunk's pooled vector.

    Every text gets `chunk_count` chunks (default: the most any has), the missing ones empty.
    counts: how many times each text stands in A1111's batch (see `emphasize`); default once each.
    """
    count = max(chunk_count or 0, *(len(chunks) for chunks in texts_chunks))
    multiplicity = None if counts is None else torch.tensor(counts, dtype=torch.float32)
    parts: list[Tensor] = []
    pooled = None
    for index in range(count):
        batch = [chunks[index] if index < len(chunks) else Chunk() for chunks in texts_chunks]
        ids = torch.tensor([tokenizer.frame(chunk.tokens) for chunk in batch], dtype=torch.long, device=device)
        weights = torch.tensor([framed_weights(chunk, ids.shape[1]) for chunk in batch], device=device)
        # each chunk's embeddings, at their places in the framed ids (after BOS)
        vectors = [[(p.offset + 1, p.vectors) for p in chunk.embeddings] for chunk in batch]
        states, chunk_pooled = encoder(ids, vectors if any(vectors) else None)
        parts.append(emphasize(states, weights, multiplicity))
        if index == 0:
            pooled = chunk_pooled
    return torch.cat(parts, dim=1), pooled
