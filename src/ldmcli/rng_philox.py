"""AUTOMATIC1111's "NV" random number source: CUDA's `torch.randn` numbers, computed on any device.

A1111's webui (Settings > Sampler parameters > "Random number generator source") can draw its noise
from "GPU", "CPU" or "NV". "NV" is `modules/rng_philox.py`: a NumPy imitation of what
`torch.manual_seed(seed); torch.randn(shape, device="cuda")` returns on an NVIDIA GPU, so that an
image made on an NVIDIA card can be remade on a Mac, an AMD card or a CPU. Its numbers (and ours) are:

- Philox 4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
  the generator inside cuRAND and PyTorch's CUDA RNG). Element ``i`` of the ``k``-th draw of a
  generator is one block of Philox with counter ``(k, 0, i, 0)`` (32-bit words, word 0 first) and key
  ``(seed mod 2^32, seed >> 32)``: the 64-bit seed split little-endian, as A1111's
  ``np.uint64 -> 2 x np.uint32`` view does. So seeds are 0..2^64-1, and every element is independent
  of the shape (cuRAND gives each CUDA thread its own Philox subsequence, counter words 2-3, and
  PyTorch advances the offset, word 0, by one block per randn call of this size).
- Box-Muller (Box & Muller, "A note on the generation of random normal deviates", 1958) on the
  block's first two words ``x, y``: ``u = x 2^-32 + 2^-33``, ``v = (y 2^-32 + 2^-33) 2 pi``,
  ``sqrt(-2 ln u) sin v``. Words 2 and 3 and the cosine deviate are discarded.
- Arithmetic as A1111's NumPy does it: the two scale constants are float32 (``2^-32`` and
  ``float32(2.3283064e-10 * 6.2831855)``), but NumPy promotes uint32 x float32 to float64, so the
  transform runs in float64 and only the result is rounded to float32. We do the same; our output is
  bit-identical to A1111's (checked against a transcription of it over millions of values; CUDA's
  own float32 intrinsics differ from both in the last bit or two, e.g. A1111's docstring digits).

`nv_noise_source` reproduces `modules/rng.py`'s `ImageRNG` in NV mode, which A1111's samplers use
for the initial latents (``p.rng.next()``) and, through `sd_samplers_common.TorchHijack.randn_like`,
for every ancestral noise draw (``randn_like(x) -> rng.next()``):

- one `rng_philox.Generator(seed)` per image of the batch, for that image's own seed;
- the first call draws each image's initial noise from its generator (offset 0, shape ``[C, H, W]``)
  and stacks them ``[N, C, H, W]``; with "Eta noise seed delta" (ENSD) set, every generator is then
  replaced by a fresh one seeded ``seed + ENSD`` (so the sampler's first noise is that seed's offset
  0), otherwise the same generators continue (offsets 1, 2, ...);
- each later call draws one ``[C, H, W]`` block per image from its generator and stacks them.

Not reproduced: variation seeds (subseed/slerp) and "resize seed from", which ldm does not offer.
NV numbers match CUDA's only while the tensor has no more elements than the GPU launches threads
(71,680 to 175,104 on the GPUs listed in pytorch/pytorch#176584; an SDXL 1024x1024 latent has
65,536), a limit A1111's NV source has too.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import torch

MAX_SEED = 2**64 - 1  # A1111 fills an np.uint64 with the seed: any 64-bit unsigned value

# Philox 4x32 constants (Salmon et al. 2011, section 4.2): round multipliers, and the Weyl sequence
# added to the key between rounds (golden ratio and sqrt(3) - 1, as 32-bit fractions).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _float32(x: float) -> float:
    """`x` rounded to float32 and back: A1111 keeps its Box-Muller constants in float32 arrays."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# u = x * 2^-32 + 2^-33 lies in (0, 1) for every uint32 x, so log(u) is finite (the bin centres of
