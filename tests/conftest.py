from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd_fixtures import save_tiny_sd1_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny SD1-structured diffusers folder with random weights."""
    return save_tiny_sd1_folder(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_folder, tmp_path_factory):
    """The same model as an original-layout (LDM) single .safetensors file, written from our loaded networks."""
    from ldmcli import pipeline

    model = pipeline.load(tiny_folder)
    parts = {"model.diffusion_model.": model.unet, "first_stage_model.": model.vae,
             "cond_stage_model.transformer.": model.text_encoder}
    tensors = {prefix + k: v.contiguous() for prefix, net in parts.items() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("tiny-single") / "tiny-sd1.safetensors"
    save_file(tensors, path)
    return path
