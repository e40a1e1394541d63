"""LoRA and LyCORIS files merged into the weights (issue 17): `ldmcli.lora`.

Oracles, fp32, tiny SD1 and SDXL models with random weights (`sd_fixtures`):
- diffusers' `load_lora_weights` + `fuse_lora(lora_scale=W)` (PEFT underneath) for the U-Net of
  kohya-ss files (SD1 in diffusers' module names, SDXL in LDM names, conv LoCon 3x3 included) and
  for every network of diffusers/PEFT files (written by PEFT's own `inject_adapter_in_model` and
  diffusers' `save_lora_weights`, with lora_adapter_metadata).
- the arithmetic written out here, applied to the diffusers pipeline's own modules, for what
  diffusers does not read: kohya text-encoder keys (diffusers 0.42 with transformers 5 leaves the
  attention keys `to_q_lora` unloaded and drops per-layer alphas of the text encoder: checked in
  `test_diffusers_kohya_text_encoder_gap`), LoCon's lora_mid (Tucker), LoHa, LoKr and full diffs.
None of the oracles calls `ldmcli.lora`. Images (latents and PNG pixels) must match within
sd_fixtures' tolerances, and every LoRA must visibly change the image.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sd_fixtures import (
    assert_latents_match,
    assert_pixels_match,
    build_tiny_sd1_pipeline,
    build_tiny_sd2_pipeline,
    build_tiny_sdxl_pipeline,
    diffusers_latents_and_pixels,
)
from torch import nn

from ldmcli import pipeline
from ldmcli.errors import LdmError
from ldmcli.layout import Components, read_components
import ldmcli.lora
from ldmcli.lora import LoraError, apply_loras, read_lora, tag_weights
from ldmcli.request import ImageRequest

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SIZE = 64
STEPS = 5
CFG = 6.0
SEED = 31
# A LoRA "changes the image" when some latent moves by more than this (random-weight latents reach
# |x| ~ 30-50; float noise between ldm and diffusers is < 1e-4).
CHANGED = 1e-2


# --- models ---------------------------------------------------------------------------------------


class Model:
    """A tiny model: its diffusers folder, the diffusers pipeline (the oracle, Euler scheduler), and our
    latents with no LoRA (made when first asked for), which every LoRA must change."""

    def __init__(self, folder: Path, pipe, family: str):
        self.folder, self.pipe, self.family = folder, pipe, family
        self._base = None

    def __iter__(self):
        return iter((self.folder, self.pipe))

    @property
    def base(self) -> torch.Tensor:
        if self._base is None:
            self._base = _ours(self.folder, [])[0]
        return self._base


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Model:
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_sd1_pipeline(seed=4)
    folder = tmp_path_factory.mktemp("lora-sd1")
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return Model(folder, pipe, "sd1")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Model:
    pipe = build_tiny_sdxl_pipeline(seed=6)  # Euler already
    folder = tmp_path_factory.mktemp("lora-sdxl")
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return Model(folder, pipe, "sdxl")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Model:
    from diffusers import EulerDiscreteScheduler

    pipe = build_tiny_sd2_pipeline(seed=5)  # v-prediction, linear proj_in/proj_out, OpenCLIP-style text encoder
    folder = tmp_path_factory.mktemp("lora-sd2")
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return Model(folder, pipe, "sd2")


def _request() -> ImageRequest:
    return ImageRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, steps=STEPS,
                        cfg_scale=CFG, sampler="euler")


@torch.inference_mode()
def _ours(folder: Path, loras):
    """ldm: read, merge, build, sample, decode."""
    components = read_components(folder)
    apply_loras(components, loras)
    model = pipeline.load_components(components, device=torch.device("cpu"), dtype=torch.float32)
    latents = pipeline.sample_latents(model, _request(), [SEED])
    return latents, pipeline.decode_latents(model, latents)


@torch.inference_mode()
def _theirs(reference):
    return diffusers_latents_and_pixels(reference, PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                                        num_inference_steps=STEPS, guidance_scale=CFG,
                                        generator=torch.Generator().manual_seed(SEED))


def _assert_same_image(reference, model: Model, loras, label):
    expected, expected_pixels = _theirs(reference)
    latents, pixels = _ours(model.folder, loras)
    assert_latents_match(latents, expected, model.family, label)
    assert_pixels_match(pixels, expected_pixels, label)
    moved = (latents - model.base).abs().max().item()
    print(f" (the LoRA moved latents by up to {moved:.2f})", end="")
    assert moved > CHANGED, f"{label}: the LoRA did not change the image"


# --- writing LoRA files -----------------------------------------------------------------------------


def _layers(module: nn.Module, pattern: str = "") -> dict[str, nn.Module]:
    """A network's Linear and Conv2d layers by module name (those a LoRA can change)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and re.search(pattern, name)}


def _kohya_te_name(prefix: str, hf_name: str) -> str:
    """kohya's name of a CLIP layer: HF names with `text_model.` (transformers 5 leaves it out)."""
    full = hf_name if hf_name.startswith("text_model.") else "text_model." + hf_name
    return prefix + full.replace(".", "_")


def _random_lora(g: torch.Generator, layer: nn.Module, rank: int, *, mid: bool = False) -> dict[str, torch.Tensor]:
    """Random kohya factors for a layer: down [r, in(, kh, kw)], up [out, r(, 1, 1)]; with `mid`,
    LoCon's Tucker form (down 1x1, mid [r, r, kh, kw])."""
    w = layer.weight
    fan_in = w[0].numel()
    if w.dim() == 2:
        down = torch.randn(rank, w.shape[1], generator=g) / fan_in**0.5
        up = torch.randn(w.shape[0], rank, generator=g) * 0.3 / rank**0.5
        return {"lora_down.weight": down, "lora_up.weight": up}
    if mid:
        kh, kw = w.shape[2:]
        return {"lora_down.weight": torch.randn(rank, w.shape[1], 1, 1, generator=g) / w.shape[1] ** 0.5,
                "lora_mid.weight": torch.randn(rank, rank, kh, kw, generator=g) / (rank * kh * kw) ** 0.5,
                "lora_up.weight": torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3 / rank**0.5}
    return {"lora_down.weight": torch.randn(rank, *w.shape[1:], generator=g) / fan_in**0.5,
            "lora_up.weight": torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3 / rank**0.5}


# The U-Net's alpha in files diffusers reads: one value for the whole U-Net, since diffusers 0.42
# matches per-layer kohya alphas of attention layers under their old names (`attn1.processor.
# to_k_lora.down.weight`), misses, and uses the most common alpha instead. Text encoders (arithmetic
# oracle) get per-layer alphas, None meaning no alpha key (scale 1).
UNET_ALPHAS = (2.0,)
TE_ALPHAS = (None, 1.0, 2.0, 8.0)


