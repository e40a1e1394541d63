"""Atomic PNG writing (ldmcli.image.save_png)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from ldmcli.image import save_png


def test_png_gets_the_umask_permissions_not_the_temp_files(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png", text={"k": "v"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.png").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary file left behind


def test_existing_png_is_kept_without_overwrite(tmp_path) -> None:
    path = tmp_path / "a.png"
    save_png(np.zeros((8, 8, 3), np.uint8), path, text={})
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(np.full((8, 8, 3), 255, np.uint8), path, text={})
    assert path.read_bytes() == before
    save_png(np.full((8, 8, 3), 255, np.uint8), path, text={}, overwrite=True)
    assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
