"""The command line as scripts use it: validation before loading, exit codes, batches, resume, metadata."""

from __future__ import annotations

import json
import os
import signal
import selectors
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ldmcli.cli import cli
from ldmcli.metadata import A1111_PARAM, parse_a1111, read_png_text

TINY = ["-W", "64", "-H", "64", "--steps", "4"]


def invoke(*args, env=None, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, input=input)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- help and usage -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["generate"], ["samplers"], ["models"], ["info"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_samplers_lists_every_sampler_and_alias():
    out = invoke("samplers").output
    for name, display in [("euler_a", "Euler a"), ("dpmpp_2m", "DPM++ 2M"), ("plms", "PLMS"), ("karras", "Karras")]:
        assert name in out and display in out
    assert "Euler a (k_euler_a, k_euler_ancestral)" in out and "DPM++ 2M SDE (k_dpmpp_2m_sde)" in out


def test_generate_help_names_what_p_takes():
    """-p is --prompt TEXT; a file of prompts is --prompts FILE."""
    out = " ".join(invoke("generate", "--help").output.split())
    assert "(or -p/--prompt TEXT, --prompts FILE, --from-png IMAGE)" in out and "-p, --prompt TEXT" in out
    assert "(or -p, --prompts FILE" not in out
    result = invoke("generate")
    assert "(or -p TEXT, --prompts FILE, --from-png IMAGE)" in result.stderr


def test_a_prompt_that_names_a_prompt_file_is_text_and_said(tmp_path, tiny_single_file, monkeypatch):
    """`-p lines.txt` with lines.txt a file: the prompt is still the words "lines.txt" (unchanged), with a note."""
    monkeypatch.chdir(tmp_path)
    Path("lines.txt").write_text("a cat\n")
    Path("jobs.JSONL").write_text('{"prompt": "a cat"}\n')
    result = invoke("generate", "-p", "lines.txt", "jobs.JSONL", "missing.txt", "a cat.txt", "-m", tiny_single_file,
                    *TINY, "--json", "-o", "out/")
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in json_lines(result.stdout) if "path" in r] == ["jobs.JSONL", "missing.txt", "a cat.txt",
                                                                               "lines.txt"]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert notes == [(f'note: the prompt "{name}" is the name of a file: it is used as the prompt\'s text, not read; '
                      f"--prompts {name} reads prompts from the file") for name in ("jobs.JSONL", "lines.txt")]
    quiet = invoke("generate", "-p", "lines.txt", "-m", tiny_single_file, *TINY, "-q", "-o", "quiet/")
    assert quiet.exit_code == 0 and quiet.stderr == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["-W", "500"], "500 is not a positive multiple of 8"),
        (["-H", "0"], "0 is not a positive multiple of 8"),
        (["--steps", "0"], "--steps"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--schedule", "nope"], "--schedule"),
        (["--device", "tpu"], "--device"),
        (["--overwrite", "--skip-existing"], "contradict"),
        (["-o", "out/{nope}.png"], "unknown field {nope}"),
        (["-o", "out/image.jpg"], "must end in .png"),
        (["--tile-vae", "sometimes"], "--tile-vae"),
        (["--threads", "0"], "--threads"),
        (["--dtype", "fp8"], "--dtype"),
    ],
)
def test_usage_errors_exit_2_before_loading(args, message, tmp_path):
    # The model does not exist: every usage error must be found before the model is even looked for.
    result = invoke("generate", "a cat", "-m", tmp_path / "absent.safetensors", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_no_prompt_is_a_usage_error():
    result = invoke("generate")
    assert result.exit_code == 2 and "give a prompt" in result.output


def test_missing_model_names_where_it_looked(tmp_path):
    result = invoke("generate", "a cat", "-m", "no-such-model", env={"LDM_MODELS_DIR": str(tmp_path)})
    assert result.exit_code == 2
    assert result.output.startswith("ldm: error: model 'no-such-model' not found")
    assert str(tmp_path) in result.output and "huggingface" in result.output


def test_corrupt_model_one_line_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    proc = subprocess.run([sys.executable, "-m", "ldmcli", "generate", "a cat", "-m", str(bad), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "bad.safetensors: not a readable safetensors file" in proc.stderr


# --- prompt files ---------------------------------------------------------------------------------


def test_malformed_jsonl_names_the_line_before_loading(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "steps": "many"}\n')
    result = invoke("generate", "--prompts", prompts, "-m", tmp_path / "absent.safetensors")
    assert result.exit_code == 2
    assert f"{prompts}:3: \"steps\" must be a whole number" in result.output


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x", "colour": "red"}', "unknown field(s) colour"),
    ('{"steps": 3}', '"prompt" (a string) is required'),
    ('{"prompt": "x", "width": 100}', "width 100 is not a positive multiple of 8"),
    ('{"prompt": "x", "sampler": "bogus"}', "unknown sampler 'bogus'"),
])
def test_jsonl_errors(tmp_path, tiny_single_file, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n' + line + "\n")
    result = invoke("generate", "--prompts", prompts, "-m", tiny_single_file, "-o", f"{tmp_path / 'out'}/")
    assert result.exit_code == 2
    assert f"{prompts}:2: " in result.output and message in result.output
    assert not (tmp_path / "out").exists()


def test_unreadable_prompt_file(tmp_path):
    result = invoke("generate", "--prompts", tmp_path / "missing.txt", "-m", "whatever")
    assert result.exit_code == 2 and "cannot read prompt file" in result.output


def test_jsonl_overrides_and_text_file_comments(tmp_path, tiny_single_file):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a cat", "seed": 7, "steps": 3, "sampler": "DPM++ 2M Karras", "batch_count": 2, "name": "cat"}\n'
        '# a comment\n'
        '{"prompt": "a dog", "negative_prompt": "blurry", "width": 72, "cfg_scale": 1}\n'
    )
    result = invoke("generate", "--prompts", prompts, "-m", tiny_single_file, "-s", "100", *TINY, "--json",
                    "-o", tmp_path / "{name}-{seed}.png")
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    cat1, cat2, dog, summary = records
    assert (cat1["seed"], cat2["seed"], cat1["steps"], cat1["sampler"], cat1["schedule"]) == (7, 8, 3, "dpmpp_2m", "karras")
    assert cat1["path"] == str(tmp_path / "cat-7.png")
    assert (dog["seed"], dog["width"], dog["height"], dog["cfg_scale"], dog["negative_prompt"]) == (100, 72, 64, 1.0, "blurry")
    assert Image.open(dog["path"]).size == (72, 64)
    assert summary["summary"]["made"] == 3 and summary["summary"]["failed"] == 0

    text = tmp_path / "p.txt"
    text.write_text("# header\n\na cat\n  \na dog\n")
    result = invoke("generate", "--prompts", text, "-m", tiny_single_file, "-s", "1", *TINY, "--json", "-o", f"{tmp_path / 't'}/")
    assert [r["prompt"] for r in json_lines(result.stdout)[:-1]] == ["a cat", "a dog"]


def test_prompts_from_stdin(tmp_path, tiny_single_file):
    result = invoke("generate", "--prompts", "-", "-m", tiny_single_file, *TINY, "--json", "-o", f"{tmp_path / 'o'}/",
                    input='{"prompt": "from stdin", "seed": 3}\n')
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["prompt"] == "from stdin"


# --- seeds are properties of the image, not of the batch -----------------------------------------


def test_image_independent_of_batch_size_position_and_neighbours(tmp_path, tiny_single_file):
    # fp32: the one-level bound is fp32's (bf16 rounds batched kernels' differences more coarsely).
    fp32 = ("--dtype", "fp32")
    alone = tmp_path / "alone"
    assert invoke("generate", "a red circle", "-s", "40", "-b", "3", "-m", tiny_single_file, *TINY, *fp32, "-o", f"{alone}/").exit_code == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "something else", "seed": 5, "batch_count": 2}\n{"prompt": "a red circle", "seed": 40, "batch_count": 3}\n')
    for batch_size in ("1", "2", "3"):
        mixed = tmp_path / f"mixed{batch_size}"
        result = invoke("generate", "--prompts", prompts, "-m", tiny_single_file, *TINY, *fp32, "--batch-size", batch_size,
                        "-o", f"{mixed}/")
        assert result.exit_code == 0, result.output
        for i in range(3):
            a, b = pixels(alone / f"{i:05d}-{40 + i}.png"), pixels(mixed / f"{i + 2:05d}-{40 + i}.png")
            if batch_size == "1":  # same U-Net batches: bit for bit, wherever the job sits in the file
                assert np.array_equal(a, b)
            else:  # batched BLAS kernels may round differently: never more than one level
                assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# --- outputs --------------------------------------------------------------------------------------


