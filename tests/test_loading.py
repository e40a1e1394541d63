"""Loading: every key of real checkpoint layouts accounted for, and bad files refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldmcli import pipeline
from ldmcli.detect import detect_spec
from ldmcli.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from ldmcli.layout import read_components, split_single_file
from ldmcli.models.clip import CLIPTextModel
from ldmcli.models.unet import UNetModel
from ldmcli.models.vae import AutoencoderKL

from sd_fixtures import MANIFESTS  # noqa: E402



def _meta_state_dict(manifest: str) -> dict[str, torch.Tensor]:
    with open(MANIFESTS / manifest) as f:
        shapes = json.load(f)
    return {k: torch.empty(shape, device="meta") for k, (shape, _dtype) in shapes.items()}


def _meta_keys_and_shapes(module_cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        module = module_cls(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def test_sd15_single_file_every_key_accounted_for():
    components = split_single_file(_meta_state_dict("sd15-single-file.json"), Path("v1-5-pruned-emaonly.safetensors"))
    spec = detect_spec(components)
    assert spec.family == "sd1"
    assert (spec.unet.model_channels, spec.unet.channel_mult, spec.unet.context_dim) == (320, (1, 2, 4, 4), 768)
    assert (spec.text_encoder.width, spec.text_encoder.layers, spec.text_encoder.heads) == (768, 12, 12)
    assert (spec.vae.ch, spec.vae.ch_mult) == (128, (1, 2, 4, 4))
    assert _meta_keys_and_shapes(UNetModel, spec.unet) == _shapes(components.unet)
    assert _meta_keys_and_shapes(AutoencoderKL, spec.vae) == _shapes(components.vae)
    assert _meta_keys_and_shapes(CLIPTextModel, spec.text_encoder) == _shapes(components.text_encoder)
    # 1143 tensors = networks + 12 schedule buffers + CLIP position_ids, nothing else.
    placed = len(components.unet) + len(components.vae) + len(components.text_encoder)
    assert placed + 12 + 1 == 1143


def test_unknown_single_file_key_is_named(tiny_single_file, tmp_path):
    tensors = _load(tiny_single_file)
    tensors["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    tensors["some_other_thing"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="some_other_thing"):
        read_components(path)
    del tensors["some_other_thing"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="unexpected model.diffusion_model.extra_head.weight|extra_head.weight"):
        pipeline.load(path)


def test_missing_tensor_is_named(tiny_single_file, tmp_path):
    tensors = _load(tiny_single_file)
    del tensors["first_stage_model.decoder.conv_out.bias"]
    path = tmp_path / "missing.safetensors"
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        pipeline.load(path)


def test_ignored_extras_are_accepted(tiny_single_file, tmp_path):
    tensors = _load(tiny_single_file)
    tensors["alphas_cumprod"] = torch.ones(1000)
    tensors["model_ema.decay"] = torch.tensor(0.999)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "extras.safetensors"
    save_file(tensors, path)
    read_components(path)


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="no such file"):
        read_components(Path("/nonexistent/model.safetensors"))


def test_folder_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="without a model"):
        read_components(tmp_path)


def test_truncated_safetensors(tiny_single_file, tmp_path):
    data = tiny_single_file.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors: not a readable safetensors"):
        read_components(path)


def test_garbage_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_components(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_ckpt_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callbacks": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle.*builtins.print|refused to unpickle.*print"):
        read_components(path)
    assert "must never run" not in capsys.readouterr().out


def test_lora_is_refused(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, path)
    with pytest.raises(UnsupportedModelError, match="a LoRA"):
        read_components(path)


def test_vae_alone_is_refused(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_out.bias": torch.zeros(3)}, path)
    with pytest.raises(UnsupportedModelError, match="a VAE alone"):
        read_components(path)


def test_other_unet_inputs_are_refused(tiny_single_file, tmp_path):
    """Inpainting U-Nets (9 channels) load (tests/test_inpaint_refiner_models.py); other inputs do not."""
    tensors = _load(tiny_single_file)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 8, 3, 3)
    path = tmp_path / "pix2pix.safetensors"
    save_file(tensors, path)
    with pytest.raises(UnsupportedModelError, match=r": an InstructPix2Pix U-Net \(8 input channels\)"):
        pipeline.load(path)


def test_text_encoder_without_text_model_prefix_loads(tiny_single_file, tmp_path):
    """Older transformers saved CLIP without `text_model.`; single files made from them exist."""
    tensors = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in _load(tiny_single_file).items()
    }
    path = tmp_path / "noprefix.safetensors"
    save_file(tensors, path)
    pipeline.load(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_on_read(tmp_path, suffix, dtype):
    """read_state_dict(dtype=...) returns exactly the stored values cast once; integer tensors keep their dtype."""
    from ldmcli.checkpoint import read_state_dict

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=gen, dtype=torch.float32),
        "b.weight": torch.randn(7, generator=gen).to(torch.float16),
        "position_ids": torch.arange(77, dtype=torch.int64)[None],
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(tensors, path)
    else:
        torch.save({"state_dict": tensors}, path)
    read = read_state_dict(path, dtype=dtype)
    assert read.keys() == tensors.keys()
    for key, original in tensors.items():
        expected = original.to(dtype) if original.is_floating_point() else original
        assert read[key].dtype == expected.dtype, key
        torch.testing.assert_close(read[key], expected, rtol=0, atol=0)
    as_stored = read_state_dict(path)
    assert {k: v.dtype for k, v in as_stored.items()} == {k: v.dtype for k, v in tensors.items()}


def _two_shards(tiny_folder: Path, unet: Path) -> dict[str, torch.Tensor]:
    """The tiny U-Net's weights split over two shards beside their index, as `save_pretrained` writes them."""
    from safetensors.torch import load_file

    tensors = load_file(tiny_folder / "unet" / "diffusion_pytorch_model.safetensors")
    keys = sorted(tensors)
    names = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    unet.mkdir()
    for name, half in zip(names, halves):
        save_file({k: tensors[k] for k in half}, unet / name)
    weight_map = {k: name for name, half in zip(names, halves) for k in half}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def test_sharded_weights_read_as_one_file(tmp_path, tiny_folder):
    from ldmcli.checkpoint import read_sharded_or_single

    tensors = _two_shards(tiny_folder, tmp_path / "unet")
    read, source = read_sharded_or_single(tmp_path / "unet", ("diffusion_pytorch_model",))
    assert source.name == "diffusion_pytorch_model.safetensors.index.json"
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


def test_shard_index_must_agree_with_its_shards(tmp_path, tiny_folder):
    from ldmcli.checkpoint import read_sharded_or_single

    first = "diffusion_pytorch_model-00001-of-00002.safetensors"
    keys = sorted(_two_shards(tiny_folder, tmp_path / "unet"))
    wrong = {k: first for k in keys}  # every tensor said to be in the first shard
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(CheckpointError, match=f"{first} does not hold"):
        read_sharded_or_single(tmp_path / "unet", ("diffusion_pytorch_model",))
