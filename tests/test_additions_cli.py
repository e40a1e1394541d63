"""What people add to a checkpoint, from the command line (issue 17): LoRAs by tag, --lora and JSONL,
found by name; a JSONL of alternating LoRA sets; --vae and its record; embeddings by name; the A1111
keys written (Lora hashes, TI hashes, VAE, VAE hash) and --from-png finding the VAE again.

The merges and readers themselves are tested against diffusers in test_lora.py, test_vae_file.py and
test_embeddings.py; here the oracle is ldm's own run with the same thing given another way, plus the
hashes written out (A1111's definitions: `hashlib` in the test).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from ldmcli.cli import cli
from ldmcli.models.vae import AutoencoderKL
from sd_fixtures import TINY_VAE, _spread_norms

TINY = ["-W", "64", "-H", "64", "--steps", "3", "-s", "5", "--dtype", "fp32"]


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"path"')]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def lora_file(path: Path, seed: int) -> Path:
    """A diffusers-format LoRA for one U-Net attention projection and one text-encoder projection."""
    g = torch.Generator().manual_seed(seed)
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{unet}.lora_A.weight": torch.randn(4, 32, generator=g), f"{unet}.lora_B.weight": torch.randn(32, 4, generator=g),
               f"{te}.lora_A.weight": torch.randn(4, 64, generator=g), f"{te}.lora_B.weight": torch.randn(64, 4, generator=g)},
              path)
    return path


def vae_file(path: Path, seed: int) -> Path:
    """A random VAE of the tiny model's structure, as a bare-key single file (vae-ft-mse's layout)."""
    from ldmcli.keymap.vae import vae_config_from_diffusers

    torch.manual_seed(seed)
    module = AutoencoderKL(vae_config_from_diffusers(TINY_VAE))
    _spread_norms(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path)
    return path


def a1111_lora_hash(path: Path) -> str:
    """kohya's "addnet" hash, as A1111 records LoRAs: SHA-256 of a .safetensors file after its header, 12 digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


@pytest.fixture
def env(tmp_path):
    """A private hash cache and models folder, with loras/ beside it."""
    (tmp_path / "models").mkdir()
    return {"LDM_MODELS_DIR": str(tmp_path / "models"), "XDG_CACHE_HOME": str(tmp_path / "cache"), "LDM_MODEL": None,
            "LDM_LORA_DIR": None, "LDM_VAE_DIR": None, "LDM_EMBEDDINGS_DIR": None}


def test_a_lora_by_tag_by_flag_and_by_jsonl_makes_one_image(tmp_path, tiny_single_file, env):
    film = lora_file(tmp_path / "models" / "loras" / "film.safetensors", 1)
    run = lambda *a: invoke("generate", "-m", tiny_single_file, *TINY, "--json", *a, env=env)  # noqa: E731
    tagged = run("a cat <lora:film:0.7>", "-o", tmp_path / "tag.png")
    flagged = run("a cat", "--lora", "film:0.7", "-o", tmp_path / "flag.png")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "lora": ["film:0.7"]}\n')
    jsonl = run("--prompts", tmp_path / "p.jsonl", "-o", tmp_path / "jsonl.png")
    plain = run("a cat", "-o", tmp_path / "plain.png")
    for result in (tagged, flagged, jsonl, plain):
        assert result.exit_code == 0, result.output
    made = {name: pixels(tmp_path / f"{name}.png") for name in ("tag", "flag", "jsonl", "plain")}
    assert np.array_equal(made["tag"], made["flag"]) and np.array_equal(made["tag"], made["jsonl"])
    assert not np.array_equal(made["tag"], made["plain"])
    (record,) = records(flagged)
    assert record["prompt"] == "a cat <lora:film:0.7>"  # the flag is the tag: one home, and A1111 reads it
    assert record["loras"] == [{"name": "film", "path": str(film.resolve()), "hash": a1111_lora_hash(film),
                                "te_weight": 0.7, "unet_weight": 0.7}]
    text = Image.open(tmp_path / "flag.png").text["parameters"]
    assert f'Lora hashes: "film: {a1111_lora_hash(film)}"' in text and "<lora:film:0.7>" in text
    assert "merged LoRA film" in flagged.stderr and "plain" not in records(plain)[0]