def test_existing_output_refused_before_loading(tmp_path, tiny_single_file):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-o", out, *TINY)
    assert result.exit_code == 2
    assert "exists: use --skip-existing to keep it or --overwrite to replace it" in result.output
    assert out.read_bytes() == b"precious"


def test_output_under_a_file_is_refused(tmp_path, tiny_single_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-o", blocker / "x.png")
    assert result.exit_code == 2 and "cannot write" in result.output


def test_unwritable_output_dir(tmp_path, tiny_single_file, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere (CI runs as root): deny it the way the OS denies others
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode))
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-o", locked / "x.png")
    assert result.exit_code == 2 and "cannot write" in result.output


def test_template_that_names_two_images_alike(tmp_path, tiny_single_file):
    result = invoke("generate", "a cat", "a dog", "-s", "1", "-m", tiny_single_file, "-o", tmp_path / "{seed}.png")
    assert result.exit_code == 2 and "names two images" in result.output and "such as {index}" in result.output


def test_env_defaults_and_flags_win(tmp_path, tiny_single_file):
    env = {"LDM_MODEL": str(tiny_single_file), "LDM_OUTPUT_DIR": str(tmp_path / "envout"), "LDM_DEVICE": "cpu"}
    assert invoke("generate", "a cat", "-s", "2", *TINY, env=env).exit_code == 0
    assert (tmp_path / "envout" / "00000-2.png").exists()
    result = invoke("generate", "a cat", "-s", "2", *TINY, "-o", tmp_path / "flag.png", "-m", tmp_path / "nope.safetensors", env=env)
    assert result.exit_code == 2 and "nope.safetensors" in result.output  # -m beats LDM_MODEL


