"""The `ldm` command line. Parses and validates; never touches tensors itself.

Heavy imports (torch, the networks) happen inside commands so `ldm --help` is instant.
Exit codes: 0 ok, 1 failure while generating, 2 usage or input error, 130 interrupted (143: SIGTERM).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import click
from click.core import ParameterSource

from ldmcli import __version__
from ldmcli.limits import DEFAULT_MAX_PIXELS, MAX_CLIP_SKIP, MAX_DEEP_CACHE, MAX_IMAGES_PER_RUN, MAX_SEED, MAX_STEPS, MAX_TOME
from ldmcli.request import MATCHES, RNGS, ImageRequest

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("leading", "linspace", "trailing", "karras", "exponential")


class SamplerName(click.ParamType):
    """Our sampler names and A1111's ("DPM++ 2M Karras", "Euler a"), checked at parse time."""

    name = "sampler"

    def convert(self, value, param, ctx):
        from ldmcli.samplers import resolve_sampler_name

        try:
            resolve_sampler_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value


class ImageSide(click.ParamType):
    """A width or height in pixels: positive and a multiple of 8 (the VAE downsamples by 8)."""

    name = "pixels"

    def convert(self, value, param, ctx):
        from ldmcli.request import check_side

        try:
            pixels = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number of pixels", param, ctx)
        try:
            check_side(pixels, param.name if param else "size")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return pixels


class ThreadCount(click.ParamType):
    """CPU threads: 1 to `device.max_threads()`, refused at parse time (100000 threads crash the machine)."""

    name = "threads"

    def convert(self, value, param, ctx):
        from ldmcli.device import MAX_THREADS_PER_CPU, max_threads

        threads = click.INT.convert(value, param, ctx)
        if not 1 <= threads <= max_threads():
            self.fail(f"{threads} threads: give at least 1 and at most {max_threads()} "
                      f"({MAX_THREADS_PER_CPU} per CPU: more only slow PyTorch down)", param, ctx)
        return threads


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ldm")
def cli() -> None:
    """ldm: Stable Diffusion text-to-image from the command line.

    Exit codes: 0 ok, 1 an image failed, 2 usage or input error, 130 interrupted, 143 terminated (SIGTERM).
    """
    _fill_closed_standard_streams()


