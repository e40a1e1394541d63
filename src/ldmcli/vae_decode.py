"""VAE decode that is bounded in memory and never returns a black image.

- `decode_latents_safely(vae, z, tile=...)`: tiled decode with blended overlaps; a decode that comes
  out non-finite in fp16/bf16 is redone in fp32 (on an fp32 twin when the VAE is packed); one still
  non-finite in fp32 raises `NonFiniteError`.
- `decode_tiled(decode, z, ...)`: the tiling and the linear blend ramps, for any decode function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ldmcli.errors import NonFiniteError
from ldmcli.kernels import packed_dtype, packed_weight

__all__ = ["decode_latents_safely", "decode_tiled"]


def decode_latents_safely(
    vae: nn.Module,
    z: Tensor,
    *,
    tile: int | None = None,
    overlap: int = 16,
    on_redo: Callable[[str], None] | None = None,
) -> Tensor:
    """`vae.decode(z)` (z: latents already divided by the scale factor) -> images [N, 3, H, W], float32.

    tile: decode in latent tiles of this side (e.g. 64 = 512 px) overlapping by `overlap` latents,
    blended with linear ramps, so memory is bounded by one tile whatever the image size (see
    `decode_tiled`). A decode that comes out non-finite in fp16/bf16 (fp16 VAEs overflow) is redone
    in fp32, tile by tile, and `on_redo` is told. A decode still non-finite in fp32 (NaN weights, NaN
    latents) raises `NonFiniteError`: a black image is never returned.
    """
    images = _decode(vae, z, tile, overlap, on_redo)
    _check_finite(images)
    return images


def _check_finite(images: Tensor) -> None:
    """Raise NonFiniteError if any image holds NaN/Inf: clamped and rounded, it would be saved black."""
    bad = (~torch.isfinite(images)).flatten(1).any(dim=1)
    if bool(bad.any()):
        raise NonFiniteError(
            f"non-finite image after VAE decode (NaN/Inf), also in float32: {int(bad.sum())} of {len(images)} "
            "image(s); the VAE's weights (or the latents) hold NaN/Inf"
        )


def _decode(vae: nn.Module, z: Tensor, tile: int | None, overlap: int, on_redo: Callable[[str], None] | None) -> Tensor:
    """The decode, whole or in tiles; each part redone in fp32 if it overflowed."""
    if tile is None or max(z.shape[-2:]) <= tile:
        return _decode_guarded(vae, z, on_redo)
    said: list[str] = []

    def once(message: str) -> None:  # one message per image, not per tile
        if on_redo is not None and not said:
            on_redo(message)
        said.append(message)

    factor = getattr(getattr(vae, "config", None), "downsample_factor", 8)
    return decode_tiled(lambda part: _decode_guarded(vae, part, once), z, tile=tile, overlap=overlap, factor=factor)


def _decode_guarded(vae: nn.Module, z: Tensor, on_redo: Callable[[str], None] | None) -> Tensor:
    dtype = _module_dtype(vae)
    images = vae.decode(z.to(dtype)).float()
    if dtype == torch.float32 or bool(torch.isfinite(images).all()):
        return images
    if on_redo is not None:
        on_redo(f"VAE decode in {str(dtype).removeprefix('torch.')} overflowed (inf/NaN); decoded again in float32")
    if packed_dtype(vae) is not None:
        return _fp32_twin(vae).decode(z.float()).float()
    vae.to(torch.float32)  # in place, no second copy; cast back after (exact: the values came from `dtype`)
    try:
        return vae.decode(z.float()).float()
    finally:
        vae.to(dtype)


def _module_dtype(module: nn.Module) -> torch.dtype:
    packed = packed_dtype(module)
    if packed is not None:
        return packed
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def _fp32_twin(vae: nn.Module) -> nn.Module:
    """An fp32 copy of `vae` (kept on the module for later redos): weights from the packed records
    where the layers were packed. Costs 4 bytes per VAE parameter, only once an overflow happened."""
    twin = vae.__dict__.get("_ldm_fp32_twin")
    if twin is not None:
        return twin
    device = next(p.device for p in vae.parameters() if not p.is_meta)
    state = {}
    for name, layer in vae.named_modules():
        weight = packed_weight(layer)
        for pname, p in layer.named_parameters(recurse=False):
            if weight is not None and pname == "weight":
                state[f"{name}.weight" if name else "weight"] = weight.float()
            else:
                state[f"{name}.{pname}" if name else pname] = p.detach().float()
    with torch.device("meta"):
        twin = type(vae)(vae.config)
    if vae.encoder is None:  # dropped for text-to-image: the twin matches
        twin.drop_encoder()
    twin.load_state_dict(state, strict=True, assign=True)
    twin = twin.to(device).eval().requires_grad_(False)
    vae.__dict__["_ldm_fp32_twin"] = twin
    return twin


def decode_tiled(decode: Callable[[Tensor], Tensor], z: Tensor, *, tile: int = 64, overlap: int = 16, factor: int = 8) -> Tensor:
    """Decode latents [N, C, h, w] tile by tile; images [N, 3, h*factor, w*factor] in float32.

    Tiles of `tile` x `tile` latents start every `tile - overlap` latents (the last tile of a row or
    column is moved back to end at the border, so all tiles are full size). Each tile's image is
    weighted by a ramp that rises linearly across the overlap on every side that has a neighbour,
    and the weighted sum is divided by the summed weights: no seams, and memory holds one tile's
    activations plus the output image. The VAE's mid-block attention and GroupNorm statistics then
    see one tile at a time, so the result differs slightly from an untiled decode (measured in
    docs/performance.md).
    """
    n, _, h, w = z.shape
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            part = decode(z[:, :, y0 : y0 + tile, x0 : x0 + tile]).float()
            if out is None:
                out = torch.zeros((n, part.shape[1], h * factor, w * factor), dtype=torch.float32, device=part.device)
                weight = torch.zeros((1, 1, h * factor, w * factor), dtype=torch.float32, device=part.device)
            th, tw = part.shape[-2:]
            ramp = _ramp(th, overlap * factor, y0 > 0, y0 + tile < h, part.device)[:, None] * _ramp(
                tw, overlap * factor, x0 > 0, x0 + tile < w, part.device
            )[None, :]
            sy, sx = y0 * factor, x0 * factor
            out[:, :, sy : sy + th, sx : sx + tw] += part * ramp
            weight[:, :, sy : sy + th, sx : sx + tw] += ramp
    assert out is not None and weight is not None
    return out / weight


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, width: int, rise: bool, fall: bool, device) -> Tensor:
    """1 in the middle, rising linearly over `width` pixels at an edge shared with a neighbour."""
    r = torch.ones(length, dtype=torch.float32, device=device)
    if width > 0:
        edge = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        if rise:
            r[:width] = torch.minimum(r[:width], edge)
        if fall:
            r[-width:] = torch.minimum(r[-width:], edge.flip(0))
    return r