def test_models_found_by_name_in_models_dir_and_hf_cache(tmp_path, tiny_single_file, tiny_folder):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "mine.safetensors").symlink_to(tiny_single_file)
    snapshot = tmp_path / "hub" / "models--someone--tiny-sd" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_folder, target_is_directory=True)
    env = {"LDM_MODELS_DIR": str(models_dir), "HF_HUB_CACHE": str(tmp_path / "hub")}
    listing = invoke("models", env=env).output
    assert "mine" in listing and "someone/tiny-sd" in listing and "huggingface cache" in listing
    for name in ("mine", "someone/tiny-sd", "tiny-sd"):
        result = invoke("generate", "a cat", "-m", name, "-s", "1", *TINY, "-o", tmp_path / f"{name.replace('/', '_')}.png", env=env)
        assert result.exit_code == 0, result.output


def test_json_and_quiet_keep_stdout_machine_readable(tmp_path, tiny_single_file):
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-s", "1", "-b", "2", *TINY, "--json", "--quiet",
                    "-o", f"{tmp_path / 'o'}/")
    assert result.exit_code == 0
    assert result.stderr == ""
    records = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is JSON
    assert [r.get("seed") for r in records[:2]] == [1, 2] and records[-1]["summary"]["made"] == 2
    assert {"path", "prompt", "seed", "steps", "cfg_scale", "sampler", "schedule", "width", "height", "model", "seconds"} <= set(records[0])


def test_grid(tmp_path, tiny_single_file):
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-s", "1", "-b", "3", *TINY, "--grid", "-o", f"{tmp_path / 'g'}/")
    assert result.exit_code == 0
    grid = Image.open(tmp_path / "g" / "grid.png")
    assert grid.size[0] >= 128 and grid.size[1] > 128


