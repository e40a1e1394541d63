"""Careless and hostile input on the command line, in prompt files and in PNGs: refused with one line
and exit 2 before the model loads, never a crash, never a write outside the output folder.
Through the real CLI (click's runner, or a subprocess where the OS's view of argv/stdin matters),
plus Hypothesis fuzzing of the prompt-file reader and the template expander."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmcli.cli import cli
from ldmcli.errors import LdmError
from ldmcli.jobs import check_job, command_line_job, read_prompt_file
from ldmcli.limits import MAX_IMAGES_PER_RUN, MAX_NAME_BYTES
from ldmcli.outputs import plan_images

TINY = ["-W", "64", "-H", "64", "--steps", "1", "--dtype", "fp32"]


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def refused(result, message: str) -> None:
    """Exit 2, one line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def no_pngs(folder: Path) -> None:
    assert not list(folder.rglob("*.png")) if folder.exists() else True


# --- non-finite numbers ---------------------------------------------------------------------------


def test_nan_cfg_scale_flag(tmp_path, tiny_single_file):
    refused(invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--cfg-scale", "nan", "-o", f"{tmp_path}/"),
            "cfg_scale must be a finite number, got nan")
    no_pngs(tmp_path)


def test_nan_and_inf_in_jsonl(tmp_path, tiny_single_file):
    for number in ("NaN", "Infinity", "-Infinity", "1e999"):
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"prompt": "a cat", "cfg_scale": %s}\n' % number)
        refused(invoke("generate", "--prompts", prompts, "-m", tiny_single_file, "-o", f"{tmp_path}/out/"),
                f'{prompts}:1: "cfg_scale" must be a finite number')
    no_pngs(tmp_path)


def test_nan_cfg_scale_in_a_png_record(tmp_path, tiny_single_file):
    from ldmcli.image import save_png

    record = {"prompt": "a cat", "seed": 1, "steps": 1, "cfg_scale": float("nan"), "sampler": "euler",
              "width": 64, "height": 64}
    png = tmp_path / "made.png"
    save_png(__import__("numpy").zeros((8, 8, 3), "uint8"), png, text={"ldm": json.dumps(record)})
    refused(invoke("generate", "--from-png", png, "-m", tiny_single_file, "-o", f"{tmp_path}/out/"),
            "cfg_scale")
    no_pngs(tmp_path / "out")


# --- names are file names, never paths -----------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("../../escaped", "must be a file name, not a path"),
    ("/etc/absolute", "must be a file name, not a path"),
    ("a\\b", "must be a file name, not a path"),
    ("..", "must be a file name, not a path"),
    ("nul\u0000byte", "must be a file name, not a path"),
    ("x" * (MAX_NAME_BYTES + 1), "more than a file name may be (255)"),
    ("\udc80", "not valid Unicode"),
])
def test_jsonl_name_is_a_file_name(tmp_path, tiny_single_file, name, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "name": name}) + "\n")
    out = tmp_path / "deep" / "out"
    refused(invoke("generate", "--prompts", prompts, "-m", tiny_single_file, "-o", f"{out}/{{name}}.png"), message)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("template, message", [
    ("{name:/>9}.png", "no conversion, nested field or path separator"),
    ("{name!r}.png", "no conversion, nested field or path separator"),
    ("{index:{seed}}.png", "no conversion, nested field or path separator"),
    ("{index:0100000000d}.png", "wider than a file name may be"),
    ("{index:" + "9" * 2000 + "d}.png", "wider than a file name may be"),
    ("{index:" + "9" * 5000 + "d}.png", "longer than a path may be (4096 bytes)"),
    ("{prompt_slug:>250}{name:>250}.png", "longer than the file system allows"),
])
def test_templates_that_would_escape_or_explode(tmp_path, tiny_single_file, template, message):
    started = time.perf_counter()
    refused(invoke("generate", "a cat", "-m", tiny_single_file, "-o", f"{tmp_path}/{template}"), message)
    assert time.perf_counter() - started < 5


# --- limits checked before the model loads ---------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--steps", "1001"], "1001 is not in the range 1<=x<=1000"),
    (["-s", str(2**64)], "is not in the range 0<=x<=18446744073709551615"),
    (["-s", str(2**64 - 1), "-b", "2"], "(the job's last image) is beyond 2^64 - 1"),
    (["-b", "1000000000"], "is not in the range 1<=x<=100000"),
    (["-W", "4096", "-H", "4096"], "more than the limit of 4,194,304 (--max-pixels raises it)"),
])
def test_limits_on_the_command_line(tmp_path, tiny_single_file, args, message):
    started = time.perf_counter()
    result = invoke("generate", "a cat", *args, "-m", tiny_single_file, "-o", f"{tmp_path}/")
    assert result.exit_code == 2 and message in result.output, result.output
    assert time.perf_counter() - started < 5


