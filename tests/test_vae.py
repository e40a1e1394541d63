"""KL autoencoder: parity with diffusers' AutoencoderKL, key map, config from real checkpoint shapes.

diffusers is used here only as a numerical oracle.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from ldmcli.keymap.vae import vae_config_to_diffusers, vae_diffusers_to_ldm, vae_ldm_to_diffusers
from ldmcli.models.vae import AutoencoderKL, VAEConfig, vae_config_from_shapes

from sd_fixtures import MANIFESTS  # noqa: E402

PREFIX = "first_stage_model."
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=32)
# fp32 parity tolerances, a few times the measured error (one thread, this machine):
# tiny decode: max abs err 2.1e-6 (6x10) / 2.3e-6 (8x8), outputs |x| <= 1.5;
# tiny encode: 4.9e-7 (mean) / 5.1e-7 (logvar).
# LDM's GroupNorm eps is 1e-6; PyTorch's default 1e-5 moves the tiny decode by 9e-5..1.2e-4 and the
# encode by 4.6e-5..7.4e-5: both must fail.
DECODE_ATOL, ENCODE_ATOL = 1e-5, 3e-6
# Full size (slow, two threads): decode 64x64 -> 512x512 max abs err 6.6e-6 (|x| <= 4.0); encode
# 256x256 3.0e-7 / 2.8e-7 (mean / logvar). eps 1e-5 moves them by 2.8e-4 and 4.6e-5 / 5.9e-5.
FULL_DECODE_ATOL, FULL_ENCODE_ATOL = 3e-5, 2e-6


def _diffusers_vae(config: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    torch.manual_seed(seed)
    return DiffusersAutoencoderKL(**vae_config_to_diffusers(config)).eval()


def _ours_from(ref, config: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ours.load_state_dict(vae_diffusers_to_ldm(ref.state_dict(), config), strict=True, assign=True)
    return ours.eval()


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Default GroupNorm init is (1, 0); randomise it so a swapped norm cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny_pair():
    ref = _diffusers_vae(TINY)
    _perturb_norms(ref, seed=1)
    return ref, _ours_from(ref, TINY)


@torch.no_grad()
@pytest.mark.parametrize("h,w", [(6, 10), (8, 8)])
def test_tiny_decode_parity(tiny_pair, h, w):
    ref, ours = tiny_pair
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(2))
    expected = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 2 * h, 2 * w)
    print(f"tiny decode {h}x{w} max abs err {_max_err(got, expected):.3e}")
    torch.testing.assert_close(got, expected, atol=DECODE_ATOL, rtol=0)


@torch.no_grad()
def test_tiny_encode_parity(tiny_pair):
    ref, ours = tiny_pair
    x = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(3)) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 6, 10)
    print(f"tiny encode max abs err mean {_max_err(mean, dist.mean):.3e} logvar {_max_err(logvar, dist.logvar):.3e}")
    torch.testing.assert_close(mean, dist.mean, atol=ENCODE_ATOL, rtol=0)
    torch.testing.assert_close(logvar, dist.logvar, atol=ENCODE_ATOL, rtol=0)


@torch.inference_mode()
def test_drop_encoder_frees_it_and_keeps_decode(tiny_pair):
    _, ours = tiny_pair
    vae = AutoencoderKL(TINY)
    vae.load_state_dict(ours.state_dict())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = vae.decode(z)
    vae.drop_encoder()
    assert torch.equal(vae.decode(z), before)
    assert not [k for k in vae.state_dict() if k.startswith(("encoder.", "quant_conv."))]
    with pytest.raises(RuntimeError, match="encoder was dropped"):
        vae.encode(torch.zeros(1, 3, 16, 16))


@torch.no_grad()
def test_logvar_is_clamped():
    ref = _diffusers_vae(TINY, seed=4)
    ref.quant_conv.bias[4:] = 1000.0  # the logvar half of the moments
    ours = _ours_from(ref, TINY)
    x = torch.zeros(1, 3, 8, 8)
    mean, logvar = ours.encode(x)
    assert torch.all(logvar == AutoencoderKL.LOGVAR_MAX)
    torch.testing.assert_close(logvar, ref.encode(x).latent_dist.logvar)
    ours.quant_conv.bias[4:] = -1000.0
    assert torch.all(ours.encode(x)[1] == AutoencoderKL.LOGVAR_MIN)


def test_meta_construction_has_no_buffers():
    with torch.device("meta"):
        model = AutoencoderKL(TINY)
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())


def test_keymap_round_trip_is_identity():
    ref = _diffusers_vae(TINY)
    diff_sd = ref.state_dict()
    ldm_sd = vae_diffusers_to_ldm(diff_sd, TINY)
    back = vae_ldm_to_diffusers(ldm_sd, TINY)
    assert back.keys() == diff_sd.keys()
    for k, t in diff_sd.items():
        assert torch.equal(back[k], t), k
    again = vae_diffusers_to_ldm(back, TINY)
    assert again.keys() == ldm_sd.keys()
    assert all(torch.equal(again[k], ldm_sd[k]) for k in ldm_sd)
    # The attention projections changed rank on the way, and back.
    assert ldm_sd["decoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert diff_sd["decoder.mid_block.attentions.0.to_q.weight"].shape == (64, 64)
    # Decoder levels are renumbered: diffusers up_blocks.0 (lowest res) is LDM up.1 here.
    torch.testing.assert_close(
        ldm_sd["decoder.up.1.upsample.conv.weight"], diff_sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    )


def test_keymap_accepts_legacy_attention_names():
    sd = _diffusers_vae(TINY).state_dict()
    legacy = {}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, t in sd.items():
        for new, old in renames.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = t
    assert any(".proj_attn." in k for k in legacy)
    a, b = vae_diffusers_to_ldm(legacy, TINY), vae_diffusers_to_ldm(sd, TINY)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keymap_unknown_keys_are_named():
    sd = dict(_diffusers_vae(TINY).state_dict())
    sd["encoder.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.bogus.weight"):
        vae_diffusers_to_ldm(sd, TINY)
    with pytest.raises(ValueError, match="decoder.nope.bias"):
        vae_ldm_to_diffusers({"decoder.nope.bias": torch.zeros(1)}, TINY)


def test_config_from_shapes_missing_keys():
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        vae_config_from_shapes({})
    shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(TINY).state_dict().items()}
    assert vae_config_from_shapes(shapes) == TINY
    del shapes["quant_conv.weight"]
    with pytest.raises(ValueError, match="quant_conv.weight"):
        vae_config_from_shapes(shapes)


WIDE = VAEConfig(ch=64, ch_mult=(1, 3, 5), num_res_blocks=3, z_channels=16, embed_dim=16)


@pytest.mark.parametrize("config", [TINY, WIDE])
def test_config_from_shapes_any_width(config):
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(config).state_dict().items()}
    assert vae_config_from_shapes(shapes) == config


def _single_file_shapes(family: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((MANIFESTS / f"{family}-single-file.json").read_text())
    return {k[len(PREFIX):]: tuple(v[0]) for k, v in data.items() if k.startswith(PREFIX)}


def _diffusers_vae_shapes(family: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((MANIFESTS / f"{family}-diffusers-folder.json").read_text())
    return {k: tuple(v[0]) for k, v in data["vae"]["tensors"].items()}


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl"])
def test_real_checkpoint_layouts(family):
    ldm_shapes = _single_file_shapes(family)
    assert len(ldm_shapes) == 248
    config = vae_config_from_shapes(ldm_shapes)
    assert config == VAEConfig()  # ch 128, ch_mult (1,2,4,4), 2 res blocks, z 4, embed 4
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.z_channels) == (128, (1, 2, 4, 4), 2, 4)

    # Our module has exactly the single file's keys and shapes, and loads them strictly on meta.
    with torch.device("meta"):
        model = AutoencoderKL(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == ldm_shapes
    meta_sd = {k: torch.empty(s, device="meta") for k, s in ldm_shapes.items()}
    model.load_state_dict(meta_sd, strict=True, assign=True)

    # The diffusers folder maps onto exactly the same keys and shapes, and back.
    diff_shapes = _diffusers_vae_shapes(family)
    diff_meta = {k: torch.empty(s, device="meta") for k, s in diff_shapes.items()}
    mapped = vae_diffusers_to_ldm(diff_meta, config)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ldm_shapes
    back = vae_ldm_to_diffusers(meta_sd, config)
    assert {k: tuple(v.shape) for k, v in back.items()} == diff_shapes

    # Our diffusers config agrees with the folder's config.json on every field we emit.
    folder_cfg = json.loads((MANIFESTS / f"{family}-diffusers-folder.json").read_text())["vae"]["config"]
    for key, value in vae_config_to_diffusers(config).items():
        assert folder_cfg[key] == value, key


@pytest.mark.slow
@torch.no_grad()
def test_full_size_decode_parity():
    config = VAEConfig()
    ref = _diffusers_vae(config, seed=0)
    _perturb_norms(ref, seed=1)
    ours = _ours_from(ref, config)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    expected = ref.decode(z).sample
    t1 = time.perf_counter()
    got = ours.decode(z)
    t2 = time.perf_counter()
    assert got.shape == (1, 3, 512, 512)
    print(f"full decode 64x64->512x512 max abs err {_max_err(got, expected):.3e}, "
          f"diffusers {t1 - t0:.1f}s, ours {t2 - t1:.1f}s")
    torch.testing.assert_close(got, expected, atol=FULL_DECODE_ATOL, rtol=0)

    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    dist = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    print(f"full encode 256x256 max abs err mean {_max_err(mean, dist.mean):.3e} "
          f"logvar {_max_err(logvar, dist.logvar):.3e}")
    torch.testing.assert_close(mean, dist.mean, atol=FULL_ENCODE_ATOL, rtol=0)
    torch.testing.assert_close(logvar, dist.logvar, atol=FULL_ENCODE_ATOL, rtol=0)
