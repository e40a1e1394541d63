"""Careless and hostile input on the command line, in prompt files and in PNGs: refused with one line
and exit 2 before the model loads, never a crash, never a write outside the output folder.
Through the real CLI (click's runner, or a subprocess where the OS's view of argv/stdin matters),
plus Hypothesis fuzzing of the prompt-file reader and the template expander."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import time
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ldmcli.cli import cli
from ldmcli.errors import LdmError
from ldmcli.jobs import check_job, command_line_job, read_prompt_file
from ldmcli.limits import MAX_IMAGES_PER_RUN, MAX_NAME_BYTES
from ldmcli.outputs import MAX_OUTPUT_PATH_BYTES, TEMPLATE_FIELDS, plan_images

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
    ("{seed:c}.png", "{seed:c} has type 'c', which this field does not take"),
    ("{name:.2}.png", "{name:.2} has a precision, which only {cfg_scale} takes"),
    ("{seed:.2}.png", "{seed:.2} has a precision"),
    ("{index:x}.png", "{index:x} has type 'x'"),
    ("{index:#d}.png", "{index:#d} is not a format spec ldm takes"),
    ("{name:=9}.png", "{name:=9} has a sign, 0 or '=' alignment, which text does not take"),
    ("{name:\x1b>9}.png", "{name:\\x1b>9} pads with a control character (U+001B)"),
])
def test_templates_that_would_escape_or_explode(tmp_path, tiny_single_file, template, message):
    started = time.perf_counter()
    refused(invoke("generate", "a cat", "-m", tiny_single_file, "-o", f"{tmp_path}/{template}"), message)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("template, values", [
    ("o/sub/{name:.2}/img.png", {"name": "..evil"}),  # was o/sub/../img.png: one folder up
    ("o/{steps:c}/img.png", {"steps": 46}),  # was o/./img.png
    ("{seed:c}ROOT/abs/img.png", {"seed": 47}),  # was /ROOT/abs/img.png: a relative template made absolute
    ("o/{seed:c}.png", {"seed": 0}),  # was a NUL in the path ("embedded null byte" after loading)
    ("o/{seed:c}.png", {"seed": 0x110000}),  # was an OverflowError
    ("o/{prompt_slug:.0}/img.png", {}),  # was o//img.png
])
def test_format_specs_that_would_leave_the_folder_are_refused(tmp_path, tiny_folder, monkeypatch, template, values):
    """Format specs pad and align only: a precision cuts "..evil" to "..", type c makes "/" of 47."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    template = template.replace("ROOT", str(tmp_path).lstrip("/"))  # "absolute" stays inside tmp_path
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "seed": 1, **values}) + "\n")
    refused(invoke("generate", "--prompts", prompts, "-m", tiny_folder, *TINY, "-o", template),
            "format specs only pad and align")
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("name", ["\x1b[31mred", "bell\x07", "two\nlines", "tab\there", "del\x7f", "next\x85line",
                                  "\u202egnp.exe", "line\u2028break"])
