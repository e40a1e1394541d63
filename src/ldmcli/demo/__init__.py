"""The bundled demo model: procedural training data, its training recipe, and image analysis.

`shapes` draws captioned images of flat shapes; `train` trains a small SD 1.x-architecture latent
diffusion model on them (`python -m ldmcli.demo.train`); `analysis` reads generated images back
(colours, position, shape) so tests can check that a picture shows what its prompt asked for.
"""

from __future__ import annotations

from pathlib import Path

from ldmcli.models_dir import DEMO_MODEL as _FILE_NAME, PACKAGE_ROOT

# The shipped model, in the repository's weights/ (where `ldm generate` without -m finds it).
DEMO_MODEL = PACKAGE_ROOT / "weights" / _FILE_NAME


def sampling_defaults(model_path: str | Path) -> dict[str, object]:
    """{"steps", "cfg_scale", "sampler"} recorded in a demo model file's `__metadata__`."""
    from ldmcli.checkpoint import read_safetensors_metadata
    from ldmcli.request import recommended_in_metadata

    recommended = recommended_in_metadata(read_safetensors_metadata(Path(model_path)))
    return {key: recommended[key] for key in ("steps", "cfg_scale", "sampler")}
