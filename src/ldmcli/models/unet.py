"""The latent-diffusion U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"), with the ORIGINAL LDM parameter names.

Module and list positions mirror CompVis/Stability `openaimodel.UNetModel`, so the
`model.diffusion_model.*` tensors of a single-file checkpoint (prefix stripped) load with
`load_state_dict(sd, strict=True, assign=True)`:

    time_embed.{0,2}                         timestep MLP
    time_embedding.cond_proj                 (LCM-distilled) guidance embedding -> timestep features,
                                             diffusers' name, kept by LCM single files as it is
    label_emb.0.{0,2}                        (SDXL) vector-conditioning MLP, `adm_in_channels`
    input_blocks.0.0                         conv_in
    input_blocks.N.{0: ResBlock | Downsample(op), 1: SpatialTransformer}
    middle_block.{0: ResBlock, 1: SpatialTransformer, 2: ResBlock}
    output_blocks.N.{0: ResBlock, 1: SpatialTransformer | Upsample, 2: Upsample}
    out.{0: GroupNorm, 2: conv}

The module holds no buffers: the sinusoidal timestep embedding is computed in `forward`, so
the whole network can be built on the meta device and materialised by `assign=True`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmcli.kernels import attention, conv2d, geglu, is_packed, linear, upsample_conv2d

__all__ = [
    "UNetConfig",
    "UNetModel",
    "timestep_embedding",
    "unet_config_from_shapes",
]

# Every GroupNorm in the LDM U-Net uses 32 groups ("GroupNorm32").
NORM_GROUPS = 32


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the LDM U-Net. Defaults are Stable Diffusion 1.x."""

    in_channels: int = 4  # latent channels; 9 for inpainting (latent + mask + masked latent)
    out_channels: int = 4
    model_channels: int = 320  # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResBlocks per level on the way down (up: num_res_blocks + 1)
    # SpatialTransformer depth after each down ResBlock of a level; 0 = no attention there.
    # SD1/SD2: (1, 1, 1, 0); SDXL: (0, 2, 10).
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    middle_transformer_depth: int = 1  # SDXL: 10
    # Depth per output block, in output_blocks order (deepest level first);
    # None = mirror `transformer_depth` (true of SD1, SD2 and SDXL base).
    output_transformer_depth: tuple[int, ...] | None = None
    context_dim: int = 768  # cross-attention width: 768 SD1 (CLIP L), 1024 SD2, 2048 SDXL
    # Exactly one of num_heads / head_dim: SD1 fixes 8 heads at every level, SD2/SDXL fix 64 channels per head.
    num_heads: int | None = 8
    head_dim: int | None = None
    use_linear_projection: bool = False  # SD1: 1x1 conv proj_in/proj_out; SD2/SDXL: nn.Linear
    upcast_attention: bool = False  # SD2.1: q.k^T softmax in fp32 (fp16 overflows otherwise)
    adm_in_channels: int | None = None  # SDXL: width of the vector conditioning `y` (2816 base)
    # LCM-distilled U-Nets: width of the guidance-scale embedding `timestep_cond` added, projected, to the
    # sinusoidal timestep features (diffusers' time_cond_proj_dim; 256 in LCM_Dreamshaper_v7 and lcm-sdxl).
    time_cond_proj_dim: int | None = None

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.transformer_depth) != levels:
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries, channel_mult has {levels}"
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("set exactly one of num_heads (SD1: 8) or head_dim (SD2/SDXL: 64)")
        if self.middle_transformer_depth < 1:
            raise ValueError("middle_transformer_depth must be >= 1 (every SD U-Net has a middle transformer)")
        n_out = levels * (self.num_res_blocks + 1)
        if self.output_transformer_depth is not None and len(self.output_transformer_depth) != n_out:
            raise ValueError(f"output_transformer_depth needs {n_out} entries (one per output block)")
        for ch in self.level_channels:
            if ch % NORM_GROUPS:
                raise ValueError(f"channel width {ch} is not a multiple of {NORM_GROUPS} (GroupNorm32)")

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def output_depths(self) -> tuple[int, ...]:
        """Transformer depth of every output block, in `output_blocks` order."""
        if self.output_transformer_depth is not None:
            return self.output_transformer_depth
        return tuple(d for d in reversed(self.transformer_depth) for _ in range(self.num_res_blocks + 1))

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer `channels` wide."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        assert self.head_dim is not None
        return channels // self.head_dim, self.head_dim