def test_one_failure_does_not_stop_the_batch(tmp_path, tiny_single_file, monkeypatch):
    from ldmcli import pipeline

    real = pipeline.sample_latents

    def flaky(model, request, seeds, **kw):
        if request.prompt == "explodes":
            raise RuntimeError("simulated failure")
        return real(model, request, seeds, **kw)

    monkeypatch.setattr(pipeline, "sample_latents", flaky)
    args = ["generate", "a cat", "explodes", "a dog", "-m", tiny_single_file, "-s", "1", *TINY, "--json"]
    result = invoke(*args, "-o", f"{tmp_path / 'a'}/")
    assert result.exit_code == 1
    records = json_lines(result.stdout)
    assert [("error" in r) for r in records[:3]] == [False, True, False]
    assert records[-1]["summary"]["failed"] == 1 and records[-1]["summary"]["made"] == 2
    result = invoke(*args, "--fail-fast", "-o", f"{tmp_path / 'b'}/")
    assert result.exit_code == 1 and len(list((tmp_path / "b").glob("*.png"))) == 1


def test_last_batch_decodes_without_the_unet(tmp_path, tiny_single_file, monkeypatch):
    """The U-Net is released after the run's last denoising step, before its decode (the memory peak),
    and not before: every image is still made."""
    from ldmcli import pipeline

    events = []
    for name in ("sample_latents", "release_unet", "decode_latents"):
        real = getattr(pipeline, name)

        def spy(*args, real=real, name=name, **kw):
            events.append(name)
            return real(*args, **kw)

        monkeypatch.setattr(pipeline, name, spy)
    args = ["generate", "a cat", "-m", tiny_single_file, "-s", "1", "-b", "3", "--batch-size", "2", *TINY]
    assert invoke(*args, "-o", f"{tmp_path / 'a'}/").exit_code == 0
    assert events == ["sample_latents", "decode_latents", "sample_latents", "release_unet", "decode_latents"]
    assert len(list((tmp_path / "a").glob("*.png"))) == 3


# --- metadata -------------------------------------------------------------------------------------