def kohya_file(path: Path, networks: dict[str, dict[str, nn.Module]], *, seed: int, rank: int = 4,
               mid: bool = False, alphas=None, metadata=None) -> dict[str, dict]:
    """Write a kohya-ss LoRA: `networks` maps a kohya prefix (`lora_unet_`, `lora_te_`, ...) to
    {name below the prefix with dots: layer}. Alphas cycle through `alphas` (default UNET_ALPHAS for
    the U-Net, TE_ALPHAS for text encoders). Returns {prefix: {name: (factors, alpha)}} for the oracles."""
    g = torch.Generator().manual_seed(seed)
    sd, out = {}, {}
    for prefix, layers in networks.items():
        cycle = alphas or (UNET_ALPHAS if prefix == "lora_unet_" else TE_ALPHAS)
        for i, (name, layer) in enumerate(layers.items()):
            factors = _random_lora(g, layer, rank, mid=mid and layer.weight.dim() == 4 and layer.weight.shape[2] > 1)
            alpha = cycle[i % len(cycle)]
            key = prefix + name.replace(".", "_")
            sd.update({f"{key}.{role}": t for role, t in factors.items()})
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
            out.setdefault(prefix, {})[name] = (factors, alpha)
    save_file(sd, path, metadata=metadata)
    return out


def lora_change(factors: dict[str, torch.Tensor], alpha: float | None, weight_shape) -> torch.Tensor:
    """kohya/A1111's change, written out: up @ down (conv kernels flattened), or with a Tucker core
    sum_{n,m} up[i,n] mid[n,m,k,l] down[m,j]; times alpha / rank (rank = down's rows, 1 without alpha)."""
    up, down = factors["lora_up.weight"], factors["lora_down.weight"]
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], rank)
    if "lora_mid.weight" in factors:
        mid = factors["lora_mid.weight"]
        change = torch.zeros(up.shape[0], down.shape[1], *mid.shape[2:])
        for n in range(rank):
            for m in range(rank):
                change += up2[:, n, None, None, None] * mid[n, m][None, None] * down[m, :, 0, 0][None, :, None, None]
    else:
        change = (up2 @ down.reshape(rank, -1)).reshape(weight_shape)
    return change.reshape(weight_shape) * (1.0 if alpha is None else alpha / rank)


@torch.no_grad()
def add_changes(layers: dict[str, nn.Module], changes: dict[str, tuple], weight: float) -> None:
    """The oracle's merge: W += weight * change for each layer of the reference model."""
    for name, (factors, alpha) in changes.items():
        layer = layers[name]
        layer.weight += weight * lora_change(factors, alpha, layer.weight.shape)


# --- kohya-ss -------------------------------------------------------------------------------------------


def test_kohya_sd1_locon_with_alphas_equals_diffusers(sd1, tmp_path):
    """Every Linear/Conv2d of the U-Net (attention, GEGLU, 1x1 proj_in, 3x3 resnet/sampler convs, time
    embedding) and of the text encoder, alphas varied per layer, te 0.8 / unet 0.8 (one weight)."""
    base = sd1.pipe
    unet_layers, te_layers = _layers(base.unet), _layers(base.text_encoder)
    te_names = {_kohya_te_name("", n): n for n in te_layers}
    written = kohya_file(tmp_path / "kohya.safetensors", {"lora_unet_": unet_layers,
                         "lora_te_": {k: te_layers[v] for k, v in te_names.items()}}, seed=1)
    lora = read_lora(tmp_path / "kohya.safetensors")
    assert len(lora.adapters) == len(unet_layers) + len(te_layers) and "kohya" in lora.format

    reference = copy.deepcopy(base)
    unet_only = {k: v for k, v in _load(tmp_path / "kohya.safetensors").items() if k.startswith("lora_unet_")}
    reference.load_lora_weights(unet_only)
    reference.fuse_lora(lora_scale=0.8)
    add_changes({k: te_layers_of(reference)[v] for k, v in te_names.items()}, written["lora_te_"], 0.8)
    _assert_same_image(reference, sd1, [(lora, 0.8, 0.8)], "kohya SD1 LoCon")


def test_kohya_sd2_equals_diffusers(sd2, tmp_path):
    """SD 2.x as kohya writes it: diffusers' U-Net names (proj_in/proj_out are linear layers here) and the
    OpenCLIP text encoder in Hugging Face CLIP names under lora_te_, text encoder 0.6 and U-Net 1.2 apart.
    Oracle: diffusers' load_lora_weights + fuse_lora for the U-Net, the change written out for the text
    encoder (as in the SD1 test: diffusers reads kohya text-encoder keys its own way)."""
    base = sd2.pipe
    unet_layers, te_layers = _layers(base.unet, r"attentions|resnets"), _layers(base.text_encoder)
    assert any(isinstance(m, nn.Linear) for n, m in unet_layers.items() if n.endswith("proj_in"))
    te_names = {_kohya_te_name("", n): n for n in te_layers}
    written = kohya_file(tmp_path / "sd2.safetensors", {"lora_unet_": unet_layers,
                         "lora_te_": {k: te_layers[v] for k, v in te_names.items()}}, seed=21)
    reference = copy.deepcopy(base)
    reference.load_lora_weights({k: v for k, v in _load(tmp_path / "sd2.safetensors").items() if k.startswith("lora_unet_")})
    reference.fuse_lora(lora_scale=1.2)
    add_changes({k: te_layers_of(reference)[v] for k, v in te_names.items()}, written["lora_te_"], 0.6)
    _assert_same_image(reference, sd2, [(read_lora(tmp_path / "sd2.safetensors"), 0.6, 1.2)], "kohya SD2")


def te_layers_of(pipe, which: str = "text_encoder"):
    return _layers(getattr(pipe, which))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def test_text_encoder_and_unet_weights_apart(sd1, tmp_path):
    """`<lora:NAME:te=0.3:unet=1.4>`: each network takes its own weight."""
    base = sd1.pipe
    te_layers = _layers(base.text_encoder, r"layers\.1\.")
    te_names = {_kohya_te_name("", n): n for n in te_layers}
    unet_layers = _layers(base.unet, r"attn2|ff\.net|resnets\.0\.conv2")
    written = kohya_file(tmp_path / "apart.safetensors", {"lora_unet_": unet_layers,
                         "lora_te_": {k: te_layers[v] for k, v in te_names.items()}}, seed=2)
    te_weight, unet_weight = tag_weights(["te=0.3", "unet=1.4"])
    reference = copy.deepcopy(base)
    reference.load_lora_weights({k: v for k, v in _load(tmp_path / "apart.safetensors").items() if k.startswith("lora_unet_")})
    reference.fuse_lora(lora_scale=unet_weight)
    add_changes({k: te_layers_of(reference)[v] for k, v in te_names.items()}, written["lora_te_"], te_weight)
    lora = read_lora(tmp_path / "apart.safetensors")
    _assert_same_image(reference, sd1, [(lora, te_weight, unet_weight)], "te 0.3 / unet 1.4")