# ---------------------------------------------------------------------------------------------
# Building blocks


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding as in LDM / "Attention Is All You Need": [cos | sin].

    timesteps: [B] (may be fractional). Returns [B, dim] in float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (LDM's GroupNorm32): fp16 variance overflows otherwise.

    bf16 has fp32's exponent range and PyTorch's bf16 kernels accumulate the statistics in fp32, so a
    bf16 input is normalised directly: same result up to the output rounding, and no fp32 round trip
    (which cost 9x the norm itself at 64x64 on CPU).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps
        ).to(x.dtype)


def _silu(x: Tensor) -> Tensor:
    """SiLU, in place when nothing can need the input (no autograd): saves a full-size write."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def _norm(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels, eps=eps)


class ResBlock(nn.Module):
    """Residual block with additive timestep conditioning (Ho et al. 2020 / ADM).

    Positions match LDM: in_layers = [norm, SiLU, conv], emb_layers = [SiLU, linear],
    out_layers = [norm, SiLU, dropout slot, conv].
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is LDM's Dropout; inference only, but the slot keeps `out_layers.3` aligned.
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Identity(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm1, _, conv1 = self.in_layers
        norm2, _, _, conv2 = self.out_layers
        e = self.emb_layers(emb).to(x.dtype)  # [B, out]
        if is_packed(conv1) and bool((e == e[:1]).all()):
            # One timestep for the whole batch (always so under CFG): the embedding is a per-channel
            # bias, added inside the convolution instead of in a separate pass.
            h = conv2d(conv1, _silu(norm1(x)), bias_add=e[0])
        else:
            h = conv2d(conv1, _silu(norm1(x)))
            h = h + e[:, :, None, None]
        skip = x if isinstance(self.skip_connection, nn.Identity) else conv2d(self.skip_connection, x)
        return conv2d(conv2, _silu(norm2(h)), residual=skip)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; output size ceil(H/2) x ceil(W/2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(self.op, x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    Upsamples to `size` (the matching skip connection's H, W) when given, so latents whose
    sides are not multiples of 2**(levels-1) still line up with their skips (as ComfyUI and
    diffusers do); otherwise doubles.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        return upsample_conv2d(self.conv, x, size)


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention via SDPA; self-attention when `context` is None."""

    FUSABLE_ATTENTION = True  # `kernels.attention` may run it as one fused kernel once prepared

    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, upcast: bool = False
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # LDM: Sequential(Linear, Dropout); only the Linear has weights.
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))

    def forward(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """Attention output projected back to `query_dim`, plus `residual` if given."""
        context = x if context is None else context
        q, k, v = linear(self.to_q, x), linear(self.to_k, context), linear(self.to_v, context)
        b, _, inner = q.shape
        # [B, T, H*D] -> [B, H, T, D]
        q, k, v = (t.view(b, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
        dtype = q.dtype
        if self.upcast:
            # SDPA needs one dtype for q, k, v, so all three go to fp32 (SD2.1's attn upcast).
            q, k, v = q.float(), k.float(), v.float()
        out = attention(self, q, k, v).to(dtype)
        out = out.transpose(1, 2).reshape(b, -1, inner)
        return linear(self.to_out[0], out, residual=residual)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): proj -> (x, gate), x * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj, x)


class FeedForward(nn.Module):
    """net = [GEGLU(dim, 4 dim), dropout slot, Linear(4 dim, dim)]."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return linear(self.net[2], self.net[0](x), residual=residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on `context`, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, merging=None) -> Tensor:
        """merging: (merge, unmerge) around the self-attention (token merging, `token_merging.py`), or None."""
        if merging is None:
            x = self.attn1(self.norm1(x), residual=x)
        else:
            merge, unmerge = merging
            x = unmerge(self.attn1(merge(self.norm1(x)))) + x
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: norm, proj_in, `depth` transformer blocks over H*W tokens, proj_out, residual.

    SD1 projects with 1x1 convs before flattening; SD2/SDXL (`linear`) with Linear after.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool, upcast: bool
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = _norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor, merging=None) -> Tensor:
        """merging: token merging for this call (`token_merging.TokenMerging`: its `plan` gives each block
        its (merge, unmerge), or None at levels it leaves alone), or None."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = conv2d(self.proj_in, x)
        # [B, C, H, W] -> [B, H*W, C]: a free view when x is channels_last
        x = x.flatten(2).transpose(1, 2)
        if self.linear:
            x = linear(self.proj_in, x)
        for block in self.transformer_blocks:
            x = block(x, context, None if merging is None else merging.plan(x, h, w))
        if self.linear:
            return linear(self.proj_out, x, residual=x_in.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        return conv2d(self.proj_out, x.transpose(1, 2).reshape(b, -1, h, w), residual=x_in)


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands each layer the extra input it needs (emb, context or skip size)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None, merging=None
    ) -> Tensor:
        for layer in self:
            if isinstance(layer, nn.Conv2d):  # conv_in
                x = conv2d(layer, x)
            elif isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, merging)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The network


@dataclass
class DeepFeatures:
    """DeepCache's exchange with `UNetModel.forward` (`deep_cache.py`): the number of outermost input/output
    block pairs that always run, and the features the blocks inside them hand outwards (None: compute them)."""

    shallow: int
    features: Tensor | None = None


class UNetModel(nn.Module):
    """Latent-diffusion U-Net eps/v-predictor: (x_t, t, context[, y]) -> model output."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        mc, ted = c.model_channels, c.time_embed_dim

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer(
                ch, heads, dim_head, depth, c.context_dim, c.use_linear_projection, c.upcast_attention
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if c.adm_in_channels is not None:
            # SDXL: label_emb.0 is itself a Sequential(Linear, SiLU, Linear).
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(c.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
            )
        if c.time_cond_proj_dim is not None:
            # diffusers' TimestepEmbedding.cond_proj (no bias); the LDM single files of LCM models keep
            # it under this diffusers name (`model.diffusion_model.time_embedding.cond_proj.weight`).
            self.time_embedding = nn.ModuleDict({"cond_proj": nn.Linear(c.time_cond_proj_dim, mc, bias=False)})

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]  # channels of each input block's output, consumed by the output blocks
        ch = mc
        for level, (out_ch, depth) in enumerate(zip(c.level_channels, c.transformer_depth)):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, out_ch)]
                ch = out_ch
                if depth:
                    layers.append(transformer(ch, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, ch), transformer(ch, c.middle_transformer_depth), ResBlock(ch, ted, ch)
        )

        self.output_blocks = nn.ModuleList()
        out_depths = iter(c.output_depths)
        for level in reversed(range(len(c.channel_mult))):
            out_ch = c.level_channels[level]
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, out_ch)]
                ch = out_ch
                depth = next(out_depths)
                if depth:
                    layers.append(transformer(ch, depth))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(mc), nn.SiLU(), nn.Conv2d(mc, c.out_channels, 3, padding=1))

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
        timestep_cond: Tensor | None = None, deep: DeepFeatures | None = None, merging=None,
    ) -> Tensor:
        """x: [B, C, H, W] latents; timesteps: [B] (float ok); context: [B, T, context_dim];
        y: [B, adm_in_channels] (SDXL only); timestep_cond: [B, time_cond_proj_dim], the guidance
        embedding of an LCM-distilled U-Net (`lcm.guidance_embedding`; required by such a U-Net, which was
        never trained without it); deep: DeepCache's exchange (`deep_cache.py`): with features, only its
        `shallow` outermost block pairs run, on them; without, the whole U-Net runs and leaves them there;
        merging: token merging before the self-attentions (`token_merging.TokenMerging`), or None.
        Returns [B, out_channels, H, W]."""
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError("y must be given exactly when the model has adm_in_channels (SDXL)")
        if (timestep_cond is None) != (self.config.time_cond_proj_dim is None):
            raise ValueError("timestep_cond (the guidance embedding) must be given exactly when the model has "
                             "time_cond_proj_dim (an LCM-distilled U-Net)")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        w_dtype = self.time_embed[0].weight.dtype
        # Inputs in the network's dtype: a sampler may keep its state in fp32 around a bf16/fp16 U-Net.
        x, context = x.to(w_dtype), context.to(w_dtype)
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(w_dtype)
        if timestep_cond is not None:
            t_emb = t_emb + self.time_embedding["cond_proj"](timestep_cond.to(w_dtype))
        emb = self.time_embed(t_emb)
        if y is not None:
            emb = emb + self.label_emb(y.to(w_dtype))

        reuse = deep is not None and deep.features is not None
        h = x
        skips = []
        for block in self.input_blocks[:deep.shallow] if reuse else self.input_blocks:
            h = block(h, emb, context, merging=merging)
            skips.append(h)
        if reuse:
            h, outputs = deep.features, self.output_blocks[len(self.output_blocks) - deep.shallow:]
        else:
            h, outputs = self.middle_block(h, emb, context, merging=merging), self.output_blocks
        keep_at = len(outputs) - deep.shallow if deep is not None and not reuse else None
        for i, block in enumerate(outputs):
            if i == keep_at:
                deep.features = h  # what the deep blocks hand to the outermost ones
            h = torch.cat([h, skips.pop()], dim=1)
            # An Upsample in this block must land on the next skip's size (odd sides round up going down).
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None, merging)
        return conv2d(self.out[2], _silu(self.out[0](h)))


