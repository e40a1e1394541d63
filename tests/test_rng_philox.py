"""A1111's "NV" random source (`ldmcli.rng_philox`): published numbers, Philox known answers, an
independent plain-Python reference, and `nv_noise_source`'s contract."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from ldmcli.rng_philox import MAX_SEED, PhiloxGenerator, nv_noise_source, philox4x32

# --- published numbers -----------------------------------------------------------------------

# AUTOMATIC1111/stable-diffusion-webui, modules/rng_philox.py module docstring (commit ef1698fd),
# "Expected output" of Generator(seed=0).randn(shape=(3, 4)) -- i.e. torch.manual_seed(0);
# torch.randn((3, 4), device="cuda"). Printed to 8 decimals; they differ from A1111's own float32
# output by up to 3e-7 (CUDA's float32 intrinsics vs A1111's float64 transform), hence atol=1e-6.
A1111_SEED0_3X4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# First CUDA torch.randn numbers after manual_seed(seed), printed to 4 decimals in PyTorch issues:
# seed 42: pytorch/pytorch#158398 (torch.randn([1, 64, 2048], generator=...manual_seed(42), device=cuda));
# seed 10: pytorch/pytorch#79496 (torch.manual_seed(10); torch.randn(3, device=cuda));
# seed 1:  pytorch/pytorch#143086 (generator.manual_seed(1); torch.randn(1, 49*12*112*144, device=cuda)).
CUDA_FIRST_NUMBERS = {
    42: [0.1940, 2.1614, -0.1721],
    10: [-0.1029, 1.6810, -0.2708],
    1: [-0.2963, 2.6764, -0.1408],
}


def test_seed_0_matches_a1111_docstring():
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (3, 4)
    torch.testing.assert_close(got, torch.tensor(A1111_SEED0_3X4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", sorted(CUDA_FIRST_NUMBERS))
def test_first_numbers_match_published_cuda_randn(seed):
    got = PhiloxGenerator(seed).randn((3,))
    torch.testing.assert_close(got, torch.tensor(CUDA_FIRST_NUMBERS[seed]), rtol=0, atol=5e-5)


# Random123 (github.com/DEShawResearch/random123) tests/kat_vectors, the three "philox4x32 10"
# lines: counter (4 words), key (2 words) -> output (4 words).
PHILOX4X32_10_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X32_10_KAT)
def test_philox4x32_10_known_answers(counter, key, expected):
    got = philox4x32([torch.tensor([c]) for c in counter], key)
    assert [int(w) for w in got] == list(expected)


# --- an independent reference, written out from the definitions -----------------------------


def _reference_block(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10 on Python ints (Salmon et al. 2011): 10 S-box rounds, key bumped between them."""
    ctr, k = list(counter), list(key)
    for round_index in range(10):
        if round_index > 0:
            k = [(k[0] + 0x9E3779B9) % 2**32, (k[1] + 0xBB67AE85) % 2**32]
        hi0, lo0 = divmod(0xD2511F53 * ctr[0], 2**32)
        hi1, lo1 = divmod(0xCD9E8D57 * ctr[2], 2**32)
        ctr = [hi1 ^ ctr[1] ^ k[0], lo1, hi0 ^ ctr[3] ^ k[1], lo0]
    return ctr