def test_locon_tucker_lora_mid(sd1, tmp_path):
    """LoCon with lora_mid on the 3x3 convs: diffusers reads no lora_mid, so it gets the same change
    as a plain LoCon whose 3x3 down is written out here: down'[n,j,k,l] = sum_m mid[n,m,k,l] down[m,j]."""
    base = sd1.pipe
    layers = _layers(base.unet, r"resnets\.\d\.conv[12]|samplers|conv_in|conv_out|attn1\.to_v")
    written = kohya_file(tmp_path / "tucker.safetensors", {"lora_unet_": layers}, seed=3, mid=True)
    lora = read_lora(tmp_path / "tucker.safetensors")
    assert sum("lora_mid.weight" in f for f, _ in written["lora_unet_"].values()) >= 8
    plain = {}
    for name, (factors, alpha) in written["lora_unet_"].items():
        key = "lora_unet_" + name.replace(".", "_")
        down = factors["lora_down.weight"]
        if "lora_mid.weight" in factors:
            mid = factors["lora_mid.weight"]
            down = torch.einsum("nmkl,mj->njkl", mid, down[:, :, 0, 0])
        plain[f"{key}.lora_down.weight"] = down
        plain[f"{key}.lora_up.weight"] = factors["lora_up.weight"]
        if alpha is not None:
            plain[f"{key}.alpha"] = torch.tensor(alpha)
    reference = copy.deepcopy(base)
    reference.load_lora_weights(plain)
    reference.fuse_lora(lora_scale=0.9)
    _assert_same_image(reference, sd1, [(lora, 0.9, 0.9)], "LoCon lora_mid")


def test_kohya_sdxl_ldm_names_equals_diffusers(sdxl, tmp_path):
    """kohya's SDXL layout: U-Net layers by LDM names (`input_blocks_4_1_...`), read by diffusers
    through its sgm-block mapping; lora_te1_ (CLIP-L) and lora_te2_ (bigG) by the arithmetic."""
    base = sdxl.pipe
    ldm_layers = _ldm_named(base.unet)
    te1 = {_kohya_te_name("", n): n for n in _layers(base.text_encoder, r"layers\.[02]\.")}
    te2 = {_kohya_te_name("", n): n for n in _layers(base.text_encoder_2, r"layers\.[12]\.")}
    written = kohya_file(tmp_path / "sdxl.safetensors", {
        "lora_unet_": ldm_layers,
        "lora_te1_": {k: _layers(base.text_encoder)[v] for k, v in te1.items()},
        "lora_te2_": {k: _layers(base.text_encoder_2)[v] for k, v in te2.items()},
    }, seed=4, metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4"})
    lora = read_lora(tmp_path / "sdxl.safetensors")
    assert lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"  # kohya's ss_* header is kept
    reference = copy.deepcopy(base)
    reference.load_lora_weights({k: v for k, v in _load(tmp_path / "sdxl.safetensors").items() if k.startswith("lora_unet_")})
    reference.fuse_lora(lora_scale=0.7)
    add_changes({k: te_layers_of(reference)[v] for k, v in te1.items()}, written["lora_te1_"], 0.7)
    add_changes({k: te_layers_of(reference, "text_encoder_2")[v] for k, v in te2.items()}, written["lora_te2_"], 0.7)
    _assert_same_image(reference, sdxl, [(lora, 0.7, 0.7)], "kohya SDXL")


def _ldm_named(unet, pattern: str = "") -> dict[str, nn.Module]:
    """A diffusers U-Net's Linear/Conv2d layers under their original LDM names (kohya's SDXL U-Net
    has these), renamed by ldm's key map (tested against real checkpoints in test_unet.py)."""
    from ldmcli.keymap.unet import unet_config_from_diffusers, unet_diffusers_to_ldm

    layers = _layers(unet)
    renamed = unet_diffusers_to_ldm({f"{n}.weight": n for n in layers}, unet_config_from_diffusers(dict(unet.config)))
    return {k.removesuffix(".weight"): layers[n] for k, n in renamed.items() if re.search(pattern, k)}


def test_diffusers_kohya_text_encoder_gap(sd1, tmp_path):
    """Why the kohya text-encoder oracle is arithmetic: this diffusers loads kohya's MLP keys but
    leaves the attention keys (`self_attn_q_proj`) unloaded. If it ever reads them, the kohya tests
    above can use it for the text encoder too."""
    _, base = sd1
    te_layers = _layers(base.text_encoder, r"layers\.0\.(self_attn\.q_proj|mlp\.fc1)")
    kohya_file(tmp_path / "te.safetensors", {"lora_te_": {_kohya_te_name("", n): m for n, m in te_layers.items()}}, seed=5)
    reference = copy.deepcopy(base)
    before = {k: v.clone() for k, v in reference.text_encoder.state_dict().items()}
    reference.load_lora_weights(str(tmp_path / "te.safetensors"))
    reference.fuse_lora()
    reference.unload_lora_weights()
    after = reference.text_encoder.state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["encoder.layers.0.mlp.fc1.weight"], changed


# --- diffusers / PEFT -----------------------------------------------------------------------------------


def peft_file(path: Path, pipe, *, seed: int, targets: dict[str, list[str]], alpha: int = 8,
              alpha_pattern: dict | None = None, lora_bias: bool = False) -> None:
    """A diffusers LoRA as diffusers' training scripts write one: PEFT adapters injected into copies of
    the networks, their factors set at random, saved by `save_lora_weights` with each LoraConfig."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    g = torch.Generator().manual_seed(seed)
    layers, configs = {}, {}
    for network, modules in targets.items():
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=modules, alpha_pattern=alpha_pattern or {},
                            init_lora_weights=False, lora_bias=lora_bias)
        model = inject_adapter_in_model(config, copy.deepcopy(getattr(pipe, network)))
        state = get_peft_model_state_dict(model)
        for key, value in state.items():
            std = 0.1 if key.endswith("bias") else 0.3 / 2 if "lora_B" in key else 1 / value[0].numel() ** 0.5
            state[key] = torch.randn(value.shape, generator=g) * std
        layers[network], configs[network] = state, config.to_dict()
    if "text_encoder_2" in targets or "text_encoder_2" in pipe.components:
        StableDiffusionXLPipeline.save_lora_weights(
            path.parent, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
            text_encoder_2_lora_layers=layers.get("text_encoder_2"), weight_name=path.name,
            unet_lora_adapter_metadata=configs.get("unet"), text_encoder_lora_adapter_metadata=configs.get("text_encoder"),
            text_encoder_2_lora_adapter_metadata=configs.get("text_encoder_2"))
    else:
        StableDiffusionPipeline.save_lora_weights(
            path.parent, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
            weight_name=path.name, unet_lora_adapter_metadata=configs.get("unet"),
            text_encoder_lora_adapter_metadata=configs.get("text_encoder"))


SD1_PEFT_TARGETS = {"unet": ["to_q", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut", "time_emb_proj", "ff.net.2"],
                    "text_encoder": ["q_proj", "v_proj", "fc1"]}


def test_peft_sd1_equals_diffusers(sd1, tmp_path):
    """PEFT keys (`unet.…lora_A.weight`, `text_encoder.encoder.layers…`), lora_alpha 8 on rank 4 and an
    alpha_pattern, both read from the lora_adapter_metadata header, and PEFT's lora_bias (`lora_B.bias`)."""
    base = sd1.pipe
    path = tmp_path / "peft.safetensors"
    with_bias = {"unet": ["to_out.0", "proj_in", "conv1", "conv_shortcut", "time_emb_proj", "ff.net.2"],
                 "text_encoder": ["q_proj", "v_proj", "fc1"]}  # lora_bias needs layers that have a bias
    peft_file(path, base, seed=6, targets=with_bias, alpha_pattern={"conv1": 2, "fc1": 16}, lora_bias=True)
    lora = read_lora(path)
    assert "diffusers/PEFT" in lora.format and any("up_bias" in a.tensors for a in lora.adapters)
    reference = copy.deepcopy(base)
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=0.6)
    _assert_same_image(reference, sd1, [(lora, 0.6, 0.6)], "PEFT SD1")