def _fill_closed_standard_streams() -> None:
    """Put /dev/null where the shell closed stdin, stdout or stderr (`2>&-`).

    Python starts with sys.stderr None then, `print(file=sys.stderr)` writes to stdout instead (into
    the --json records), and the next file ldm opens (a model, a PNG being written) would get the
    number 2, where PyTorch's C++ warnings go. So the number gets /dev/null, and sys.stdout and
    sys.stderr a stream onto it: the messages are dropped, the images still made. sys.stdin stays
    None, so that `--prompts -` still says standard input is closed.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
            continue  # taken since by a file of someone else's: not ours to replace
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if name != "stdin":
            setattr(sys, name, open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False))


@cli.command()
@click.argument("prompts", nargs=-1)
@click.option("-p", "--prompt", "prompt_options", multiple=True, metavar="TEXT",
              help="A prompt's text (repeatable; same as the arguments); --prompts FILE reads a file of prompts.")
@click.option("--prompts", "prompt_file", metavar="FILE",
              help="Prompts from FILE: one a line (# comments), or .jsonl objects with per-job overrides; - reads stdin.")
@click.option("--from-png", "from_png", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Regenerate the image a PNG's metadata (ours or A1111's) describes; other flags override it.")
@click.option("-n", "--negative-prompt", default="", help="What the image should not show.")
@click.option("-m", "--model", envvar="LDM_MODEL",
              help="Model file, diffusers folder, or a name in ./weights, $LDM_MODELS_DIR or the HF cache. "
                   "Default: the bundled demo model. [env: LDM_MODEL]")
@click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), help=f"Sampling steps. [default: {ImageRequest().steps}, or the model's]")
@click.option("--cfg-scale", type=float, help=f"Classifier-free guidance scale; 1 skips the negative pass. [default: {ImageRequest().cfg_scale}]")
@click.option("-W", "--width", type=ImageSide(), help=f"Width in pixels, a multiple of 8. [default: {ImageRequest().width}, or the model's]")
@click.option("-H", "--height", type=ImageSide(), help=f"Height in pixels, a multiple of 8. [default: {ImageRequest().height}, or the model's]")
@click.option("-s", "--seed", type=click.IntRange(min=-1, max=MAX_SEED), help="Seed of each job's first image; image i gets seed+i. Random if unset or -1.")
@click.option("--clip-skip", type=click.IntRange(min=1, max=MAX_CLIP_SKIP),
              help="Condition on the text encoder's layer N - 1 blocks before its own (A1111's Clip skip). [default: 1]")
@click.option("--rng", type=click.Choice(RNGS), help="Noise generator: cpu (torch's CPU generator), or nv (an NVIDIA GPU's numbers, "
              "A1111's default there, on any device). [default: cpu]")
@click.option("--ensd", type=click.IntRange(min=0, max=MAX_SEED),
              help="A1111's eta noise seed delta: after the initial noise, each image's generator restarts at seed + N. "
                   "[default: 0, none]")
@click.option("--match", type=click.Choice(MATCHES),
              help="Whose numbers to reproduce: diffusers' schedulers, or A1111's (k-diffusion's noise levels and "
                   "timesteps, its DDIM/PLMS grid, truncated pixels), so that an A1111 image's seed and settings give "
                   "its pixels. --from-png of an A1111 image: a1111. [default: diffusers]")
@click.option("--pad-conds/--no-pad-conds", "pad_conds", default=None,
              help="A prompt and negative prompt of different lengths: pad the shorter with empty chunks and run one "
                   "U-Net batch, or run two unpadded passes (A1111's default). [default: pad]")
@click.option("-b", "--batch-count", type=click.IntRange(min=1, max=MAX_IMAGES_PER_RUN), default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per U-Net batch (speed/memory only: images do not change).")
@click.option("--sampler", type=SamplerName(), help=f"Sampler; A1111 names accepted. See `ldm samplers`. [default: {ImageRequest().sampler}]")
@click.option("--schedule", type=click.Choice(SCHEDULES), help="Sigma schedule. [default: the model's timestep spacing]")
@click.option("-i", "--init-image", type=click.Path(dir_okay=False), callback=lambda _c, _p, v: _absolute(v),
              help="Start from this image (img2img): it is noised to --strength and the rest of the steps run from it.")
@click.option("--strength", type=click.FloatRange(min=0, max=1, min_open=True),
              help=f"img2img: how much of the image is redone, the part of --steps run (A1111's Denoising strength). "
                   f"[default: {ImageRequest().strength}]")
@click.option("--resize-mode", type=click.Choice(["resize", "crop", "fill"]),
              help="An init image of another size than -W/-H: stretch it, crop it to cover, or fit it and fill the "
                   "rest from its edges (A1111's resize modes). [default: resize]")
@click.option("--mask", type=click.Path(dir_okay=False), callback=lambda _c, _p, v: _absolute(v),
              help="Inpainting: repaint the white part of this image (the init image's size) and keep the rest.")
@click.option("--invert-mask", is_flag=True, default=None, help="Repaint the black part of the mask instead.")
@click.option("--mask-blur", type=click.IntRange(min=0, max=64),
              help=f"Blur the mask's edge by N pixels first (A1111's Gaussian). [default: {ImageRequest().mask_blur}]")
@click.option("--pad", metavar="L,T,R,B",
              help="Outpainting: add pixels around the init image (one number: every side), filled from its edges "
                   "and repainted.")
@click.option("--hires-scale", type=click.FloatRange(min=1, max=4),
              help="Hires fix: make the image at -W x -H, upscale it by F (1 to 4) and run an img2img second pass.")
@click.option("--hires-steps", type=click.IntRange(min=0, max=MAX_STEPS),
              help="Hires fix: the second pass's steps (of which --hires-strength runs a part). [default: 0, as --steps]")
@click.option("--hires-strength", type=click.FloatRange(min=0, max=1, min_open=True),
              help=f"Hires fix: the second pass's denoising strength. [default: {ImageRequest().hires_strength}]")
@click.option("--hires-upscaler", metavar="NAME",
              help="Hires fix: latent (A1111's Latent: the latents resized bilinearly), lanczos (the image decoded, "
                   "resized, encoded again), or another of A1111's: Latent (nearest), Latent (bicubic), ... "
                   "[default: latent]")
@click.option("--refiner", metavar="MODEL",
              help="SDXL: finish each image with this refiner model (file, folder or name), from the base's latents.")
@click.option("--refiner-switch", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help=f"The part of the denoising the base does before the refiner takes over (A1111's Refiner switch "
                   f"at). [default: {ImageRequest().refiner_switch}]")
@click.option("--deep-cache", type=click.IntRange(min=0, max=MAX_DEEP_CACHE), metavar="N",
              help="Faster, not exact: the U-Net's deep features recomputed every N evaluations only (DeepCache; "
                   "3: about 2x the sampling speed). 0: off. [default: 0]")
@click.option("--tome", type=click.FloatRange(min=0, max=MAX_TOME), metavar="RATIO",
              help="Faster, not exact: merge this fraction of the tokens before each full-resolution self-attention "
                   "(token merging, ToMe, as A1111's Token merging ratio; 0.5: half the tokens). 0: off. [default: 0]")
@click.option("--lora", "loras", multiple=True, metavar="NAME[:W]",
              help="Merge a LoRA into every job, as the tag <lora:NAME:W> at the prompt's end (repeatable; "
                   "NAME:te=W1:unet=W2 weights the text encoder and U-Net apart). Prompts may carry tags themselves.")
@click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LDM_LORA_DIR",
              help="Folder of LoRAs named in prompts, looked in first; then loras/ beside the models. [env: LDM_LORA_DIR]")
@click.option("--embeddings-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LDM_EMBEDDINGS_DIR",
              help="Folder of textual-inversion embeddings a prompt names (A1111: the file's name; ComfyUI: "
                   "embedding:NAME); then embeddings/ beside the models. [env: LDM_EMBEDDINGS_DIR]")
@click.option("--vae", help="A VAE file or diffusers VAE folder (or its name) to decode with instead of the checkpoint's.")
@click.option("--vae-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LDM_VAE_DIR",
              help="Folder of VAEs looked in first by --vae NAME; then vae/ beside the models. [env: LDM_VAE_DIR]")
@click.option("--taesd", type=click.Path(path_type=Path),
              help="Decode with this tiny autoencoder (TAESD: taesd_decoder.safetensors/.pth, or a diffusers "
                   "AutoencoderTiny file or folder; taesdxl for SDXL): about 1/20 of the VAE's time, a little softer. "
                   "Images to start from are still encoded with the VAE. --from-png: the image's, if still there.")
@click.option("--prediction", type=click.Choice(["eps", "v"]),
              help="What the U-Net predicts, when a single file cannot say (SD 2.x 768 models are v). [default: detected]")
@click.option("--device", type=click.Choice(DEVICES), envvar="LDM_DEVICE", default="auto", show_default=True, help="[env: LDM_DEVICE]")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: bf16 on CPUs with bf16 units (AMX, AVX512-BF16), else fp32; bf16 on CUDA GPUs that have it, "
              "else fp16; fp16 on MPS. --from-png: the image's.")
@click.option("--tile-vae", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Decode in 512 px tiles with blended overlaps (bounded memory). auto: above 1024x1024.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the U-Net and VAE (slow first run, cached on disk under ~/.cache/ldm/inductor).")
@click.option("--threads", type=ThreadCount(), help="CPU threads, at most 4 per CPU. [default: one per core]")
@click.option("--max-pixels", type=click.IntRange(min=64), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Largest width x height accepted; raise it for bigger images (memory grows with the area).")
@click.option("-o", "--output", help="PNG path template, fields {index} {seed} {prompt_slug} {name} {job} {image} ..., "
              "or a folder ending in /. [default: $LDM_OUTPUT_DIR or outputs/, then 00000-SEED.png]")
@click.option("--overwrite", is_flag=True, help="Replace existing images.")
@click.option("--skip-existing", is_flag=True, help="Keep existing images and make only the missing ones (resume).")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed image (default: report it and go on).")
@click.option("--grid", is_flag=True, help="Also write grid.png: a captioned contact sheet of the images.")
@click.option("--json", "json_lines", is_flag=True, help="One JSON object per image on stdout, then a summary.")
@click.option("-q", "--quiet", is_flag=True, help="No messages on stderr but errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def generate(ctx, prompts, prompt_options, prompt_file, from_png, negative_prompt, model, steps, cfg_scale, width,
             height, seed, clip_skip, rng, ensd, match, pad_conds, batch_count, batch_size, sampler, schedule,
             init_image, strength, resize_mode, mask, invert_mask, mask_blur, pad, hires_scale, hires_steps,
             hires_strength, hires_upscaler, refiner, refiner_switch, deep_cache, tome, loras, lora_dir,
             embeddings_dir, vae, vae_dir, taesd, prediction, device, dtype, tile_vae, compile_, threads, max_pixels,
             output, overwrite, skip_existing, fail_fast, grid, json_lines, quiet, debug):
    """Generate images from PROMPTS (or -p/--prompt TEXT, --prompts FILE, --from-png IMAGE)."""

    report = None  # the run's Report, made first thing, so that an interrupt from here on ends with the summary

    def stopped_early(exc: KeyboardInterrupt) -> int:
        """Ctrl-C or SIGTERM before run_generate took over (reading prompts, finding the model,
        reading its headers): the summary, 0 made, as for any run that began."""
        nonlocal report
        if report is None:
            from ldmcli.run import Report

            report = Report(json=json_lines, quiet=quiet)
        if report.summarized:  # the interrupt came after the summary: nothing more to say
            raise exc
        return report.finish(exc)

    def build():
        try:
            return plan_and_run()
        except KeyboardInterrupt as exc:
            return stopped_early(exc)

    def plan_and_run():
        nonlocal report
        from ldmcli.run import Report

        report = Report(json=json_lines, quiet=quiet)
        from ldmcli.jobs import apply_model_family, command_line_job, job_from_png, random_seed, read_prompt_file
        from ldmcli.outputs import check_template, resolve_template
        from ldmcli.request import field_names
        from ldmcli.run import RunOptions, recommended_defaults, run_generate

        if overwrite and skip_existing:
            raise click.UsageError("--overwrite and --skip-existing contradict each other")
        given = {name for name in ctx.params if ctx.get_parameter_source(name) in
                 (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        # A flag's destination is its request field's name: these are the fields the user set.
        template = command_line_job({name: ctx.params[name] for name in field_names() if name in given}, batch_count)
        texts = [*prompts, *prompt_options]
        model_path, prediction_type, run_dtype = model, prediction, dtype
        if from_png is not None:
            if texts or prompt_file:
                raise click.UsageError("--from-png regenerates one image: give no other prompt")
            job, recorded = job_from_png(from_png, template)
            jobs = [job if "seed" in job.given else job.setting(seed=random_seed())]
            prediction_type = prediction_type or recorded.get("prediction_type")
            if "dtype" not in given and recorded.get("dtype") in DTYPES:
                run_dtype = recorded["dtype"]  # the same pixels need the same arithmetic
        else:
            if not texts and not prompt_file:
                raise click.UsageError('give a prompt: ldm generate "a cat"  (or -p TEXT, --prompts FILE, --from-png IMAGE)')
            if not quiet:
                for text in dict.fromkeys(texts):
                    if _names_a_prompt_file(text):
                        _tell(_prompt_file_note(text))
            jobs = [template.setting(prompt=t) for t in texts]
            if prompt_file:
                jobs += read_prompt_file(prompt_file, template, images_before=len(jobs) * batch_count)
            if "seed" not in template.given:  # one random seed for the run's jobs that set none, recorded like any
                seed = random_seed()  # other (an A1111 request line without a seed has -1: its own, as in A1111)
                jobs = [job if "seed" in job.given else job.setting(seed=seed) for job in jobs]
        if loras:
            from ldmcli.lora_uses import check_lora_spec, with_lora_tags

            for spec in loras:
                check_lora_spec(spec)
            jobs = [job.setting(prompt=with_lora_tags(job.request.prompt, loras)) for job in jobs]
        vae_path = None
        if vae is not None:
            from ldmcli.models_dir import resolve_extra

            vae_path = resolve_extra("vae", vae, vae_dir)
        elif from_png is not None and (recorded.get("vae_name") or recorded.get("vae_hash")):
            vae_path = _recorded_extra(from_png, "vae", recorded.get("vae_name"), recorded.get("vae_hash"), vae_dir, quiet)
        taesd_path = taesd
        if taesd is None and from_png is not None and recorded.get("taesd_path"):
            taesd_path = _recorded_taesd(from_png, recorded, quiet)
        lora_files, embedding_files = {}, {}
        if from_png is not None and recorded.get("lora_hashes"):
            lora_files = _loras_for_png(from_png, jobs[0].request.prompt, recorded["lora_hashes"], lora_dir, quiet)
        if from_png is not None and recorded.get("ti_hashes"):
            embedding_files = _embeddings_for_png(from_png, jobs[0].request, recorded["ti_hashes"], embeddings_dir, quiet)
        output_template = resolve_template(output, os.environ.get("LDM_OUTPUT_DIR"))
        check_template(output_template)
        if from_png is not None:
            explicit = model if ctx.get_parameter_source("model") == ParameterSource.COMMANDLINE else None
            model_file = _model_for_png(from_png, recorded, explicit, model if explicit is None else None, quiet)
        else:
            model_file = _resolve_model(model_path, quiet)
        options = RunOptions(
            model=model_file, template=output_template,
            device=device, dtype=run_dtype, batch_size=batch_size, prediction=prediction_type, overwrite=overwrite, skip_existing=skip_existing,
            compile=compile_, tile_vae=tile_vae, threads=threads, max_pixels=max_pixels,
            fail_fast=fail_fast, grid=grid, json=json_lines, quiet=quiet,
            vae=vae_path, taesd=taesd_path, lora_dir=lora_dir, lora_files=lora_files, embeddings_dir=embeddings_dir,
            embedding_files=embedding_files,
        )
        defaults = recommended_defaults(model_file, prediction_type)
        if any("clip_skip" in job.a1111 and job.request.clip_skip != 1 for job in jobs):
            family = _model_family(model_file, prediction_type)  # headers only, as recommended_defaults
            jobs = [apply_model_family(job, family) for job in jobs]
        return run_generate(jobs, options, defaults, report)

    sys.exit(_run(build, debug))


def _absolute(path: str | None) -> str | None:
    """A file named on the command line, as an absolute path: what the image's record keeps."""
    return None if path is None else os.path.abspath(path)