def test_alternating_lora_sets_in_a_jsonl_equal_separate_runs_and_merge_each_set_once(tmp_path, tiny_single_file, env):
    lora_file(tmp_path / "loras" / "a.safetensors", 2)
    lora_file(tmp_path / "loras" / "b.safetensors", 3)
    lines = ['{"prompt": "a cat <lora:a:0.9>", "name": "1"}', '{"prompt": "a dog <lora:b:0.5>", "name": "2"}',
             '{"prompt": "a cow <lora:a:0.9>", "name": "3"}', '{"prompt": "a hen", "name": "4"}',
             '{"prompt": "a pig <lora:b:0.5>", "name": "5"}']
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    args = ["-m", tiny_single_file, *TINY, "--lora-dir", tmp_path / "loras"]
    together = invoke("generate", "--prompts", tmp_path / "all.jsonl", *args, "--json",
                      "-o", f"{tmp_path / 'together'}/{{name}}.png", env=env)
    assert together.exit_code == 0, together.output
    merged = {r["prompt"]: [Path(lora["path"]).name for lora in r.get("loras", [])] for r in records(together)}
    assert merged == {"a cat <lora:a:0.9>": ["a.safetensors"], "a dog <lora:b:0.5>": ["b.safetensors"],
                      "a cow <lora:a:0.9>": ["a.safetensors"], "a hen": [], "a pig <lora:b:0.5>": ["b.safetensors"]}
    assert together.stderr.count("merged LoRA a") == 1 and together.stderr.count("merged LoRA b") == 1
    assert together.stderr.count("loaded tiny-sd1") == 3  # one load a set: {a}, {b}, {}
    for line in lines:
        (tmp_path / "one.jsonl").write_text(line + "\n")
        alone = invoke("generate", "--prompts", tmp_path / "one.jsonl", *args, "-o", f"{tmp_path / 'alone'}/{{name}}.png",
                       env=env)
        assert alone.exit_code == 0, alone.output
    for name in "12345":
        assert (tmp_path / "together" / f"{name}.png").read_bytes() == (tmp_path / "alone" / f"{name}.png").read_bytes()