def test_control_characters_in_a_name_are_refused(tmp_path, tiny_folder, name):
    """A name becomes a file name and is printed: ESC sequences, BEL, newlines, bidi overrides are refused,
    and the message shows them escaped, never raw."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "name": name}) + "\n")
    result = invoke("generate", "--prompts", prompts, "-m", tiny_folder, *TINY, "-o", f"{tmp_path}/out/{{name}}.png")
    refused(result, f"{prompts}:1: name {name!r} contains")
    shown = result.output.removesuffix("\n")
    assert not any(c in shown for c in name if c not in "abcdefghijklmnopqrstuvwxyz[31.") and not list(
        tmp_path.rglob("*.png"))


def test_colliding_names_say_which_images(tmp_path, tiny_folder):
    refused(invoke("generate", "a cat", "a dog", "-s", "5", "-m", tiny_folder, *TINY, "-o", f"{tmp_path}/{{seed}}.png"),
            f"names two images {tmp_path}/5.png: image 0 (job 0, command line, seed 5) and image 1 (job 1, command "
            "line, seed 5); add a field that tells them apart, such as {index}")


def deep_path(length: int, folder: Path, name: str) -> str:
    """A path of `length` bytes: `folder`, then folders of at most 200 bytes, then `name`."""
    rest, parts = length - len(os.fsencode(f"{folder}/")) - len(os.fsencode(name)), []
    while rest:
        size = min(rest, 200) - (rest - min(rest, 200) == 1)  # never leave 1 byte: an empty folder name
        parts.append("d" * (size - 1))
        rest -= size
    return f"{folder}/" + "".join(f"{part}/" for part in parts) + name


def test_output_path_leaves_room_for_the_temporary_file(tmp_path, tiny_folder):
    """A path within PATH_MAX whose temporary file (`.NAME.XXXXXXXX.png.part`, 15 bytes more) is not: refused
    before loading (it failed with ENAMETOOLONG after)."""
    path = deep_path(MAX_OUTPUT_PATH_BYTES + 1, tmp_path, "1.png")  # within PATH_MAX (4095 bytes and a NUL)
    template = path.removesuffix("1.png") + "{seed}.png"
    refused(invoke("generate", "a cat", "-s", "1", "-m", tiny_folder, *TINY, "-o", template),
            f"gives a path of {MAX_OUTPUT_PATH_BYTES + 1:,} bytes, longer than the file system allows")


def test_names_of_up_to_255_bytes_are_written_with_their_temporary_files(tmp_path, tiny_single_file):
    """NAME_MAX names whose temporary names are 15 bytes longer, in a folder as deep as a path allows: an
    OSError after loading, before the temporary name was shortened (and the path bound made room for it)."""
    names = ["x" * 251, "é" * 125]  # + ".png": 255 and 254 bytes
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "a cat", "name": n, "seed": 1}) + "\n" for n in names))
    template = deep_path(MAX_OUTPUT_PATH_BYTES, tmp_path / "out", f"{names[0]}.png").removesuffix(f"{names[0]}.png")
    template += "{name}.png"
    result = invoke("generate", "--prompts", prompts, "-m", tiny_single_file, *TINY, "-o", template, "--json", "-q")
    assert result.exit_code == 0, result.output
    made = [Path(json.loads(line)["path"]) for line in result.stdout.splitlines() if '"path"' in line]
    assert [p.name for p in made] == [f"{n}.png" for n in names] and len(os.fsencode(made[0])) == MAX_OUTPUT_PATH_BYTES
    assert all(p.is_file() for p in made) and not list(made[0].parent.glob(".*.part"))


def test_output_path_bound_counts_the_temporary_name():
    from ldmcli.image import TEMP_PATH_EXTRA

    assert MAX_OUTPUT_PATH_BYTES == 4096 - 1 - TEMP_PATH_EXTRA


def test_number_too_large_for_a_float_is_refused(tmp_path, tiny_folder):
    """A 400-digit JSON number is a Python int no float holds (math.isfinite raised OverflowError)."""
    huge = "9" * 400
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "cfg_scale": %s}\n' % huge)
    refused(invoke("generate", "--prompts", prompts, "-m", tiny_folder, *TINY, "-o", f"{tmp_path}/out/"),
            f'{prompts}:1: "cfg_scale" must be a finite number, got a 400-digit number')
    from ldmcli.image import save_png

    png = tmp_path / "made.png"
    record = '{"prompt": "a cat", "seed": 1, "steps": 1, "cfg_scale": %s, "width": 64, "height": 64}' % huge
    save_png(__import__("numpy").zeros((8, 8, 3), "uint8"), png, text={"ldm": record})
    refused(invoke("generate", "--from-png", png, "-m", tiny_folder, "-o", f"{tmp_path}/out/"),
            '"cfg_scale" must be a finite number, got a 400-digit number')
    no_pngs(tmp_path / "out")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' in the environment: expected a whole number of at least 1"),  # was / 0
    ({"RANK": "abc"}, "RANK='abc' in the environment: expected a whole number"),  # was a ValueError
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5 is not below WORLD_SIZE=2"),  # made nothing, exit 0
    ({"RANK": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
    ({"LOCAL_RANK": "-1", "WORLD_SIZE": "2"}, "LOCAL_RANK='-1' in the environment"),
])
def test_careless_distributed_environment(tmp_path, tiny_folder, env, message):
    env = {"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, **env}
    result = CliRunner().invoke(cli, ["generate", "a cat", "-s", "1", "-m", str(tiny_folder), *TINY,
                                      "-o", f"{tmp_path}/"], env=env)
    refused(result, message)


# --- limits checked before the model loads ---------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--steps", "1001"], "1001 is not in the range 1<=x<=1000"),
    (["-s", str(2**64)], "<=x<=18446744073709551615"),  # -1 (random) is allowed too
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
    ('{"prompt": "a", "cfg_scale": -' + "9" * 4000 + "}", '"cfg_scale" must be a finite number, got a 4000-digit'),
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


def _maybe(*choices):
    """Nothing half the time (so that short specs like `c` or `.2` come up often), else one of `choices`."""
    return st.one_of(st.just(""), st.sampled_from(choices))


_SPECS = st.one_of(
    # the format-spec grammar, each part drawn from what Python accepts and some it does not
    st.builds(lambda *parts: "".join(parts), _maybe(".", "/", "\\", "0", " ", "_", "{", "\0", "\x1b", "\u202e"),
              _maybe("<", ">", "^", "="), _maybe("+", "-", " "), _maybe("#"), _maybe("0"),
              st.one_of(st.just(""), st.integers(0, 300).map(str)), _maybe(",", "_"),
              _maybe(".0", ".1", ".2", ".3"), _maybe("c", "d", "s", "x", "o", "b", "n", "f", "e", "g", "%")),
    st.text(alphabet="._-/\\<>^=+ #,0123456789cdsxfeg%", max_size=6),
)
_FIELDS = st.builds(lambda field, spec: "{" + field + (":" + spec if spec else "") + "}",
                    st.sampled_from(TEMPLATE_FIELDS), st.one_of(st.just(""), _SPECS))
_TEMPLATE_PART = st.one_of(_FIELDS, st.sampled_from(["/", "../", "./", "..", "{{", "}}", "-", "x", "//"]),
                           st.text(alphabet="ab._-/\\{}:", max_size=6))
_NAMES = st.one_of(st.none(), st.text(max_size=40),
                   st.sampled_from(["..evil", "..", ".", "...", ".x", "a\x1bb", "\u202efdp.exe", "\x85", "x" * 255]))
# Numbers whose characters are "." (46), "/" (47), "\\" (92), NUL (0) or none at all (0x110000)
_SEEDS = st.one_of(st.sampled_from([0, 46, 47, 92, 0x110000, 2**64 - 1]), st.integers(0, 2**64 - 1))
_STEPS = st.one_of(st.sampled_from([46, 47, 92]), st.integers(1, 1000))
_CFG = st.floats(-1e6, 1e6, allow_nan=False)


def is_control(char: str) -> bool:
    """What a name may not hold, said independently of outputs.py: C0/C1 controls, line and paragraph
    separators, bidirectional embeddings, overrides and isolates."""
    return (unicodedata.category(char) in ("Cc", "Zl", "Zp")
            or unicodedata.bidirectional(char) in ("LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI", "PDI"))


def literal_folders(pieces) -> tuple[str, ...]:
    """The folders a parsed template's literal text names before its first field: every path is inside."""
    text = ""
    for literal, field, _, _ in pieces:
        text += literal
        if field is not None:
            break
    return Path(text + "x").parent.parts  # "x" stands for the field: its component is not a folder named


