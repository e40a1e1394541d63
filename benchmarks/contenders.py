"""Other CPU Stable Diffusion runtimes as benchmark contenders: OpenVINO (optimum-intel) and stable-diffusion.cpp.

Neither is an ldm dependency. Both live in their own virtual environment (benchmarks/contenders.md has the
recipe; $LDM_BENCH_VENV, default <workdir>/venv), and this file has two halves:

* The child half runs under that venv's python, ONE FRESH PROCESS PER RUN, and prints one JSON line:

      <venv>/bin/python benchmarks/contenders.py --tool openvino --folder $WORKDIR/sd15-openvino
      <venv>/bin/python benchmarks/contenders.py --tool sdcpp --file $WORKDIR/sd15-fp16.safetensors
      <venv>/bin/python benchmarks/contenders.py --tool openvino --folder ... --unet-only
      <venv>/bin/python benchmarks/contenders.py --export $WORKDIR/sd15-diffusers $WORKDIR/sd15-openvino

  Each image run: 512x512, 20 steps, CFG 7.5, seed 0, prompt "a photograph of an astronaut riding a horse",
  negative "blurry" (bench.py's image piece), 2 threads, each tool's own default precision. Samplers:
  OpenVINO runs diffusers' pipeline code, so it gets bench.py's exact sampler, DPMSolverMultistepScheduler
  from the model's scheduler config (DPM++ 2M); stable-diffusion.cpp has its own "dpm++2m" sampler
  (k-diffusion's DPM++ 2M) on its default "discrete" schedule for SD1.x.

  The JSON line:
    start_to_first_step_s  process start (BENCH_T0 from the parent, else time.time() at the top of this file,
                           before any import) to the START of the first U-Net evaluation, like bench.py's ldm
                           child (which wraps UNetModel.forward). OpenVINO: a wrapper on the pipeline's U-Net
                           call. sd.cpp: its progress callback, which it fires as (0, steps) right before the
                           first denoiser call.
    per_step_s             median time of one U-Net evaluation at batch 2 (CFG). OpenVINO: the median of the
                           20 U-Net calls' own durations (one batch-2 infer request each). sd.cpp evaluates
                           cond and uncond as two batch-1 graphs per step, so its number is the median
                           interval between progress callbacks: both halves plus the (negligible) sampler
                           arithmetic, i.e. the same work as one batch-2 step.
    step_interval_s        median interval between consecutive step-end callbacks (the whole sampler step).
    whole_image_s          process start to the PNG written.
    peak_rss_gib           VmHWM of this process (/proc/self/status), read after the PNG is written.
    precision, sampler     what the tool ran (OpenVINO: the compiled U-Net's INFERENCE_PRECISION_HINT).
    image_mean, image_std  of the 8-bit image: random weights give noise, but it must not be constant.

  --unet-only (OpenVINO): compiles only unet/openvino_model.xml and times the infer request alone at batch 2
  (latents 2x4x64x64, 77 tokens, 768 wide), one warm-up then --runs timed calls; per_step_s is their median.
  This is the per-step column without the pipeline around it, for when the callback numbers are noisy.

* The parent half is plain Python (no torch, no venv) for benchmarks/bench.py to import:

      from contenders import contender_commands, run_contender, prepare_contenders
      prepare_contenders(workdir)                      # exports the OpenVINO IR once (cached)
      for name, argv in contender_commands(workdir).items():
          result = run_contender(argv)                 # dict: the JSON line + wall_s + loadavg

  `python benchmarks/contenders.py --bench --runs 3` (any python) runs every contender --runs times, round by
  round, in fresh processes, and prints each run and the medians.

Weights are bench.py's: the SD1.5-shaped random-weight diffusers folder (benchmarks/sd15_pipeline.py), exported
once to OpenVINO IR with optimum-intel's defaults (fp32 weights in the IR: the U-Net has < 1e9 parameters, below
optimum's automatic int8 threshold), and the 2.1 GB fp16 single file (benchmarks/sd15_file.py) for sd.cpp.
"""

from __future__ import annotations

import time

_T_TOP = time.time()  # before any other import: the fallback "process start" when the parent gives no BENCH_T0

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"  # bench.py's image piece uses the same
WIDTH = HEIGHT = 512
STEPS = 20
CFG = 7.5
SEED = 0
THREADS = 2