def _names_a_prompt_file(text: str) -> bool:
    """Whether a prompt given as text is exactly the name of an existing .txt or .jsonl file: most
    likely meant for --prompts (it is still used as the text, as given)."""
    if not text.lower().endswith((".txt", ".jsonl")):
        return False
    try:
        return os.path.isfile(text)
    except (OSError, ValueError):  # a NUL, a lone surrogate, a name too long: no such file
        return False


def _prompt_file_note(text: str) -> str:
    import shlex

    from ldmcli.metadata import printable

    return (f'note: the prompt "{printable(text, 120)}" is the name of a file: it is used as the prompt\'s text, '
            f"not read; --prompts {printable(shlex.quote(text), 120)} reads prompts from the file")


def _recorded_extra(png: Path, kind: str, name: str | None, recorded_hash: str | None, folder: Path | None,
                    quiet: bool) -> Path:
    """The LoRA, embedding or VAE file `png` records, found by hash, else by name (warned: the image may differ)."""
    from ldmcli.models_dir import EXTRA_KINDS, find_recorded_extra

    found = find_recorded_extra(kind, name, recorded_hash, folder)
    if found.by == "name" and recorded_hash and not quiet:
        _tell(f"ldm: warning: {png} was made with {EXTRA_KINDS[kind].label} {name} of hash {recorded_hash}; no file "
              f"ldm can find has that hash: using {found.path}, of the same name: the image may differ")
    return found.path


