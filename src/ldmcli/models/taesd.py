"""TAESD, the tiny autoencoder: a VAE distilled to decode (and encode) Stable Diffusion's latents fast.

Ollin Boer Bohan, "TAESD: Tiny AutoEncoder for Stable Diffusion" (github.com/madebyollin/taesd, 2023).
It shares the latent space of SD's KL autoencoder (one set of weights for SD 1.x/2.x, `taesdxl` for SDXL)
at about 1/50 of its decoder's work: 64-channel plain convolutions and ReLUs, no normalisation, no
attention. Images come out a little softer; A1111 offers it as a decode method, stable-diffusion.cpp as
`--taesd`, ComfyUI as the `taesd` VAE.

    decoder:  z -> tanh(z / 3) * 3 (a soft clamp)
              conv 3x3 (latent -> w), ReLU
              per level: n Blocks, then (not the last level) nearest x2 upsample + conv 3x3 without bias
              conv 3x3 (w -> 3), image in [0, 1]
    encoder:  image in [0, 1] -> conv 3x3 (3 -> w)
              per level: (not the first) stride-2 conv 3x3 without bias, then n Blocks
              conv 3x3 (w -> latent)
    Block:    ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)

The latents are the U-Net's own, already multiplied by the model's scale factor (TAESD was distilled on
them: diffusers' `AutoencoderTiny` has scaling_factor 1.0). Parameter names are diffusers'
`AutoencoderTiny` (`encoder.layers.{i}...`, `decoder.layers.{i}...`), whose indices count ReLUs and
upsamplings too; `taesd_file` renames madebyollin's own files to them. The interface is
`AutoencoderKL`'s where the two meet (`decode` to [-1, 1], `encoder`, `drop_encoder`, `config`), so
`vae_decode` tiles and guards it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class TinyConfig:
    """The structure of a TAESD; defaults are madebyollin's taesd / taesdxl."""

    latent_channels: int = 4
    width: int = 64  # channels of every layer between the first and the last convolution
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # Blocks per decoder level (an upsampling between levels)
    encoder_blocks: tuple[int, ...] | None = (1, 3, 3, 3)  # None: a decoder-only file (taesd_decoder.*)
    image_channels: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.decoder_blocks) - 1)


class Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, added to the input, then ReLU (diffusers'
    `AutoencoderTinyBlock` with equal in and out widths, as every TAESD has: no skip convolution)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        first, _, second, _, third = self.conv
        h = F.relu_(first(x))  # in place: no second full-resolution buffer per activation
        h = F.relu_(second(h))
        return F.relu_(third(h).add_(x))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 (a module so that the layer indices are the file's)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TinyDecoder(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        w = config.width
        layers: list[nn.Module] = [nn.Conv2d(config.latent_channels, w, 3, padding=1), nn.ReLU()]
        for level, blocks in enumerate(config.decoder_blocks):
            layers += [Block(w) for _ in range(blocks)]
            if level < len(config.decoder_blocks) - 1:
                layers += [Upsample2x(), nn.Conv2d(w, w, 3, padding=1, bias=False)]
        layers.append(nn.Conv2d(w, config.image_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Scaled latents -> image in [0, 1] (not clamped)."""
        x = z.div(3).tanh_().mul_(3)
        for layer in self.layers:
            x = F.relu_(x) if isinstance(layer, nn.ReLU) else layer(x)
        return x


class TinyEncoder(nn.Module):
    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        assert config.encoder_blocks is not None
        w = config.width
        layers: list[nn.Module] = [nn.Conv2d(config.image_channels, w, 3, padding=1)]
        for level, blocks in enumerate(config.encoder_blocks):
            if level > 0:
                layers.append(nn.Conv2d(w, w, 3, padding=1, stride=2, bias=False))
            layers += [Block(w) for _ in range(blocks)]
        layers.append(nn.Conv2d(w, config.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Image in [0, 1] -> scaled latents."""
        return self.layers(x)


class TinyAutoencoder(nn.Module):
    """TAESD (see the module doc): `decode` and `encode` speak the pipeline's [-1, 1] images and the
    U-Net's scaled latents."""

    # Tells `pipeline.decode_latents` and `vae_encode` not to divide or multiply by the model's scale
    # factor: TAESD's latents are the U-Net's own.
    scaled_latents = True

    def __init__(self, config: TinyConfig = TinyConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder: TinyEncoder | None = None if config.encoder_blocks is None else TinyEncoder(config)
        self.decoder = TinyDecoder(config)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents [B, latent, h, w] -> image [B, 3, h*f, w*f], roughly in [-1, 1], not clamped."""
        return self.decoder(z).mul_(2).sub_(1)

    def encode(self, x: Tensor) -> Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> scaled latents (no posterior to sample: TAESD is deterministic)."""
        if self.encoder is None:
            raise RuntimeError("this tiny VAE has no encoder (a decoder-only file, or dropped): it can only decode")
        return self.encoder(x.add(1).div(2))

    def drop_encoder(self) -> None:
        self.encoder = None