HERE = Path(__file__).resolve()
# bench.py's --workdir default; the venv defaults to a folder in it, or wherever $LDM_BENCH_VENV says
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "ldm-bench"
DEFAULT_VENV = Path(os.environ.get("LDM_BENCH_VENV") or DEFAULT_WORKDIR / "venv")


# ------------------------------------------------------------------------------------------ parent API


def venv_python(venv: Path | str | None = None) -> Path:
    return Path(venv or DEFAULT_VENV) / "bin" / "python"


def contender_commands(workdir: Path | str = DEFAULT_WORKDIR, venv: Path | str | None = None,
                       unet_only: bool = False) -> dict[str, list[str]]:
    """name -> argv of one fresh-process run of each contender on bench.py's weights in `workdir`.

    Expects <workdir>/sd15-openvino (prepare_contenders makes it) and <workdir>/sd15-fp16.safetensors
    (sd15_file.write_sd15_file). With unet_only, adds "openvino unet": OpenVINO's U-Net request alone."""
    workdir = Path(workdir)
    py = str(venv_python(venv))
    out = workdir / "out"
    commands = {
        "openvino": [py, str(HERE), "--tool", "openvino", "--folder", str(workdir / "sd15-openvino"),
                     "--out", str(out / "contender-openvino.png")],
        "sdcpp": [py, str(HERE), "--tool", "sdcpp", "--file", str(workdir / "sd15-fp16.safetensors"),
                  "--out", str(out / "contender-sdcpp.png")],
    }
    if unet_only:
        commands["openvino unet"] = [py, str(HERE), "--tool", "openvino", "--folder",
                                     str(workdir / "sd15-openvino"), "--unet-only"]
    return commands


def contenders_available(venv: Path | str | None = None) -> dict[str, str | None]:
    """name -> None if the contender's package imports in the venv, else why not (so bench.py can skip it)."""
    py = venv_python(venv)
    checks = {"openvino": "import openvino, optimum.intel", "sdcpp": "import stable_diffusion_cpp"}
    if not py.exists():
        return {name: f"no contender venv at {py.parent.parent} (see benchmarks/contenders.md)" for name in checks}
    status = {}
    for name, code in checks.items():
        proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
        status[name] = None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]
    return status


def prepare_contenders(workdir: Path | str = DEFAULT_WORKDIR, venv: Path | str | None = None) -> None:
    """Export <workdir>/sd15-diffusers to <workdir>/sd15-openvino once (in the venv; skipped when present)."""
    workdir = Path(workdir)
    if (workdir / "sd15-openvino" / "model_index.json").is_file():
        return
    subprocess.run([str(venv_python(venv)), str(HERE), "--export", str(workdir / "sd15-diffusers"),
                    str(workdir / "sd15-openvino")], check=True, env=_child_env())


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS=str(THREADS))  # torch in the OpenVINO child, and ggml's OpenMP pool
    env.pop("PYTHONPATH", None)  # the venv must not see the repo's src/ or another venv's packages
    return env


def run_contender(argv: list[str], timeout: float | None = 3600) -> dict:
    """Run one contender command (from contender_commands) in a fresh process; its JSON line as a dict.

    Adds wall_s (measured here), loadavg (/proc/loadavg's 1-minute figure just before the run) and argv.
    Raises RuntimeError with the child's stderr tail when it fails."""
    env = _child_env()
    loadavg = Path("/proc/loadavg").read_text().split()[0]
    env["BENCH_T0"] = repr(time.time())  # the child measures "process start" from here, like bench.py's
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"contender"' in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"contender failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result.update(wall_s=round(wall, 3), loadavg=float(loadavg), argv=argv)
    if "whole_image_s" in result and result["steps"] != STEPS:
        # A shortened run (sd.cpp takes long on 2 cores): what the STEPS-step image would take, from its parts.
        result["whole_image_est_s"] = round(result["start_to_first_step_s"] + STEPS * result["step_interval_s"]
                                            + result["after_last_step_s"], 3)
    return result


