"""The `ldm` command line. Parses and validates; never touches tensors itself.

Heavy imports (torch, the networks) happen inside commands so `ldm --help` is instant.
Exit codes: 0 ok, 1 failure while generating, 2 usage or input error, 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ldmcli import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("leading", "linspace", "trailing", "karras", "exponential")
DEFAULT_OUTPUT = "outputs/{index:05d}-{seed}.png"


class SamplerName(click.ParamType):
    """Our sampler names and A1111's ("DPM++ 2M Karras", "Euler a"); converts to (sampler, schedule | None)."""

    name = "sampler"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from ldmcli.samplers import resolve_sampler_name

        try:
            return resolve_sampler_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ImageSide(click.ParamType):
    """A width or height in pixels: positive and a multiple of 8 (the VAE downsamples by 8)."""

    name = "pixels"

    def convert(self, value, param, ctx):
        try:
            pixels = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number of pixels", param, ctx)
        if pixels < 8 or pixels % 8:
            self.fail(f"{pixels} is not a positive multiple of 8", param, ctx)
        return pixels


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ldm")
def cli() -> None:
    """ldm: Stable Diffusion text-to-image from the command line."""


@cli.command()
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompt_option", help="The prompt (instead of the argument).")
@click.option("-n", "--negative-prompt", default="", help="What the image should not show.")
@click.option("-m", "--model", "model_path", envvar="LDM_MODEL", type=click.Path(path_type=Path), required=True,
              help="Checkpoint: a .safetensors/.ckpt single file or a diffusers folder. [env: LDM_MODEL]")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Sampling steps.")
@click.option("--cfg-scale", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale; 1 skips the unconditional pass.")
@click.option("-W", "--width", type=ImageSide(), default=512, show_default=True)
@click.option("-H", "--height", type=ImageSide(), default=512, show_default=True)
@click.option("-s", "--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None, help="Seed of the first image; image i gets seed+i. Random if unset.")
@click.option("-b", "--batch-count", type=click.IntRange(min=1), default=1, show_default=True, help="Images to make.")
@click.option("--sampler", type=SamplerName(), default="euler_a", show_default=True, help="Sampler; A1111 names accepted. See `ldm samplers`.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None, help="Sigma schedule. Default: the model's own timestep spacing.")
@click.option("--device", type=click.Choice(DEVICES), envvar="LDM_DEVICE", default="auto", show_default=True, help="[env: LDM_DEVICE]")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="auto: fp16 on CUDA/MPS, fp32 on CPU.")
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True,
              help="PNG path; may use {index}, {seed}. A folder (ending in /) gets 00000-SEED.png names.")
@click.option("--overwrite", is_flag=True, help="Replace existing files instead of refusing.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def generate(prompt, prompt_option, negative_prompt, model_path, steps, cfg_scale, width, height, seed, batch_count,
             sampler, schedule, device, dtype, output, overwrite, debug):
    """Generate images from PROMPT."""
    from ldmcli.run import GenerateOptions, run_generate

    text = prompt_option if prompt_option is not None else prompt
    if text is None:
        raise click.UsageError("give a prompt: ldm generate \"a cat\"")
    sampler_name, sampler_schedule = sampler
    options = GenerateOptions(
        prompt=text,
        negative_prompt=negative_prompt,
        model=model_path,
        steps=steps,
        cfg_scale=cfg_scale,
        width=width,
        height=height,
        seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
        batch_count=batch_count,
        sampler=sampler_name,
        schedule=schedule or sampler_schedule,
        device=device,
        dtype=dtype,
        output=output,
        overwrite=overwrite,
    )
    _run(lambda: run_generate(options), debug)


@cli.command()
def samplers() -> None:
    """List samplers and schedules, with their A1111 names and diffusers equivalents."""
    from ldmcli.samplers import SAMPLERS, SCHEDULES as SCHEDULE_INFO

    def kwargs(mapping) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in mapping.items())

    _table(["sampler", "A1111 name", "diffusers scheduler", "description"], [
        [name, info.display_name, info.diffusers_class + (f"({kwargs(info.diffusers_kwargs)})" if info.diffusers_kwargs else ""),
         info.description] for name, info in SAMPLERS.items()])
    click.echo()
    _table(["schedule", "A1111 suffix", "diffusers scheduler kwargs", "description"], [
        [name, info.display_name or "-", kwargs(info.diffusers_kwargs), info.description]
        for name, info in SCHEDULE_INFO.items()])
    click.echo("\nA1111 names combine both: 'DPM++ 2M Karras' = --sampler dpmpp_2m --schedule karras.")
    click.echo("Default schedule: the model's own timestep spacing (SD 1.5: leading, as diffusers).")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) + 2 for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo("".join(f"{str(c):<{w}}" for c, w in zip(row, widths)) + str(row[-1]))


def _run(action, debug: bool) -> None:
    """Run a command body, mapping our errors to one-line messages and exit codes."""
    from ldmcli.errors import LdmError

    try:
        action()
    except LdmError as exc:
        if debug:
            raise
        click.echo(f"ldm: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("ldm: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - one line for the user; --debug shows the rest
        if debug:
            raise
        click.echo(f"ldm: failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
