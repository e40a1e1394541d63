"""Prompts -> what the U-Net is conditioned on, step by step.

By family (what diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline do for a plain prompt):
- sd1/sd2: `context` = the text encoder's hidden states (SD2 single files: penultimate block + LN);
- sdxl: `context` = [CLIP-L penultimate | bigG penultimate] (raw, no final LN), and a pooled, projected
  bigG vector that `pipeline` turns into the U-Net's `y`; an empty negative prompt conditions on zeros
  (`force_zeros_for_empty_prompt`);
- the SDXL refiner (bigG alone: `model.text_encoder` None): `context` = bigG penultimate, and the pooled
  bigG vector (StableDiffusionXLImg2ImgPipeline.encode_prompt with `text_encoder=None`); its empty
  negative prompt is encoded, not zeroed (the refiner's model_index.json: force_zeros_for_empty_prompt false).

On top of that, prompts are read as A1111 reads them (`prompt_encoding.py`: weights, chunks of 75
tokens, BREAK) and may change during sampling (`prompt_syntax.prompt_schedule`: `[from:to:when]`,
`[a|b]`). Clip skip counts as A1111 does: 1 is the model's own layer, N conditions on the layer N - 1
blocks earlier (diffusers' `clip_skip=N-1`). On SDXL both encoders move back, as diffusers does.

Textual-inversion embeddings come from `model.embeddings` (an `embeddings.EmbeddingLibrary`, or None):
a prompt calls them by name (`prompt_encoding`); on SDXL clip_l's vectors go to the first encoder and
clip_g's to the second. The text cache is keyed by text only: a model keeps one library for its run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ldmcli.prompt_encoding import chunk_prompt, encode_chunks
from ldmcli.prompt_syntax import extra_network_tags, prompt_schedule

if TYPE_CHECKING:
    from ldmcli.embeddings import Embedding, EncoderEmbeddings
    from ldmcli.pipeline import StableDiffusion
    from ldmcli.request import ImageRequest


@dataclass(frozen=True)
class TextConditioning:
    """What the prompt encoders give: the cross-attention context and (SDXL) the pooled embedding."""

    context: torch.Tensor  # [B, 77 * chunks, context_dim]
    pooled: torch.Tensor | None = None  # [B, projection_dim]: SDXL's projected bigG EOS state (first chunk)

    def rows(self, start: int, stop: int) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled[start:stop]
        return TextConditioning(self.context[start:stop], pooled)

    def zeros(self) -> TextConditioning:
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return TextConditioning(torch.zeros_like(self.context), pooled)

    def padded(self, tokens: int, empty: TextConditioning) -> TextConditioning:
        """The context lengthened to `tokens` with copies of the empty prompt's (one chunk of 77), as
        A1111's "pad prompt/negative prompt to be same length" does, so that prompts of different
        lengths batch together. The pooled vector is the first chunk's and stays."""
        missing = tokens - self.context.shape[1]
        if missing == 0:
            return self
        chunk = empty.context.shape[1]
        if missing < 0 or missing % chunk:
            raise ValueError(f"cannot pad a context of {self.context.shape[1]} tokens to {tokens}")
        filler = empty.context.expand(self.context.shape[0], -1, -1).repeat(1, missing // chunk, 1)
        return TextConditioning(torch.cat([self.context, filler.to(self.context.dtype)], dim=1), self.pooled)


def concat(parts: Sequence[TextConditioning]) -> TextConditioning:
    """Batch conditionings of the same length along dim 0."""
    context = torch.cat([p.context for p in parts])
    if any(p.pooled is None for p in parts):
        return TextConditioning(context)
    return TextConditioning(context, torch.cat([p.pooled for p in parts]))


@torch.inference_mode()
def encode_texts(model: StableDiffusion, texts: tuple[str, ...], clip_skip: int = 1) -> TextConditioning:
    """Texts encoded together as A1111 encodes a prompt's schedule texts: one row each, all as long as
    the longest (`prompt_encoding`). A text that appears more than once is encoded once, and counted
    as often as it appears in the emphasis's batch mean. Answered from `model.text_cache` when encoded
    up front."""
    cached = model.text_cache.get((texts, clip_skip))
    if cached is not None:
        return cached
    if model.text_encoder is None and model.text_encoder_2 is None:
        raise RuntimeError(f"the text encoders were released and {texts!r} was not encoded up front")
    distinct = list(dict.fromkeys(texts))
    counts = [texts.count(text) for text in distinct]
    encoded = _encode_distinct(model, distinct, counts, clip_skip - 1)
    if len(distinct) == len(texts):
        return encoded
    index = torch.tensor([distinct.index(text) for text in texts], device=encoded.context.device)
    pooled = None if encoded.pooled is None else encoded.pooled[index]
    return TextConditioning(encoded.context[index], pooled)


def _encode_distinct(model: StableDiffusion, texts: list[str], counts: list[int], skip: int) -> TextConditioning:
    """`texts` through the text encoder(s), `skip` blocks before the family's own layer."""
    if model.text_encoder_2 is None:
        chunks = [chunk_prompt(text, model.tokenizer, _embeddings(model, 0)) for text in texts]
        encoder = model.text_encoder
        layers = model.spec.clip_skip + skip  # SD2 single files already skip the tower's last block

        def states(ids, vectors):
            return encoder(ids, skip_last_layers=layers, vectors=vectors).hidden_states, None

        context, _ = encode_chunks(states, model.tokenizer, chunks, device=model.device, counts=counts)
        return TextConditioning(context)
    assert model.tokenizer_2 is not None and model.text_encoder_2 is not None
    first_encoder, second_encoder = model.text_encoder, model.text_encoder_2
    chunks_2 = [chunk_prompt(text, model.tokenizer_2, _embeddings(model, 1)) for text in texts]

    def second(ids, vectors):
        out = second_encoder(ids, skip_last_layers=skip, vectors=vectors)
        return out.penultimate, out.pooled

    if first_encoder is None:  # the SDXL refiner: bigG alone
        context, pooled = encode_chunks(second, model.tokenizer_2, chunks_2, device=model.device, counts=counts)
        return TextConditioning(context, pooled)
    chunks_1 = [chunk_prompt(text, model.tokenizer, _embeddings(model, 0)) for text in texts]
    # The two tokenizers split alike unless a tokenizer.json makes "!" special in one: equal counts.
    count = max(len(chunks) for chunks in (*chunks_1, *chunks_2))

    def first(ids, vectors):
        return first_encoder(ids, skip_last_layers=skip, vectors=vectors).penultimate, None

    context_1, _ = encode_chunks(first, model.tokenizer, chunks_1, device=model.device, chunk_count=count, counts=counts)
    context_2, pooled = encode_chunks(second, model.tokenizer_2, chunks_2, device=model.device, chunk_count=count,
                                      counts=counts)
    return TextConditioning(torch.cat([context_1, context_2], dim=-1), pooled)


def _embeddings(model: StableDiffusion, index: int) -> EncoderEmbeddings | None:
    """The model's embeddings as text encoder `index` (0: the first) sees them, if it has any."""
    library = model.embeddings
    if library is None:
        return None
    return library.for_encoder(index, model.tokenizer if index == 0 else model.tokenizer_2)


def used_embeddings(model: StableDiffusion, request: ImageRequest) -> list[Embedding]:
    """The embeddings an image of `request` calls (prompt and negative prompt, every text of their
    schedules), in order of first use: what A1111 lists as "TI hashes". Reads the files it has not read
    yet, so a file that cannot serve fails here, before sampling; needs only the tokenizers."""
    found: dict[int, Embedding] = {}
    index = 0 if model.tokenizer is not None else 1  # the SDXL refiner has only its second tokenizer
    tokenizer = model.tokenizer if index == 0 else model.tokenizer_2
    for texts, _ in conditioning_keys(request):
        for text in texts:
            for chunk in chunk_prompt(text, tokenizer, _embeddings(model, index)):
                found.update((id(p.embedding), p.embedding) for p in chunk.embeddings)
    return list(found.values())


def encode_text(model: StableDiffusion, prompts: Sequence[str], clip_skip: int = 1) -> TextConditioning:
    """Prompts -> one row each, every prompt encoded on its own (a batch of one), so that its
    conditioning does not depend on which other prompts share the batch; shorter ones padded."""
    encoded = {prompt: encode_texts(model, (prompt,), clip_skip) for prompt in dict.fromkeys(prompts)}
    tokens = max(e.context.shape[1] for e in encoded.values())
    empty = encode_texts(model, ("",), clip_skip) if any(e.context.shape[1] < tokens for e in encoded.values()) else None
    return concat([encoded[p] if empty is None else encoded[p].padded(tokens, empty) for p in prompts])


ConditioningSchedule = list[tuple[int, TextConditioning]]
"""[(end_at_step, conditioning), ...] as A1111's ScheduledPromptConditioning: the conditioning of
the first entry whose end_at_step is at least the current step."""


def request_conditioning(model: StableDiffusion, request: ImageRequest) -> tuple[ConditioningSchedule, ConditioningSchedule | None]:
    """The prompt's and (with guidance) the negative prompt's conditioning schedules for `request`.

    SDXL conditions an empty negative prompt on zeros, as A1111 does when every text of its schedule is
    empty (and diffusers' `force_zeros_for_empty_prompt`).
    """
    timeline = timeline_steps(request)
    cond = _conditioning(model, _schedule(request.prompt, timeline), request.clip_skip)
    if not request.guided:  # at scale 1 no unconditional pass at all (Turbo)
        return cond, None
    schedule = _schedule(request.negative_prompt, timeline, negative=True)
    uncond = _conditioning(model, schedule, request.clip_skip)
    if model.spec.zero_empty_negative and all(text == "" for _, text in schedule):
        uncond = [(end, text.zeros()) for end, text in uncond]
    return cond, uncond


def prompt_conditioning(model: StableDiffusion, prompt: str, steps: int, clip_skip: int = 1) -> ConditioningSchedule:
    """A prompt's conditioning over a timeline of `steps`: its schedule's texts encoded together."""
    return _conditioning(model, _schedule(prompt, steps), clip_skip)


def _conditioning(model: StableDiffusion, schedule: list[tuple[int, str]], clip_skip: int) -> ConditioningSchedule:
    encoded = encode_texts(model, tuple(text for _, text in schedule), clip_skip)
    return [(end, encoded.rows(i, i + 1)) for i, (end, _) in enumerate(schedule)]


def timeline_steps(request: ImageRequest) -> int:
    """The steps A1111 lays a prompt's editing timeline over: twice the steps for a second-order
    sampler (it counts model calls, about two a step there), else the steps."""
    from ldmcli.samplers import SAMPLERS

    return request.steps * (2 if SAMPLERS[request.sampler].second_order else 1)


def _schedule(prompt: str, steps: int, *, negative: bool = False) -> list[tuple[int, str]]:
    """The prompt's A1111 schedule. A prompt's extra-network tags (`<lora:x:0.8>`) are removed first, as
    A1111 removes them before it parses it (what they ask for is applied, or reported, elsewhere); a
    negative prompt's stay words, as in A1111, which reads tags in the prompt only."""
    return prompt_schedule(prompt if negative else extra_network_tags(prompt)[0], steps)


def text_encoder_bytes(model: StableDiffusion) -> int:
    """Memory the text encoder(s) hold: what `encode_up_front` can give back."""
    encoders = [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]
    return sum(p.numel() * p.element_size() for e in encoders for p in e.parameters())


@torch.inference_mode()
def encode_up_front(model: StableDiffusion, requests: Sequence[ImageRequest]) -> None:
    """Encode every text `requests` will need now, keep the results, and release the text encoders.

    Nothing but `encode_texts` needs the text encoders, so once every prompt of a run is encoded they
    only take memory while the U-Net and VAE work (SD1.5 in bf16: 0.25 GB of 2.1 GB of weights; SDXL:
    1.6 GB). Afterwards `encode_texts` answers from the cache and raises for any other text.
    """
    keys = dict.fromkeys(key for request in requests for key in conditioning_keys(request))
    keys[(("",), 1)] = None  # the padding of prompts of different lengths
    keys.update({(("",), r.clip_skip): None for r in requests})
    for texts, clip_skip in keys:
        model.text_cache[(texts, clip_skip)] = encode_texts(model, texts, clip_skip)
    model.text_encoder = model.text_encoder_2 = None
    from ldmcli.kernels import return_freed_memory

    return_freed_memory()


def conditioning_keys(request: ImageRequest) -> list[tuple[tuple[str, ...], int]]:
    """The (texts, clip skip) batches an image of `request` encodes: its prompt's and negative prompt's."""
    timeline = timeline_steps(request)
    return [(tuple(text for _, text in _schedule(prompt, timeline, negative=i == 1)), request.clip_skip)
            for i, prompt in enumerate(request.text_prompts)]