def _recorded_taesd(png: Path, recorded: dict, quiet: bool) -> Path | None:
    """The tiny autoencoder `png` was decoded with (ldm's record): its recorded path when the file there
    still has the recorded hash; else None, warned (decoded with the VAE, the pixels differ)."""
    from ldmcli.hashing import vae_hash

    path = Path(recorded["taesd_path"])
    found = vae_hash(path) if path.is_file() else None
    if found == recorded["taesd_hash"]:
        return path
    if not quiet:
        where = f"not at {path} any more" if found is None else f"not the file at {path} now (hash {found})"
        _tell(f"ldm: warning: {png} was decoded with the tiny autoencoder {recorded['taesd_name']} (hash "
              f"{recorded['taesd_hash']}), which is {where}: decoding with the VAE, so the image will differ; give "
              "--taesd to use it")
    return None


def _loras_for_png(png: Path, prompt: str, hashes: dict[str, str], folder: Path | None, quiet: bool) -> dict[str, Path]:
    """The files of the LoRAs `png`'s prompt names whose hashes it records (A1111's "Lora hashes", ldm's
    record): tag name -> file, each found by its hash, else by its name (`_recorded_extra`). Tags
    without a recorded hash are found by name when the run loads them, as any prompt's are."""
    from ldmcli.lora_uses import hashes_name, lora_tags

    files = {}
    for name, _ in lora_tags(prompt):
        recorded_hash = hashes.get(hashes_name(name))
        if recorded_hash and name not in files:
            files[name] = _recorded_extra(png, "lora", name, recorded_hash, folder, quiet)
    return files


