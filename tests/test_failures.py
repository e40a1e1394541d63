"""Hostile and careless input through the real command line (issue 15): a broken model never makes a
black image called success, a signal or a closed pipe never loses finished work, leftovers of a killed
run are cleaned up, and the exit code says what happened."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from ldmcli.cli import cli

TINY = ["-W", "64", "-H", "64", "--steps", "2"]
LDM = [sys.executable, "-m", "ldmcli"]


def default_signals() -> None:
    """In the child before exec: SIGTERM and SIGINT at their defaults, whatever this process inherited
    (a shell or CI runner may start it with them ignored, and ldm leaves an ignored SIGTERM alone)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def assert_complete(path: Path) -> None:
    with Image.open(path) as image:
        image.load()


# --- NaN / Inf weights ------------------------------------------------------------------------------

NAN_IN = {
    # A NaN in the U-Net's last conv: every denoising step's output, hence the latents, are NaN.
    "unet": ("model.diffusion_model.out.2.weight", "non-finite latents after sampling (NaN/Inf)"),
    # A NaN in the VAE decoder's last conv: finite latents, NaN pixels, in fp32 and after the fp32 redo.
    "vae": ("first_stage_model.decoder.conv_out.weight", "non-finite image after VAE decode (NaN/Inf)"),
}


@pytest.fixture(scope="module", params=sorted(NAN_IN))
def nan_model(request, tiny_single_file, tmp_path_factory):
    """The tiny model with one NaN weight in the network `request.param` names; (path, expected message)."""
    key, message = NAN_IN[request.param]
    tensors = load_file(tiny_single_file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    path = tmp_path_factory.mktemp(f"nan-{request.param}") / f"nan-{request.param}.safetensors"
    save_file(tensors, path)
    return path, message


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nan_weight_fails_the_image_and_writes_no_png(nan_model, dtype, tmp_path):
    model, message = nan_model
    out = tmp_path / "out"
    result = invoke("generate", "a cat", "-m", model, *TINY, "-s", "1", "-b", "2", "--dtype", dtype,
                    "-o", f"{out}/", "--json")
    assert result.exit_code == 1, result.output
    assert not list(out.glob("*.png")) and not list(out.glob(".*.part"))
    errors = [r for r in json_lines(result.stdout) if "error" in r]
    assert [e["index"] for e in errors] == [0, 1]
    assert all(message in e["error"] for e in errors), errors
    assert message in result.stderr and "Traceback" not in result.stderr
    summary = json_lines(result.stdout)[-1]["summary"]
    assert summary["made"] == 0 and summary["failed"] == 2


# A value that poisons one image of a batch: NaN latents fail at sampling; latents far beyond any
# real ones (finite) make the VAE's GroupNorm overflow, so that image's pixels are NaN even in fp32.
POISON = {"latents": (float("nan"), "non-finite latents after sampling"),
          "pixels": (1e35, "non-finite image after VAE decode")}


@pytest.mark.parametrize("stage", sorted(POISON))
def test_one_non_finite_image_does_not_fail_the_rest_of_its_batch(stage, tiny_single_file, tmp_path, monkeypatch):
    from ldmcli import pipeline

    value, message = POISON[stage]
    sample = pipeline.sample_latents

    def second_image_poisoned(*args, **kwargs):
        latents = sample(*args, **kwargs).clone()  # an inference tensor is read-only outside inference mode
        latents[1] = value
        return latents

    monkeypatch.setattr(pipeline, "sample_latents", second_image_poisoned)
    out = tmp_path / "out"
    result = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-s", "1", "-b", "3", "--batch-size", "3",
                    "--dtype", "fp32", "-o", f"{out}/", "--json")
    assert result.exit_code == 1, result.output
    records = json_lines(result.stdout)
    assert [r["index"] for r in records if "error" in r] == [1]
    assert message in next(r["error"] for r in records if "error" in r)
    assert sorted(r["index"] for r in records if "path" in r and "error" not in r) == [0, 2]
    assert len(list(out.glob("*.png"))) == 2 and not list(out.glob(".*.part"))
    assert records[-1]["summary"]["made"] == 2 and records[-1]["summary"]["failed"] == 1


# --- SIGTERM ----------------------------------------------------------------------------------------

# As tests/test_cli.py's interruption test: enough steps that the signal sent when the first image's
# --json line arrives lands while the second image is being made.
SIGNAL_STEPS = 60