def _case(folder: str, parts: list[str], name: str | None = None, seed: int = 1, steps: int = 1):
    return example(folder=folder, parts=parts, name=name, prompt="a cat", seed=seed, steps=steps, cfg_scale=7.5, size=64)


@settings(max_examples=500, deadline=2000)
@given(folder=st.sampled_from(["out/", "", "../out/", "/srv/out/"]), parts=st.lists(_TEMPLATE_PART, max_size=8),
       name=_NAMES, prompt=st.text(max_size=40), seed=_SEEDS, steps=_STEPS, cfg_scale=_CFG, size=st.sampled_from([8, 64, 512]))
@_case("o/", ["sub/", "{name:.2}", "/img"], name="..evil")  # o/sub/../img.png
@_case("o/", ["{steps:c}", "/img"], steps=46)  # o/./img.png
@_case("", ["{seed:c}", "etc/x"], seed=47)  # /etc/x.png
@_case("o/", ["{seed:c}"], seed=0)  # NUL
@_case("o/", ["{seed:c}"], seed=0x110000)  # OverflowError
@_case("o/", ["{name}"], name="\x1b[31mred")
def test_fuzz_template_expander_stays_in_the_template_folders(folder, parts, name, prompt, seed, steps, cfg_scale, size):
    """Whatever the template and its format specs, and whatever a prompt file puts in `name`, `prompt` and
    the numbers, a planned path is inside the folders the template's literal text names, has exactly the
    template's components (a field never adds, removes or climbs out of one: no "/", "." or ".."), holds
    no control character, and fits the file system with its temporary file."""
    template = folder + "".join(parts) + ".png"
    job = command_line_job({"prompt": prompt or "x", "sampler": "euler", "seed": seed, "steps": steps,
                            "cfg_scale": cfg_scale, "width": size, "height": size})
    try:
        job = check_job(replace(job, name=name))
        (task,) = plan_images([job], template)
    except LdmError as exc:
        assert "outside the folders it names" not in str(exc)  # the last-resort check never has to act
        event("refused")
        return
    event("planned")
    pieces = list(string.Formatter().parse(template))  # parsed, or plan_images would have refused
    shape = Path("".join(literal + ("x" if field is not None else "") for literal, field, _, _ in pieces))
    prefix = literal_folders(pieces)
    planned = task.path.parts
    assert task.path.is_absolute() == shape.is_absolute() and len(planned) == len(shape.parts), (template, task.path)
    assert planned[: len(prefix)] == prefix, (template, task.path)
    for made, meant in zip(planned, shape.parts):
        if made != meant:  # a component a field is in
            assert made not in ("", ".", "..") and made.count("\\") == meant.count("\\"), made  # "\\" only literal
            assert not any(is_control(c) for c in made), made
    encoded = os.fsencode(task.path)
    assert all(len(part) <= MAX_NAME_BYTES for part in encoded.split(b"/")) and len(encoded) <= MAX_OUTPUT_PATH_BYTES


