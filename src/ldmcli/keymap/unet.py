"""U-Net key renames between diffusers `UNet2DConditionModel` and original LDM names.

The rename table is generated from a `UNetConfig` in loops, the way stable-diffusion.cpp's
`name_conversion.cpp` builds prefix pairs: each diffusers module prefix (`down_blocks.1.resnets.0`)
pairs with one LDM prefix (`input_blocks.4.0`). Inside a pair the parameter names are either
identical (transformers, convs, norms) or follow the fixed ResBlock sub-map below. No tensor is
reshaped: SD1's conv and SD2's linear proj_in/proj_out have the same shapes in both layouts.

Renames are pure dict -> dict and inverse of each other on every key of the supported models.
Keys the table does not cover raise a KeyError that names them; nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from ldmcli.models.unet import UNetConfig

__all__ = [
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "unet_diffusers_to_ldm",
    "unet_ldm_to_diffusers",
]

T = TypeVar("T")

# diffusers ResnetBlock2D submodule -> LDM ResBlock submodule
_RESNET_SUB = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_SUB_INV = {v: k for k, v in _RESNET_SUB.items()}

# Kinds of prefix pair: a single conv/linear/norm (only .weight/.bias below it), a ResBlock
# (sub-map above), or a SpatialTransformer (identical names below it in both layouts).
LEAF, RESNET, TRANSFORMER = "leaf", "resnet", "transformer"
_LEAF_PARAMS = {"weight": "weight", "bias": "bias"}

# (diffusers prefix, LDM prefix, kind)
_Pair = tuple[str, str, str]


def _prefix_pairs(config: UNetConfig) -> list[_Pair]:
    """Module-prefix correspondences for this architecture."""
    nrb, levels = config.num_res_blocks, len(config.channel_mult)
    pairs: list[_Pair] = [
        ("time_embedding.linear_1", "time_embed.0", LEAF),
        ("time_embedding.linear_2", "time_embed.2", LEAF),
        ("conv_in", "input_blocks.0.0", LEAF),
        ("conv_norm_out", "out.0", LEAF),
        ("conv_out", "out.2", LEAF),
        ("mid_block.resnets.0", "middle_block.0", RESNET),
        ("mid_block.attentions.0", "middle_block.1", TRANSFORMER),
        ("mid_block.resnets.1", "middle_block.2", RESNET),
    ]
    if config.adm_in_channels is not None:  # SDXL vector conditioning
        pairs += [("add_embedding.linear_1", "label_emb.0.0", LEAF), ("add_embedding.linear_2", "label_emb.0.2", LEAF)]
    if config.time_cond_proj_dim is not None:  # LCM-distilled: the guidance embedding's projection, same name
        pairs.append(("time_embedding.cond_proj", "time_embedding.cond_proj", LEAF))

    for level in range(levels):
        for i in range(nrb):
            n = 1 + level * (nrb + 1) + i  # input_blocks.0 is conv_in; each level adds nrb + 1 blocks
            pairs.append((f"down_blocks.{level}.resnets.{i}", f"input_blocks.{n}.0", RESNET))
            if config.transformer_depth[level]:
                pairs.append((f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n}.1", TRANSFORMER))
        if level != levels - 1:
            n = (level + 1) * (nrb + 1)
            pairs.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{n}.0.op", LEAF))

    depths = config.output_depths
    for up in range(levels):  # up_blocks.0 is the deepest level, like output_blocks.0
        for i in range(nrb + 1):
            n = up * (nrb + 1) + i
            pairs.append((f"up_blocks.{up}.resnets.{i}", f"output_blocks.{n}.0", RESNET))
            if depths[n]:
                pairs.append((f"up_blocks.{up}.attentions.{i}", f"output_blocks.{n}.1", TRANSFORMER))
        if up != levels - 1:
            n = up * (nrb + 1) + nrb
            slot = 2 if depths[n] else 1  # the Upsample follows the transformer when there is one
            pairs.append((f"up_blocks.{up}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv", LEAF))
    return pairs


def _rename(sd: Mapping[str, T], table: dict[str, tuple[str, dict[str, str] | None]], what: str) -> dict[str, T]:
    out: dict[str, T] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for cut in range(1, len(parts)):
            hit = table.get(".".join(parts[:cut]))
            if hit is None:
                continue
            target, sub = hit
            rest = ".".join(parts[cut:])
            if sub is None:  # transformer: same names below the prefix
                new = f"{target}.{rest}"
            elif sub is _LEAF_PARAMS:
                if rest in sub:
                    new = f"{target}.{rest}"
            else:
                module, _, param = rest.rpartition(".")
                if module in sub and param in _LEAF_PARAMS:
                    new = f"{target}.{sub[module]}.{param}"
            break
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise KeyError(f"{len(unknown)} {what} U-Net key(s) not covered by this config: {shown}{more}")
    return out


def unet_diffusers_to_ldm(sd: Mapping[str, T], config: UNetConfig) -> dict[str, T]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM names (no `model.diffusion_model.` prefix)."""
    subs = {LEAF: _LEAF_PARAMS, RESNET: _RESNET_SUB, TRANSFORMER: None}
    table = {d: (ldm, subs[kind]) for d, ldm, kind in _prefix_pairs(config)}
    return _rename(sd, table, "diffusers")


