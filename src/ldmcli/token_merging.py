"""Token merging (ToMe) for the U-Net's self-attention: opt-in, `--tome RATIO` (A1111's "Token merging ratio").

Bolya and Hoffman, "Token Merging for Fast Stable Diffusion" (CVPR Workshops 2023), as A1111 applies it
(`tomesd.apply_patch(ratio=..., use_rand=False, merge_attn=True, merge_crossattn=False, merge_mlp=False)`,
tomesd's defaults otherwise: `max_downsample` 1, strides 2 x 2). In each transformer block at the U-Net's
full latent resolution, before self-attention:

1. the tokens are split into destinations, the top-left token of every 2 x 2 cell of the token grid, and
   sources, the rest (deterministic: A1111 turns tomesd's random pick off, "can cause issues with some
   samplers");
2. each source is matched to its most similar destination (cosine similarity of the block's input tokens),
   and the r = int(ratio x tokens) sources with the best matches are averaged into their destinations
   ("bipartite soft matching"; r is at most the number of sources);
3. self-attention runs on the tokens left, and its output is copied back out: a merged source takes its
   destination's output ("unmerging"), so the residual stream keeps every token.

Cross-attention and the MLP run on every token. At ratio 0.5 the full-resolution self-attention sees half
the tokens, a quarter of the query-key pairs: that attention is the largest single cost of an SD 1.5 step
on a CPU. The image is close to, not equal to, the exact one; the price is measured (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# A1111's bound for its "Token merging ratio" setting (a slider from 0 to 0.9).
MAX_RATIO = 0.9
# (sx, sy): one destination token per cell of 2 x 2 tokens (tomesd's default, which A1111 keeps).
STRIDE = (2, 2)


@dataclass(frozen=True)
class TokenMerging:
    """Token merging during one U-Net call: the ratio asked for, and the call's latent size, the only
    resolution merged at (tomesd's `max_downsample` 1, A1111's setting)."""

    ratio: float
    latent_size: tuple[int, int]  # (height, width) of the latents the U-Net was called with

    def plan(self, x: Tensor, height: int, width: int):
        """(merge, unmerge) for a transformer block whose input tokens are `x` [B, height x width, C], or
        None below the full resolution (or where nothing would be merged)."""
        if (height, width) != tuple(self.latent_size):
            return None
        r = int(x.shape[1] * self.ratio)
        sx, sy = STRIDE
        if r <= 0 or height < sy or width < sx:  # no whole cell: no destination to merge into
            return None
        return bipartite_soft_matching(x, width, height, sx, sy, r)


def bipartite_soft_matching(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int):
    """(merge, unmerge) that average the `r` sources most similar to a destination into it, for tokens
    [B, N, C] laid out row by row on an h x w grid; destinations are the top-left token of each sy x sx cell.

    merge: [B, N, C] -> [B, N - r, C], the unmerged sources then the destinations; unmerge: back to
    [B, N, C], each merged source given its destination's value. The partition and the argsorts are
    tomesd's, so ties and the order of tokens (which a mean's rounding depends on) come out as in A1111.
    """
    batch, tokens, _ = metric.shape
    src_positions, dst_positions = _partition(h, w, sx, sy, metric.device)
    num_dst = dst_positions.shape[1]

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[-1]
        return (torch.gather(x, 1, src_positions.expand(batch, tokens - num_dst, c)),
                torch.gather(x, 1, dst_positions.expand(batch, num_dst, c)))

    with torch.no_grad():
        normed = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(normed)
        scores = a @ b.transpose(-1, -2)  # cosine similarity of each source with each destination
        r = min(a.shape[1], r)
        best, best_dst = scores.max(dim=-1)
        ranked = best.argsort(dim=-1, descending=True)[..., None]
        unmerged, merged = ranked[..., r:, :], ranked[..., :r, :]  # indices into the sources
        into = torch.gather(best_dst[..., None], -2, merged)  # each merged source's destination

    def merge(x: Tensor) -> Tensor:
        src, dst = split(x)
        n, sources, c = src.shape
        kept = torch.gather(src, -2, unmerged.expand(n, sources - r, c))
        moved = torch.gather(src, -2, merged.expand(n, r, c))
        dst = dst.scatter_reduce(-2, into.expand(n, r, c), moved, reduce="mean")
        return torch.cat([kept, dst], dim=1)

    def unmerge(x: Tensor) -> Tensor:
        kept_count = unmerged.shape[1]
        kept, dst = x[..., :kept_count, :], x[..., kept_count:, :]
        c = kept.shape[-1]
        moved = torch.gather(dst, -2, into.expand(batch, r, c))
        out = torch.zeros(batch, tokens, c, device=x.device, dtype=x.dtype)
        out.scatter_(-2, dst_positions.expand(batch, num_dst, c), dst)
        sources = src_positions.expand(batch, src_positions.shape[1], 1)
        out.scatter_(-2, torch.gather(sources, 1, unmerged).expand(batch, kept_count, c), kept)
        out.scatter_(-2, torch.gather(sources, 1, merged).expand(batch, r, c), moved)
        return out

    return merge, unmerge


def _partition(h: int, w: int, sx: int, sy: int, device) -> tuple[Tensor, Tensor]:
    """Token positions [1, n, 1] of the sources and of the destinations (the top-left token of each whole
    sy x sx cell; tokens beyond the last whole cell are sources), in tomesd's order: an argsort of a grid
    holding -1 at destinations and 0 elsewhere."""
    hsy, wsx = h // sy, w // sx
    cells = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64, device=device)
    cells[..., 0] = -1
    grid = torch.zeros(h, w, dtype=torch.int64, device=device)
    grid[:hsy * sy, :wsx * sx] = cells.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    order = grid.reshape(1, -1, 1).argsort(dim=1)
    num_dst = hsy * wsx
    return order[:, num_dst:, :], order[:, :num_dst, :]


class TokenMergingNetwork:
    """`network(x, t, **cond)` as the denoiser calls it, with token merging at `ratio` in every call of the
    U-Net under it (a `UNetModel`, or a wrapper that passes keyword arguments through to one)."""

    def __init__(self, network, ratio: float) -> None:
        self.network = network
        self.ratio = ratio

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.network(x, t, merging=TokenMerging(self.ratio, tuple(x.shape[-2:])), **cond)


def with_token_merging(network, ratio: float):
    """`network` with token merging at `ratio` (`TokenMergingNetwork`), or as it is for ratio 0."""
    return TokenMergingNetwork(network, ratio) if ratio else network
