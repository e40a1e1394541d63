"""DeepCache: the U-Net's deep features computed on every N-th evaluation only (opt-in, `--deep-cache N`).

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024). Between neighbouring
denoising steps the U-Net's high-level features, what its deep blocks hand to the outermost up-block,
barely change; its low-level features, carried by the outermost skip connection, do. So one evaluation in
N runs the whole U-Net and keeps what enters its last `SHALLOW` output blocks; the N - 1 after it run only
the first `SHALLOW` input blocks and those last output blocks, on the kept features (the paper's uniform
1:N schedule with its shallowest skip branch, for SD 1.5 "cache_block_id 0"). At N = 3 on SD 1.5 shapes
an evaluation that reuses costs about a fifth of a full one; the image is close to, not equal to, the
full computation's: the price is measured on the demo model (docs/performance.md).

The wrapper counts evaluations by their timestep: a sampler evaluates the network once or twice (classifier-
free guidance in two passes) at each noise level, so calls at the same timestep are one evaluation, and
each pass (`slot`) keeps its own features. Features are kept per input shape: a hires second pass, or any
new shape, starts with a full evaluation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldmcli.models.unet import DeepFeatures

# Input/output block pairs always computed: the first input block (the input convolution) and the last
# output block (the full-resolution ResBlock and transformer), DeepCache's shallowest branch.
SHALLOW = 1


class DeepCacheNetwork:
    """`network(x, t, **cond)` as the denoiser calls it, with DeepCache over `unet` (a `UNetModel`, or a
    wrapper such as `InpaintingNetwork` that passes keyword arguments through to one)."""

    def __init__(self, unet, interval: int) -> None:
        if interval < 2:
            raise ValueError(f"DeepCache needs an interval of at least 2, got {interval}")
        self.unet = unet
        self.interval = interval
        self.evaluations = -1  # evaluations begun (distinct timesteps in a row), minus one
        self.full_evaluations = 0
        self._timestep: float | None = None
        self._slot = 0
        self._kept: dict[int, tuple[tuple, Tensor]] = {}  # slot -> (input shape, the deep features)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        timestep = float(t.reshape(-1)[0])
        if timestep != self._timestep:
            self._timestep, self._slot = timestep, 0
            self.evaluations += 1
        else:
            self._slot += 1
        shape = tuple(x.shape)
        kept = self._kept.get(self._slot)
        reuse = self.evaluations % self.interval != 0 and kept is not None and kept[0] == shape
        deep = DeepFeatures(SHALLOW, kept[1] if reuse else None)
        out = self.unet(x, t, **cond, deep=deep)
        if not reuse:
            self.full_evaluations += 1
            self._kept[self._slot] = (shape, deep.features)
        return out


def with_deep_cache(network, interval: int):
    """`network` itself when `interval` is 0 or 1 (off), else DeepCache over it."""
    return network if interval <= 1 else DeepCacheNetwork(network, interval)