def test_vae_is_recorded_and_found_again_by_hash(tmp_path, tiny_single_file, env):
    mine = vae_file(tmp_path / "models" / "vae" / "mine.safetensors", 7)
    made = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--vae", "mine", "--json", "-o", tmp_path / "v.png",
                  env=env)
    plain = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "p.png", env=env)
    assert made.exit_code == plain.exit_code == 0, made.output
    (record,) = records(made)
    sha = hashlib.sha256(mine.read_bytes()).hexdigest()
    assert record["vae"] == {"name": "mine.safetensors", "path": str(mine.resolve()), "hash": sha[:10]}
    assert f"VAE hash: {sha[:10]}, VAE: mine.safetensors" in Image.open(tmp_path / "v.png").text["parameters"]
    assert not np.array_equal(pixels(tmp_path / "v.png"), pixels(tmp_path / "p.png"))
    # --from-png of the A1111 text alone finds the VAE by its hash, under another name
    mine.rename(mine.with_name("renamed.safetensors"))
    text = Image.open(tmp_path / "v.png").text["parameters"]
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.open(tmp_path / "v.png").save(tmp_path / "a1111.png", pnginfo=info)
    again = invoke("generate", "--from-png", tmp_path / "a1111.png", "-m", tiny_single_file, "--dtype", "fp32",
                   "-o", tmp_path / "again.png", env=env)  # the A1111 text does not record ldm's dtype
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "v.png"))
    (tmp_path / "models" / "vae" / "renamed.safetensors").unlink()
    missing = invoke("generate", "--from-png", tmp_path / "a1111.png", "-m", tiny_single_file, "-o", tmp_path / "x.png",
                     env=env)
    assert missing.exit_code == 2 and "the image was made with VAE 'mine.safetensors'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_an_embedding_named_in_the_prompt_is_used_and_recorded(tmp_path, tiny_single_file, env):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(4))}, folder / "shiny.safetensors")
    args = ["-m", tiny_single_file, *TINY, "--embeddings-dir", folder, "--json"]
    used = invoke("generate", "a shiny cat", *args, "-o", tmp_path / "e.png", env=env)
    words = invoke("generate", "a shiny cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "w.png", env=env)
    assert used.exit_code == words.exit_code == 0, used.output
    (record,) = records(used)
    sha = hashlib.sha256((folder / "shiny.safetensors").read_bytes()).hexdigest()
    assert [(e["name"], e["hash"]) for e in record["embeddings"]] == [("shiny", sha[:12])]
    assert f'TI hashes: "shiny: {sha[:12]}"' in Image.open(tmp_path / "e.png").text["parameters"]
    assert not np.array_equal(pixels(tmp_path / "e.png"), pixels(tmp_path / "w.png"))


@pytest.mark.parametrize("args, message", [
    (["a cat", "--lora", "nowhere:0.5"], "LoRA 'nowhere' not found"),
    (["a cat", "--lora", "film:x"], "LoRA"),
    (["a cat", "--vae", "nowhere"], "VAE 'nowhere' not found"),
])
def test_missing_or_malformed_additions_are_one_line_errors(tmp_path, tiny_single_file, env, args, message):
    result = invoke("generate", *args, "-m", tiny_single_file, "-o", tmp_path / "o.png", env=env)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_another_familys_lora_is_a_one_line_error_and_nothing_is_made(tmp_path, tiny_single_file, env):
    g = torch.Generator().manual_seed(0)
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"  # SDXL's second text encoder
    (tmp_path / "loras").mkdir()
    save_file({f"{key}.lora_down.weight": torch.randn(4, 64, generator=g), f"{key}.lora_up.weight": torch.randn(64, 4, generator=g)},
              tmp_path / "loras" / "xl.safetensors")
    result = invoke("generate", "a cat <lora:xl>", "-m", tiny_single_file, *TINY, "--lora-dir", tmp_path / "loras",
                    "-o", tmp_path / "o.png", env=env)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("ldm: error: ")
    assert not (tmp_path / "o.png").exists()


def _a1111_only(png: Path, out: Path) -> Path:
    """`png` with its A1111 text alone, as A1111 would have saved it (no ldm record)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", Image.open(png).text["parameters"])
    Image.open(png).save(out, pnginfo=info)
    return out


@pytest.mark.parametrize("record", ["a1111", "ldm"])
def test_from_png_finds_loras_by_hash_else_by_name_else_says_which(record, tmp_path, tiny_single_file, env):
    """The LoRA an image records is found by its hash under another name, even with another file of
    its name present; without a file of that hash the one of its name is used, with a warning; with
    neither, a one-line error naming it (exit 2), nothing made."""
    loras = tmp_path / "models" / "loras"
    film = lora_file(loras / "film.safetensors", 1)
    made = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, "--lora", "film:0.7", "-o", tmp_path / "made.png",
                  env=env)
    assert made.exit_code == 0, made.output
    png = _a1111_only(tmp_path / "made.png", tmp_path / "a1111.png") if record == "a1111" else tmp_path / "made.png"
    film.rename(loras / "renamed.safetensors")
    decoy = lora_file(loras / "film.safetensors", 9)  # same name, other weights
    again = invoke("generate", "--from-png", png, "-m", tiny_single_file, "--dtype", "fp32", "--json",
                   "-o", tmp_path / "again.png", env=env)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png"))
    assert [Path(u["path"]).name for u in records(again)[0]["loras"]] == ["renamed.safetensors"]
    assert "warning" not in again.stderr

    (loras / "renamed.safetensors").unlink()
    by_name = invoke("generate", "--from-png", png, "-m", tiny_single_file, "--dtype", "fp32", "-o", tmp_path / "n.png",
                     env=env)
    assert by_name.exit_code == 0, by_name.output
    assert f"no file ldm can find has that hash: using {decoy}, of the same name" in by_name.stderr
    assert not np.array_equal(pixels(tmp_path / "n.png"), pixels(tmp_path / "made.png"))

    decoy.unlink()
    missing = invoke("generate", "--from-png", png, "-m", tiny_single_file, "-o", tmp_path / "x.png", env=env)
    assert missing.exit_code == 2 and "the image was made with LoRA 'film'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("value, read", [
    ("film: 0123456789ab", {"film": "0123456789ab"}),
    ("film: 0123456789AB, my lora: abcdef012345", {"film": "0123456789ab", "my lora": "abcdef012345"}),
    ("film", {}), ("film: not-hex, ok: 12ab", {"ok": "12ab"}), (": 12ab", {}), ("", {}),
])
def test_lora_and_ti_hashes_are_read_as_a1111_writes_them(value, read):
    from ldmcli.metadata import read_name_hashes

    assert read_name_hashes(value) == read


def test_lora_names_lose_colons_and_commas_in_lora_hashes_as_in_a1111():
    from ldmcli.lora_uses import hashes_name

    assert hashes_name("a:b,c d") == "abc d"


@pytest.mark.parametrize("record", ["a1111", "ldm"])
def test_from_png_finds_embeddings_by_hash_else_by_name_else_says_which(record, tmp_path, tiny_single_file, env):
    """The embedding an image records (TI hashes) is what its prompt word calls again, found by hash in a
    subfolder under another name even with another file of its name present; else by name, warned;
    else a one-line error naming it (exit 2): never silently a plain word."""
    folder = tmp_path / "models" / "embeddings"
    (folder / "sub").mkdir(parents=True)
    vectors = lambda seed: {"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(seed))}  # noqa: E731
    save_file(vectors(4), folder / "shiny.safetensors")
    made = invoke("generate", "a shiny cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "made.png", env=env)
    assert made.exit_code == 0, made.output
    assert "TI hashes" in Image.open(tmp_path / "made.png").text["parameters"]
    png = _a1111_only(tmp_path / "made.png", tmp_path / "a1111.png") if record == "a1111" else tmp_path / "made.png"
    (folder / "shiny.safetensors").rename(folder / "sub" / "renamed.safetensors")
    save_file(vectors(5), folder / "shiny.safetensors")  # same name, other vectors
    again = invoke("generate", "--from-png", png, "-m", tiny_single_file, "--dtype", "fp32", "-o", tmp_path / "again.png",
                   env=env)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png")) and "warning" not in again.stderr

    (folder / "sub" / "renamed.safetensors").unlink()
    by_name = invoke("generate", "--from-png", png, "-m", tiny_single_file, "--dtype", "fp32", "-o", tmp_path / "n.png",
                     env=env)
    assert by_name.exit_code == 0, by_name.output
    assert "embedding shiny of hash" in by_name.stderr and "of the same name: the image may differ" in by_name.stderr
    assert not np.array_equal(pixels(tmp_path / "n.png"), pixels(tmp_path / "made.png"))

    (folder / "shiny.safetensors").unlink()
    missing = invoke("generate", "--from-png", png, "-m", tiny_single_file, "-o", tmp_path / "x.png", env=env)
    assert missing.exit_code == 2 and "the image was made with embedding 'shiny'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_from_png_finds_a_lora_named_by_path_and_keeps_the_dots_of_a_name(tmp_path, tiny_single_file, env):
    """A LoRA given as a path is found at that path again; a name with a dot ("detail_v1.5") is that
    name, not "detail_v1" (a file of which is present to be picked by mistake)."""
    elsewhere = lora_file(tmp_path / "elsewhere" / "film.safetensors", 1)
    loras = tmp_path / "models" / "loras"
    lora_file(loras / "detail_v1.5.safetensors", 2)
    lora_file(loras / "detail_v1.safetensors", 3)  # what a stem of "detail_v1.5" would find
    cases = {"path": ["--lora", f"{elsewhere}:0.7"], "dotted": ["--lora", "detail_v1.5:0.7"]}
    for label, args in cases.items():
        made = invoke("generate", "a cat", "-m", tiny_single_file, *TINY, *args, "-o", tmp_path / f"{label}.png", env=env)
        assert made.exit_code == 0, made.output
        png = _a1111_only(tmp_path / f"{label}.png", tmp_path / f"{label}-a1111.png")
        again = invoke("generate", "--from-png", png, "-m", tiny_single_file, "--dtype", "fp32", "--json",
                       "-o", tmp_path / f"{label}-again.png", env=env)
        assert again.exit_code == 0, again.output
        assert "warning" not in again.stderr, again.stderr
        assert np.array_equal(pixels(tmp_path / f"{label}-again.png"), pixels(tmp_path / f"{label}.png")), label
    lora_file(loras / "detail_v1.5.safetensors", 4)  # changed: found by name, warned
    changed = invoke("generate", "--from-png", tmp_path / "dotted-a1111.png", "-m", tiny_single_file, "--dtype", "fp32",
                     "--json", "-o", tmp_path / "changed.png", env=env)
    assert changed.exit_code == 0, changed.output
    assert "of the same name" in changed.stderr
    assert [Path(u["path"]).name for u in records(changed)[0]["loras"]] == ["detail_v1.5.safetensors"]


def test_an_embedding_found_by_hash_wins_over_a_name_differing_in_case(tmp_path, tiny_single_file, env):
    folder = tmp_path / "models" / "embeddings"
    (folder / "sub").mkdir(parents=True)
    vectors = lambda seed: {"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(seed))}  # noqa: E731
    save_file(vectors(4), folder / "Shiny.safetensors")
    made = invoke("generate", "a shiny cat", "-m", tiny_single_file, *TINY, "-o", tmp_path / "made.png", env=env)
    assert made.exit_code == 0, made.output
    (folder / "Shiny.safetensors").rename(folder / "sub" / "renamed.safetensors")
    save_file(vectors(5), folder / "shiny.safetensors")  # the same tokens, other vectors
    again = invoke("generate", "--from-png", tmp_path / "made.png", "-m", tiny_single_file, "--dtype", "fp32",
                   "-o", tmp_path / "again.png", env=env)
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "made.png"))