def _reference_randn(seed: int, offset: int, n: int) -> list[float]:
    """A1111's NV numbers in float64: element i = Box-Muller sine deviate of block (offset, 0, i, 0)."""
    key = [seed % 2**32, seed // 2**32]
    scale = 2.0**-32  # float32(2.3283064e-10), which is exactly 2^-32
    scale_2pi = torch.tensor(2.3283064e-10 * 6.2831855, dtype=torch.float32).item()
    out = []
    for i in range(n):
        x, y, _, _ = _reference_block([offset, 0, i, 0], key)
        u = x * scale + scale / 2
        v = y * scale_2pi + scale_2pi / 2
        out.append(math.sqrt(-2.0 * math.log(u)) * math.sin(v))
    return out


@pytest.mark.parametrize("seed", [0, 1, 1234567, 2**32 - 1, 2**32, 2**32 + 5, 2**63 + 12345, MAX_SEED])
def test_matches_plain_reference_over_several_draws(seed):
    g = PhiloxGenerator(seed)
    for offset in range(3):
        got = g.randn((2, 3, 4))
        expected = torch.tensor(_reference_randn(seed, offset, 24), dtype=torch.float64).to(torch.float32)
        assert torch.equal(got.flatten(), expected), f"seed {seed} draw {offset}"


def test_both_seed_words_matter():
    """The key is the 64-bit seed split in two 32-bit words: its high word changes the numbers."""
    low = PhiloxGenerator(7).randn((16,))
    assert not torch.equal(low, PhiloxGenerator(7 + 2**32).randn((16,)))
    assert not torch.equal(low, PhiloxGenerator(7 + 2**63).randn((16,)))


def test_element_depends_on_index_not_shape():
    flat = PhiloxGenerator(99).randn((60,))
    assert torch.equal(PhiloxGenerator(99).randn((3, 4, 5)).flatten(), flat)
    assert torch.equal(PhiloxGenerator(99).randn((7,)), flat[:7])


def test_successive_draws_differ_and_repeat_per_seed():
    g = PhiloxGenerator(5)
    a, b = g.randn((4, 8, 8)), g.randn((4, 8, 8))
    assert g.offset == 2
    assert not torch.equal(a, b)
    h = PhiloxGenerator(5)
    assert torch.equal(h.randn((4, 8, 8)), a) and torch.equal(h.randn((4, 8, 8)), b)


def test_looks_standard_normal():
    x = PhiloxGenerator(2024).randn((4, 128, 128)).double()
    assert torch.isfinite(x).all()
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 1.5, True])
def test_rejects_seeds_outside_64_bits(seed):
    with pytest.raises(ValueError):
        PhiloxGenerator(seed)


# --- nv_noise_source: pipeline.noise_source's contract, A1111's ImageRNG draws ----------------

SHAPE = (4, 8, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_noise_source_contract(dtype):
    # Imported here so that the rest of this file needs nothing but ldmcli.rng_philox.
    from ldmcli.pipeline import noise_source

    seeds = [3, 0, MAX_SEED]
    draw = nv_noise_source(seeds, SHAPE, torch.device("cpu"), dtype)
    ours = noise_source(seeds, SHAPE, "cpu", dtype)
    for _ in range(3):
        got, like = draw(), ours()
        assert got.shape == like.shape == (3, *SHAPE)
        assert got.dtype == like.dtype == dtype and got.device == like.device
        assert torch.isfinite(got.float()).all()


def test_noise_source_is_imagerng_in_nv_mode():
    """Image i: initial latents = generator(seeds[i]) offset 0, the k-th later draw = offset k."""
    seeds = [11, 2**40 + 3]
    draw = nv_noise_source(seeds, SHAPE, "cpu", torch.float32)
    generators = [PhiloxGenerator(s) for s in seeds]
    draws = [draw() for _ in range(4)]
    for got in draws:
        assert torch.equal(got, torch.stack([g.randn(SHAPE) for g in generators]))
    assert all(not torch.equal(a, b) for a, b in pairwise(draws))
    again = nv_noise_source(seeds, SHAPE, "cpu", torch.float32)
    assert all(torch.equal(again(), d) for d in draws)


def test_noise_source_image_independent_of_batch():
    alone = nv_noise_source([8], SHAPE, "cpu", torch.float32)
    batch = nv_noise_source([5, 8], SHAPE, "cpu", torch.float32)
    for _ in range(2):
        assert torch.equal(batch()[1], alone()[0])


def test_noise_source_eta_noise_seed_delta():
    """ENSD: initial noise from the seed, then every ancestral draw from seed + ENSD, offsets 0, 1..."""
    draw = nv_noise_source([100], SHAPE, "cpu", torch.float32, eta_noise_seed_delta=31337)
    assert torch.equal(draw()[0], PhiloxGenerator(100).randn(SHAPE))
    later = PhiloxGenerator(100 + 31337)
    assert torch.equal(draw()[0], later.randn(SHAPE))
    assert torch.equal(draw()[0], later.randn(SHAPE))


@pytest.mark.parametrize("seeds", [[-1], [MAX_SEED + 1]])
def test_noise_source_rejects_bad_seeds(seeds):
    with pytest.raises(ValueError):
        nv_noise_source(seeds, SHAPE, "cpu", torch.float32)
    with pytest.raises(ValueError):
        nv_noise_source([MAX_SEED], SHAPE, "cpu", torch.float32, eta_noise_seed_delta=1)