def bench(workdir: Path, runs: int, venv: Path | None, unet_only: bool, sdcpp_steps: int | None = None) -> list[dict]:
    """--runs rounds; in each, every contender once in a fresh process, one after another.

    sdcpp_steps shortens sd.cpp's runs (it can take ~20 s a step, much more under load); their table row then
    also shows whole_image_est_s, the STEPS-step image estimated from the measured parts."""
    prepare_contenders(workdir, venv)
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    commands = contender_commands(workdir, venv, unet_only)
    if sdcpp_steps:
        commands["sdcpp"] += ["--steps", str(sdcpp_steps)]
    results: list[dict] = []
    for round_ in range(runs):
        for name, argv in commands.items():
            r = run_contender(argv)
            r["round"] = round_
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "argv"}), flush=True)
    print()
    cols = ("start_to_first_step_s", "per_step_s", "step_interval_s", "whole_image_s", "whole_image_est_s",
            "after_last_step_s", "peak_rss_gib")
    print("| contender | steps | precision | sampler | " + " | ".join(cols) + " | loadavg |")
    print("|---" * (len(cols) + 5) + "|")
    for name in commands:
        rs = [r for r in results if r["contender"] == name]
        cells = []
        for c in cols:
            vals = [r[c] for r in rs if r.get(c) is not None]
            cells.append(f"{statistics.median(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})" if vals else "")
        print(f"| {name} | {rs[0]['steps']} | {rs[0]['precision']} | {rs[0].get('sampler', '')} | " + " | ".join(cells)
              + f" | {', '.join(str(r['loadavg']) for r in rs)} |")
    return results


# ------------------------------------------------------------------------------------------ child half


def _t0() -> float:
    return float(os.environ.get("BENCH_T0", _T_TOP))


def _peak_rss_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmHWM")


def _image_stats(img) -> tuple[float, float]:
    import numpy as np

    a = np.asarray(img, dtype=np.float32)
    return float(a.mean()), float(a.std())


def export_openvino(src: Path, dst: Path) -> None:
    """Export a diffusers SD folder to OpenVINO IR with optimum-intel's defaults (what `optimum-cli export
    openvino --task text-to-image` does), once: an existing dst is kept.

    Why not optimum's main_export on the folder directly: the folder's text encoder was saved by a newer
    transformers (5.24, ldm's venv) whose CLIPTextModel checkpoint keys lack the "text_model." prefix, and
    optimum-intel 2.2 caps transformers below 5.6; loaded by that older CLIPTextModel, every text-encoder
    weight would be silently re-initialised at random. So the pipeline is loaded here, the text encoder's
    weights are loaded again under the names this transformers expects, and the fixed pipeline is exported."""
    import shutil

    if (dst / "model_index.json").is_file():
        print(f"{dst} exists; not exporting again", file=sys.stderr)
        return
    import torch
    from diffusers import StableDiffusionPipeline
    from optimum.exporters.openvino import export_from_model
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True, torch_dtype=torch.float32)
    state = load_file(str(src / "text_encoder" / "model.safetensors"))
    want = set(pipe.text_encoder.state_dict())
    if not set(state) & want:  # saved under the other naming: add or drop "text_model."
        state = ({f"text_model.{k}": v for k, v in state.items()} if any(k.startswith("text_model.") for k in want)
                 else {k.removeprefix("text_model."): v for k, v in state.items()})
    missing, unexpected = pipe.text_encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, rebuilt by the model
    if missing or unexpected:
        raise RuntimeError(f"text encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_from_model(pipe, tmp, task="text-to-image")
    tmp.rename(dst)
    print(f"exported {src} -> {dst}", file=sys.stderr)


def run_openvino(folder: Path, out: Path | None, static: bool) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)  # the pipeline's scheduler and tensor glue run in torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.intel import OVStableDiffusionPipeline

    # Defaults but the thread count: no INFERENCE_PRECISION_HINT (bf16 wherever the CPU has bf16), dynamic
    # shapes unless --static, no CACHE_DIR (optimum sets one only for GPUs).
    ov_config = {"INFERENCE_NUM_THREADS": THREADS}
    pipe = OVStableDiffusionPipeline.from_pretrained(folder, ov_config=ov_config, compile=not static,
                                                     local_files_only=True)
    if static:  # Intel's guides reshape to the one shape they run, then compile
        pipe.reshape(batch_size=1, height=HEIGHT, width=WIDTH, num_images_per_prompt=1)
        pipe.compile()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # bench.py's DPM++ 2M

    calls: list[tuple[float, float]] = []  # (start, end) of every U-Net evaluation
    forward = pipe.unet.forward

    def timed_forward(*args, **kwargs):  # OVModelUnet.__call__ looks up self.forward: this instance attribute wins
        start = time.time()
        result = forward(*args, **kwargs)
        calls.append((start, time.time()))
        return result

    pipe.unet.forward = timed_forward
    step_ends: list[float] = []

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        step_ends.append(time.time())
        return callback_kwargs

    image = pipe(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                 guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), output_type="np",
                 callback_on_step_end=on_step_end).images[0]
    if not np.isfinite(image).all():
        raise RuntimeError("OpenVINO produced a non-finite image")
    from PIL import Image

    pil = Image.fromarray((image * 255).round().clip(0, 255).astype("uint8"))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        pil.save(out)
    done = time.time()
    t0 = _t0()
    # The first step end is measured from the first U-Net start, so all intervals are whole steps.
    ends = [calls[0][0]] + step_ends
    return {
        "start_to_first_step_s": calls[0][0] - t0,
        "per_step_s": statistics.median(e - s for s, e in calls),
        "first_unet_call_s": calls[0][1] - calls[0][0],
        "unet_calls": len(calls),
        "step_interval_s": statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "whole_image_s": done - t0,
        "after_last_step_s": done - ends[-1],  # VAE decode + PNG
        "peak_rss_gib": _peak_rss_gib(),
        "precision": _ov_precision(pipe.unet.request),
        "vae_precision": _ov_precision(pipe.vae_decoder.request),
        "text_encoder_precision": _ov_precision(pipe.text_encoder.request),
        "sampler": "diffusers DPMSolverMultistepScheduler (DPM++ 2M), from the model's scheduler config",
        "shapes": "static" if static else "dynamic",
        **dict(zip(("image_mean", "image_std"), _image_stats(pil))),
        **_versions("openvino", "optimum-intel", "diffusers"),
    }