def _embeddings_for_png(png: Path, request, hashes: dict[str, str], folder: Path | None, quiet: bool) -> dict[str, Path]:
    """The files of the embeddings `png` records (A1111's "TI hashes", ldm's record) that its prompts
    still name: name -> file, found by hash, else by name (`_recorded_extra`)."""
    texts = f"{request.prompt}\n{request.negative_prompt}".casefold()  # A1111's tokenizer lowercases
    return {name: _recorded_extra(png, "embedding", name, digest, folder, quiet)
            for name, digest in hashes.items() if name.casefold() in texts}


def _model_for_png(png: Path, recorded: dict, explicit: str | None, fallback: str | None, quiet: bool) -> Path:
    """The model to regenerate `png` with: -m (`explicit`) when given, warned if its hash is not the
    recorded one; else the recorded path (ldm's record) if it still exists; else the model ldm finds
    with the recorded hash, or else the recorded name (warned when its hash differs). An image that
    names no model runs on $LDM_MODEL (`fallback`, warned) if set. An image whose recorded model ldm
    cannot find is an error naming the hash and the model, never a run on $LDM_MODEL or the demo
    model: $LDM_MODEL is a default, not a choice made for this image; only -m replaces its model.
    """
    from ldmcli.errors import ModelNotFoundError
    from ldmcli.hashing import hash_matches, model_hash
    from ldmcli.models_dir import find_recorded_model, places, resolve_model

    name, recorded_hash = recorded.get("name"), recorded.get("hash")
    made_with = _recorded_model(name, recorded_hash)

    def say(message: str) -> None:
        if not quiet:
            _tell(f"ldm: {message}")

    def check(path: Path, what: str) -> Path:
        """`path`, said to differ from the recorded model when its hash does."""
        if recorded_hash and not hash_matches(path, recorded_hash):
            actual = model_hash(path)
            has = f"has hash {actual}" if actual else "is a folder (no A1111 hash to compare)"
            say(f"warning: {png} was made with {made_with}; {what} {path} {has}: the image may differ")
        return path

    if explicit:
        return check(resolve_model(explicit), "-m")
    if recorded.get("path"):
        return check(resolve_model(recorded["path"]), "the recorded model file")
    if not name and not recorded_hash:
        if fallback:
            say(f"warning: {png} does not say which model made it; using $LDM_MODEL {fallback}")
            return resolve_model(fallback)
        raise ModelNotFoundError(f"{png} does not say which model made it (no Model hash or Model): "
                                 "pass -m MODEL")
    found = find_recorded_model(name, recorded_hash)
    if found is not None and found.by == "hash":
        say(f"{png} was made with {made_with}: using {found.model.path} (same hash)")
        return found.model.path
    if found is not None:
        if recorded_hash:
            has = f"hash {found.hash}" if found.hash else "no A1111 hash (a folder)"
            say(f"warning: {png} was made with {made_with}; no model ldm can find has that hash: using "
                f"{found.model.path}, of the same name but {has}: the image may differ")
        else:
            say(f"{png} was made with {made_with}: using {found.model.path} (same name; the image records no hash)")
        return found.model.path
    unused = (f"; $LDM_MODEL ({fallback}) is not used in its place: only -m on the command line replaces "
              "the model an image records") if fallback else ""
    raise ModelNotFoundError(f"{png} was made with {made_with}, which ldm cannot find by hash or name "
                             f"(looked in {places()}): pass -m MODEL to use another{unused}")