def test_sigterm_ends_like_ctrl_c_with_exit_143(tmp_path, tiny_single_file):
    out = tmp_path / "run"
    args = [*LDM, "generate", "a cat", "-m", tiny_single_file, "-s", "1", "-b", "4", "-W", "64", "-H", "64",
            "--steps", SIGNAL_STEPS, "-o", f"{out}/", "--json"]
    proc = subprocess.Popen([str(a) for a in args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        first = proc.stdout.readline()  # blocks until the first image is written
        assert "path" in json.loads(first), first
        proc.send_signal(signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "terminated" in stderr
    summary = json.loads(rest.splitlines()[-1])["summary"]
    assert summary["interrupted"] is True and 1 <= summary["made"] < 4
    done = sorted(out.glob("*.png"))
    assert len(done) == summary["made"] and not list(out.glob(".*.part"))
    for path in done:
        assert_complete(path)


# --- leftovers of a killed run ----------------------------------------------------------------------


def test_leftover_temp_files_are_removed_from_the_output_folder_only(tmp_path, tiny_single_file):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    leftover = out / ".00000-1.k3j4h5g6.png.part"  # save_png's temp name: .STEM.XXXXXXXX.png.part
    kept = [out / "notes.txt", out / "x.png.part", out / ".x.png.partial", out / ".x.abc.png.part",
            elsewhere / ".00000-1.zzzzzzzz.png.part"]
    busy = out / ".00007-8.abcdefgh.png.part"  # a live writer's: its lock is held
    for path in [leftover, *kept, busy]:
        path.write_bytes(b"\x89PNG half")
    with open(busy, "r+b") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)
        result = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-s", "1", "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    assert not leftover.exists()
    assert all(path.exists() for path in [*kept, busy])
    assert "removed 1 unfinished temporary file" in result.stderr
    assert_complete(out / "00000-1.png")


def test_a_cleaner_taking_a_new_temp_file_never_loses_the_image(tmp_path, monkeypatch):
    """Another run's cleanup may lock a temporary file in the instant between its creation and the
    writer's lock, and remove it: the writer notices (no name left) and writes another."""
    import tempfile

    import numpy as np

    from ldmcli.image import is_complete_png, remove_stale_temp_files, save_png

    real_mkstemp, raced = tempfile.mkstemp, []

    def mkstemp_then_a_cleaner(*args, **kwargs):
        made = real_mkstemp(*args, **kwargs)
        if not raced:
            raced.extend(remove_stale_temp_files(tmp_path))
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_a_cleaner)
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png", text={})
    assert len(raced) == 1  # the cleaner did take the first temporary file
    assert is_complete_png(tmp_path / "a.png") and [p.name for p in tmp_path.iterdir()] == ["a.png"]


# --- --skip-existing and incomplete PNGs ------------------------------------------------------------


def test_skip_existing_remakes_empty_and_truncated_pngs(tmp_path, tiny_single_file):
    out = tmp_path / "out"
    args = ["generate", "a cat", "-m", tiny_single_file, *TINY, "-s", "1", "-b", "3", "-o", f"{out}/"]
    assert invoke(*args).exit_code == 0
    good, truncated, empty = sorted(out.glob("*.png"))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    empty.write_bytes(b"")

    result = invoke(*args, "--skip-existing", "--json")
    assert result.exit_code == 0, result.output
    summary = json_lines(result.stdout)[-1]["summary"]
    assert (summary["skipped"], summary["made"]) == (1, 2)
    assert sorted(r["path"] for r in json_lines(result.stdout) if "path" in r) == [str(truncated), str(empty)]
    for path in (good, truncated, empty):
        assert_complete(path)


def test_is_complete_png(tmp_path):
    from ldmcli.image import is_complete_png

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    data = path.read_bytes()
    assert is_complete_png(path)
    for name, content in [("empty.png", b""), ("half.png", data[: len(data) // 2]), ("cut.png", data[:-1]),
                          ("text.png", b"not a png at all, but long enough to have a tail"),
                          ("iend-only.png", data[-12:])]:
        (tmp_path / name).write_bytes(content)
        assert not is_complete_png(tmp_path / name), name
    assert not is_complete_png(tmp_path / "missing.png")
    (tmp_path / "folder.png").mkdir()
    assert not is_complete_png(tmp_path / "folder.png")
    # never opened for reading in a way that blocks: a FIFO without a writer, a device
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    # a writer after 5 s releases an open() that blocks (the bug), so the test fails instead of hanging
    writer = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(5); open({str(fifo)!r}, 'wb').close()"])
    try:
        started = time.perf_counter()
        assert not is_complete_png(fifo) and time.perf_counter() - started < 2
    finally:
        writer.kill()
        writer.wait()
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    assert not is_complete_png(tmp_path / "zero.png")
    (tmp_path / "link.png").symlink_to(path)
    assert is_complete_png(tmp_path / "link.png")


# --- --json into a closed pipe ----------------------------------------------------------------------


def test_json_into_a_closed_pipe_still_makes_every_image(tmp_path, tiny_single_file):
    """`ldm generate --json ... | head -c 0`: the images are the work, stdout only its report."""
    out = tmp_path / "out"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    try:
        proc = subprocess.run([*LDM, "generate", "a cat", "-m", str(tiny_single_file), *TINY, "-s", "1", "-b", "3",
                               "-o", f"{out}/", "--json"], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "failed:" not in proc.stderr and "Exception ignored" not in proc.stderr
    assert "stdout was closed" in proc.stderr and "done: 3 made, 0 skipped, 0 failed" in proc.stderr
    made = sorted(out.glob("*.png"))
    assert len(made) == 3 and not list(out.glob(".*.part"))
    for path in made:
        assert_complete(path)


# --- --threads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [4 * os.cpu_count() + 1, 100000], ids=["limit+1", "100000"])
def test_threads_beyond_the_limit_are_refused_at_parse_time(threads, tmp_path):
    # The model does not exist: the refusal must come first, before any thread or model.
    result = invoke("generate", "a cat", "-m", tmp_path / "absent.safetensors", "--threads", threads)
    assert result.exit_code == 2, result.output
    assert "--threads" in result.output and f"at most {4 * os.cpu_count()}" in result.output


def test_threads_at_the_limit_are_accepted(tmp_path):
    result = invoke("generate", "a cat", "-m", tmp_path / "absent.safetensors", "--threads", 4 * os.cpu_count())
    assert result.exit_code == 2 and "not found" in result.output  # past parsing: the model is looked for


# --- --debug ----------------------------------------------------------------------------------------


def test_debug_shows_the_traceback_but_keeps_the_exit_code(tmp_path):
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    for model in (tmp_path / "absent.safetensors", corrupt):
        args = [*LDM, "generate", "a cat", "-m", str(model), "-o", str(tmp_path / "x.png")]
        plain = subprocess.run(args, capture_output=True, text=True, timeout=60)
        debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, timeout=60)
        assert plain.returncode == debug.returncode == 2, debug.stderr
        assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
        assert plain.stderr.strip().splitlines()[-1] in debug.stderr  # the same one-line message, too


# --- no stderr ---------------------------------------------------------------------------------------


def _stderr_gone(how: str):
    """(stderr argument, preexec_fn, cleanup) for a child whose stderr is closed (`2>&-`) or a pipe
    whose reader has left (`2>&1 | head -0`)."""
    if how == "closed":
        return None, lambda: os.close(2), lambda: None
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end, None, lambda: os.close(write_end)


@pytest.mark.parametrize("how", ["closed", "broken pipe"])
def test_no_stderr_still_makes_every_image(how, tmp_path, tiny_single_file):
    """`ldm generate ... 2>&-` exited 1 with no image and no message (sys.stderr is None, and the human
    lines went to stdout, into the --json records); with a stderr whose reader left, exit 0 and no image."""
    out = tmp_path / "out"
    stderr, preexec, cleanup = _stderr_gone(how)
    try:
        proc = subprocess.run([*LDM, "generate", "a cat", "-m", str(tiny_single_file), *TINY, "--dtype", "fp32", "-s", "1",
                               "-b", "2", "-o", f"{out}/", "--json"], stdout=subprocess.PIPE, stderr=stderr,
                              preexec_fn=preexec, text=True, timeout=120)
    finally:
        cleanup()
    assert proc.returncode == 0, proc.stdout
    records = [json.loads(line) for line in proc.stdout.splitlines()]  # nothing but the records on stdout
    assert [r["index"] for r in records[:-1]] == [0, 1] and records[-1]["summary"]["made"] == 2
    made = sorted(out.glob("*.png"))
    assert len(made) == 2 and not list(out.glob(".*.part"))
    for path in made:
        assert_complete(path)


@pytest.mark.parametrize("how", ["closed", "broken pipe"])
def test_no_stderr_keeps_the_exit_code_of_a_refusal(how, tmp_path):
    """The one-line error has nowhere to go; the exit code still says what happened (was 1 for a broken pipe)."""
    stderr, preexec, cleanup = _stderr_gone(how)
    try:
        proc = subprocess.run([*LDM, "generate", "a cat", "-m", str(tmp_path / "absent.safetensors"), "-o", f"{tmp_path}/"],
                              stdout=subprocess.PIPE, stderr=stderr, preexec_fn=preexec, text=True, timeout=60)
    finally:
        cleanup()
    assert proc.returncode == 2 and proc.stdout == ""


def test_closed_standard_streams_get_dev_null(tmp_path):
    """With stdout and stderr closed, the next files ldm opened took their numbers (1, 2): PyTorch's C++
    warnings, written to 2, would have gone into them. ldm puts /dev/null there first."""
    report = tmp_path / "report.txt"
    script = ("import sys\n"
              "from ldmcli.cli import cli\n"
              "try:\n"
              "    cli(['generate', 'a cat', '-m', 'absent.safetensors'])\n"
              "except SystemExit as exc:\n"
              f"    with open({str(report)!r}, 'w') as file:\n"
              "        file.write(f'{exc.code} {file.fileno()} {sys.stdout is not None} {sys.stderr is not None}')\n")
    proc = subprocess.run([sys.executable, "-c", script], preexec_fn=lambda: (os.close(1), os.close(2)), timeout=60)
    assert proc.returncode == 0 and report.read_text() == "2 3 True True"


# --- SIGTERM (or Ctrl-C) before the first image -------------------------------------------------------


def test_sigterm_while_reading_the_prompts_prints_the_summary(tmp_path, tiny_single_file):
    """`timeout 1.5 ldm generate ...` stopping it while it reads or plans: "ldm: terminated", exit 143,
    but no summary (stderr) and no --json summary. Here it waits on a prompt FIFO (`--prompts <(...)`)
    that is given nothing, so the signal surely lands before the first image."""
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*LDM, "generate", "--prompts", str(fifo), "-m", str(tiny_single_file), "-o", f"{tmp_path}/",
                             "--json"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=default_signals, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None:  # opens once ldm has opened the FIFO to read it
            try:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # say where it is stuck: faulthandler prints every stack on SIGABRT
            proc.send_signal(signal.SIGABRT)
            stdout, stderr = proc.communicate(timeout=10)
            pytest.fail(f"ldm did not end 30 s after SIGTERM; its stacks:\n{stderr}")
    finally:
        proc.kill()
        if writer is not None:
            os.close(writer)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-2:] == ["terminated (SIGTERM): finished images are saved; re-run with --skip-existing "
                                        "to make the rest", "done: 0 made, 0 skipped, 0 failed in 0.0 s"]
    assert json.loads(stdout) == {"summary": {"made": 0, "skipped": 0, "failed": 0, "total": 0, "interrupted": True,
                                              "seconds": 0.0}}


@pytest.mark.parametrize("stage", ["ldmcli.run.plan_images", "ldmcli.run.check_outputs", "ldmcli.run.recommended_defaults"])
def test_interrupt_while_planning_prints_the_summary(stage, tmp_path, tiny_single_file, monkeypatch):
    """An interrupt in any stage before the first image: the summary, then its exit code (143 for SIGTERM)."""
    from ldmcli.errors import Terminated

    def stopped(*args, **kwargs):
        raise Terminated(signal.SIGTERM)

    monkeypatch.setattr(stage, stopped)
    result = CliRunner().invoke(cli, ["generate", "a cat", "-b", "3", "-m", str(tiny_single_file), "-o", f"{tmp_path}/",
                                      "--json"])
    assert result.exit_code == 143, result.output
    assert "terminated (SIGTERM)" in result.stderr and "done: 0 made, 0 skipped, 0 failed" in result.stderr
    summary = json.loads(result.stdout.splitlines()[-1])["summary"]
    assert summary["interrupted"] is True and summary["made"] == 0
    assert not list(tmp_path.glob("*.png"))
