"""CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), the prompt encoder of Stable Diffusion.

Parameter names follow Hugging Face ``CLIPTextModel`` (``text_model.encoder.layers.N.self_attn.
q_proj`` ...), which SD1 single files already use under ``cond_stage_model.transformer.``, so
those load after a prefix strip. Pre-LayerNorm blocks with causal self-attention; OpenAI's
ViT-L/14 (SD1) uses quick_gelu, OpenCLIP ViT-H/14 (SD2) and ViT-bigG/14 (SDXL) exact gelu.

The module holds no buffers (position ids come from ``torch.arange`` in ``forward``; the causal
mask is SDPA's ``is_causal``), so it can be built on the meta device and filled with
``load_state_dict(sd, strict=True, assign=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of a CLIP text tower. Defaults: OpenAI ViT-L/14 (SD1)."""

    vocab_size: int = 49408  # OpenAI BPE: 512 byte symbols + 48,894 merges + BOS + EOS
    max_positions: int = 77  # context length; prompts are framed to exactly this many ids
    width: int = 768  # 768 ViT-L (SD1), 1024 ViT-H (SD2), 1280 bigG (SDXL)
    layers: int = 12  # 12 ViT-L, 24 ViT-H (23 in diffusers folders), 32 bigG
    heads: int = 12  # width / 64 for all three towers
    intermediate: int = 3072  # MLP hidden size, 4 * width
    activation: str = "quick_gelu"  # OpenAI's x*sigmoid(1.702x); OpenCLIP towers use "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # text_projection output size (SDXL's bigG pooled embed)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class CLIPTextOutput(NamedTuple):
    """What the diffusion models condition on.

    hidden_states: [B, T, width] output of all but the last ``skip_last_layers`` blocks, then
        ``final_layer_norm`` (SD1: skip 0; SD2: skip 1, "penultimate layer + final LN").
    penultimate: [B, T, width] raw output of the block before that one, no final LN: with skip 0 the
        second-to-last block (SDXL's conditioning); each skipped block moves it one block earlier
        (clip skip on SDXL, as diffusers' ``hidden_states[-(clip_skip + 2)]``).
    pooled: [B, width | projection_dim] final-LN'ed last block at the EOS position, through
        ``text_projection`` when the model has one (SDXL's pooled text embedding).
    """

    hidden_states: torch.Tensor
    penultimate: torch.Tensor
    pooled: torch.Tensor


Vectors = Sequence[Sequence[tuple[int, torch.Tensor]]]
"""Per batch row, (position, vectors [n, width]) pairs: token embeddings that replace the table's rows of
ids at positions position .. position + n - 1 (cut at the row's end), before the position embeddings are
added; how textual-inversion embeddings enter (A1111's `EmbeddingsWithFixes`)."""


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """Sigmoid approximation of GELU used by OpenAI CLIP (Hendrycks & Gimpel 2016, sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, input_ids: torch.Tensor, vectors: Vectors | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = self.token_embedding(input_ids)
        if vectors is not None and any(vectors):
            tokens = tokens.clone()
            for row, placed in enumerate(vectors):
                for position, rows in placed:
                    count = max(0, min(tokens.shape[1] - position, rows.shape[0]))
                    tokens[row, position:position + count] = rows[:count].to(tokens)
        return tokens + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention (each token sees itself and the tokens before it)."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, heads, T, C/heads]
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    """The ``text_model.`` submodule: embeddings, blocks, final LayerNorm."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP text encoder: token ids [B, T] -> CLIPTextOutput."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        # A bias-free linear [projection_dim, width], as in HF CLIPTextModelWithProjection.
        self.text_projection = (
            nn.Linear(config.width, config.projection_dim, bias=False)
            if config.projection_dim is not None
            else None
        )

    def forward(self, input_ids: torch.Tensor, *, skip_last_layers: int = 0, vectors: Vectors | None = None) -> CLIPTextOutput:
        """`vectors`: token embeddings placed over some ids' (see `Vectors`); the ids still say where EOS is."""
        n = self.config.layers
        if not 0 <= skip_last_layers < n:
            raise ValueError(f"skip_last_layers must be in [0, {n}), got {skip_last_layers}")
        if input_ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"{input_ids.shape[1]} tokens exceed the {self.config.max_positions} positions"
            )
        tm = self.text_model
        x = tm.embeddings(input_ids, vectors)
        states = [x]  # states[i] = output after i blocks
        # All blocks always run, even when skipping: the pooled output needs the last one, and
        # one block is cheap next to the U-Net.
        for layer in tm.encoder.layers:
            x = layer(x)
            states.append(x)
        last = tm.final_layer_norm(x)
        hidden = tm.final_layer_norm(states[n - skip_last_layers]) if skip_last_layers else last
        # EOS (49407) is the largest id of the vocabulary, so argmax finds the first EOS whatever
        # the padding (EOS or 0). This is HF's rule for the eos_token_id=2 configs SD ships with.
        eos = input_ids.to(torch.long).argmax(dim=-1)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return CLIPTextOutput(hidden_states=hidden, penultimate=states[n - 1 - skip_last_layers], pooled=pooled)


_LAYER_KEY = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")


def clip_config_from_shapes(
    shapes: Mapping[str, Sequence[int]], *, activation: str = "quick_gelu"
) -> CLIPTextConfig:
    """Infer a CLIPTextConfig from canonical (``text_model.``-prefixed HF) key -> shape.

    Heads are not visible in shapes: width / 64 holds for ViT-L, ViT-H and bigG. The
    activation is not visible either and must be given (quick_gelu for OpenAI, gelu for OpenCLIP).
    """

    def shape(key: str) -> Sequence[int]:
        if key not in shapes:
            raise KeyError(f"cannot infer CLIP text config: missing {key!r}")
        return shapes[key]

    vocab_size, width = shape("text_model.embeddings.token_embedding.weight")
    max_positions, _ = shape("text_model.embeddings.position_embedding.weight")
    indices = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"CLIP text layers are missing or not contiguous: {sorted(indices)}")
    intermediate = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    projection = shapes.get("text_projection.weight")
    if width % 64:
        raise ValueError(f"CLIP text width {width} is not a multiple of the head size 64")
    return CLIPTextConfig(
        vocab_size=int(vocab_size),
        max_positions=int(max_positions),
        width=int(width),
        layers=len(indices),
        heads=int(width) // 64,
        intermediate=int(intermediate),
        activation=activation,
        projection_dim=None if projection is None else int(projection[0]),
    )