def _recorded_model(name: str | None, recorded_hash: str | None) -> str:
    """How messages name a recorded model: 'model "v1-5-pruned" (hash 6ce0161689)'."""
    from ldmcli.metadata import printable

    shown = f'model "{printable(name, 80)}"' if name else "a model"
    return f"{shown} (hash {printable(recorded_hash, 64)})" if recorded_hash else f"{shown} (no hash recorded)"


def _model_family(model: Path, prediction: str | None) -> str:
    """The model's family ("sd1", "sd2", "sdxl"), from headers and shapes, before anything loads."""
    from ldmcli.detect import detect_spec
    from ldmcli.layout import read_components

    return detect_spec(read_components(Path(model), meta=True), prediction=prediction).family


def _resolve_model(name: str | None, quiet: bool) -> Path:
    from ldmcli.errors import ModelNotFoundError
    from ldmcli.models_dir import demo_model, resolve_model

    if name:
        return resolve_model(name)
    demo = demo_model()
    if demo is None:
        raise ModelNotFoundError("no model: pass -m MODEL or set LDM_MODEL (the bundled demo model is not installed)")
    if not quiet:
        _tell(f"ldm: using the bundled demo model {demo} (pass -m to use another)")
    return demo


class Credentials(click.ParamType):
    """--api-auth USER:PASS[,USER:PASS] (A1111's format), checked at parse time."""

    name = "USER:PASS[,USER:PASS]"

    def convert(self, value, param, ctx):
        from ldmcli.server import parse_credentials

        if isinstance(value, tuple):
            return value
        try:
            return parse_credentials(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@cli.command()
@click.option("-m", "--model", envvar="LDM_MODEL",
              help="The model to load (file, diffusers folder or name, as for generate); clients switch among the "
                   "models `ldm models` lists. Default: the bundled demo model. [env: LDM_MODEL]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than this machine's (0.0.0.0) wants --api-auth.")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=7860, show_default=True,
              help="Port to listen on (0: a free one, said on stderr).")
