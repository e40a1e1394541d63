"""Module structure: the networks import only the layer kernels (and the fused attention kernel those route to); reading a checkpoint does not import detection."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys
loaded = lambda: sorted(m for m in sys.modules if m.startswith("ldmcli"))
import ldmcli.models.unet, ldmcli.models.vae, ldmcli.models.clip
networks = loaded()
import ldmcli.layout
print(json.dumps({"networks": networks, "layout": loaded()}))
"""


def test_import_graph() -> None:
    """A fresh interpreter, so what earlier tests imported does not count."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out)
    assert loaded["networks"] == [
        "ldmcli", "ldmcli.fused_attention", "ldmcli.kernels", "ldmcli.models", "ldmcli.models.clip", "ldmcli.models.unet", "ldmcli.models.vae",
    ]
    # layout refuses unsupported files through `unsupported`; `detect` imports layout, never the reverse
    assert "ldmcli.detect" not in loaded["layout"]
    assert {"ldmcli.unsupported", "ldmcli.checkpoint"} <= set(loaded["layout"])


def test_cli_help_does_not_import_torch() -> None:
    """`ldm --help` and `ldm generate --help` answer at once: no torch, no networks."""
    probe = ("import sys\nfrom click.testing import CliRunner\nfrom ldmcli.cli import cli\n"
             "for args in (['--help'], ['generate', '--help']):\n    assert CliRunner().invoke(cli, args).exit_code == 0\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ldmcli.models')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
