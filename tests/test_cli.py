"""The command line: help, validation before loading, one-line errors with exit codes, PNG metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ldmcli.cli import cli
from ldmcli.image import read_png_text

TINY_ARGS = ["-W", "64", "-H", "64", "--steps", "4"]


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["generate"], ["samplers"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_samplers_lists_every_sampler_and_alias():
    out = run("samplers").output
    for name, display in [("euler_a", "Euler a"), ("dpmpp_2m", "DPM++ 2M"), ("plms", "PLMS"), ("karras", "Karras")]:
        assert name in out and display in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["-W", "500"], "500 is not a positive multiple of 8"),
        (["-H", "0"], "0 is not a positive multiple of 8"),
        (["--steps", "0"], "--steps"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--schedule", "nope"], "--schedule"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_usage_errors_exit_2_before_loading(args, message, tmp_path):
    # The model path does not exist: a usage error must be reported before the model is even looked at.
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tmp_path / "absent.safetensors"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_missing_model_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tmp_path / "absent.safetensors")])
    assert result.exit_code == 2
    assert result.output.strip() == f"ldm: error: {tmp_path / 'absent.safetensors'}: no such file or folder"


def test_corrupt_model_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run(
        [sys.executable, "-m", "ldmcli", "generate", "a cat", "-m", str(bad), "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "bad.safetensors: not a readable safetensors file" in proc.stderr


def test_existing_output_refused_before_loading(tmp_path, tiny_single_file):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "-o", str(out), *TINY_ARGS])
    assert result.exit_code == 2
    assert "exists (use --overwrite" in result.output
    assert out.read_bytes() == b"precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path, tiny_single_file):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "-o", str(locked / "x.png")])
    assert result.exit_code == 2
    assert "cannot write" in result.output


def test_output_under_a_file_is_refused(tmp_path, tiny_single_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "-o", str(blocker / "x.png")])
    assert result.exit_code == 2
    assert "cannot write" in result.output


def test_generate_writes_png_with_metadata(tmp_path, tiny_single_file):
    result = CliRunner().invoke(cli, [
        "generate", "a red circle, big", "-n", "blurry", "-m", str(tiny_single_file), "-s", "42",
        "--sampler", "DPM++ 2M Karras", "--cfg-scale", "7", "-b", "2", "-o", str(tmp_path / "out") + "/", *TINY_ARGS,
    ])
    assert result.exit_code == 0, result.output
    first, second = tmp_path / "out" / "00000-42.png", tmp_path / "out" / "00001-43.png"
    assert Image.open(first).size == (64, 64) and second.exists()
    text = read_png_text(first)
    assert text["parameters"] == (
        "a red circle, big\n"
        "Negative prompt: blurry\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, Model: tiny-sd1"
    )
    ours = json.loads(text["ldm"])
    assert ours["seed"] == 42 and ours["sampler"] == "dpmpp_2m" and ours["schedule"] == "karras"
    assert not list((tmp_path / "out").glob("*.part"))


def test_same_seed_same_bytes(tmp_path, tiny_single_file):
    for name in ("a.png", "b.png"):
        result = CliRunner().invoke(cli, ["generate", "a cat", "-m", str(tiny_single_file), "-s", "3",
                                          "-o", str(tmp_path / name), *TINY_ARGS])
        assert result.exit_code == 0, result.output
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