@click.option("--api-auth", type=Credentials(), help="Require HTTP basic auth with one of these users on every endpoint.")
@click.option("--queue", "queue_size", type=click.IntRange(min=1, max=10_000), default=None,
              help="Requests that may wait behind the one being made; more get HTTP 429 with Retry-After. [default: 16]")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also save every image here (NNNNN-SEED.png), and img2img's input images under inputs/.")
@click.option("--lora-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LDM_LORA_DIR",
              help="Folder of LoRAs prompts name, looked in first; then loras/ beside the models. [env: LDM_LORA_DIR]")
@click.option("--embeddings-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LDM_EMBEDDINGS_DIR",
              help="Folder of textual-inversion embeddings; then embeddings/ beside the models. [env: LDM_EMBEDDINGS_DIR]")
@click.option("--device", type=click.Choice(DEVICES), envvar="LDM_DEVICE", default="auto", show_default=True, help="[env: LDM_DEVICE]")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="As for generate.")
@click.option("--threads", type=ThreadCount(), help="CPU threads, at most 4 per CPU. [default: one per core]")
@click.option("--max-pixels", type=click.IntRange(min=64), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Largest width x height a request may ask for.")
@click.option("--taesd", type=click.Path(path_type=Path),
              help="Decode every image with this tiny autoencoder (TAESD), as for generate: A1111's decode method TAESD.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def serve(model, host, port, api_auth, queue_size, output_dir, lora_dir, embeddings_dir, device, dtype, threads,
          max_pixels, taesd, debug) -> None:
    """Serve A1111's HTTP API (/sdapi/v1/txt2img, img2img, options, progress, ...) with one model loaded.

    Requests run one at a time, in the order they arrive. SIGTERM lets the current image finish, then exits 0.
    """

    def start() -> int:
        from ldmcli.errors import LdmError
        from ldmcli.limits import DEFAULT_SERVER_QUEUE

        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as exc:
            raise LdmError(f"ldm serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'ldmcli[serve]'") from None
        from ldmcli.run import RunOptions, recommended_defaults
        from ldmcli.server import ServerConfig, serve as run_server
        from ldmcli.server_worker import ServerLog, check_output_dir

        folder = check_output_dir(output_dir) if output_dir is not None else None
        model_file = _resolve_model(model, quiet=False)
        recommended_defaults(model_file)  # a file that is not a model: one line, exit 2, before loading
        if taesd is not None:
            from ldmcli.taesd_file import read_taesd

            read_taesd(taesd)  # likewise (a few MB)
        options = RunOptions(model=model_file, template="", device=device, dtype=dtype, threads=threads,
                             max_pixels=max_pixels, lora_dir=lora_dir, embeddings_dir=embeddings_dir, taesd=taesd)
        return run_server(options, ServerConfig(host, port, api_auth or ()), report=ServerLog(),
                          capacity=queue_size or DEFAULT_SERVER_QUEUE, output_dir=folder)

    sys.exit(_run(start, debug))


@cli.command()
def samplers() -> None:
    """List samplers and schedules, with their A1111 names and diffusers equivalents."""
    from ldmcli.samplers import A1111_ALIASES, SAMPLERS, SCHEDULES as SCHEDULE_INFO

    def kwargs(mapping) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in mapping.items())

    def a1111_names(info) -> str:
        aliases = [alias for alias, (name, schedule) in A1111_ALIASES.items() if name == info.name and schedule is None]
        return info.display_name + (f" ({', '.join(aliases)})" if aliases else "")

    _table(["sampler", "A1111 name (aliases)", "diffusers scheduler", "description"], [
        [name, a1111_names(info), info.diffusers_class + (f"({kwargs(info.diffusers_kwargs)})" if info.diffusers_kwargs else ""),
         info.description] for name, info in SAMPLERS.items()])
    click.echo()
    _table(["schedule", "A1111 suffix", "diffusers scheduler kwargs", "description"], [
        [name, info.display_name or "-", kwargs(info.diffusers_kwargs), info.description]
        for name, info in SCHEDULE_INFO.items()])
    click.echo("\nA1111 names combine both: 'DPM++ 2M Karras' = --sampler dpmpp_2m --schedule karras.")
    click.echo("Default schedule: the model's own timestep spacing (SD 1.5: leading, as diffusers).")


@cli.command()
def models() -> None:
    """List the models found in ./weights, $LDM_MODELS_DIR and the local Hugging Face cache."""
    from ldmcli.models_dir import list_models

    found = list_models()
    if not found:
        click.echo("no models found (looked in ./weights, $LDM_MODELS_DIR, the Hugging Face cache)", err=True)
        return
    _table(["name", "where", "path"], [[m.name, m.where, str(m.path)] for m in found])