def test_png_metadata_is_a1111_format(tmp_path, tiny_single_file):
    prompt = "a cat: big, fluffy\nsecond line"
    result = invoke("generate", prompt, "-n", "blurry, dark", "-m", tiny_single_file, "-s", "42",
                    "--sampler", "DPM++ 2M Karras", "--cfg-scale", "7", *TINY, "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.output
    text = read_png_text(tmp_path / "x.png")["parameters"]
    *_, last = text.split("\n")
    assert len(A1111_PARAM.findall(last)) >= 3  # A1111's own test for "this is the parameters line"
    assert last.startswith("Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, Model hash: ")
    parsed = parse_a1111(text)
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == "blurry, dark"
    assert parsed["Model"] == "tiny-sd1" and len(parsed["Model hash"]) == 10
    assert parsed["Version"] == "ldm 0.1.0"  # a value with ':'-free text stays unquoted


def test_from_png_reproduces_bytes(tmp_path, tiny_single_file):
    first = tmp_path / "first.png"
    assert invoke("generate", "a red circle", "-n", "x, y", "-m", tiny_single_file, "-s", "9", "--sampler", "euler_a",
                  *TINY, "-o", first).exit_code == 0
    again = tmp_path / "again.png"
    result = invoke("generate", "--from-png", first, "-o", again)  # model found from the image's own record
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == first.read_bytes()
    other = tmp_path / "other.png"
    assert invoke("generate", "--from-png", first, "-s", "10", "-o", other).exit_code == 0  # flags override
    assert json.loads(read_png_text(other)["ldm"])["seed"] == 10


def test_compute_dtype_is_recorded_and_reused(tmp_path, tiny_single_file):
    """bf16 and fp32 give other pixels for one seed: the record says which, and --from-png reuses it."""
    first = tmp_path / "fp32.png"
    result = invoke("generate", "a cat", "-m", tiny_single_file, "-s", "3", "--dtype", "fp32", *TINY, "-o", first, "--json")
    assert result.exit_code == 0, result.output
    assert "running fp32 (requested)" in result.output
    assert json.loads(read_png_text(first)["ldm"])["model"]["dtype"] == "fp32"
    again = tmp_path / "again.png"
    assert invoke("generate", "--from-png", first, "-o", again).exit_code == 0
    assert again.read_bytes() == first.read_bytes()
    bf16 = tmp_path / "bf16.png"
    assert invoke("generate", "--from-png", first, "--dtype", "bf16", "-o", bf16).exit_code == 0
    assert json.loads(read_png_text(bf16)["ldm"])["model"]["dtype"] == "bf16"


def test_tiled_decode_from_the_command_line(tmp_path, tiny_single_file, monkeypatch):
    """--tile-vae on/off reach the decoder as (tile, overlap) or None (here 32 px tiles, 8 px overlaps)."""
    from ldmcli import pipeline, run

    monkeypatch.setattr(run, "VAE_TILE_PIXELS", 32)
    monkeypatch.setattr(run, "VAE_TILE_OVERLAP_PIXELS", 8)
    calls = []
    real = pipeline.decode_latents

    def spy(model, latents, tile=None, **kw):
        calls.append(tile)
        return real(model, latents, tile=tile, **kw)

    monkeypatch.setattr(pipeline, "decode_latents", spy)
    args = ["generate", "a cat", "-m", tiny_single_file, "-s", "5", "--dtype", "fp32", "-W", "96", "-H", "64", "--steps", "4"]
    assert invoke(*args, "--tile-vae", "off", "-o", tmp_path / "whole.png").exit_code == 0
    result = invoke(*args, "--tile-vae", "on", "-o", tmp_path / "tiled.png")
    assert result.exit_code == 0, result.output
    assert calls == [None, (4, 1)]  # latent pixels at the tiny model's 8x factor
    # the tiles really were decoded separately (seam-free blending is tested in test_runtime.py)
    assert not np.array_equal(pixels(tmp_path / "whole.png"), pixels(tmp_path / "tiled.png"))


def test_auto_tiling_threshold():
    from ldmcli.run import AUTO_TILE_PIXELS, vae_tile

    assert vae_tile("auto", 1024, 1024, 8) is None  # SD's sizes decode whole
    assert vae_tile("auto", 1024, 1032, 8) == (64, 16) and 1024 * 1032 > AUTO_TILE_PIXELS  # 512 px tiles, 128 px overlaps
    assert vae_tile("on", 64, 64, 4) == (128, 32)
    assert vae_tile("off", 4096, 4096, 8) is None


def test_from_a1111_only_png(tmp_path, tiny_single_file):
    first = tmp_path / "first.png"
    assert invoke("generate", "a cat, sitting", "-m", tiny_single_file, "-s", "3", "--sampler", "DPM++ 2M Karras",
                  *TINY, "-o", first).exit_code == 0
    foreign = tmp_path / "foreign.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", read_png_text(first)["parameters"])
    Image.open(first).save(foreign, pnginfo=info)
    again = tmp_path / "again.png"
    result = invoke("generate", "--from-png", foreign, "-m", tiny_single_file, "-o", again)
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(again), pixels(first))


def test_info_image_and_model(tmp_path, tiny_single_file):
    out = tmp_path / "x.png"
    assert invoke("generate", "a cat", "-m", tiny_single_file, "-s", "5", *TINY, "-o", out).exit_code == 0
    shown = json.loads(invoke("info", out, "--json").output)
    assert shown["prompt"] == "a cat" and shown["seed"] == 5 and shown["model"]["name"] == "tiny-sd1"
    model = json.loads(invoke("info", tiny_single_file, "--json").output)
    assert model["family"] == "sd1" and model["unet_parameters"] > 0 and len(model["hash"]) == 10