def test_max_pixels_lifts_the_size_limit(tmp_path, tiny_single_file):
    (tmp_path / "00000-1.png").write_bytes(b"")  # stop right after validation: the output exists
    result = invoke("generate", "a cat", "-s", "1", "-W", "4096", "-H", "4096", "--max-pixels", str(4096 * 4096),
                    "-m", tiny_single_file, "-o", f"{tmp_path}/")
    refused(result, "exists")


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "steps": 5000}', "steps must be between 1 and 1000, got 5000"),
    ('{"prompt": "a cat", "seed": 18446744073709551615, "batch_count": 2}', "is beyond 2^64 - 1"),
    ('{"prompt": "a cat", "seed": 18446744073709551616}', "seed must be between 0 and 2^64 - 1"),
    ('{"prompt": "a cat", "batch_count": 1000000000}', "batch_count must be between 1 and 100,000"),
    ('{"prompt": "a cat", "width": 65536, "height": 65536}', "more than the limit"),
    ('{"prompt": "a \\ud800 cat"}', "prompt is not valid Unicode: a lone surrogate"),
    ('[' * 100_000 + ']' * 100_000, "not usable JSON (RecursionError"),
    ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", "not usable JSON (ValueError"),
])
def test_limits_in_prompt_files(tmp_path, tiny_single_file, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(line + "\n")
    started = time.perf_counter()
    refused(invoke("generate", "--prompts", prompts, "-m", tiny_single_file, "-o", f"{tmp_path}/"), message)
    assert time.perf_counter() - started < 5
    no_pngs(tmp_path)


def test_many_jobs_beyond_the_run_limit_fail_fast(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "batch_count": 1000}\n' * (MAX_IMAGES_PER_RUN // 1000 + 1))
    started = time.perf_counter()
    result = invoke("generate", "--prompts", prompts, "-m", "weights/ldm-demo.safetensors", "-o", f"{tmp_path}/")
    assert result.exit_code == 2 and "101,000 images in one run: the limit is 100,000" in result.output, result.output
    assert time.perf_counter() - started < 10


# --- text that is not what it seems -------------------------------------------------------------------


def test_invalid_utf8_in_argv(tmp_path, tiny_single_file):
    """The OS hands Python bytes; invalid UTF-8 becomes lone surrogates, refused before loading."""
    proc = subprocess.run([sys.executable, "-m", "ldmcli", "generate", b"a \xff cat", "-m", str(tiny_single_file),
                           "-o", f"{tmp_path}/"], capture_output=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert b"prompt is not valid Unicode" in proc.stderr and b"Traceback" not in proc.stderr
    no_pngs(tmp_path)


def test_invalid_utf8_prompt_file(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a cat\na \xff dog\n")
    refused(invoke("generate", "--prompts", prompts, "-m", tmp_path / "absent.safetensors"),
            f"{prompts}:2: not UTF-8 (byte 0xff at offset 8)")


def test_closed_stdin(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldmcli", "generate", "--prompts", "-", "-m", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2 and "standard input is closed" in proc.stderr, proc.stderr


def test_bom_and_unicode_line_separators(tmp_path, tiny_single_file):
    """A BOM is not part of the first prompt; U+2028 and U+0085 do not split a prompt (only \\n does)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("\ufeffa cat\nsun\u2028moon\r\nfork\u0085spoon\n", encoding="utf-8")
    result = invoke("generate", "--prompts", prompts, "-m", tiny_single_file, *TINY, "-s", "1", "-o", f"{tmp_path}/",
                    "--json", "-q")
    assert result.exit_code == 0, result.output
    made = [json.loads(line) for line in result.output.splitlines() if '"path"' in line]  # escaped: one a line
    assert [m["prompt"] for m in made] == ["a cat", "sun\u2028moon", "fork\u0085spoon"]


# --- fuzzing ----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass"))),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_fuzz_prompt_file_reader(tmp_path, data, suffix):
    """Any bytes: jobs whose requests pass or fail `check_job` with an LdmError, or one LdmError; nothing else."""
    path = tmp_path / f"p{suffix}"
    path.write_bytes(data)
    try:
        jobs = read_prompt_file(str(path), command_line_job({}))
    except LdmError:
        return
    for job in jobs:
        try:
            check_job(job)
        except LdmError:
            pass


_VALUE = st.text(max_size=40)
_TEMPLATE_PART = st.one_of(
    st.sampled_from(["{index}", "{seed}", "{name}", "{prompt_slug}", "{steps:04d}", "{name:>12}", "{sampler}", "/",
                     "../", "{", "}", "{{", ":", "{cfg_scale:.1f}", "{width}x{height}", "{job}-{image}"]),
    st.text(alphabet="ab._-/\\{}:0123456789", max_size=8),
)


@settings(max_examples=400, deadline=2000)
@given(parts=st.lists(_TEMPLATE_PART, max_size=8), name=_VALUE, prompt=_VALUE)
def test_fuzz_template_expander_stays_in_the_template_folders(parts, name, prompt):
    """Whatever the template and whatever a prompt file puts in `name` and `prompt`, a planned path has
    exactly the template's folders (fields never add a component) and fits the file system."""
    template = "out/" + "".join(parts) + ".png"
    job = command_line_job({"prompt": prompt or "x", "sampler": "euler"})
    job = job.__class__(**{**job.__dict__, "name": name or None})
    try:
        job = check_job(job)
        (task,) = plan_images([job], template)
    except LdmError:
        return
    literal_folders = template.split("/")[:-1]
    assert len(task.path.parts) <= len(Path(template).parts)
    assert task.path.parts[0] == "out" and ".." not in task.path.parts[1:] or ".." in literal_folders
    assert all(len(os.fsencode(p)) <= MAX_NAME_BYTES for p in task.path.parts)


def test_planning_refuses_a_path_in_a_field_even_from_an_unchecked_job():
    """Defence in depth: `plan_images` itself never lets a field value add a folder."""
    from ldmcli.jobs import Job
    from ldmcli.request import ImageRequest

    for name in ("../x", "a/b", "/abs"):
        with pytest.raises(LdmError, match="must be a file name, not a path"):
            plan_images([Job(ImageRequest(prompt="a cat"), name=name)], "out/{name}.png")