@pytest.mark.parametrize("template, path", [
    ("o{{x}}/{seed}.png", "o{x}/7.png"),  # escaped braces in a folder the literal text names
    ("a/../b/{{{seed}}}.png", "a/../b/{7}.png"),  # a literal ".." is the user's own
    ("//o/./{name:.>4}/{cfg_scale:+.1f}.png", "//o/./...n/+7.5.png"),
    ("o/{seed}//./{steps:=+05d}.png", "o/7//./+0003.png"),
    ("{name}/{index:_^5}.png", "n/__0__.png"),
    ("//{index}.png", "//0.png"),  # POSIX keeps a leading "//"
])
def test_templates_the_checks_keep(template, path):
    """What pads and aligns, and literal text however odd, still plans (the checks refuse only what a field adds)."""
    job = check_job(replace(command_line_job({"prompt": "a cat", "seed": 7, "steps": 3}), name="n"))
    (task,) = plan_images([job], template)
    assert task.path == Path(path)


def test_planning_refuses_a_path_in_a_field_even_from_an_unchecked_job():
    """Defence in depth: `plan_images` itself never lets a field value add a folder."""
    from ldmcli.jobs import Job
    from ldmcli.request import ImageRequest

    for name in ("../x", "a/b", "/abs"):
        with pytest.raises(LdmError, match="must be a file name, not a path"):
            plan_images([Job(ImageRequest(prompt="a cat"), name=name)], "out/{name}.png")


