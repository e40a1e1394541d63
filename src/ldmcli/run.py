"""The `generate` command's work: check everything cheap, load the model once, make and save images."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ldmcli.errors import LdmError, ModelNotFoundError


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    model: Path
    negative_prompt: str = ""
    steps: int = 30
    cfg_scale: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = 0
    batch_count: int = 1
    sampler: str = "euler_a"
    schedule: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    output: str = "outputs/{index:05d}-{seed}.png"
    overwrite: bool = False


def output_paths(template: str, seeds: list[int]) -> list[Path]:
    """Expand the output template for each image: fields {index} and {seed}."""
    if template.endswith(("/", os.sep)) or Path(template).is_dir():
        template = os.path.join(template, "{index:05d}-{seed}.png")
    if len(seeds) > 1 and "{index" not in template and "{seed" not in template:
        stem, dot, suffix = template.rpartition(".")
        template = f"{stem}-{{index:05d}}.{suffix}" if dot else f"{template}-{{index:05d}}"
    try:
        return [Path(template.format(index=i, seed=seed)) for i, seed in enumerate(seeds)]
    except (KeyError, IndexError, ValueError) as exc:
        raise LdmError(f"output template {template!r}: {exc} (fields: {{index}}, {{seed}})") from exc


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Fail before loading the model if any output cannot be written."""
    for path in paths:
        if path.exists() and not overwrite:
            raise LdmError(f"{path} exists (use --overwrite to replace it)")
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise LdmError(f"cannot write to {folder}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LdmError("--device cuda: no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LdmError("--device mps: MPS is not available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # GPUs: fp16 halves memory and is their fast path. CPU: fp32 until bf16 is measured here.
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def run_generate(options: GenerateOptions) -> None:
    if not options.model.exists():
        raise ModelNotFoundError(f"{options.model}: no such file or folder")
    seeds = [options.seed + i for i in range(options.batch_count)]
    paths = output_paths(options.output, seeds)
    check_writable(paths, options.overwrite)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)

    from ldmcli import pipeline
    from ldmcli.image import a1111_parameters, ldm_metadata, save_png
    from ldmcli.samplers import SAMPLERS

    started = time.perf_counter()
    model = pipeline.load(options.model, device=device, dtype=dtype)
    _say(f"loaded {model.name} ({model.spec.family}, {str(dtype).removeprefix('torch.')} on {device}) "
         f"in {time.perf_counter() - started:.1f} s")
    request = pipeline.ImageRequest(
        prompt=options.prompt,
        negative_prompt=options.negative_prompt,
        width=options.width,
        height=options.height,
        steps=options.steps,
        cfg_scale=options.cfg_scale,
        sampler=options.sampler,
        spacing=options.schedule,
    )
    schedule_name = options.schedule or model.spec.schedule.timestep_spacing
    for seed, path in zip(seeds, paths):
        started = time.perf_counter()
        pixels = pipeline.generate(model, request, [seed])[0].numpy()
        fields = {
            "Steps": options.steps,
            "Sampler": SAMPLERS[options.sampler].display_name,
            "Schedule type": schedule_name.capitalize(),
            "CFG scale": _number(options.cfg_scale),
            "Seed": seed,
            "Size": f"{options.width}x{options.height}",
            "Model": model.name,
        }
        ours = {"prompt": options.prompt, "negative_prompt": options.negative_prompt, "steps": options.steps,
                "sampler": options.sampler, "schedule": schedule_name, "cfg_scale": options.cfg_scale,
                "seed": seed, "width": options.width, "height": options.height, "model": model.name,
                "prediction_type": model.spec.schedule.prediction_type, "family": model.spec.family}
        save_png(pixels, path, overwrite=options.overwrite, text={
            "parameters": a1111_parameters(options.prompt, options.negative_prompt, fields),
            "ldm": ldm_metadata(ours),
        })
        _say(f"wrote {path} (seed {seed}, {time.perf_counter() - started:.1f} s)")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
