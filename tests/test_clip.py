"""CLIP text encoder: parity with transformers' CLIPTextModel (the reference), key normalisation,
and config inference against the key/shape manifests of real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from ldmcli.keymap.clip import clip_hf_to_canonical
from ldmcli.models.clip import CLIPTextConfig, CLIPTextModel, clip_config_from_shapes
from ldmcli.tokenizer import PromptTokenizer

from sd_fixtures import MANIFESTS  # noqa: E402

# fp32, same math in a different order (eager softmax vs SDPA). Full size: the raw residual
# stream (penultimate) reaches |x| ~ 17-25 after 11-22 random blocks, and rounding grows with it.
TINY_TOL = dict(atol=1e-5, rtol=1e-5)
FULL_TOL = dict(atol=1e-4, rtol=1e-4)
PROMPTS = [
    "a photo of a cat",
    "(masterpiece:1.2), a red circle on a white background, 8k, 🐱",
    "",
    " ".join(f"word{i}" for i in range(100)),  # truncated: EOS lands at position 76
]


@pytest.fixture(scope="module")
def token_ids() -> dict[str, torch.Tensor]:
    """Real prompts framed both ways: SD1 pads with EOS, SD2 with 0 (moves nothing but padding)."""
    return {
        "eos_pad": PromptTokenizer()(PROMPTS),
        "zero_pad": PromptTokenizer(pad_token_id=0)(PROMPTS),
    }


def hf_reference(
    width: int, layers: int, act: str, projection: bool, seed: int = 0
) -> torch.nn.Module:
    """A random transformers CLIP text model; every parameter (biases, LN too) is made non-trivial
    so that a swapped or dropped tensor in our key map shows up in the outputs."""
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTextModelWithProjection as HFModelWithProjection

    config = HFConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width // 2,
        attn_implementation="eager",  # explicit softmax(QK^T) with a causal mask: not our SDPA path
    )
    torch.manual_seed(seed)
    model = (HFModelWithProjection if projection else HFModel)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:  # ~unit-variance outputs: std 1/sqrt(fan_in) for matrices, 1 for embeddings
                p.copy_(torch.randn_like(p) / (p.shape[1] ** 0.5 if "embedding" not in name else 1))
    return model


def ours_from(reference: torch.nn.Module, act: str) -> CLIPTextModel:
    sd = clip_hf_to_canonical(reference.state_dict())
    config = clip_config_from_shapes({k: v.shape for k, v in sd.items()}, activation=act)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def check_parity(
    reference: torch.nn.Module, ours: CLIPTextModel, ids: torch.Tensor, tol: dict = TINY_TOL
) -> dict[str, float]:
    """Compare every output of ours with the reference; return the max abs errors."""
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True)
        # transformers 5 saves CLIPTextModel without the text_model. level (WithProjection keeps it)
        final_ln = getattr(reference, "text_model", reference).final_layer_norm
        pooled_ref = ref.text_embeds if hasattr(ref, "text_embeds") else ref.pooler_output
        out = ours(ids)
        pairs = {
            "skip0": (out.hidden_states, ref.last_hidden_state),
            "skip1": (ours(ids, skip_last_layers=1).hidden_states, final_ln(ref.hidden_states[-2])),
            "skip2": (ours(ids, skip_last_layers=2).hidden_states, final_ln(ref.hidden_states[-3])),
            "penultimate": (out.penultimate, ref.hidden_states[-2]),
            "pooled": (out.pooled, pooled_ref),
        }
    errors = {}
    for name, (actual, expected) in pairs.items():
        torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{name}: {m}")
        errors[name] = (actual - expected).abs().max().item()
    return errors


@pytest.mark.parametrize(
    "act, projection", [("quick_gelu", False), ("gelu", False), ("gelu", True)]
)
def test_tiny_parity_with_transformers(act, projection, token_ids) -> None:
    reference = hf_reference(width=128, layers=3, act=act, projection=projection)
    ours = ours_from(reference, act)
    assert ours.config.heads == 2 and ours.config.layers == 3
    assert (ours.text_projection is not None) == projection
    for padding, ids in token_ids.items():
        errors = check_parity(reference, ours, ids)
        print(f"tiny {act} projection={projection} {padding}: max abs err {errors}")


def test_pooled_reads_the_first_eos(token_ids) -> None:
    """The pooled vector is the final-LN state at the EOS position, not at the padding."""
    reference = hf_reference(width=64, layers=2, act="quick_gelu", projection=False)
    ours = ours_from(reference, "quick_gelu")
    ids = token_ids["eos_pad"]
    eos = [row.index(49407) for row in ids.tolist()]
    assert eos[0] == 6 and eos[3] == 76
    with torch.no_grad():
        out = ours(ids)
    torch.testing.assert_close(out.pooled, out.hidden_states[torch.arange(len(eos)), eos])
    assert not torch.allclose(out.pooled[0], out.hidden_states[0, -1], atol=1e-3)


def test_wrong_activation_is_detected(token_ids) -> None:
    """Guards the parity test itself: a mismatched activation must not pass."""
    reference = hf_reference(width=64, layers=3, act="gelu", projection=False)
    ours = ours_from(reference, "quick_gelu")
    with pytest.raises(AssertionError):
        check_parity(reference, ours, token_ids["eos_pad"])


def test_builds_on_meta_without_buffers() -> None:
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(projection_dim=1280))
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    assert "text_projection.weight" in model.state_dict()


def test_rejects_bad_arguments() -> None:
    config = CLIPTextConfig(vocab_size=100, max_positions=8, width=64, layers=2, heads=1)
    model = CLIPTextModel(config)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="skip_last_layers"):
        model(ids, skip_last_layers=2)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig(activation="relu")


# --- key normalisation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_state_dict() -> dict[str, torch.Tensor]:
    return hf_reference(width=64, layers=2, act="quick_gelu", projection=True).state_dict()


def test_both_prefix_spellings_load(tiny_hf_state_dict) -> None:
    prefixed = dict(tiny_hf_state_dict)
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older transformers
    bare = {k.removeprefix("text_model."): v for k, v in prefixed.items()}
    assert "embeddings.position_ids" in bare and "text_projection.weight" in bare
    a, b = clip_hf_to_canonical(prefixed), clip_hf_to_canonical(bare)
    assert a.keys() == b.keys() == tiny_hf_state_dict.keys()
    assert all(a[k] is b[k] for k in a)
    config = clip_config_from_shapes({k: v.shape for k, v in b.items()})
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.load_state_dict(b, strict=True, assign=True)


def test_unknown_key_is_named(tiny_hf_state_dict) -> None:
    strays = ("text_model.encoder.layers.0.self_attn.qkv.weight", "logit_scale", "vision_model.x")
    for stray in strays:
        with pytest.raises(ValueError, match=stray.replace(".", r"\.")):
            clip_hf_to_canonical({**tiny_hf_state_dict, stray: torch.zeros(1)})


def test_key_in_both_spellings_is_an_error(tiny_hf_state_dict) -> None:
    sd = {**tiny_hf_state_dict, "final_layer_norm.weight": torch.zeros(64)}
    with pytest.raises(ValueError, match="both"):
        clip_hf_to_canonical(sd)


# --- real checkpoint layouts (shapes only, meta device) ----------------------------------------


def _fixture(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


def _check_layout(shapes: dict[str, list[int]], act: str, expect: dict) -> None:
    canonical = clip_hf_to_canonical(shapes)
    config = clip_config_from_shapes(canonical, activation=act)
    for field, value in expect.items():
        assert getattr(config, field) == value, field
    with torch.device("meta"):
        model = CLIPTextModel(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in canonical.items()}


def test_sd15_single_file_layout() -> None:
    prefix = "cond_stage_model.transformer."
    manifest = _fixture("sd15-single-file.json")
    shapes = {k.removeprefix(prefix): v[0] for k, v in manifest.items() if k.startswith(prefix)}
    assert "text_model.embeddings.position_ids" in shapes  # dropped by the explicit ignore list
    expect = dict(width=768, layers=12, heads=12, intermediate=3072, vocab_size=49408)
    _check_layout(shapes, "quick_gelu", expect)


@pytest.mark.parametrize(
    "fixture, component, expect",
    [
        ("sd15-diffusers-folder.json", "text_encoder", {}),
        ("sd21-diffusers-folder.json", "text_encoder", {}),  # 23 of ViT-H's 24 layers
        ("sdxl-diffusers-folder.json", "text_encoder", {}),
        ("sdxl-diffusers-folder.json", "text_encoder_2", {"projection_dim": 1280}),
    ],
)
def test_diffusers_text_encoder_layouts(fixture: str, component: str, expect: dict) -> None:
    entry = _fixture(fixture)[component]
    hf = entry["config"]
    shapes = {k: v[0] for k, v in entry["tensors"].items()}
    expect = dict(
        width=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"],
        max_positions=hf["max_position_embeddings"],
        vocab_size=hf["vocab_size"],
        **expect,
    )
    _check_layout(shapes, hf["hidden_act"], expect)


# --- full size ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, width, layers, act",
    [("ViT-L/14 (SD1)", 768, 12, "quick_gelu"), ("ViT-H/14 diffusers (SD2)", 1024, 23, "gelu")],
)
def test_full_size_parity(name: str, width: int, layers: int, act: str, token_ids) -> None:
    reference = hf_reference(width=width, layers=layers, act=act, projection=False)
    ours = ours_from(reference, act)
    assert ours.config.heads == width // 64
    for padding, ids in token_ids.items():
        errors = check_parity(reference, ours, ids, FULL_TOL)
        print(f"{name} {padding}: max abs err {errors}")
