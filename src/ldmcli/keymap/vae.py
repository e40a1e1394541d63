"""Rename VAE tensors between the diffusers layout and the original LDM layout.

The rename table is generated from the config in loops (in the manner of
stable-diffusion.cpp's ``name_conversion.cpp``), module path by module path;
the ``.weight``/``.bias`` suffix is carried over unchanged. Two things are
more than a rename:

* the decoder's resolution levels are numbered in opposite directions
  (diffusers ``up_blocks.0`` is the lowest resolution, LDM ``up.0`` the highest);
* the mid-block attention projections are linear ``[C, C]`` in diffusers and
  1x1 convs ``[C, C, 1, 1]`` in LDM. Reshaping uses ``.reshape`` so that meta
  tensors work too.

Older diffusers files name the attention ``query/key/value/proj_attn``; those
are accepted on input, and the current ``to_q/to_k/to_v/to_out.0`` are written.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from torch import Tensor

from ldmcli.models.vae import VAEConfig

_RESNET_PARTS = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                 ("conv_shortcut", "nin_shortcut"))
# (diffusers, ldm) pairs. The legacy names are accepted on input only; output uses the current ones.
_ATTN_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
_LEGACY_ATTN_PARTS = (("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out"))
# LDM modules whose weight is a 1x1 conv standing in for a diffusers linear layer.
_ATTN_LINEAR = ("q", "k", "v", "proj_out")


def _resnet(d: str, ldm: str) -> Iterator[tuple[str, str]]:
    for dp, lp in _RESNET_PARTS:
        yield f"{d}.{dp}", f"{ldm}.{lp}"


def _mid(d: str, ldm: str, legacy: bool) -> Iterator[tuple[str, str]]:
    yield from _resnet(f"{d}.mid_block.resnets.0", f"{ldm}.mid.block_1")
    yield from _resnet(f"{d}.mid_block.resnets.1", f"{ldm}.mid.block_2")
    for dp, lp in _ATTN_PARTS + (_LEGACY_ATTN_PARTS if legacy else ()):
        yield f"{d}.mid_block.attentions.0.{dp}", f"{ldm}.mid.attn_1.{lp}"


def _module_pairs(config: VAEConfig, legacy: bool) -> Iterator[tuple[str, str]]:
    """(diffusers module path, LDM module path) for every module of the VAE."""
    levels = len(config.ch_mult)
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_in", f"{side}.conv_in"
        yield f"{side}.conv_norm_out", f"{side}.norm_out"
        yield f"{side}.conv_out", f"{side}.conv_out"
        yield from _mid(side, side, legacy)
    for i in range(levels):
        for j in range(config.num_res_blocks):
            yield from _resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        yield f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"
        # Decoder levels count from the bottom in diffusers and from the top in LDM.
        ldm_i = levels - 1 - i
        for j in range(config.num_res_blocks + 1):
            yield from _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}")
        yield f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv"
    yield "quant_conv", "quant_conv"
    yield "post_quant_conv", "post_quant_conv"


def _is_attn_linear(ldm_key: str) -> bool:
    module, _, param = ldm_key.rpartition(".")
    return param == "weight" and ".mid.attn_1." in ldm_key and module.rsplit(".", 1)[-1] in _ATTN_LINEAR


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, str], direction: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        module, dot, param = key.rpartition(".")
        if not dot or module not in table:
            unknown.append(key)
            continue
        new_key = f"{table[module]}.{param}"
        if new_key in out:
            raise ValueError(f"VAE {direction}: two keys map to {new_key!r} (legacy and current attention names?)")
        out[new_key] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:20])
        more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise ValueError(f"VAE {direction}: {len(unknown)} unknown key(s): {shown}{more}")
    return out


def vae_diffusers_to_ldm(sd: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM ``first_stage_model`` names (no prefix)."""
    table = dict(_module_pairs(config, legacy=True))
    out = _rename(sd, table, "diffusers->LDM")
    for key, t in out.items():
        if _is_attn_linear(key) and t.ndim == 2:
            out[key] = t.reshape(t.shape[0], t.shape[1], 1, 1)
    return out


def vae_ldm_to_diffusers(sd: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Rename LDM VAE tensors (prefix stripped) to diffusers ``AutoencoderKL`` names."""
    table = {ldm: d for d, ldm in _module_pairs(config, legacy=False)}
    reshaped = {
        k: (t.reshape(t.shape[0], t.shape[1]) if _is_attn_linear(k) and t.ndim == 4 else t) for k, t in sd.items()
    }
    return _rename(reshaped, table, "LDM->diffusers")


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    """The diffusers ``AutoencoderKL`` config dict describing the same network."""
    if config.embed_dim != config.z_channels:
        # diffusers ties both to latent_channels.
        raise ValueError(
            f"diffusers AutoencoderKL needs embed_dim == z_channels, got {config.embed_dim} != {config.z_channels}"
        )
    n = len(config.ch_mult)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
    }


def vae_config_from_diffusers(dconfig: Mapping) -> VAEConfig:
    """Read a diffusers `vae/config.json` (inverse of `vae_config_to_diffusers`)."""
    widths = list(dconfig["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of {ch}")
    latent = int(dconfig.get("latent_channels", 4))
    return VAEConfig(
        in_channels=int(dconfig.get("in_channels", 3)),
        out_channels=int(dconfig.get("out_channels", 3)),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=int(dconfig.get("layers_per_block", 2)),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=int(dconfig.get("norm_num_groups", 32)),
    )