def test_info_of_an_a1111_image_shows_only_what_it_records(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 12, Seed: 7, Size: 64x96")
    path = tmp_path / "foreign.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    shown = json.loads(invoke("info", path, "--json").output)
    # No sampler, CFG or size in the text: none shown (ldm's defaults are not what that tool used).
    recorded = {k: v for k, v in shown.items() if k not in ("path", "made_by", "model", "parameters", "not_honoured", "notes")}
    # No RNG: A1111's default, its GPU noise, which is what an NVIDIA GPU draws (--rng nv); said in the notes.
    # No Pad conds: A1111's default, off.
    assert recorded == {"prompt": "a cat", "negative_prompt": "", "steps": 12, "seed": 7, "width": 64, "height": 96,
                        "rng": "nv", "pad_conds": False, "match": "a1111"}, shown
    assert shown["not_honoured"] == [] and [n["key"] for n in shown["notes"]] == ["RNG", "Match"]


# --- interruption ---------------------------------------------------------------------------------

# Steps per image in the interruption test: about a second an image with the tiny model here, so the
# Ctrl-C sent after the first image lands while the second is being made.
INTERRUPT_STEPS = 60


def test_interrupt_then_resume(tmp_path, tiny_single_file):
    """Ctrl-C mid-batch: exit 130, finished images intact; --skip-existing makes only the rest.

    Ctrl-C is sent when the first image's --json line arrives, so the test does not depend on how
    fast the machine is; an image takes long enough (INTERRUPT_STEPS) that the batch is still running.
    """
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ldmcli", "generate", "a cat", "-m", str(tiny_single_file), "-s", "1", "-b", "4",
            "-W", "64", "-H", "64", "--steps", str(INTERRUPT_STEPS), "-o", f"{out}/", "--json"]
    # A shell's background job (`pytest &`, CI runners) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child Ctrl-C's default disposition back.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # The first image's --json line (or the end of the process), within a generous deadline.
        ready = selectors.DefaultSelector()
        ready.register(proc.stdout, selectors.EVENT_READ)
        assert ready.select(timeout=300), "no image within 300 s"
        first = proc.stdout.readline()
        assert first and "path" in json.loads(first), (first, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    done = sorted(out.glob("*.png"))
    assert 1 <= len(done) < 4 and not list(out.glob("*.part"))
    for path in done:
        Image.open(path).load()  # complete, valid PNGs
    assert json.loads(rest.splitlines()[-1])["summary"]["interrupted"] is True

    resumed = subprocess.run([*args, "--skip-existing"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.splitlines()[-1])["summary"]
    assert summary["skipped"] == len(done) and summary["made"] == 4 - len(done)
    assert len(list(out.glob("*.png"))) == 4


def test_many_processes_share_a_batch(tmp_path, tiny_single_file):
    """Under torchrun/`accelerate launch`, each process makes its share; the images are the single-process ones."""
    args = ["-m", "ldmcli", "generate", "a cat", "a dog", "-s", "1", "-b", "3", "-m", str(tiny_single_file), *TINY]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # CPU kernels' rounding depends on the thread count
    single, shared = tmp_path / "single", tmp_path / "shared"
    subprocess.run([sys.executable, *args, "-o", f"{single}/"], check=True, capture_output=True, env=one_thread)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args, "-o", f"{shared}/", "--json", "--grid"],
        capture_output=True, text=True, env=one_thread, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summaries = [r["summary"] for r in json_lines(proc.stdout) if "summary" in r]
    assert sorted((s["process"], s["made"]) for s in summaries) == [(0, 3), (1, 3)]
    for path in single.glob("*.png"):
        assert np.array_equal(pixels(path), pixels(shared / path.name))
    assert (shared / "grid.png").exists()


def test_random_seed_when_none_is_given_is_recorded(tmp_path, tiny_single_file):
    """No -s: each run draws its own seed, and the file name and the record say which."""
    seeds = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        result = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-o", f"{out}/", "--json")
        assert result.exit_code == 0, result.output
        (made,) = [json.loads(line) for line in result.output.splitlines() if '"path"' in line]
        assert Path(made["path"]).name == f"00000-{made['seed']}.png"
        assert json.loads(read_png_text(Path(made["path"]))["ldm"])["seed"] == made["seed"]
        seeds.append(made["seed"])
    assert seeds[0] != seeds[1]


def test_a_json_record_is_one_write(monkeypatch):
    """Processes of one run (torchrun) share stdout: each record goes out in one write, newline included,
    so that no other process's line lands inside it (print() writes the newline apart: unbuffered, as under
    PYTHONUNBUFFERED, two lines could interleave)."""
    import io

    from ldmcli.run import Report

    class Writes(io.StringIO):
        calls: list[str] = []

        def write(self, text):
            self.calls.append(text)
            return super().write(text)

    out = Writes()
    monkeypatch.setattr(sys, "stdout", out)
    Report(json=True, quiet=True).emit({"path": "x.png", "prompt": "a cat \u2028 é"})
    assert len(out.calls) == 1 and out.calls[0].endswith("\n") and out.calls[0].count("\n") == 1
    assert json.loads(out.calls[0]) == {"path": "x.png", "prompt": "a cat \u2028 é"}