# --- --grid: the contact sheet never replaces an image, nor writes over what is not a file ----------------


@pytest.mark.parametrize("name", ["grid", "GRID"])  # GRID: the same file where names ignore case (macOS, Windows)
def test_an_image_named_like_the_grid_is_refused(tmp_path, tiny_folder, name):
    """`og/{name}.png` with a job named "grid": the image was made, then overwritten by the sheet, exit 0."""
    prompts = tmp_path / "g.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "name": name, "seed": 1}) + "\n"
                       + json.dumps({"prompt": "b", "name": "dog", "seed": 2}) + "\n")
    out = tmp_path / "og"
    refused(invoke("generate", "--prompts", prompts, "-m", tiny_folder, *TINY, "-o", f"{out}/{{name}}.png", "--grid"),
            f"{out}/{name}.png is image 0 ({prompts}:1) and the path --grid writes its contact sheet to")
    no_pngs(tmp_path)


@pytest.mark.parametrize("flag", [None, "--overwrite", "--skip-existing"])
@pytest.mark.parametrize("kind", ["FIFO", "folder"])
def test_grid_path_that_is_not_a_file_is_refused(tmp_path, tiny_folder, kind, flag):
    """As at any output path: a FIFO or a folder at grid.png is refused whatever the flags (it was only
    asked to "exist": --skip-existing replaced a FIFO, --overwrite made the images and then failed)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "grid.png") if kind == "FIFO" else (out / "grid.png").mkdir()
    args = ["generate", "a cat", "-s", "1", "-m", tiny_folder, *TINY, "-o", f"{out}/", "--grid"]
    refused(invoke(*args, *([flag] if flag else [])), f"{out}/grid.png: not a file but a")
    assert not list(out.glob("0*.png"))


def test_grid_next_to_images_with_other_names_is_made(tmp_path, tiny_folder):
    prompts = tmp_path / "g.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "name": "grid-1", "seed": 1}) + "\n")
    result = invoke("generate", "--prompts", prompts, "-m", tiny_folder, *TINY, "-o", f"{tmp_path}/{{name}}.png", "--grid")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["grid-1.png", "grid.png"]


# --- the run limit stops reading a prompt file ----------------------------------------------------------


def test_a_prompt_file_of_a_million_lines_is_refused_at_the_line_beyond_the_limit(tmp_path):
    """1,000,000 lines "a" took 23 s and 1.1 GB before exit 2 (a 64 MiB file, 33M lines: killed for memory):
    reading stops at the line that goes beyond the limit, in bounded time and memory."""
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a\n" * 1_000_000)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ldmcli", "generate", "--prompts", str(prompts), "-m",
                           str(tmp_path / "absent.safetensors"), "-o", f"{tmp_path}/"],
                          capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"ldm: error: {prompts}:{MAX_IMAGES_PER_RUN + 1}: at least 100,001 images in one run: "
                      "the limit is 100,000 (split the prompt file)\n")
    assert seconds < 5, seconds


def test_prompt_file_reading_stops_within_bounded_memory(tmp_path):
    """The same file, the peak memory of a process of its own measured (Linux's VmHWM, in kB, which
    starts afresh at exec; ru_maxrss would count the forked test process): 1.1 GB before."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc/self/status")
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a\n" * 1_000_000)
    script = ("import re\n"
              "from ldmcli.cli import cli\n"
              "try:\n"
              f"    cli(['generate', '--prompts', {str(prompts)!r}, '-m', 'absent.safetensors'])\n"
              "except SystemExit as exc:\n"
              "    status = open('/proc/self/status').read()\n"
              "    print(exc.code, re.search(r'VmHWM:\\s*(\\d+) kB', status).group(1))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    code, peak_kb = proc.stdout.split()
    assert code == "2" and "at least 100,001 images" in proc.stderr, proc.stderr
    assert int(peak_kb) < 250_000, f"{int(peak_kb) // 1024} MB"


@pytest.mark.parametrize("args, lines, stop", [
    (["-b", "40000"], ["a", "b", "c"], "p.txt:3: at least 120,000 images"),  # -b counts on every line
    (["a", "b", "-b", "40000"], ["c", "d"], "p.txt:1: at least 120,000 images"),  # so do the command line's prompts
    ([], ["# a comment", "", '{"prompt": "a", "batch_count": 60000}', '{"prompt": "b", "n_iter": 40001}'],
     "p.jsonl:4: at least 100,001 images"),  # lines numbered as in the file; A1111's n_iter is a batch count
    ([], ['{"prompt": "a", "n_iter": 1000000, "batch_size": 1000000}', "not JSON"],
     "p.jsonl:1: batch_count must be between 1 and 100,000, got 1000000000000"),
])
def test_batch_counts_count_towards_the_limit_while_reading(tmp_path, args, lines, stop):
    prompts = tmp_path / ("p.jsonl" if lines[-1].startswith(("{", "not")) else "p.txt")
    prompts.write_text("\n".join(lines) + "\n")
    refused(invoke("generate", "--prompts", prompts, *args, "-m", tmp_path / "absent.safetensors"),
            f"{tmp_path}/{stop}")


def test_prompt_file_at_the_limit_is_read_whole(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("#\n" + "a\n" * 99_999 + "\n  \u2028 b  \n")
    jobs = read_prompt_file(str(prompts), command_line_job({}))
    assert len(jobs) == MAX_IMAGES_PER_RUN and jobs[-1].request.prompt == "b" and jobs[-1].source == f"{prompts}:100002"


# --- ldm info shows any string -------------------------------------------------------------------------


def _png_with(path: Path, key: str, text: str) -> Path:
    from ldmcli.image import save_png

    save_png(__import__("numpy").zeros((8, 8, 3), "uint8"), path, text={key: text})
    return path


LONE_SURROGATES = {
    # ldm's record with an escaped lone surrogate in the prompt (valid JSON, not valid Unicode)
    "ldm": ("ldm", json.dumps({"prompt": "café a\ud800b", "seed": 1, "steps": 1, "cfg_scale": 7.0, "sampler": "euler",
                               "width": 64, "height": 64}), "prompt", "café a\ud800b"),
    # A1111's text with a JSON-quoted value that decodes to one
    "a1111": ("parameters", 'a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: "\\ud800"',
              "model", {"name": "\ud800", "hash": None}),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("case", sorted(LONE_SURROGATES))
def test_info_shows_a_lone_surrogate_escaped(tmp_path, case, as_json):
    """Was `ldm: failed: UnicodeEncodeError`, exit 1 (after half the text output)."""
    key, text, field, value = LONE_SURROGATES[case]
    png = _png_with(tmp_path / "x.png", key, text)
    result = invoke("info", png, *(["--json"] if as_json else []))
    assert result.exit_code == 0, result.output
    assert "\\ud800" in result.output and "Traceback" not in result.output
    if as_json:  # valid JSON, saying what the image says, readable where it can be (é, not \u00e9)
        assert ("café" in result.output) == (case == "ldm")
        described = json.loads(result.output)
        assert described[field] == value if field == "prompt" else described[field]["name"] == value["name"]
    else:
        assert result.output.startswith(f"path: {png}\n")


def test_info_on_a_stdout_that_cannot_encode_the_text(tmp_path):
    """An ASCII stdout (PYTHONIOENCODING, a C locale without UTF-8 coercion): escaped, never a crash."""
    png = _png_with(tmp_path / "x.png", "ldm", json.dumps({"prompt": "café \ud800 ☕", "seed": 1}))
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    for args in ([], ["--json"]):
        proc = subprocess.run([sys.executable, "-m", "ldmcli", "info", str(png), *args], capture_output=True,
                              env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        shown = proc.stdout.decode("ascii")
        assert (json.loads(shown)["prompt"] == "café \ud800 ☕") if args else "prompt: caf\\xe9 \\ud800 \\u2615" in shown