# [0, 1)); v the same, scaled by 2 pi. These literals are A1111's; the first is exactly 2^-32.
_TWO_POW32_INV = _float32(2.3283064e-10)
_TWO_POW32_INV_2PI = _float32(2.3283064e-10 * 6.2831855)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of the 64-bit product ``a * m`` (Philox's mulhi/mullo).

    `a` is an int64 tensor of uint32 values and `m` a 32-bit constant. The product can reach 2^64,
    past int64, so it is formed from 16-bit halves of `a` whose partial products stay below 2^49:
    ``a*m = lo16(a)*m + hi16(a)*m*2^16``.
    """
    low_part = (a & _MASK16) * m  # < 2^48
    high_part = (a >> 16) * m  # < 2^48, weight 2^16
    t = low_part + ((high_part & _MASK16) << 16)  # < 2^49: the product's bits below 2^32, plus carry
    return ((high_part >> 16) + (t >> 32)) & _MASK32, t & _MASK32


def philox4x32(
    counter: Sequence[torch.Tensor | int], key: tuple[int, int], rounds: int = PHILOX_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox 4x32-`rounds` blocks (Salmon et al. 2011): four 32-bit counter words -> four random words.

    `counter` holds words 0..3 as int64 tensors (or ints) of uint32 values, broadcast together, one
    block per element; `key` is the two 32-bit key words. Each round is the paper's S-box
    ``(c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``, and the
    key advances by the Weyl constants between rounds (not after the last), as in Random123.
    """
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK32, (k1 + PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def box_muller(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """First Box-Muller deviate ``sqrt(-2 ln u) sin(2 pi v)`` of uint32 words `x`, `y`, as float32.

    In float64 with float32 constants, then rounded: what NumPy's type promotion does in A1111.
    """
    u = x.to(torch.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    v = y.to(torch.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (torch.sqrt(-2.0 * torch.log(u)) * torch.sin(v)).to(torch.float32)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"NV seed must be an integer between 0 and 2^64 - 1, got {seed!r}")
    return seed


class PhiloxGenerator:
    """A1111's NV generator (`rng_philox.Generator`): CUDA `torch.randn` numbers on the CPU.

    Each `randn` call is one CUDA randn call: it uses the next Philox offset (counter word 0), and
    element ``i`` of the result is Philox block ``(offset, 0, i, 0)`` under key ``seed`` through
    Box-Muller. Not thread-safe (the offset advances).
    """

    def __init__(self, seed: int):
        self.seed = _check_seed(seed)
        self.offset = 0  # randn calls so far
        self._key = (seed & _MASK32, seed >> 32)  # A1111 views the np.uint64 seed as 2 x uint32, low first

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal float32 CPU tensor of `shape`; advances the offset by one."""
        shape = tuple(int(d) for d in shape)
        n = math.prod(shape)
        if n > 2**32:  # counter word 2 is the element index; A1111 does not spill into word 3
            raise ValueError(f"at most 2^32 numbers per draw, asked for {n}")
        index = torch.arange(n, dtype=torch.int64)
        x, y, _, _ = philox4x32((self.offset & _MASK32, 0, index, 0), self._key)
        self.offset += 1
        return box_muller(x, y).reshape(shape)


def nv_noise_source(
    seeds: Sequence[int], shape: tuple[int, ...], device, dtype, *, eta_noise_seed_delta: int = 0
) -> Callable[[], torch.Tensor]:
    """NV-mode standard normal noise for a batch, image i with its own stream for `seeds[i]`.

    The contract of `pipeline.noise_source`: the first call gives the initial latents
    ``[N, *shape]``, later calls the samplers' ancestral noise, on `device` in `dtype` (drawn in
    float32 on the CPU, so the same whatever the device). The numbers are A1111's `ImageRNG` with
    ``randn_source = "NV"`` (see the module docstring): one `PhiloxGenerator` per image, the
    initial noise its offset 0 and each later draw the next offset; `eta_noise_seed_delta` is
    A1111's ENSD setting: after the initial noise the generators restart at ``seed + ENSD``.
    """
    seeds = [_check_seed(seed) for seed in seeds]
    restart = [_check_seed(seed + eta_noise_seed_delta) for seed in seeds] if eta_noise_seed_delta else None
    generators = [PhiloxGenerator(seed) for seed in seeds]
    first = True

    def draw() -> torch.Tensor:
        nonlocal generators, first
        noise = torch.stack([g.randn(shape) for g in generators]) if generators else torch.empty((0, *shape))
        if first and restart is not None:
            generators = [PhiloxGenerator(seed) for seed in restart]
        first = False
        return noise.to(device=device, dtype=dtype)

    return draw
