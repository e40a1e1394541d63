"""The KL-regularised autoencoder ("first stage") of latent diffusion.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", section 3.1 and appendix G; the architecture is the VQGAN
encoder/decoder (Esser et al. 2021) with a diagonal-Gaussian bottleneck.

Module and parameter names follow the original CompVis code
(``ldm/modules/diffusionmodules/model.py``) so that the ``first_stage_model.*``
tensors of a Stable Diffusion single-file checkpoint load with the prefix
stripped and ``strict=True``:

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}
    encoder.down.{i}.downsample.conv            (every level but the last)
    encoder.mid.{block_1,attn_1.{norm,q,k,v,proj_out},block_2}
    encoder.norm_out, encoder.conv_out
    quant_conv, post_quant_conv
    decoder.conv_in, decoder.mid.*
    decoder.up.{i}.block.{j}                    (num_res_blocks + 1 blocks)
    decoder.up.{i}.upsample.conv                (every level but level 0)
    decoder.norm_out, decoder.conv_out

The latent scale factor (0.18215 for SD1/SD2, 0.13025 for SDXL) is not part
of this module: the pipeline multiplies/divides by it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmcli.kernels import attention, conv2d, upsample_conv2d


@dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of :class:`AutoencoderKL`; defaults are the SD1/SD2/SDXL VAE."""

    in_channels: int = 3  # RGB image in
    out_channels: int = 3  # RGB image out
    ch: int = 128  # base width: channels of encoder.conv_in and of the highest-resolution level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level; 4 levels = /8 spatially
    num_res_blocks: int = 2  # ResNet blocks per encoder level (the decoder has one more per level)
    z_channels: int = 4  # latent channels leaving the encoder (it outputs 2x: mean and logvar)
    embed_dim: int = 4  # latent channels after quant_conv: what the diffusion model sees
    norm_groups: int = 32  # GroupNorm groups everywhere (LDM's Normalize)
    norm_eps: float = 1e-6  # GroupNorm epsilon (LDM uses 1e-6, not PyTorch's 1e-5)

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between image and latent (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """SiLU(GroupNorm(x)); the SiLU in place when no autograd needs its input (one full-size write less)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """Pre-activation ResNet block (GroupNorm, SiLU, 3x3 conv) x2, no time embedding."""

    def __init__(self, cfg: VAEConfig, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv aligns the skip path only where the width changes (LDM's nin_shortcut).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = conv2d(self.conv1, _norm_silu(self.norm1, x))
        skip = x if self.nin_shortcut is None else conv2d(self.nin_shortcut, x)
        return conv2d(self.conv2, _norm_silu(self.norm2, h), residual=skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1-conv projections.

    The weights are stored as 1x1 convs ([C, C, 1, 1]) as in the LDM checkpoints.
    """

    FUSABLE_ATTENTION = True  # `kernels.attention` may run it as one fused kernel once prepared

    def __init__(self, cfg: VAEConfig, channels: int) -> None:
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, 1, c, hh * ww).transpose(-1, -2)

        # SDPA's default scale 1/sqrt(C) is exactly LDM's `c ** -0.5`.
        q, k, v = (tokens(conv2d(proj, h)) for proj in (self.q, self.k, self.v))
        h = attention(self, q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hh, ww)
        return conv2d(self.proj_out, h, residual=x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (right/bottom) zero pad, as LDM does.

    torch's symmetric padding would shift the sampling grid by half a pixel
    relative to the trained weights, hence the explicit pad (0, 1, 0, 1).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(self.conv, F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv2d(self.conv, x)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (LDM's ``mid``)."""

    def __init__(self, cfg: VAEConfig, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (a list of ResNets) and an optional resampler.

    The resampler attribute is ``downsample`` in the encoder and ``upsample`` in
    the decoder; it is absent (not None-valued parameters) where LDM has none.
    """

    def __init__(self, blocks: list[ResnetBlock], resample_name: str, resample: nn.Module | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image [B, in, H, W] -> [B, 2*z_channels, H/f, W/f] (mean and logvar, before quant_conv)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cfg, in_ch, out_ch))
                in_ch = out_ch
            last = i == len(widths) - 1
            levels.append(_Level(blocks, "downsample", None if last else Downsample(out_ch)))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(cfg, in_ch)
        self.norm_out = _norm(cfg, in_ch)
        # "double_z": the encoder predicts both the mean and the log-variance.
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = conv2d(self.conv_in, x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return conv2d(self.conv_out, _norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out, h*f, w*f].

    ``up`` is indexed by resolution level like the encoder's ``down`` (up.0 is
    the highest resolution) but runs in reverse order, as in LDM, so the
    checkpoint's ``decoder.up.{i}`` keys line up without renumbering.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = MidBlock(cfg, in_ch)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cfg, in_ch, widths[i]))
                in_ch = widths[i]
            levels.insert(0, _Level(blocks, "upsample", Upsample(in_ch) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(conv2d(self.conv_in, z))
        for level in reversed(self.up):
            h = level(h)
        return conv2d(self.conv_out, _norm_silu(self.norm_out, h))


class AutoencoderKL(nn.Module):
    """KL autoencoder of latent diffusion (Rombach et al. 2022), LDM parameter names."""

    # LDM's DiagonalGaussianDistribution clamps logvar to this range for stability.
    LOGVAR_MIN = -30.0
    LOGVAR_MAX = 20.0

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder: Encoder | None = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv: nn.Conv2d | None = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image [B, in, H, W] in [-1, 1] -> (mean, logvar), each [B, embed_dim, H/f, W/f].

        H and W should be multiples of the downsample factor (8 for SD).
        Sample a latent as ``mean + exp(0.5 * logvar) * noise``; the scale
        factor is applied by the caller.
        """
        if self.encoder is None or self.quant_conv is None:
            raise RuntimeError("this VAE's encoder was dropped (drop_encoder): it can only decode")
        moments = conv2d(self.quant_conv, self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(self.LOGVAR_MIN, self.LOGVAR_MAX)

    def drop_encoder(self) -> None:
        """Free the encoder half (text-to-image only decodes: SD's is 34 M parameters); `encode` raises after."""
        self.encoder = None
        self.quant_conv = None

    def decode(self, z: Tensor) -> Tensor:
        """Latent [B, embed_dim, h, w] (already divided by the scale factor) -> image [B, out, h*f, w*f].

        The output is roughly in [-1, 1] but deliberately not clamped.
        """
        return self.decoder(conv2d(self.post_quant_conv, z))


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(
            f"cannot infer the VAE config: missing key {key!r} "
            "(expected LDM-named first_stage_model tensors with the prefix stripped)"
        )
    return tuple(int(s) for s in shapes[key])


def vae_config_from_shapes(shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
    """Read a :class:`VAEConfig` from the shapes of LDM-named VAE tensors (prefix stripped).

    Works at any width. GroupNorm groups/eps are not visible in shapes and keep
    their defaults.
    """
    conv_in = _shape(shapes, "encoder.conv_in.weight")  # [ch, in, 3, 3]
    ch, in_channels = conv_in[0], conv_in[1]

    ch_mult: list[int] = []
    while f"encoder.down.{len(ch_mult)}.block.0.conv1.weight" in shapes:
        out_ch = _shape(shapes, f"encoder.down.{len(ch_mult)}.block.0.conv1.weight")[0]
        if out_ch % ch:
            raise ValueError(f"VAE level {len(ch_mult)} width {out_ch} is not a multiple of ch={ch}")
        ch_mult.append(out_ch // ch)
    if not ch_mult:
        _shape(shapes, "encoder.down.0.block.0.conv1.weight")  # raises with the key named

    num_res_blocks = 0
    while f"encoder.down.0.block.{num_res_blocks}.conv1.weight" in shapes:
        num_res_blocks += 1

    z_channels = _shape(shapes, "decoder.conv_in.weight")[1]  # [C, z, 3, 3]
    embed_dim = _shape(shapes, "quant_conv.weight")[0] // 2  # [2*embed, 2*z, 1, 1]
    post = _shape(shapes, "post_quant_conv.weight")  # [z, embed, 1, 1]
    if post[:2] != (z_channels, embed_dim):
        raise ValueError(f"inconsistent VAE latent shapes: post_quant_conv {post}, z={z_channels}, embed={embed_dim}")
    out_channels = _shape(shapes, "decoder.conv_out.weight")[0]
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
    )
