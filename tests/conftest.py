from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd_fixtures import ldm_single_file_state_dict, save_tiny_sd1_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny SD1-structured diffusers folder with random weights."""
    return save_tiny_sd1_folder(tmp_path_factory.mktemp("tiny-sd1"))


@pytest.fixture(scope="session")
def tiny_single_file(tiny_folder, tmp_path_factory):
    """The same model as an original-layout (LDM) single .safetensors file, written from our loaded networks."""
    from ldmcli import pipeline

    path = tmp_path_factory.mktemp("tiny-single") / "tiny-sd1.safetensors"
    save_file(ldm_single_file_state_dict(pipeline.load(tiny_folder)), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Intra-op threads off for a module of tiny-model tests (`pytestmark = usefixtures("one_thread")`):
    tiny tensors gain nothing from them, and on a shared 2-core box the thread handoff made diffusers'
    12 steps take 13 s instead of 0.1 s and convolutions ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