def test_peft_sdxl_both_text_encoders_equals_diffusers(sdxl, tmp_path):
    base = sdxl.pipe
    path = tmp_path / "peft-xl.safetensors"
    peft_file(path, base, seed=7, targets={"unet": ["to_k", "to_out.0", "proj_out", "conv2", "ff.net.0.proj"],
                                           "text_encoder": ["k_proj", "out_proj"], "text_encoder_2": ["q_proj", "fc2"]})
    lora = read_lora(path)
    assert lora.networks == {"unet", "text_encoder", "text_encoder_2"}
    reference = copy.deepcopy(base)
    reference.load_lora_weights(str(path))
    reference.fuse_lora(lora_scale=1.1)
    _assert_same_image(reference, sdxl, [(lora, 1.1, 1.1)], "PEFT SDXL")


def test_two_loras_stacked(sd1, tmp_path):
    """A kohya LoCon at 0.5 and a PEFT LoRA at 1.2 on overlapping layers: the changes add up."""
    base = sd1.pipe
    kohya_file(tmp_path / "a.safetensors", {"lora_unet_": _layers(base.unet, r"attn1|conv1")}, seed=8)
    peft_file(tmp_path / "b.safetensors", base, seed=9, targets=SD1_PEFT_TARGETS)
    reference = copy.deepcopy(base)
    reference.load_lora_weights(_load(tmp_path / "a.safetensors"), adapter_name="a")
    reference.load_lora_weights(str(tmp_path / "b.safetensors"), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.5, 1.2])
    reference.fuse_lora(adapter_names=["a", "b"])
    loras = [(read_lora(tmp_path / "a.safetensors"), 0.5, 0.5), (read_lora(tmp_path / "b.safetensors"), 1.2, 1.2)]
    _assert_same_image(reference, sd1, loras, "kohya 0.5 + PEFT 1.2")


def test_diffusers_spellings_merge_alike(sd1, tmp_path):
    """The same factors as PEFT keys, bare U-Net keys (no `unet.`), diffusers' `lora.down/up` and
    `lora_linear_layer`, and the attention-processor `to_q_lora` keys: the same merged weights."""
    folder, base = sd1
    g = torch.Generator().manual_seed(10)
    unet_layers = _layers(base.unet, r"attn1\.to_(q|out\.0)$|conv1")
    te_layers = _layers(base.text_encoder, r"layers\.0\.(self_attn\.q_proj|mlp\.fc1)")
    factors = {("unet", n): _random_lora(g, m, 4) for n, m in unet_layers.items()}
    factors |= {("text_encoder", n): _random_lora(g, m, 4) for n, m in te_layers.items()}

    def spell(write) -> dict:
        out = {}
        for (network, name), f in factors.items():
            for side, t in (("down", f["lora_down.weight"]), ("up", f["lora_up.weight"])):
                out[write(network, name, side)] = t
        return out

    ab = {"down": "A", "up": "B"}
    spellings = {
        "peft": lambda n, m, s: f"{n}.{m}.lora_{ab[s]}.weight",
        "bare": lambda n, m, s: f"{m}.lora_{ab[s]}.weight" if n == "unet" else f"{n}.{m}.lora_{ab[s]}.weight",
        "lora.down": lambda n, m, s: f"{n}.{m}.lora.{s}.weight" if n == "unet" else f"{n}.{m}.lora_linear_layer.{s}.weight",
        "processor": lambda n, m, s: (re.sub(r"\.(attn1)\.(to_q|to_out)(\.0)?$", r".\1.processor.\2_lora", f"{n}.{m}")
                                      .replace("self_attn.q_proj", "self_attn.to_q_lora") + f".{s}.weight"
                                      if re.search(r"attn1|self_attn", m) else f"{n}.{m}.lora.{s}.weight"
                                      if n == "unet" else f"{n}.{m}.lora_linear_layer.{s}.weight"),
    }
    merged = {}
    for label, write in spellings.items():
        save_file(spell(write), tmp_path / f"{label}.safetensors")
        components = read_components(folder)
        apply_loras(components, [(read_lora(tmp_path / f"{label}.safetensors"), 1.0, 1.0)])
        merged[label] = components
    original = read_components(folder)
    changed = [k for k in original.unet if not torch.equal(original.unet[k], merged["peft"].unet[k])]
    assert len(changed) == len(unet_layers)
    for label, components in merged.items():
        for network in ("unet", "text_encoder"):
            ours, want = getattr(components, network), getattr(merged["peft"], network)
            assert all(torch.equal(ours[k], want[k]) for k in want), f"{label}: {network} differs from the PEFT spelling"