@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def info(target, as_json, debug) -> None:
    """Describe a MODEL (family, sizes, hash, parts) or an IMAGE.png's generation parameters."""

    def show() -> int:
        from ldmcli.info import describe_image, describe_model

        described = describe_image(Path(target)) if target.lower().endswith(".png") else describe_model(target)
        if as_json:
            _print_json(described)
        else:
            lines = []
            for key, value in described.items():
                if key in ("not_honoured", "notes"):  # lists of {"key", "value", "why"}
                    lines.append(f"{key}:" + ("" if value else " none"))
                    lines += [f"  - {_note_text(note)}" for note in value]
                else:
                    lines.append(f"{key}: {value}")
            _print_text("\n".join(lines))
        return 0

    sys.exit(_run(show, debug))


# A surrogate code point: in a str only as a lone one (from a JSON "\\ud800" escape, or bytes that are not
# UTF-8), which no UTF-8 stream can write.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _stdout_encoding() -> str:
    return getattr(sys.stdout, "encoding", None) or "utf-8"


def _print_text(text: str) -> None:
    """`text` on stdout, whatever it holds: what the stream cannot encode (a lone surrogate a PNG's
    record smuggled in; anything, on an ASCII terminal) is shown as a backslash escape (\\ud800)."""
    encoding = _stdout_encoding()
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an encoding Python does not know: ASCII is in all of them
        text = text.encode("ascii", "backslashreplace").decode("ascii")
    click.echo(text)


def _print_json(value) -> None:
    """`value` as JSON on stdout, readable text where the stream takes it, valid JSON whatever it holds:
    a lone surrogate is written as its JSON escape (\\ud800, what the PNG's record said), and on a
    stream that cannot encode the rest, all of it is escaped (ensure_ascii)."""
    import json

    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, indent=2, ensure_ascii=False))
    try:
        text.encode(_stdout_encoding())
    except (UnicodeEncodeError, LookupError):
        text = json.dumps(value, indent=2, ensure_ascii=True)
    click.echo(text)


def _tell(message: str) -> None:
    """A line on stderr, or nowhere when there is no stderr to write to (closed, or its reader left):
    saying something is never an error of its own, nor changes the exit code."""
    try:
        try:
            click.echo(message, err=True)
        except UnicodeEncodeError:
            click.echo(message.encode("ascii", "backslashreplace").decode("ascii"), err=True)
    except (OSError, ValueError):
        try:  # what is still buffered would fail again at exit, and make the exit code 120
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
        except (OSError, ValueError, AttributeError):
            pass


def _note_text(note: dict | str) -> str:
    """An image's note ({"key", "value", "why"}) or a model's (a sentence), as one line."""
    from ldmcli.metadata import Note

    return note if isinstance(note, str) else Note(note["key"], note["value"], note["why"]).text()


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("".join(f"{str(c):<{w}}" for c, w in zip(row, widths)) + str(row[-1]))


def _run(action, debug: bool) -> int:
    """Run a command body, mapping our errors to one-line messages and exit codes.

    --debug adds the traceback and never changes the exit code: a script sees the same status either way.
    SIGTERM is handled as Ctrl-C is (`_sigterm_as_interrupt`), with exit 143.
    """
    from ldmcli.errors import LdmError, Terminated

    try:
        with _sigterm_as_interrupt():
            return action()
    except click.ClickException:
        raise
    except LdmError as exc:
        return _fail(f"ldm: error: {exc}", exc.exit_code, debug)
    except KeyboardInterrupt as exc:
        _tell("ldm: terminated" if isinstance(exc, Terminated) else "ldm: interrupted")
        return getattr(exc, "exit_code", EXIT_INTERRUPTED)
    except BrokenPipeError:  # `ldm ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug shows the rest
        return _fail(f"ldm: failed: {type(exc).__name__}: {exc}", EXIT_FAILURE, debug)


def _fail(message: str, exit_code: int, debug: bool) -> int:
    """Say `message` (after the traceback of the exception being handled, with --debug); return `exit_code`."""
    if debug:
        import traceback

        traceback.print_exc()
    _tell(message)
    return exit_code


@contextmanager
def _sigterm_as_interrupt():
    """While a command runs, SIGTERM (`timeout`, CI, `kill`) raises `Terminated`, a KeyboardInterrupt.

    So it ends a run as Ctrl-C does (finished images kept, the summary printed) instead of killing the
    process mid-write; the exit code is 143 (128 + 15) as a shell reports a SIGTERM death. A second
    SIGTERM kills at once. Left alone where SIGTERM is ignored or handled by someone else (the parent's
    choice) and off the main thread (where Python cannot install handlers).
    """
    import signal
    import threading

    from ldmcli.errors import Terminated

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