def unet_ldm_to_diffusers(sd: Mapping[str, T], config: UNetConfig) -> dict[str, T]:
    """Rename LDM U-Net keys (prefix stripped) to diffusers UNet2DConditionModel names."""
    subs = {LEAF: _LEAF_PARAMS, RESNET: _RESNET_SUB_INV, TRANSFORMER: None}
    table = {ldm: (d, subs[kind]) for d, ldm, kind in _prefix_pairs(config)}
    return _rename(sd, table, "LDM")


def unet_config_to_diffusers(config: UNetConfig, *, addition_time_embed_dim: int = 256) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config equivalent to `config`.

    diffusers' `attention_head_dim` is really the number of heads (diffusers issue #2011):
    SD1 = 8 everywhere, SD2/SDXL = width / 64 per level. `addition_time_embed_dim` only matters
    for SDXL (`adm_in_channels` set): the width of each size/crop sinusoid in `y`.
    """
    c = config
    levels = len(c.channel_mult)
    widths = list(c.level_channels)
    if c.num_heads is not None:
        heads: int | list[int] = c.num_heads
    else:
        heads = [w // c.head_dim for w in widths]  # type: ignore[operator]
    # diffusers takes the middle depth from the last level's entry, which is unused when that
    # level has no attention (SD1/SD2); otherwise the two must agree.
    per_level = [d if d else 1 for d in c.transformer_depth]
    if c.transformer_depth[-1] and c.transformer_depth[-1] != c.middle_transformer_depth:
        raise ValueError("diffusers cannot express a middle depth different from the deepest level's")
    per_level[-1] = c.middle_transformer_depth
    n = c.num_res_blocks + 1
    up_depths = [c.output_depths[u * n:(u + 1) * n] for u in range(levels)]
    if any(0 in ds and any(ds) for ds in up_depths):
        raise ValueError("diffusers up blocks have attention on all layers or none; got " + str(up_depths))
    out: dict[str, Any] = {
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "block_out_channels": widths,
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.transformer_depth],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if any(ds) else "UpBlock2D" for ds in up_depths],
        "cross_attention_dim": c.context_dim,
        "attention_head_dim": heads,
        "transformer_layers_per_block": per_level if len(set(per_level)) > 1 else per_level[0],
        "use_linear_projection": c.use_linear_projection,
        "upcast_attention": c.upcast_attention,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,  # LDM's embedding is [cos | sin]
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
    }
    if c.output_transformer_depth is not None:
        out["reverse_transformer_layers_per_block"] = [[d if d else 1 for d in ds] for ds in up_depths]
    if c.time_cond_proj_dim is not None:
        out["time_cond_proj_dim"] = c.time_cond_proj_dim
    if c.adm_in_channels is not None:
        out.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            projection_class_embeddings_input_dim=c.adm_in_channels,
        )
    return out


# diffusers config entries we cannot express, with the value our U-Net implies.
_DIFFUSERS_FIXED = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
}


def unet_config_from_diffusers(dconfig: Mapping[str, Any]) -> UNetConfig:
    """Read a diffusers `unet/config.json` into a UNetConfig (inverse of `unet_config_to_diffusers`).

    Raises ValueError on settings this U-Net does not implement rather than ignoring them.
    """
    bad = {k: dconfig[k] for k, v in _DIFFUSERS_FIXED.items() if k in dconfig and dconfig[k] != v}
    if dconfig.get("addition_embed_type") not in (None, "text_time"):
        bad["addition_embed_type"] = dconfig["addition_embed_type"]
    if bad:
        raise ValueError(f"unsupported diffusers U-Net settings: {bad}")
    widths = list(dconfig["block_out_channels"])
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of {mc}")
    levels, nrb = len(widths), int(dconfig.get("layers_per_block", 2))
    if not isinstance(dconfig.get("layers_per_block", 2), int):
        raise ValueError("per-level layers_per_block is not supported")

    down_types = list(dconfig["down_block_types"])
    up_types = list(dconfig["up_block_types"])
    allowed = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down_types + up_types) - allowed or len(down_types) != levels or len(up_types) != levels:
        raise ValueError(f"unsupported block types {down_types} / {up_types}")

    tlpb = dconfig.get("transformer_layers_per_block", 1)
    tlpb = [tlpb] * levels if isinstance(tlpb, int) else list(tlpb)
    if any(not isinstance(d, int) for d in tlpb):
        raise ValueError("per-layer transformer_layers_per_block on the way down is not supported")
    depths = tuple(d if t.startswith("CrossAttn") else 0 for d, t in zip(tlpb, down_types))
    rev = dconfig.get("reverse_transformer_layers_per_block")
    rev_levels = list(rev) if rev is not None else list(reversed(tlpb))
    out_depths: list[int] = []
    for t, ds in zip(up_types, rev_levels):
        ds = [ds] * (nrb + 1) if isinstance(ds, int) else list(ds)
        out_depths += [d if t.startswith("CrossAttn") else 0 for d in ds]
    mirrored = [d for d in reversed(depths) for _ in range(nrb + 1)]

    heads = dconfig.get("attention_head_dim", 8)  # diffusers' name for the number of heads
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    per_head = {w // h for w, h, t in zip(widths, heads, down_types) if t.startswith("CrossAttn")}
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], None
    elif len(per_head) == 1:
        num_heads, head_dim = None, per_head.pop()
    else:
        raise ValueError(f"attention_head_dim {heads} is neither a fixed head count nor a fixed head width")

    context_dim = dconfig.get("cross_attention_dim", 1280)  # diffusers' default
    if not isinstance(context_dim, int):
        raise ValueError(f"per-level cross_attention_dim {context_dim} is not supported")
    adm = None
    if dconfig.get("addition_embed_type") == "text_time":
        adm = int(dconfig["projection_class_embeddings_input_dim"])
    return UNetConfig(
        in_channels=int(dconfig.get("in_channels", 4)),
        out_channels=int(dconfig.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=nrb,
        transformer_depth=depths,
        middle_transformer_depth=tlpb[-1],
        output_transformer_depth=None if out_depths == mirrored else tuple(out_depths),
        context_dim=context_dim,
        num_heads=num_heads,
        head_dim=head_dim,
        use_linear_projection=bool(dconfig.get("use_linear_projection", False)),
        upcast_attention=bool(dconfig.get("upcast_attention") or False),
        adm_in_channels=adm,
        time_cond_proj_dim=_optional_width(dconfig.get("time_cond_proj_dim"), "time_cond_proj_dim"),
    )


def _optional_width(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} {value!r} is not a positive whole number")
    return value