# ---------------------------------------------------------------------------------------------
# Config from checkpoint shapes


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _depth(keys: Sequence[str], prefix: str) -> int:
    """Number of transformer blocks under `prefix` (0 if it is not a SpatialTransformer)."""
    pat = re.compile(re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def unet_config_from_shapes(
    shapes: Mapping[str, Sequence[int]], *, num_heads: int | None = None, head_dim: int | None = None
) -> UNetConfig:
    """Infer a UNetConfig from LDM-named U-Net keys (prefix `model.diffusion_model.` stripped).

    Values may be shapes or tensors (meta tensors are fine). Heads are not recoverable from
    shapes: pass num_heads (SD1: 8) or head_dim (SD2/SDXL: 64). `upcast_attention` is not in
    the weights either; set it with `dataclasses.replace` (SD2.1: True).
    """
    keys = list(shapes)
    for required in ("input_blocks.0.0.weight", "out.2.weight", "time_embed.0.weight"):
        if required not in shapes:
            raise ValueError(
                f"not an LDM U-Net state dict: missing {required!r} "
                "(strip the 'model.diffusion_model.' prefix first)"
            )
    model_channels, in_channels = _shape(shapes["input_blocks.0.0.weight"])[:2]
    out_channels = _shape(shapes["out.2.weight"])[0]

    def block_exists(name: str) -> bool:
        return any(k.startswith(name + ".") for k in keys)

    # Walk input_blocks: ResBlocks (maybe followed by a transformer) until a Downsample ends a level.
    widths: list[int] = []
    depths: list[int] = []
    res_counts: list[int] = []
    level_res, level_ch = 0, model_channels
    level_depths: list[int] = []
    n = 1
    while block_exists(f"input_blocks.{n}"):
        if f"input_blocks.{n}.0.op.weight" in shapes:  # Downsample closes the level
            if level_res == 0:
                raise ValueError(f"input_blocks.{n}: Downsample with no ResBlock before it")
            widths.append(level_ch)
            depths.append(level_depths[0])
            res_counts.append(level_res)
            if len(set(level_depths)) > 1:
                raise ValueError(f"level {len(depths) - 1} mixes transformer depths {level_depths}")
            level_res, level_depths = 0, []
        else:
            key = f"input_blocks.{n}.0.out_layers.3.weight"
            if key not in shapes:
                raise ValueError(f"input_blocks.{n} is neither a ResBlock nor a Downsample (no {key!r})")
            level_ch = _shape(shapes[key])[0]
            level_res += 1
            level_depths.append(_depth(keys, f"input_blocks.{n}.1"))
        n += 1
    if level_res == 0:
        raise ValueError("input_blocks end with a Downsample or hold no ResBlock")
    widths.append(level_ch)
    depths.append(level_depths[0])
    res_counts.append(level_res)
    if len(set(level_depths)) > 1:
        raise ValueError(f"level {len(depths) - 1} mixes transformer depths {level_depths}")
    if any(w % model_channels for w in widths):
        raise ValueError(f"level widths {widths} are not multiples of model_channels={model_channels}")
    channel_mult = [w // model_channels for w in widths]
    if len(set(res_counts)) > 1:
        raise ValueError(f"levels have different numbers of ResBlocks {res_counts}; not supported")
    num_res_blocks = res_counts[0]

    n_out = len(channel_mult) * (num_res_blocks + 1)
    if not block_exists(f"output_blocks.{n_out - 1}") or block_exists(f"output_blocks.{n_out}"):
        raise ValueError(f"expected exactly {n_out} output_blocks for {len(channel_mult)} levels")
    out_depths = tuple(_depth(keys, f"output_blocks.{i}.1") for i in range(n_out))
    middle_depth = _depth(keys, "middle_block.1")

    context_dim = next((_shape(v)[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context_dim is None:
        raise ValueError("no cross-attention weights (attn2.to_k.weight) found; not a text-conditioned U-Net")
    proj_in = next((v for k, v in shapes.items() if k.endswith("proj_in.weight")), None)
    linear = proj_in is not None and len(_shape(proj_in)) == 2
    adm = _shape(shapes["label_emb.0.0.weight"])[1] if "label_emb.0.0.weight" in shapes else None
    cond_proj = shapes.get("time_embedding.cond_proj.weight")
    time_cond_proj_dim = _shape(cond_proj)[1] if cond_proj is not None else None

    mirrored = tuple(d for d in reversed(depths) for _ in range(num_res_blocks + 1))
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(depths),
        middle_transformer_depth=middle_depth,
        output_transformer_depth=None if out_depths == mirrored else out_depths,
        context_dim=context_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        use_linear_projection=linear,
        adm_in_channels=adm,
        time_cond_proj_dim=time_cond_proj_dim,
    )