def _ov_precision(compiled) -> str:
    """The precision a compiled OpenVINO model runs in ("bf16", "f32"): what the CPU plugin chose by default."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def run_openvino_unet(folder: Path, runs: int) -> dict:
    """OpenVINO's U-Net infer request alone at batch 2, as the pipeline compiles it (same ov_config)."""
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(folder / "unet" / "openvino_model.xml")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"})
    first_ready = time.time()
    rng = np.random.default_rng(SEED)
    inputs = {}
    for port in compiled.inputs:  # sample, timestep, encoder_hidden_states (names from the export)
        name = port.any_name
        if name == "sample":
            inputs[name] = rng.standard_normal((2, 4, HEIGHT // 8, WIDTH // 8), dtype=np.float32)
        elif name == "encoder_hidden_states":
            inputs[name] = rng.standard_normal((2, 77, 768), dtype=np.float32)
        elif name == "timestep":
            shape = [2 if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
            inputs[name] = np.full(shape, 500, dtype=port.get_element_type().to_dtype())
        else:
            raise RuntimeError(f"unexpected U-Net input {name}")
    request = compiled.create_infer_request()
    start = time.time()
    request.infer(inputs)  # warm-up: with dynamic shapes the first call also prepares kernels for them
    warm = time.time() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = request.infer(inputs)
        times.append(time.perf_counter() - start)
    if not np.isfinite(next(iter(out.values()))).all():
        raise RuntimeError("OpenVINO U-Net output is not finite")
    return {
        "per_step_s": statistics.median(times),
        "runs_s": [round(t, 3) for t in times],
        "warmup_s": warm,
        "compile_s": first_ready - _t0(),
        "peak_rss_gib": _peak_rss_gib(),
        "precision": _ov_precision(compiled),
        **_versions("openvino"),
    }


def run_sdcpp(file: Path, out: Path | None, flash: bool) -> dict:
    from stable_diffusion_cpp import StableDiffusion

    # wtype "default" keeps each tensor's type as stored (the file's fp16); n_threads 2 as every contender.
    sd = StableDiffusion(model_path=str(file), n_threads=THREADS, verbose=False,
                         diffusion_flash_attn=flash)
    events: list[tuple[float, int, int]] = []

    def progress(step: int, steps: int, _avg: float) -> None:
        events.append((time.time(), step, steps))

    images = sd.generate_image(PROMPT, negative_prompt=NEGATIVE, width=WIDTH, height=HEIGHT, cfg_scale=CFG,
                               sample_method="dpm++2m", scheduler="discrete", sample_steps=STEPS, seed=SEED,
                               progress_callback=progress)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
    done = time.time()
    t0 = _t0()
    # sd.cpp reports (0, steps) just before the first denoiser call, then (i, steps) after step i. The model's
    # tensor-loading progress goes through the same callback but happens in the constructor, before ours is set.
    sampling = [(t, s) for t, s, n in events if n == STEPS]
    start = next(t for t, s in sampling if s == 0)
    ends = [start] + [t for t, s in sampling if s > 0]
    mean, std = _image_stats(images[0])
    if std == 0:
        raise RuntimeError("stable-diffusion.cpp produced a constant image (NaN upstream?)")
    return {
        "start_to_first_step_s": start - t0,
        "per_step_s": statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "step_interval_s": statistics.median(b - a for a, b in zip(ends, ends[1:])),
        "steps_seen": len(ends) - 1,
        "whole_image_s": done - t0,
        "after_last_step_s": done - ends[-1],  # VAE decode + PNG
        "peak_rss_gib": _peak_rss_gib(),
        "precision": "f16 (weights as stored, wtype default)",
        "sampler": "sd.cpp dpm++2m, discrete schedule",
        "flash_attn": flash,
        "image_mean": mean,
        "image_std": std,
        **_versions("stable-diffusion-cpp-python"),
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import version

    return {f"{n}_version": version(n) for n in names}


def main() -> None:
    global STEPS  # --steps overrides it for smoke tests; every run reports the steps it ran
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=("openvino", "sdcpp"))
    p.add_argument("--folder", type=Path, help="OpenVINO IR folder (from --export)")
    p.add_argument("--file", type=Path, help="single-file .safetensors for sd.cpp")
    p.add_argument("--out", type=Path, help="PNG to write")
    p.add_argument("--unet-only", action="store_true", help="OpenVINO: time the U-Net request alone")
    p.add_argument("--runs", type=int, default=5, help="--unet-only: timed calls; --bench: rounds")
    p.add_argument("--static", action="store_true", help="OpenVINO: reshape to 512x512 batch 1 before compiling")
    p.add_argument("--steps", type=int, default=STEPS, help="sampling steps (20 for the benchmark; fewer for a smoke test)")
    p.add_argument("--flash", action="store_true", help="sd.cpp: diffusion_flash_attn (off by default)")
    p.add_argument("--export", nargs=2, type=Path, metavar=("SRC_DIFFUSERS", "DST_IR"))
    p.add_argument("--bench", action="store_true", help="parent: run every contender --runs times, print medians")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--venv", type=Path, default=None)
    p.add_argument("--with-unet", action="store_true", help="--bench: also the OpenVINO U-Net-only run")
    p.add_argument("--sdcpp-steps", type=int, default=None, help="--bench: shorter sd.cpp runs (see whole_image_est_s)")
    a = p.parse_args()
    STEPS = a.steps
    if a.bench:
        bench(a.workdir, a.runs, a.venv, a.with_unet, a.sdcpp_steps)
        return
    if a.export:
        export_openvino(*a.export)
        return
    if a.tool == "openvino" and a.unet_only:
        result = {"contender": "openvino unet", **run_openvino_unet(a.folder, a.runs)}
    elif a.tool == "openvino":
        result = {"contender": "openvino", **run_openvino(a.folder, a.out, a.static)}
    elif a.tool == "sdcpp":
        result = {"contender": "sdcpp", **run_sdcpp(a.file, a.out, a.flash)}
    else:
        p.error("give --tool, --export or --bench")
    result["steps"] = STEPS
    # One line, last on stdout: run_contender parses it (libraries may print before it).
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