# --- LyCORIS: LoHa, LoKr, full diffs against the arithmetic ---------------------------------------------


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


def lycoris_layers(g: torch.Generator, kind: str, layer: nn.Module, rank: int = 3):
    """(file tensors, the change written out) for one layer. `kind`: loha, loha_tucker, lokr_full,
    lokr_decomposed, lokr_t2, full. Math: LyCORIS/A1111 (module docstring of ldmcli.lora for the
    references), but spelled out independently here."""
    w = layer.weight
    out, inp = w.shape[:2]
    kernel = tuple(w.shape[2:])
    conv3 = kernel not in ((), (1, 1))
    alpha = 1.5
    if kind.startswith("loha"):
        tucker = kind == "loha_tucker" and conv3
        t = {}
        halves = []
        for i in "12":
            if tucker:
                t[f"hada_t{i}"] = _randn(g, rank, rank, *kernel, std=0.5)
                t[f"hada_w{i}_a"] = _randn(g, rank, out, std=0.5)
                t[f"hada_w{i}_b"] = _randn(g, rank, inp, std=0.5 / inp**0.5)
                # sum_{a,b} t[a,b,k,l] wa[a,p] wb[b,q]
                half = torch.zeros(out, inp, *kernel)
                for a in range(rank):
                    for b in range(rank):
                        half += t[f"hada_t{i}"][a, b][None, None] * torch.outer(t[f"hada_w{i}_a"][a], t[f"hada_w{i}_b"][b])[..., None, None]
            else:
                t[f"hada_w{i}_a"] = _randn(g, out, rank, std=0.5)
                t[f"hada_w{i}_b"] = _randn(g, rank, w[0].numel(), std=0.5 / w[0].numel() ** 0.25)  # conv kernels flattened
                half = (t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]).reshape(w.shape)
            halves.append(half)
        t["alpha"] = torch.tensor(alpha)
        return t, halves[0] * halves[1] * (alpha / rank)
    if kind.startswith("lokr"):
        a, c = 4, out // 4
        b, d = (2, inp // 2)
        w1 = _randn(g, a, b, std=0.5)
        t = {"lokr_w1": w1, "alpha": torch.tensor(alpha)}
        if kind == "lokr_full":
            w2 = _randn(g, c, d, *kernel, std=1 / (d * max(1, math.prod(kernel))) ** 0.5)
            t["lokr_w2"] = w2
            scale = 1.0  # both factors full: no rank, alpha ignored
        elif kind == "lokr_t2" and conv3:
            t["lokr_t2"] = _randn(g, rank, rank, *kernel, std=0.5)
            t["lokr_w2_a"] = _randn(g, rank, c, std=0.5)
            t["lokr_w2_b"] = _randn(g, rank, d, std=0.5 / d**0.5)
            w2 = torch.einsum("abkl,ap,bq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            scale = alpha / rank
        else:
            t["lokr_w2_a"] = _randn(g, c, rank, std=0.5)
            t["lokr_w2_b"] = _randn(g, rank, d * max(1, math.prod(kernel)), std=0.5 / d**0.5)
            w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(c, d, *kernel)
            scale = alpha / rank
        # Kronecker product over the two matrix dims, the kernel taken from w2
        change = torch.zeros(a * c, b * d, *kernel)
        for i in range(a):
            for j in range(b):
                change[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j] * w2
        return t, change * scale
    if kind == "full":
        diff = _randn(g, *w.shape, std=0.2 / w[0].numel() ** 0.5)
        tensors = {"diff": diff}
        if layer.bias is not None:
            tensors["diff_b"] = _randn(g, out, std=0.1)
        return tensors, diff
    raise ValueError(kind)


LYCORIS_KINDS = ["loha", "loha_tucker", "lokr_full", "lokr_decomposed", "lokr_t2", "full"]


@pytest.mark.parametrize("kind", LYCORIS_KINDS)
def test_lycoris_against_the_arithmetic(kind, sd1, tmp_path):
    """LoHa/LoKr (with and without Tucker / t2) and full diffs on linear, 1x1 and 3x3 conv layers of
    the U-Net and on text encoder layers (kohya names), at weight 0.7 / 1.1; the oracle adds the
    written-out change to diffusers' own modules."""
    base = sd1.pipe
    g = torch.Generator().manual_seed(LYCORIS_KINDS.index(kind) + 20)
    unet_layers = _layers(base.unet, r"down_blocks\.0\.attentions\.0\.(proj_in|transformer_blocks\.0\.(attn2\.to_k|ff\.net\.0\.proj))$|resnets\.0\.conv1|up_blocks\.0\.upsamplers")
    te_layers = _layers(base.text_encoder, r"layers\.1\.(self_attn\.v_proj|mlp\.fc2)")
    reference = copy.deepcopy(base)
    ref_unet, ref_te = _layers(reference.unet), _layers(reference.text_encoder)
    sd = {}
    with torch.no_grad():
        for prefix, layers, ref_layers, weight in (("lora_unet_", unet_layers, ref_unet, 1.1), ("lora_te_", te_layers, ref_te, 0.7)):
            for name, layer in layers.items():
                tensors, change = lycoris_layers(g, kind, layer)
                key = _kohya_te_name(prefix, name) if prefix == "lora_te_" else prefix + name.replace(".", "_")
                sd.update({f"{key}.{role}": t for role, t in tensors.items()})
                ref_layers[name].weight += weight * change.reshape(layer.weight.shape)
                if "diff_b" in tensors:
                    ref_layers[name].bias += weight * tensors["diff_b"]
    save_file(sd, tmp_path / f"{kind}.safetensors")
    lora = read_lora(tmp_path / f"{kind}.safetensors")
    _assert_same_image(reference, sd1, [(lora, 0.7, 1.1)], kind)


# --- reading: formats and files ----------------------------------------------------------------------


def test_pickled_lora_reads_like_safetensors(sd1, tmp_path):
    folder, base = sd1
    kohya_file(tmp_path / "k.safetensors", {"lora_unet_": _layers(base.unet, r"attn2")}, seed=11)
    tensors = _load(tmp_path / "k.safetensors")
    torch.save(tensors, tmp_path / "k.pt")
    (tmp_path / "folder").mkdir()
    save_file(tensors, tmp_path / "folder" / "pytorch_lora_weights.safetensors")  # a diffusers LoRA folder
    a, b = read_lora(tmp_path / "k.safetensors"), read_lora(tmp_path / "k.pt")
    assert [x.label for x in read_lora(tmp_path / "folder").adapters] == [x.label for x in a.adapters]
    assert [(x.label, x.scale) for x in a.adapters] == [(x.label, x.scale) for x in b.adapters]
    ca, cb = read_components(folder), read_components(folder)
    apply_loras(ca, [(a, 1.0, 1.0)])
    apply_loras(cb, [(b, 1.0, 1.0)])
    assert all(torch.equal(ca.unet[k], cb.unet[k]) for k in ca.unet)


@pytest.mark.parametrize("block_rows", [None, 1, 3])
def test_merge_adds_in_float32_rounds_once_and_writes_in_place(block_rows, sd1, tmp_path, monkeypatch):
    """fp16 weights: the change is added to the weight upcast to fp32, then rounded once, written into
    the weight itself (no second copy of it), a block of rows at a time (here also 1 and 3 rows per
    block: 3 leaves a ragged last block of the 32 rows)."""
    import ldmcli.lora

    folder, base = sd1
    layers = _layers(base.unet, r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q$")
    written = kohya_file(tmp_path / "q.safetensors", {"lora_unet_": layers}, seed=12, alphas=(2.0,))
    components = read_components(folder, dtype=torch.float16)
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    weight = components.unet[key]
    if block_rows is not None:
        monkeypatch.setattr(ldmcli.lora, "MERGE_BLOCK_BYTES", 4 * weight.shape[1] * block_rows)
    before = weight.clone()
    apply_loras(components, [(read_lora(tmp_path / "q.safetensors"), 1.0, 0.5)])
    factors, alpha = written["lora_unet_"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    want = (before.float() + 0.5 * lora_change(factors, alpha, before.shape)).half()
    assert components.unet[key] is weight and weight.dtype == torch.float16 and torch.equal(weight, want)


def test_merge_never_writes_through_to_another_key(sd1, tmp_path):
    """Two keys in one storage (as a pickle may store tied weights): merging into one copies it first,
    the other keeps its values; a fused q/k/v split into non-overlapping views is written in place."""
    folder, base = sd1
    layers = _layers(base.unet, r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q$")
    kohya_file(tmp_path / "q.safetensors", {"lora_unet_": layers}, seed=13)
    components = read_components(folder)
    q, k = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    components.unet[k] = components.unet[q]  # the same tensor under two keys
    before = components.unet[k].clone()
    apply_loras(components, [(read_lora(tmp_path / "q.safetensors"), 1.0, 1.0)])
    assert torch.equal(components.unet[k], before) and not torch.equal(components.unet[q], before)

    components = read_components(folder)
    fused = torch.cat([components.unet[q], components.unet[k]])  # q and k as views of one tensor
    components.unet[q], components.unet[k] = fused[: len(fused) // 2], fused[len(fused) // 2:]
    before = fused.clone()
    apply_loras(components, [(read_lora(tmp_path / "q.safetensors"), 1.0, 1.0)])
    assert components.unet[q].data_ptr() == fused.data_ptr() and not torch.equal(fused[: len(fused) // 2], before[: len(fused) // 2])
    assert torch.equal(components.unet[k], before[len(fused) // 2:])


def test_safetensors_factors_are_read_when_merged(sd1, tmp_path):
    """A .safetensors LoRA is read without its factors (only their shapes, and the alphas' values):
    the merge reads each layer's from the file, so the whole file is never in memory at once."""
    folder, base = sd1
    kohya_file(tmp_path / "k.safetensors", {"lora_unet_": _layers(base.unet, r"attn2")}, seed=14, alphas=(3.0,))
    lora = read_lora(tmp_path / "k.safetensors")
    assert lora.lazy and lora.adapters and all(t.is_meta for a in lora.adapters for t in a.tensors.values())
    assert {a.alpha for a in lora.adapters} == {3.0}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_files_merge_like_folders(family, sd1, sdxl, tmp_path):
    """The same model as an original single file (SDXL: bigG in OpenCLIP names, its fused q/k/v split
    on reading): a kohya and a PEFT LoRA merge into the same canonical tensors as in the folder."""
    from sd_fixtures import ldm_sdxl_single_file_state_dict, ldm_single_file_state_dict

    model = {"sd1": sd1, "sdxl": sdxl}[family]
    to_single = {"sd1": ldm_single_file_state_dict, "sdxl": ldm_sdxl_single_file_state_dict}[family]
    single = tmp_path / "model.safetensors"
    save_file(to_single(pipeline.load(model.folder)), single)
    te = {"lora_te1_" if family == "sdxl" else "lora_te_": {_kohya_te_name("", n): m for n, m in _layers(model.pipe.text_encoder, r"layers\.0\.").items()}}
    if family == "sdxl":
        te["lora_te2_"] = {_kohya_te_name("", n): m for n, m in _layers(model.pipe.text_encoder_2, r"layers\.1\.").items()}
    unet = _ldm_named(model.pipe.unet, r"input_blocks|out\.2") if family == "sdxl" else _layers(model.pipe.unet, r"up_blocks")
    kohya_file(tmp_path / "k.safetensors", {"lora_unet_": unet, **te}, seed=18)
    targets = {"unet": ["to_q", "conv2", "proj_out"], "text_encoder": ["v_proj", "fc2"]}
    if family == "sdxl":
        targets["text_encoder_2"] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    peft_file(tmp_path / "p.safetensors", model.pipe, seed=19, targets=targets)
    loras = [(read_lora(tmp_path / "k.safetensors"), 0.9, 1.1), (read_lora(tmp_path / "p.safetensors"), 1.3, 0.4)]
    merged = {}
    for label, path in (("folder", model.folder), ("single", single)):
        merged[label] = read_components(path)
        apply_loras(merged[label], loras)
    original = read_components(model.folder)
    for network, tensors in merged["folder"].networks.items():
        if network == "vae":
            continue
        other = merged["single"].networks[network]
        changed = [k for k in tensors if not torch.equal(tensors[k], original.networks[network][k])]
        assert changed, network
        assert all(torch.equal(tensors[k], other[k]) for k in changed), network


# --- bad input: one line each, nothing merged -----------------------------------------------------------


def _one_line_error(fn, *patterns) -> str:
    with pytest.raises(LoraError) as info:
        fn()
    message = str(info.value)
    print(f"\n{message}", end="")
    assert "\n" not in message and isinstance(info.value, LdmError) and info.value.exit_code == 2
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


def _unchanged(folder, components) -> bool:
    fresh = read_components(folder)
    return all(torch.equal(fresh.unet[k], components.unet[k]) for k in fresh.unet) and all(
        torch.equal(fresh.text_encoder[k], components.text_encoder[k]) for k in fresh.text_encoder)


def test_keys_that_match_no_layer_are_named(sd1, tmp_path):
    folder, base = sd1
    g = torch.Generator().manual_seed(13)
    layer = base.unet.down_blocks[0].attentions[0].proj_in
    sd = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{r}": t for r, t in _random_lora(g, layer, 4).items()}
    sd |= {f"lora_unet_down_blocks_7_attentions_0_proj_in.{r}": t for r, t in _random_lora(g, layer, 4).items()}
    save_file(sd, tmp_path / "typo.safetensors")
    components = read_components(folder)
    _one_line_error(lambda: apply_loras(components, [(read_lora(tmp_path / "typo.safetensors"), 1.0, 1.0)]),
                    r"1 of its 2 layers match no layer", "lora_unet_down_blocks_7_attentions_0_proj_in")
    assert _unchanged(folder, components)


def test_keys_of_unknown_kinds_are_named(tmp_path):
    g = torch.Generator().manual_seed(14)
    base = {"lora_unet_conv_in.lora_down.weight": _randn(g, 4, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": _randn(g, 32, 4, 1, 1)}
    cases = {
        "sideways": ({"lora_unet_conv_in.lora_sideways.weight": _randn(g, 4)}, r"no LoRA/LyCORIS kind.*lora_sideways"),
        "dora": ({"lora_unet_conv_in.dora_scale": _randn(g, 32, 1, 1, 1)}, r"not supported yet: DoRA"),
        "oft": ({"lora_unet_conv_in.oft_blocks": _randn(g, 4, 8, 8)}, r"not supported yet: OFT"),
        "emb": ({"bundle_emb.easyneg.string_to_param.*": _randn(g, 2, 64)}, r"not supported yet: textual-inversion embeddings"),
        "mixed": ({"lora_unet_conv_in.hada_w1_a": _randn(g, 32, 4)}, r"mixes loha and lora"),
        "alpha only": ({"lora_unet_conv_out.alpha": torch.tensor(4.0)}, r"alpha with no weights"),
        "half a pair": ({"lora_unet_conv_out.lora_down.weight": _randn(g, 4, 32, 3, 3)}, r"without its up factor"),
    }
    for extra, pattern in cases.values():
        save_file({**base, **extra}, tmp_path / "x.safetensors")
        _one_line_error(lambda: read_lora(tmp_path / "x.safetensors"), pattern)


def test_another_familys_lora_is_refused_before_anything_changes(sd1, sdxl, tmp_path):
    """An SDXL LoRA on SD 1.x (second text encoder, LDM names whose shapes differ) and an SD 1.x
    LoRA on SDXL: one line each, and the model's tensors are untouched (all checked before merging)."""
    sd1_folder, sd1_pipe = sd1
    sdxl_folder, sdxl_pipe = sdxl
    te2 = {_kohya_te_name("", n): m for n, m in _layers(sdxl_pipe.text_encoder_2, r"layers\.0\.self_attn").items()}
    xl_unet = _ldm_named(sdxl_pipe.unet, r"input_blocks\.4\.1\.transformer_blocks\.0")
    kohya_file(tmp_path / "xl.safetensors", {"lora_unet_": xl_unet, "lora_te2_": te2}, seed=15)
    components = read_components(sd1_folder)
    small = kohya_file(tmp_path / "sd1.safetensors", {"lora_unet_": _layers(sd1_pipe.unet, r"attn2")}, seed=16)
    assert small
    # A good LoRA first: it must not be merged either, since the second is refused.
    _one_line_error(lambda: apply_loras(components, [(read_lora(tmp_path / "sd1.safetensors"), 1.0, 1.0),
                                                     (read_lora(tmp_path / "xl.safetensors"), 1.0, 1.0)]),
                    r"xl\.safetensors: not a LoRA for this Stable Diffusion 1\.x model", r"second text encoder")
    assert _unchanged(sd1_folder, components)
    xl = read_components(sdxl_folder)
    _one_line_error(lambda: apply_loras(xl, [(read_lora(tmp_path / "sd1.safetensors"), 1.0, 1.0)]),
                    r"Stable Diffusion XL model", r"(do not fit|match no layer)")


def test_factors_that_do_not_fit(sd1, tmp_path):
    folder = sd1.folder
    g = torch.Generator().manual_seed(17)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": _randn(g, 3, 32), f"{name}.lora_up.weight": _randn(g, 32, 4)}, tmp_path / "rank.safetensors")
    _one_line_error(lambda: read_lora(tmp_path / "rank.safetensors"), r"rank mismatch", name)
    save_file({f"{name}.hada_w1_a": _randn(g, 32, 4), f"{name}.hada_w1_b": _randn(g, 4, 32),
               f"{name}.hada_w2_a": _randn(g, 32, 2), f"{name}.hada_w2_b": _randn(g, 4, 32)}, tmp_path / "loha.safetensors")
    _one_line_error(lambda: read_lora(tmp_path / "loha.safetensors"), r"loha factors do not fit together")
    # a well-formed LoRA for a wider layer: the model's weight is named with both shapes
    save_file({f"{name}.lora_down.weight": _randn(g, 4, 48), f"{name}.lora_up.weight": _randn(g, 48, 4)}, tmp_path / "wide.safetensors")
    components = read_components(folder)
    _one_line_error(lambda: apply_loras(components, [(read_lora(tmp_path / "wide.safetensors"), 1.0, 1.0)]),
                    r"\[48, 48\]", r"input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q\.weight is \[32, 32\]")
    assert _unchanged(folder, components)


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("touch lora-pickle-ran",)


def test_pickle_wanting_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"lora_unet_conv_in.alpha": _RunsCode()}, tmp_path / "evil.pt")
    _one_line_error(lambda: read_lora(tmp_path / "evil.pt"), r"refused to unpickle.*wants (posix|os|nt)\.system")
    assert not (tmp_path / "lora-pickle-ran").exists()


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    _one_line_error(lambda: read_lora(tmp_path / "bad.safetensors"), r"bad\.safetensors")
    _one_line_error(lambda: read_lora(tmp_path / "gone.safetensors"), r"no such LoRA file")
    (tmp_path / "notes.txt").write_text("hi")
    _one_line_error(lambda: read_lora(tmp_path / "notes.txt"), r"not a LoRA file")


def test_a1111_tag_weights():
    """A1111's extra_networks_lora: te = 1st, unet = 2nd positional (default te); te=/unet= override."""
    assert tag_weights([]) == (1.0, 1.0)
    assert tag_weights(["0.8"]) == (0.8, 0.8)
    assert tag_weights(["0.8", "0.3"]) == (0.8, 0.3)
    assert tag_weights(["te=0.25"]) == (0.25, 0.25)
    assert tag_weights(["te=0.2", "unet=1.5"]) == (0.2, 1.5)
    assert tag_weights(["0.9", "unet=0"]) == (0.9, 0.0)
    for bad in (["x"], ["nan"], ["1", "2", "3"], ["dyn=4"]):
        _one_line_error(lambda bad=bad: tag_weights(bad))


# --- the merge's edges (review) -------------------------------------------------------------------

# A text-encoder layer written by hand: every kind of change through the block path, on a conv-shaped weight.
P, K = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.q_proj"


def _comps(w, b):
    return Components(layout="single-file", path=None, unet={}, vae={}, text_encoder={K + ".weight": w, K + ".bias": b})


@pytest.mark.parametrize("block_rows", [1, 5, None])
def test_every_kind_through_blocks(block_rows, tmp_path, monkeypatch):
    """LoHa, LoKr, a full diff (+ diff_b) and a LoCon pair stacked on one weight, 1 and 5 rows per block or one
    block: the changes written out."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    W, B = r(12, 8, 3, 3), r(12)
    if block_rows:
        monkeypatch.setattr(ldmcli.lora, "MERGE_BLOCK_BYTES", 4 * 72 * block_rows)
    files = {
        "loha": {f"{P}.hada_w1_a": r(12, 2), f"{P}.hada_w1_b": r(2, 72), f"{P}.hada_w2_a": r(12, 2), f"{P}.hada_w2_b": r(2, 72)},
        "lokr": {f"{P}.lokr_w1": r(3, 2), f"{P}.lokr_w2": r(4, 4, 3, 3)},
        "full": {f"{P}.diff": r(12, 8, 3, 3), f"{P}.diff_b": r(12)},
        "locon": {f"{P}.lora_down.weight": r(2, 8, 3, 3), f"{P}.lora_up.weight": r(12, 2, 1, 1)},
    }
    for n, f in files.items():
        save_file(f, tmp_path / f"{n}.safetensors")
    c = _comps(W.clone(), B.clone())
    apply_loras(c, [(read_lora(tmp_path / f"{n}.safetensors"), 0.5, 1) for n in files])
    lo, lk, fu, lc = (files[n] for n in files)
    dl = ((lo[f"{P}.hada_w1_a"] @ lo[f"{P}.hada_w1_b"]) * (lo[f"{P}.hada_w2_a"] @ lo[f"{P}.hada_w2_b"])).reshape(W.shape)
    dk = torch.kron(lk[f"{P}.lokr_w1"][:, :, None, None], lk[f"{P}.lokr_w2"])
    dc = (lc[f"{P}.lora_up.weight"].flatten(1) @ lc[f"{P}.lora_down.weight"].flatten(1)).reshape(W.shape)
    torch.testing.assert_close(c.text_encoder[K + ".weight"], W + 0.5 * (dl + dk + fu[f"{P}.diff"] + dc))
    torch.testing.assert_close(c.text_encoder[K + ".bias"], B + 0.5 * fu[f"{P}.diff_b"])


def test_two_loras_on_one_fp16_weight_are_summed_before_rounding(tmp_path, monkeypatch):
    """Two changes to one fp16 weight are summed in fp32, then rounded once (not once per change)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    monkeypatch.setattr(ldmcli.lora, "MERGE_BLOCK_BYTES", 4 * 64 * 3)
    W = r(64, 64).half()
    a = {f"{P}.lora_A.weight": r(4, 64), f"{P}.lora_B.weight": r(64, 4) * 1e-2, f"{P}.lora_B.bias": r(64)}
    b = {f"{P}.lora_A.weight": r(4, 64), f"{P}.lora_B.weight": r(64, 4) * 1e-2}
    save_file(a, tmp_path / "a.safetensors"), save_file(b, tmp_path / "b.safetensors")
    c = _comps(W.clone(), torch.zeros(64, dtype=torch.float16))
    apply_loras(c, [(read_lora(tmp_path / "a.safetensors"), 0.7, 1), (read_lora(tmp_path / "b.safetensors"), -1.3, 1)])
    want = (W.float() + 0.7 * a[f"{P}.lora_B.weight"] @ a[f"{P}.lora_A.weight"]
            - 1.3 * b[f"{P}.lora_B.weight"] @ b[f"{P}.lora_A.weight"]).half()
    assert (c.text_encoder[K + ".weight"].float() - want.float()).abs().max() <= 2**-10 * want.float().abs().max()
    assert (c.text_encoder[K + ".weight"] != want).float().mean() < 0.01  # at most matmul-order ulps
    torch.testing.assert_close(c.text_encoder[K + ".bias"], (0.7 * a[f"{P}.lora_B.bias"]).half())


@pytest.mark.parametrize("change", ["renamed", "reshaped"])
def test_a_lazy_file_changed_before_the_merge_is_a_lora_error(change, tmp_path):
    """A .safetensors LoRA rewritten between reading and merging: a LoraError naming it, not a traceback."""
    path = tmp_path / "c.safetensors"
    save_file({f"{P}.lora_A.weight": torch.randn(4, 8), f"{P}.lora_B.weight": torch.randn(12, 4)}, path)
    lora = read_lora(path)
    if change == "renamed":
        save_file({f"{P}.lora_down.weight": torch.randn(4, 8), f"{P}.lora_up.weight": torch.randn(12, 4)}, path)
    else:
        save_file({f"{P}.lora_A.weight": torch.randn(2, 8), f"{P}.lora_B.weight": torch.randn(12, 2)}, path)
    with pytest.raises(LoraError, match="c.safetensors"):
        apply_loras(_comps(torch.randn(12, 8), torch.randn(12)), [(lora, 1, 1)])


def test_a_channels_last_conv_weight_merges(tmp_path):
    """A weight in channels_last strides (a .ckpt saved from such a module keeps them) merges."""
    W = torch.randn(12, 8, 3, 3)
    save_file({f"{P}.lora_down.weight": torch.ones(2, 8, 3, 3), f"{P}.lora_up.weight": torch.ones(12, 2, 1, 1)}, tmp_path / "l.safetensors")
    c = _comps(W.clone().to(memory_format=torch.channels_last), torch.zeros(12))
    apply_loras(c, [(read_lora(tmp_path / "l.safetensors"), 1, 1)])
    torch.testing.assert_close(c.text_encoder[K + ".weight"], W + 2)
