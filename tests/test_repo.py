"""The repository works from any checkout: CI runs the README's own test command, and no file names
a path that exists only on one machine."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one() -> None:
    install_and_generate, install_and_test = _quick_start_commands()
    assert "ldm generate" in install_and_generate and "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert install_and_test in ci.splitlines()
    assert re.search(r"python3? -m venv ", ci), "CI must build a fresh virtual environment"


def test_no_paths_of_one_machine() -> None:
    # Built from parts so that this file does not match itself.
    machine = re.compile("[\"'](/" + "(work|tmp|root|home)/)")
    offenders = []
    for folder in ("src", "tests", "benchmarks", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", "") and "__pycache__" not in path.parts:
                for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                    if machine.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_required_manifests_are_in_the_repo() -> None:
    from sd_fixtures import MANIFESTS

    names = {p.name for p in MANIFESTS.glob("*.json")}
    assert names == {f"{m}-{layout}.json" for m in ("sd15", "sd21", "sdxl") for layout in ("single-file", "diffusers-folder")}
