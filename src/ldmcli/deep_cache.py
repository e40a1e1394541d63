"""DeepCache: the U-Net's deep features computed on every N-th evaluation only (opt-in, `--deep-cache N`).

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024). Between neighbouring
denoising steps the U-Net's high-level features, what its deep blocks hand to the outermost up-block,
barely change; its low-level features, carried by the outermost skip connection, do. So one evaluation in
N runs the whole U-Net and keeps what enters its last `SHALLOW` output blocks; the N - 1 after it run only
the first `SHALLOW` input blocks and those last output blocks, on the kept features (the paper's uniform
1:N schedule with its shallowest skip branch, for SD 1.5 "cache_block_id 0"). At N = 3 on SD 1.5 shapes
an evaluation that reuses costs about a fifth of a full one; the image is close to, not equal to, the
full computation's: the price is measured on the demo model (docs/performance.md).

The wrapper tells evaluations apart without knowing the sampler: a call is a new evaluation when its
timestep differs from the last call's, or when a call of the same kind (same latent and conditioning shapes)
already ran at this timestep (Heun evaluates twice at a noise level; rounded schedules repeat a timestep).
Calls of different kinds at one timestep are the passes of one evaluation (classifier-free guidance in two
passes when the prompts are of different lengths, unpadded), and each kind keeps its own features. Features
serve only the cycle of N evaluations they were made in, so they are never older than N - 1 evaluations; a
kind seen first mid-cycle (a hires second pass at a new size, a prompt edit that changes the passes) starts
with a full evaluation.
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
        self.evaluations = -1  # evaluations begun, minus one
        self.full_evaluations = 0  # calls that ran the whole U-Net
        self._timestep: float | None = None
        self._kinds_now: set[tuple] = set()  # the kinds of call made in the current evaluation
        self._kept: dict[tuple, tuple[int, Tensor]] = {}  # kind -> (cycle it was made in, deep features)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        timestep = float(t.reshape(-1)[0])
        kind = (tuple(x.shape), *sorted((k, tuple(v.shape)) for k, v in cond.items() if isinstance(v, Tensor)))
        if timestep != self._timestep or kind in self._kinds_now:
            self.evaluations += 1
            self._timestep, self._kinds_now = timestep, set()
        self._kinds_now.add(kind)
        cycle, position = divmod(self.evaluations, self.interval)
        kept = self._kept.get(kind)
        reuse = position != 0 and kept is not None and kept[0] == cycle
        deep = DeepFeatures(SHALLOW, kept[1] if reuse else None)
        out = self.unet(x, t, **cond, deep=deep)
        if not reuse:
            self.full_evaluations += 1
            self._kept[kind] = (cycle, deep.features)
        return out


def with_deep_cache(network, interval: int):
    """`network` itself when `interval` is 0 or 1 (off), else DeepCache over it."""
    return network if interval <= 1 else DeepCacheNetwork(network, interval)
