"""ldm vs diffusers on the same random weights in SD1.5 shapes, on this machine, side by side.

    python benchmarks/bench.py                      # everything (about half an hour on 2 cores)
    python benchmarks/bench.py --pieces unet,vae    # some pieces
    python benchmarks/bench.py --markdown docs/performance-table.md

Pieces (each tool's numbers come from the same process and the same weights, runs interleaved so
that noise from other load hits both; medians of --runs runs after one warm-up):
  text   CLIP text encoder, batch 2 (one prompt + negative)
  prompt a request's text conditioning, prompt + negative, parse to context: a 1-chunk prompt against a
         weighted 3-chunk one (A1111 syntax, ~200 tokens), ldm bf16 and fp32; diffusers' encode_prompt of
         the 1-chunk prompt (it has no long prompts) for scale
  unet   one U-Net step at 512x512 (latents 64x64), batch 2 (CFG), 77 tokens
  vae    VAE decode of one 512x512 image
  encode VAE encode of one 512x512 image (what img2img adds to text-to-image, beside its fewer steps)
  image  one 512x512 image, 20 steps DPM++ 2M, CFG 7.5: diffusers' StableDiffusionPipeline and ldm's
         pipeline.generate, each with its defaults on this CPU, plus diffusers' best (bf16 + channels_last)
  load   `ldm generate` from an SD1.5-shaped fp16 single file (~2.1 GB, written once to --workdir):
         process start to the first U-Net step, and the process's peak RSS for a whole image; the same
         for diffusers loading its folder (peak RSS). --src DIR runs ldm from another source tree
         (before/after comparisons of loading changes).
  tiles  peak RSS of a VAE decode at 512, 1024, 2048 px, untiled and tiled (512 px tiles, 128 px
         blended overlaps), each in its own process, and max/mean |difference| tiled vs untiled
  lora   applying a rank-128 LoRA (kohya layout, every attention and feed-forward linear of the U-Net and
         text encoder, fp16) to the 2.1 GB fp16 file: process start to first step and peak RSS with and
         without `--lora`, the difference being the merge's cost
  hires  hires fix 512 -> 1024 end to end (20 steps, then 10 of 20 at 1024² from the resized latents): ldm's
         CLI against diffusers' txt2img + img2img pipelines composed so (bf16 + channels_last), one run each
  lcm    a whole 512² image from the 2.1 GB fp16 file, process start to PNG: 4 LCM steps at CFG 1 with an
         LCM-LoRA-shaped LoRA (rank 64 on every linear and convolution of the U-Net, kohya layout, as
         latent-consistency/lcm-lora-sdv1-5 has them; random weights, so only the time means anything)
         against 20 DPM++ 2M steps at CFG 7.5 without it
  peers  the CPU engines a user picks instead, each with its own defaults, fresh processes, interleaved round
         by round: `ldm generate` from the 2.1 GB fp16 file, diffusers' default StableDiffusionPipeline (fp32)
         from its folder, OpenVINO (optimum-intel, exported IR) and stable-diffusion.cpp (the fp16 file), the
         last two from their own venv (benchmarks/contenders.md); one 512² image, 20 steps, CFG 7.5: start to
         first step, U-Net step at batch 2, whole image, peak RSS, and per-round ratios against ldm
  fewsteps  one 512² image in 1 step at CFG 1 (SD-Turbo's settings) from the 2.1 GB fp16 file, decoded by the
         VAE or a TAESD (--taesd, random weights in madebyollin's structure): `ldm generate` processes
         (interleaved) and requests to a warm `ldm serve`
  deepcache  --deep-cache 0/2/3/5: one 512² SD1.5-shaped image each (fresh processes, interleaved), and the
         demo model's prompt adherence and PSNR against the exact images at each interval
  tome   --tome 0/0.3/0.5/0.7 (token merging), measured as deepcache is
  compile  torch.compile of ldm's U-Net: first compile, then a new process with a warm cache
  profile  where one U-Net step's time goes in each tool (torch.profiler, self time): attention
         (SDPA), convolutions, linear layers, the rest; the shares explain how close the step ratio
         can come to the goal: attention runs the same PyTorch kernel in both tools
  demo   bf16 quality: prompt adherence of the bundled demo model (weights/ldm-demo.safetensors),
         fp32 against bf16 (prepared, fused), same cases and seeds

"diffusers' best" is bf16 weights + channels_last (its fastest eager configuration on this CPU).
Nothing here is a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

UNET_TFLOP = 1.6065  # one SD1.5 U-Net forward, batch 2, 64x64 latents, 77 tokens (torch FlopCounterMode)
VAE_TFLOP = 2.5145  # one SD1.5 VAE decode to 512x512
BF16_PEAK_TFLOPS = 2.2  # measured bf16 matmul peak of this 2-core machine (issue 5)


# ------------------------------------------------------------------------------------ bookkeeping


@dataclass
class Results:
    rows: list[tuple[str, ...]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *row: object) -> None:
        self.rows.append(tuple(str(c) for c in row))
        print(" | ".join(str(c) for c in row), flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(text, flush=True)

    def markdown(self) -> str:
        lines = ["| what | measured | median s (runs) | vs diffusers best | vs diffusers fp32 |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])


def timed(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """One warm-up each, then `runs` rounds calling every function once per round (interleaved)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def report(results: Results, what: str, times: dict[str, list[float]], best: str, default: str,
           flops: float | None = None) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, values in times.items():
        extra = ""
        if flops and name.startswith("ldm"):
            extra = f" ({flops / med[name]:.2f} TFLOP/s, {flops / med[name] / BF16_PEAK_TFLOPS:.0%} of bf16 peak)"
        results.add(what, name + extra, f"{med[name]:.3f} ({', '.join(f'{v:.2f}' for v in values)})",
                    f"{med[name] / med[best]:.2f}x", f"{med[name] / med[default]:.2f}x")


def machine_load() -> str:
    load1, load5, _ = os.getloadavg()
    training = subprocess.run(["pgrep", "-f", "ldmcli.demo.train"], capture_output=True, text=True).stdout.strip()
    return f"load average {load1:.1f}/{load5:.1f}" + (" (a training run was active)" if training else "")


# ------------------------------------------------------------------------------------ models


def diffusers_folder(workdir: Path) -> Path:
    """A full-size SD1.5-structured diffusers folder with random weights (fp32, written once)."""
    from sd15_pipeline import write_sd15_folder

    return write_sd15_folder(workdir / "sd15-diffusers")


def load_both(folder: Path, *, ldm_dtypes=("bf16",), diffusers_dtypes=("fp32", "bf16")):
    """{name: (pipeline-like)} for diffusers (fp32 default / bf16+channels_last best) and ldm."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ldmcli import device, pipeline
    from ldmcli.device import dtype_name

    out = {}
    for d in diffusers_dtypes:
        dtype = device.DTYPES[d]
        pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if d != "fp32":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        out[f"diffusers {d}" + (" + channels_last" if d != "fp32" else "")] = pipe
    for d in ldm_dtypes:
        dtype = device.choose_dtype("cpu", "auto")[0] if d == "auto" else device.DTYPES[d]
        model = pipeline.load(folder, dtype=dtype)
        pipeline.optimize(model)  # what `ldm generate` does
        out[f"ldm {dtype_name(dtype)}"] = model
    return out


# ------------------------------------------------------------------------------------ pieces


def piece_components(results: Results, folder: Path, runs: int, which: set[str], with_ldm_fp32: bool) -> None:
    import torch

    models = load_both(folder, ldm_dtypes=("bf16", "fp32") if with_ldm_fp32 else ("bf16",))
    best, default = "diffusers bf16 + channels_last", "diffusers fp32"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (2, 77), generator=g)

    def dt(name):
        return torch.float32 if "fp32" in name else torch.bfloat16

    if "text" in which:
        fns = {}
        for name, m in models.items():
            if name.startswith("diffusers"):
                fns[name] = (lambda m=m: m.text_encoder(ids)[0])
            else:
                fns[name] = (lambda m=m: m.text_encoder(ids).hidden_states)
        report(results, "text encoder, batch 2", timed(fns, runs), best, default)

    if "unet" in which:
        x = torch.randn(2, 4, 64, 64, generator=g)
        t = torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, 768, generator=g)
        fns = {}
        for name, m in models.items():
            xi, ci = x.to(dt(name)), ctx.to(dt(name))
            if "channels_last" in name:
                xi = xi.contiguous(memory_format=torch.channels_last)
            if name.startswith("diffusers"):
                fns[name] = (lambda m=m, xi=xi, ci=ci: m.unet(xi, t, ci).sample)
            else:
                fns[name] = (lambda m=m, xi=xi, ci=ci: m.unet(xi, t, ci))
        report(results, "U-Net step 512², batch 2", timed(fns, runs), best, default, UNET_TFLOP)
        _errors(results, "U-Net, one forward", fns, best)

    if "vae" in which:
        z = torch.randn(1, 4, 64, 64, generator=g)
        fns = {}
        for name, m in models.items():
            zi = z.to(dt(name))
            if name.startswith("diffusers"):
                fns[name] = (lambda m=m, zi=zi: m.vae.decode(zi).sample)
            else:
                fns[name] = (lambda m=m, zi=zi: m.vae.decode(zi))
        report(results, "VAE decode 512²", timed(fns, runs), best, default, VAE_TFLOP)
        _errors(results, "VAE decode (pixels in [-1, 1])", fns, best)

    if "encode" in which:  # img2img's extra cost over text-to-image: one encode of the init image
        from ldmcli import vae_encode

        image = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
        fns = {}
        for name, m in models.items():
            xi = image.to(dt(name))
            if "channels_last" in name:
                xi = xi.contiguous(memory_format=torch.channels_last)
            if name.startswith("diffusers"):
                fns[name] = (lambda m=m, xi=xi: m.vae.encode(xi).latent_dist.mean)
            else:
                fns[name] = (lambda m=m: vae_encode.encode(m.vae, image, noise=None, scale_factor=1.0))
        report(results, "VAE encode 512² (img2img's init image)", timed(fns, runs), best, default)


SHORT_PROMPT = "a lighthouse on a cliff at dusk, (oil painting:1.2), dramatic sky"
LONG_PROMPT = ", ".join(
    ["a (lighthouse:1.3) on a rocky cliff at dusk", "[crashing waves] below", "((dramatic storm clouds))",
     "oil painting in the style of the old masters", "warm light from the lantern room", "seagulls",
     "a small fishing boat in the distance", "wet rocks glistening", "BREAK highly detailed",
     "intricate brush strokes", "(volumetric light:1.1)", "muted colour palette", "golden hour",
     "a winding path up the cliff", "wildflowers in the grass", "an old stone cottage", "smoke from the chimney",
     "(masterpiece:1.2)", "best quality", "sharp focus", "rule of thirds", "cinematic composition",
     "soft rim light", "long shadows", "a flock of birds", "mist over the sea", "distant mountains",
     "BREAK a red sailing ship on the horizon", "(foam on the waves:0.8)", "reflections on the water",
     "a lone figure on the path", "a dog beside the figure", "[lens flare]", "film grain", "subtle vignette",
     "moss on the stones", "a weathered wooden fence", "an iron railing", "the first stars", "a crescent moon"])


def piece_prompt(results: Results, folder: Path, runs: int) -> None:
    """Text conditioning of a request (prompt + negative), as `pipeline.sample_latents` builds it."""
    from ldmcli import text_conditioning
    from ldmcli.request import ImageRequest

    models = load_both(folder, ldm_dtypes=("bf16", "fp32"), diffusers_dtypes=("fp32",))
    ldm_any = next(m for name, m in models.items() if name.startswith("ldm"))
    fns = {}
    for label, prompt in (("1 chunk", SHORT_PROMPT), ("3 chunks", LONG_PROMPT)):
        request = ImageRequest(prompt=prompt, negative_prompt="blurry, low quality", steps=20)
        for name, m in models.items():
            if name.startswith("diffusers"):
                if label == "1 chunk":
                    fns[f"{name} encode_prompt, {label}"] = (
                        lambda m=m, r=request: m.encode_prompt(r.prompt, "cpu", 1, True, r.negative_prompt))
                continue

            def encode(m=m, r=request):
                m.text_cache.clear()  # each round encodes anew, as a new job does
                return text_conditioning.request_conditioning(m, r)

            fns[f"{name}, {label}"] = encode
    times = timed(fns, runs)
    tokens = {label: text_conditioning.request_conditioning(ldm_any, ImageRequest(prompt=p))[0][0][1].context.shape[1]
              for label, p in (("1 chunk", SHORT_PROMPT), ("3 chunks", LONG_PROMPT))}
    assert tokens["3 chunks"] == 3 * 77, tokens  # the long prompt is what its label says
    report(results, f"prompt conditioning ({tokens['1 chunk']} / {tokens['3 chunks']} context tokens)", times,
           "diffusers fp32 encode_prompt, 1 chunk", "diffusers fp32 encode_prompt, 1 chunk")
    med = {k: statistics.median(v) for k, v in times.items()}
    for d in ("bf16", "fp32"):
        one, three = med[f"ldm {d}, 1 chunk"], med[f"ldm {d}, 3 chunks"]
        results.note(f"ldm {d}: a 3-chunk prompt adds {1000 * (three - one):.0f} ms to its 1-chunk time "
                     f"({1000 * one:.0f} ms), {three / one:.1f}x")


# How the profiler names each kind of op, for the profile piece.
OP_KINDS = {
    "attention (SDPA)": ("scaled_dot_product", "flash_attention"),
    "convolution": ("convolution", "conv2d", "mkldnn_convolution"),
    "linear / matmul": ("linear", "addmm", "matmul", "mm", "bmm"),
}
ATTENTION_TFLOP = 0.2521  # SDPA's QK^T and PV in one SD1.5 U-Net forward, batch 2, 64x64 latents, 77 tokens


def piece_profile(results: Results, folder: Path, runs: int) -> None:
    """Self CPU time of one U-Net step by kind of op, ldm against diffusers' best, medians of `runs`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    models = load_both(folder, diffusers_dtypes=("bf16",))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g).bfloat16()
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=g).bfloat16()
    for name, m in models.items():
        if name.startswith("diffusers"):
            xi = x.contiguous(memory_format=torch.channels_last)
            step = lambda m=m, xi=xi: m.unet(xi, t, ctx).sample  # noqa: E731
        else:
            step = lambda m=m: m.unet(x, t, ctx)  # noqa: E731
        shares: dict[str, list[float]] = {}
        with torch.inference_mode():
            step()
            for _ in range(runs):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    step()
                totals = {kind: 0.0 for kind in [*OP_KINDS, "everything else"]}
                for event in prof.key_averages():
                    kind = next((k for k, keys in OP_KINDS.items() if any(key in event.key for key in keys)),
                                "everything else")
                    totals[kind] += event.self_cpu_time_total / 1e6
                for kind, seconds in totals.items():
                    shares.setdefault(kind, []).append(seconds)
        total = sum(statistics.median(v) for v in shares.values())
        parts = ", ".join(f"{kind} {statistics.median(v):.2f} s ({statistics.median(v) / total:.0%})"
                          for kind, v in shares.items())
        attention = statistics.median(shares["attention (SDPA)"])
        results.note(f"U-Net step profile, {name}: {total:.2f} s = {parts}; attention at "
                     f"{ATTENTION_TFLOP / attention:.2f} TFLOP/s")


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _errors(results: Results, what: str, fns: dict, best: str) -> None:
    """bf16 outputs against the fp32 reference (diffusers fp32; ldm's fp32 path equals it to ~1e-5)."""
    import torch

    with torch.inference_mode():
        ref = fns["diffusers fp32"]().float()
        parts = []
        for name in [n for n in fns if n != "diffusers fp32"]:
            out = fns[name]().float()
            parts.append(f"{name}: relative L2 {_rel(out, ref):.2e}, max |d| {(out - ref).abs().max():.3g}")
    results.note(f"{what} against fp32 (diffusers fp32): " + "; ".join(parts))


def piece_image(results: Results, folder: Path, runs: int) -> None:
    import torch

    from ldmcli import pipeline
    from ldmcli.request import ImageRequest

    models = load_both(folder, ldm_dtypes=("auto",))
    prompt, negative = "a photograph of an astronaut riding a horse", "blurry"
    fns = {}
    for name, m in models.items():
        if name.startswith("diffusers"):
            fns[name] = (lambda m=m: m(prompt, negative_prompt=negative, num_inference_steps=20, guidance_scale=7.5,
                                       generator=torch.Generator().manual_seed(0), output_type="np").images)
        else:
            request = ImageRequest(prompt=prompt, negative_prompt=negative, steps=20, cfg_scale=7.5, sampler="dpmpp_2m")
            fns[name + " (auto)"] = (lambda m=m, r=request: pipeline.generate(m, r, [0]))
    report(results, "image 512², 20 steps DPM++ 2M, CFG 7.5", timed(fns, runs),
           "diffusers bf16 + channels_last", "diffusers fp32")


CHILD_LDM = r"""
import os, sys, time, json
t0 = float(os.environ["BENCH_T0"])
import ldmcli.models.unet as unet
forward = unet.UNetModel.forward
def first(self, *a, **k):
    if not getattr(first, "done", False):
        first.done = True
        print(json.dumps({"first_step": time.time() - t0}), file=sys.stderr, flush=True)
    return forward(self, *a, **k)
unet.UNetModel.forward = first
from ldmcli.cli import cli
sys.argv = ["ldm", *sys.argv[1:]]
try:
    cli()
except SystemExit as e:
    if e.code: raise
"""

CHILD_DIFFUSERS = r"""
import sys, time, torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
folder, dtype = sys.argv[1], {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                               requires_safety_checker=False, local_files_only=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
if dtype != torch.float32:
    pipe.unet.to(memory_format=torch.channels_last); pipe.vae.to(memory_format=torch.channels_last)
pipe("a cat", num_inference_steps=int(sys.argv[3]), guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
"""


# Prepended to every child: its own peak RSS (VmHWM) on stderr at exit. Not the rusage of wait4: Linux
# carries ru_maxrss across exec, so a child forked from this (large) process would report our size.
PEAK_RSS = r"""
import atexit, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(f"VmHWM_KB {line.split()[1]}", file=sys.stderr, flush=True)
atexit.register(_peak)
"""


def run_child(code: str, args: list[str], env_src: str | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stderr) of `python -c code args` in a fresh process."""
    env = dict(os.environ)
    if env_src:
        env["PYTHONPATH"] = env_src + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_T0"] = repr(time.time())
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", PEAK_RSS + code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read() if proc.stderr else ""  # read before waiting: a full pipe would block the child
    status = proc.wait()
    wall = time.perf_counter() - start
    if status:
        raise RuntimeError(f"child failed ({status}):\n{err[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in err.splitlines() if line.startswith("VmHWM_KB ")))
    return wall, peak_kb / 1024**2, err


def piece_load(results: Results, workdir: Path, runs: int, src: str | None, steps: int, folder: Path | None) -> None:
    from sd15_file import write_sd15_file

    path = write_sd15_file(workdir / "sd15-fp16.safetensors")
    out = workdir / "out"
    args = ["generate", "a cat", "-m", str(path), "--steps", str(steps), "-s", "1", "-o", str(out) + "/",
            "--overwrite", "-q", "--sampler", "dpmpp_2m"]
    first, rss, wall = [], [], []
    for _ in range(runs + 1):  # the first run also warms the page cache
        w, r, err = run_child(CHILD_LDM, args, src)
        line = next(line for line in err.splitlines() if line.startswith("{"))
        first.append(json.loads(line)["first_step"])
        rss.append(r)
        wall.append(w)
    first, rss, wall = first[1:], rss[1:], wall[1:]
    who = f"ldm ({src})" if src else "ldm"
    results.add(f"`ldm generate` from the 2.1 GB fp16 file, {steps} steps", f"{who}: process start to first step",
                f"{statistics.median(first):.2f} ({', '.join(f'{v:.2f}' for v in first)})", "", "")
    results.add(f"`ldm generate` from the 2.1 GB fp16 file, {steps} steps", f"{who}: peak RSS GiB; whole run s",
                f"{statistics.median(rss):.2f} GiB; {statistics.median(wall):.1f} s", "", "")
    if folder is not None:
        for d in ("fp32", "bf16"):
            w, r, _ = run_child(CHILD_DIFFUSERS, [str(folder), d, str(steps)])
            results.add(f"diffusers folder, {steps} steps", f"diffusers {d}: peak RSS GiB; whole run s",
                        f"{r:.2f} GiB; {w:.1f} s", "", "")


def write_sd15_lora(path: Path, rank: int = 128, lcm: bool = False) -> Path:
    """A kohya-layout LoRA of `rank` for SD 1.5 (written once): every linear layer of the U-Net's
    transformer blocks (diffusers' module names, as kohya writes SD 1.x) and of the text encoder, fp16.
    lcm: LCM-LoRA's layers instead: every linear and convolution of the U-Net but conv_in/conv_out
    (3x3 convolutions as LoCon pairs, down [r, in, 3, 3] and up [out, r, 1, 1]), no text encoder."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    g = torch.Generator().manual_seed(0)
    tensors = {}

    def add(prefix: str, out_features: int, in_features: int, kernel: tuple[int, ...] = ()) -> None:
        down = torch.randn(rank, in_features, *kernel, generator=g) * 0.01
        up = torch.randn(out_features, rank, *(1 for _ in kernel), generator=g) * 0.01
        tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down.half(), up.half()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank // 2)).half()

    if lcm:
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear):
                add("lora_unet_" + name.replace(".", "_"), module.out_features, module.in_features)
            elif isinstance(module, torch.nn.Conv2d) and name not in ("conv_in", "conv_out"):
                add("lora_unet_" + name.replace(".", "_"), module.out_channels, module.in_channels, module.kernel_size)
        save_file(tensors, path)
        return path
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".transformer_blocks." in name:
            add("lora_unet_" + name.replace(".", "_"), module.out_features, module.in_features)
    for layer in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}", 768, 768)
        add(f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1", 3072, 768)
        add(f"lora_te_text_model_encoder_layers_{layer}_mlp_fc2", 768, 3072)
    save_file(tensors, path)
    return path


def piece_lora(results: Results, workdir: Path, runs: int) -> None:
    from sd15_file import write_sd15_file

    model = write_sd15_file(workdir / "sd15-fp16.safetensors")
    lora = write_sd15_lora(workdir / "loras" / "rank128.safetensors")
    size = lora.stat().st_size / 1024**2
    out = workdir / "out"
    base = ["generate", "a cat", "-m", str(model), "--steps", "1", "-s", "1", "-o", str(out) + "/", "--overwrite", "-q",
            "--lora-dir", str(lora.parent)]
    measured = {}
    for label, extra in (("without LoRA", []), ("with the rank-128 LoRA", ["--lora", "rank128:0.8"])):
        first, rss = [], []
        for _ in range(runs + 1):  # the first run also warms the page cache
            _, r, err = run_child(CHILD_LDM, base + extra)
            first.append(json.loads(next(line for line in err.splitlines() if line.startswith("{")))["first_step"])
            rss.append(r)
        measured[label] = (statistics.median(first[1:]), statistics.median(rss[1:]))
        results.add(f"`ldm generate` from the 2.1 GB fp16 file, LoRA {size:.0f} MB", f"ldm {label}: start to first step; peak RSS",
                    f"{measured[label][0]:.2f} s ({', '.join(f'{v:.2f}' for v in first[1:])}); {measured[label][1]:.2f} GiB", "", "")
    (t0, r0), (t1, r1) = measured.values()
    results.note(f"applying the {size:.0f} MB rank-128 LoRA: +{t1 - t0:.2f} s to the first step, "
                 f"+{(r1 - r0) * 1024:.0f} MB peak RSS")


CHILD_DIFFUSERS_HIRES = r"""
import sys, torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
folder, dtype = sys.argv[1], {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                               requires_safety_checker=False, local_files_only=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
if dtype != torch.float32:
    pipe.unet.to(memory_format=torch.channels_last); pipe.vae.to(memory_format=torch.channels_last)
latents = pipe("a cat", num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
second = StableDiffusionImg2ImgPipeline(**pipe.components)
second(prompt="a cat", image=F.interpolate(latents.float(), size=(128, 128), mode="bilinear").to(dtype), strength=0.5,
       num_inference_steps=20, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
"""


def piece_hires(results: Results, workdir: Path, folder: Path) -> None:
    """Hires fix 512 -> 1024 end to end (process start to PNG): 20 DPM++ 2M steps at 512², the latents
    resized (A1111's Latent), 10 steps of a 20-step img2img at 1024² (strength 0.5). ldm's CLI against
    diffusers' two pipelines composed so, bf16 + channels_last (its best here). One run each."""
    from sd15_file import write_sd15_file

    model = write_sd15_file(workdir / "sd15-fp16.safetensors")
    args = ["generate", "a cat", "-m", str(model), "-s", "0", "-o", str(workdir / "out") + "/", "--overwrite", "-q",
            "--steps", "20", "--sampler", "dpmpp_2m", "--cfg-scale", "7.5", "-W", "512", "-H", "512",
            "--hires-scale", "2", "--hires-strength", "0.5"]
    ldm_wall, ldm_rss, _ = run_child(CHILD_LDM, args)
    theirs_wall, theirs_rss, _ = run_child(CHILD_DIFFUSERS_HIRES, [str(folder), "bf16"])
    what = "hires fix 512 -> 1024, 20 + 10 steps DPM++ 2M, process start to image"
    results.add(what, "ldm (auto: bf16): whole run s; peak RSS", f"{ldm_wall:.1f} s; {ldm_rss:.2f} GiB",
                f"{theirs_wall / ldm_wall:.2f}x", "")
    results.add(what, "diffusers bf16 + channels_last, composed: whole run s; peak RSS",
                f"{theirs_wall:.1f} s; {theirs_rss:.2f} GiB", "1.00x", "")


def piece_lcm(results: Results, workdir: Path, runs: int) -> None:
    from sd15_file import write_sd15_file

    model = write_sd15_file(workdir / "sd15-fp16.safetensors")
    lora = write_sd15_lora(workdir / "loras" / "lcm-rank64.safetensors", rank=64, lcm=True)
    size = lora.stat().st_size / 1024**2
    out = workdir / "out"
    base = ["generate", "a cat", "-m", str(model), "-s", "1", "-o", str(out) + "/", "--overwrite", "-q",
            "--width", "512", "--height", "512"]
    cases = {
        "20 steps DPM++ 2M, CFG 7.5": ["--steps", "20", "--sampler", "dpmpp_2m", "--cfg-scale", "7.5"],
        f"LCM-LoRA ({size:.0f} MB, merged), 4 steps LCM, CFG 1": [
            "--steps", "4", "--sampler", "lcm", "--cfg-scale", "1", "--lora-dir", str(lora.parent), "--lora", lora.stem],
    }
    walls: dict[str, list[float]] = {label: [] for label in cases}
    for i in range(runs + 1):  # interleaved; the first round also warms the page cache
        for label, extra in cases.items():
            wall, _, _ = run_child(CHILD_LDM, base + extra)
            if i:
                walls[label].append(wall)
    medians = {label: statistics.median(w) for label, w in walls.items()}
    for label, w in walls.items():
        results.add("`ldm generate`, one 512² image from the 2.1 GB fp16 file, process start to PNG", f"ldm {label}",
                    f"{medians[label]:.1f} ({', '.join(f'{v:.1f}' for v in w)})", "", "")
    (slow, fast) = medians.values()
    results.note(f"LCM-LoRA, 4 steps: a whole image in {fast / slow:.2f}x the time of 20 DPM++ 2M steps "
                 f"({slow / fast:.1f}x faster)")


def write_taesd(path: Path, seed: int = 0) -> Path:
    """A random TAESD in madebyollin's structure, as diffusers' AutoencoderTiny file (what --taesd reads)."""
    import torch
    from safetensors.torch import save_file

    from ldmcli.models.taesd import TinyAutoencoder

    if path.is_file():
        return path
    torch.manual_seed(seed)
    module = TinyAutoencoder()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.6 * math.sqrt(2 / p[0].numel()) if p.ndim == 4 else 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    return path


def _served_seconds(model: Path, extra: list[str], request: dict, requests: int) -> list[float]:
    """Seconds of each of `requests` identical txt2img requests to one fresh `ldm serve` process."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "ldmcli", "serve", "-m", str(model), "--port", "0", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = next(line.split("listening on ", 1)[1].split()[0] for line in proc.stderr if "listening on http://" in line)
        seconds = []
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(requests):
                start = time.perf_counter()
                client.post("/sdapi/v1/txt2img", json=request).raise_for_status()
                seconds.append(time.perf_counter() - start)
        return seconds
    finally:
        proc.terminate()
        proc.wait(60)


def piece_fewsteps(results: Results, workdir: Path, runs: int) -> None:
    """Issue 19's few-steps goal: one 512² image in one step at CFG 1 (SD-Turbo's settings) from the fp16
    SD1.5-shaped file, decoded by the VAE or by a TAESD (--taesd): as `ldm generate` processes (interleaved,
    one uncounted warm-up round) and as requests to a warm `ldm serve` (the first request of each server,
    which packs the weights, reported apart)."""
    from sd15_file import write_sd15_file

    model = write_sd15_file(workdir / "sd15-fp16.safetensors")
    taesd = write_taesd(workdir / "taesd" / "diffusion_pytorch_model.safetensors")
    out = workdir / "out"
    base = ["generate", "a cat", "-m", str(model), "-s", "1", "-o", str(out) + "/", "--overwrite", "-q",
            "--width", "512", "--height", "512", "--steps", "1", "--cfg-scale", "1", "--sampler", "euler_a"]
    cases = {"VAE": [], "TAESD": ["--taesd", str(taesd)]}
    walls: dict[str, list[float]] = {label: [] for label in cases}
    for i in range(runs + 1):
        for label, extra in cases.items():
            wall, _, _ = run_child(CHILD_LDM, base + extra)
            if i:
                walls[label].append(wall)
    for label, w in walls.items():
        results.add("one 512² image, 1 step Euler a, CFG 1, from the 2.1 GB fp16 file", f"`ldm generate`, {label} decode",
                    f"{statistics.median(w):.2f} ({', '.join(f'{v:.2f}' for v in w)})", "", "")
    request = {"prompt": "a cat", "width": 512, "height": 512, "steps": 1, "cfg_scale": 1,
               "sampler_name": "Euler a", "seed": 1}
    for label, extra in cases.items():
        first, *warm = _served_seconds(model, extra, request, runs + 3)
        results.add("one 512² image, 1 step Euler a, CFG 1, from the 2.1 GB fp16 file",
                    f"`ldm serve` request, {label} decode (warm; first request {first:.2f})",
                    f"{statistics.median(warm):.2f} ({', '.join(f'{v:.2f}' for v in warm)})", "", "")


# `ldm generate` as a user runs it, with each U-Net call timed (one call = one step at batch 2 under CFG).
CHILD_LDM_STEPS = r"""
import os, sys, time, json, atexit, statistics
t0 = float(os.environ["BENCH_T0"])
import ldmcli.models.unet as unet
forward, calls = unet.UNetModel.forward, []
def timed(self, *a, **k):
    start = time.time()
    out = forward(self, *a, **k)
    calls.append((start, time.time() - start))
    return out
unet.UNetModel.forward = timed
@atexit.register
def _report():
    print(json.dumps({"start_to_first_step_s": calls[0][0] - t0, "per_step_s": statistics.median(d for _, d in calls),
                      "unet_total_s": sum(d for _, d in calls), "steps": len(calls)}), file=sys.stderr, flush=True)
from ldmcli.cli import cli
sys.argv = ["ldm", *sys.argv[1:]]
try:
    cli()
except SystemExit as e:
    if e.code: raise
"""

# diffusers' default pipeline (fp32 on a CPU, its own scheduler swapped for DPM++ 2M), U-Net calls timed.
CHILD_DIFFUSERS_STEPS = r"""
import os, sys, time, json, statistics
t0 = float(os.environ["BENCH_T0"])
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False,
                                               local_files_only=True)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
forward, calls = pipe.unet.forward, []
def timed(*a, **k):
    start = time.time()
    out = forward(*a, **k)
    calls.append((start, time.time() - start))
    return out
pipe.unet.forward = timed
image = pipe(sys.argv[2], negative_prompt="blurry", num_inference_steps=20, guidance_scale=7.5,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[3])
print(json.dumps({"start_to_first_step_s": calls[0][0] - t0, "per_step_s": statistics.median(d for _, d in calls),
                  "steps": len(calls), "whole_image_s": time.time() - t0}), file=sys.stderr, flush=True)
"""

PEER_PROMPT = "a photograph of an astronaut riding a horse"  # contenders.py's too
# One SD1.5 U-Net forward at batch 2, 64x64 latents, 77 tokens: convolutions 0.888, linear layers 0.467,
# attention's two matmuls 0.252 TFLOP (torch.utils.flop_counter.FlopCounterMode over UNetModel on the meta device).
UNET_STEP_TFLOP = 1.6065


# GEMM shapes of an SD1.5 step (tokens x channels at batch 2) and a square one: the best of them is the bf16
# throughput this CPU reaches in practice (it moves with the clock; one shape alone understated it by 20 %).
PEAK_SHAPES = ((4096, 4096, 4096), (8192, 1280, 1280), (8192, 640, 640), (8192, 320, 1280), (2048, 2560, 2560))


def bf16_matmul_tflops(runs: int = 5) -> float:
    """The bf16 peak this CPU reaches in practice: the best of `runs` bf16 matmuls (oneDNN) over PEAK_SHAPES,
    in TFLOP/s."""
    import torch

    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, w = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
        torch.mm(a, w.t())
        for _ in range(runs):
            start = time.perf_counter()
            torch.mm(a, w.t())
            best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e12)
    return best


def piece_peers(results: Results, workdir: Path, folder: Path, runs: int, skip: set[str], extra_ldm: list[str],
                sdcpp_steps: int | None = None, variants: tuple[str, ...] = ()) -> None:
    """One 512² image with each engine's defaults, fresh processes, interleaved; ratios per round against ldm.

    variants: more `ldm generate` runs in the same rounds, each with these extra arguments (the opt-in levers,
    "--tome 0.5"), compared with every other engine as ldm is. sdcpp_steps shortens stable-diffusion.cpp's runs (~45 s a step here); its whole-image column is then
    contenders.py's estimate of the 20-step image from the measured parts (start, step interval, decode)."""
    import contenders
    from sd15_file import write_sd15_file

    model = write_sd15_file(workdir / "sd15-fp16.safetensors")
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    ldm_args = ["generate", PEER_PROMPT, "-n", "blurry", "-m", str(model), "--steps", "20", "--cfg-scale", "7.5",
                "-W", "512", "-H", "512", "--sampler", "dpmpp_2m", "-s", "0", "-o", str(out / "peer-ldm.png"),
                "--overwrite", "-q", *extra_ldm]

    def ldm(*extra: str) -> dict:
        wall, rss, err = run_child(CHILD_LDM_STEPS, [*ldm_args, *extra])
        record = json.loads(next(line for line in reversed(err.splitlines()) if line.startswith("{")))
        return {**record, "whole_image_s": wall, "peak_rss_gib": rss, "precision": "bf16 (auto)"}

    def diffusers() -> dict:
        wall, rss, err = run_child(CHILD_DIFFUSERS_STEPS, [str(folder), PEER_PROMPT, str(out / "peer-diffusers.png")])
        record = json.loads(next(line for line in reversed(err.splitlines()) if line.startswith("{")))
        return {**record, "peak_rss_gib": rss, "precision": "fp32 (default)"}

    engines = {"ldm": ldm, **{f"ldm {v}": (lambda v=v: ldm(*v.split())) for v in variants},
               "diffusers (default)": diffusers}
    missing = contenders.contenders_available()
    for name, argv in contenders.contender_commands(workdir).items():
        if name in skip:
            continue
        if missing.get(name):
            results.note(f"{name} not run: {missing[name]}")
            continue
        if name == "openvino":
            contenders.prepare_contenders(workdir)
        if name == "sdcpp" and sdcpp_steps:
            argv = [*argv, "--steps", str(sdcpp_steps)]
        engines[name] = (lambda argv=argv: contenders.run_contender(argv))
    engines = {k: v for k, v in engines.items() if k not in skip}
    import torch

    peak = bf16_matmul_tflops()
    results.note(f"bf16 peak in practice (best bf16 matmul of PEAK_SHAPES, {torch.get_num_threads()} threads): {peak:.3f} TFLOP/s; "
                 f"a U-Net step is {UNET_STEP_TFLOP} TFLOP")
    runs_by: dict[str, list[dict]] = {name: [] for name in engines}
    for round_ in range(runs + 1):  # round 0 warms the page cache and is not counted
        for name, run in engines.items():
            load = Path("/proc/loadavg").read_text().split()[0]
            record = run()
            record["loadavg"] = load
            if "whole_image_est_s" in record:  # a shortened run: the 20-step image estimated
                record["whole_image_s"] = record["whole_image_est_s"]
            print(f"round {round_} {name}: {json.dumps({k: v for k, v in record.items() if k != 'argv'})}", flush=True)
            if round_:
                runs_by[name].append(record)
    columns = (("start_to_first_step_s", "start to first step s"), ("per_step_s", "U-Net step s (batch 2)"),
               ("whole_image_s", "whole image s"), ("peak_rss_gib", "peak RSS GiB"))
    for name, records in runs_by.items():
        cells = []
        for key, label in columns:
            values = [r[key] for r in records]
            cells.append(f"{label} {statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")
        step = statistics.median(r["per_step_s"] for r in records)
        cells.append(f"U-Net step at {UNET_STEP_TFLOP / step / peak:.0%} of the bf16 matmul peak")
        results.add("peers: one 512² image, 20 steps, CFG 7.5, each engine's defaults",
                    f"{name}, {records[0].get('precision', '')}, {records[0].get('sampler', 'DPM++ 2M')}",
                    "; ".join(cells), "", "")
    for ours in (name for name in runs_by if name.startswith("ldm")):
        for name in runs_by:
            if name.startswith("ldm") and (ours == "ldm" or name != "ldm"):
                continue  # ldm against the other engines; each variant against them and the exact ldm
            for key, label in columns:
                ratios = [a[key] / b[key] for a, b in zip(runs_by[ours], runs_by[name])]
                results.note(f"{ours} / {name}, {label}: median per-round ratio {statistics.median(ratios):.2f}x "
                             f"({', '.join(f'{r:.2f}' for r in ratios)})")


CHILD_DECODE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[4])
from ldmcli.models.vae import AutoencoderKL, VAEConfig
from ldmcli import optimize, vae_decode
side, tile, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
with torch.device("meta"):
    vae = AutoencoderKL(VAEConfig())
from sd15_pipeline import vae_state_dict
vae.load_state_dict(vae_state_dict(dtype=torch.bfloat16), strict=True, assign=True)
parts = {"vae": vae}
optimize.prepare_for_inference(parts, "cpu", torch.bfloat16)
z = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(1))
with torch.inference_mode():
    start = time.perf_counter()
    img = vae_decode.decode_latents_safely(vae, z, tile=None if tile == "none" else int(tile), overlap=16)
    print(f"{time.perf_counter() - start:.2f}", file=sys.stderr)
torch.save(img.to(torch.float16), out)
"""


def piece_tiles(results: Results, workdir: Path) -> None:
    import torch

    for side in (512, 1024, 2048):
        outs = {}
        for tile in ("none", "64"):
            out = workdir / f"decode-{side}-{tile}.pt"
            wall, rss, err = run_child(CHILD_DECODE, [str(side), tile, str(out), str(HERE)])
            outs[tile] = out
            label = "untiled" if tile == "none" else "tiled 512 px, 128 px overlap"
            results.add(f"VAE decode {side}² bf16", f"{label}: peak RSS GiB; decode s",
                        f"{rss:.2f} GiB; {err.strip().splitlines()[-1]} s", "", "")
        a, b = torch.load(outs["none"]).float(), torch.load(outs["64"]).float()
        d = (a - b).abs()
        results.note(f"tiled vs untiled decode at {side}² (random SD1.5-shaped VAE, pixels in [-1, 1]): "
                     f"max |d| {d.max():.3f}, mean |d| {d.mean():.4f}")


CHILD_COMPILE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from ldmcli import optimize
from ldmcli.models.unet import UNetConfig, UNetModel
from sd15_pipeline import unet_state_dict
with torch.device("meta"):
    unet = UNetModel(UNetConfig())
unet.load_state_dict(unet_state_dict(), strict=True, assign=True)
unet = unet.to(torch.bfloat16)
parts = {"unet": unet}
optimize.prepare_for_inference(parts, "cpu", torch.bfloat16, compile=True, cache_dir=sys.argv[1])
x = torch.randn(2, 4, 64, 64).bfloat16(); t = torch.tensor([500.0, 500.0]); c = torch.randn(2, 77, 768).bfloat16()
with torch.inference_mode():
    s = time.perf_counter(); parts["unet"](x, t, c); first = time.perf_counter() - s
    steps = []
    for _ in range(3):
        s = time.perf_counter(); parts["unet"](x, t, c); steps.append(time.perf_counter() - s)
print(f"{first:.1f} {sorted(steps)[1]:.3f}", file=sys.stderr)
"""


def piece_compile(results: Results, workdir: Path) -> None:
    cache = workdir / "inductor-cache"
    for label in ("cold cache", "warm cache (second process)"):
        _, rss, err = run_child(CHILD_COMPILE, [str(cache), str(HERE)])
        first, step = err.strip().splitlines()[-1].split()
        results.add("ldm U-Net, torch.compile (inductor, freezing), bf16", f"{label}: first call s; step s",
                    f"{first}; {step}", "", "")


def piece_demo(results: Results, seeds: int, path: Path | None) -> None:
    import torch

    from ldmcli import pipeline
    from ldmcli.demo import DEMO_MODEL
    from ldmcli.device import dtype_name
    from ldmcli.demo.analysis import adherence, adherence_cases

    path = path or DEMO_MODEL
    if not path.is_file():
        results.note(f"demo: no {path}; skipped")
        return
    cases = adherence_cases()
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = pipeline.load(path, dtype=dtype)
        pipeline.optimize(model)
        with torch.inference_mode():
            rates[dtype], details = adherence(model, cases, list(range(seeds)))
        name = dtype_name(dtype)
        results.add("demo model prompt adherence", f"ldm {name}: colour / position / shape / all",
                    " / ".join(f"{rates[dtype][k]:.3f}" for k in ("colour", "position", "shape", "all")) +
                    f" ({len(details)} images)", "", "")


# The opt-in levers that trade exactness for speed, each setting as request fields (the `ldm generate` flag
# is the field's name with dashes); the first of each is the exact computation it is compared with.
LOSSY_LEVERS = {
    "deepcache": ("--deep-cache N", {"N = 0": {}, "N = 2": {"deep_cache": 2}, "N = 3": {"deep_cache": 3},
                                     "N = 5": {"deep_cache": 5}}),
    "tome": ("--tome RATIO", {"off": {}, "0.3": {"tome": 0.3}, "0.5": {"tome": 0.5}, "0.7": {"tome": 0.7}}),
}


def piece_lossy(results: Results, workdir: Path, runs: int, seeds: int, lever: str) -> None:
    """A lever of LOSSY_LEVERS: what it buys (one 512² SD1.5-shaped image, 20 steps DPM++ 2M, CFG 7.5, fresh `ldm
    generate` processes, interleaved) and what it costs (the demo model's prompt adherence over its cases,
    and how far its images are from the exact ones: PSNR against the first setting, same seeds)."""
    import numpy as np
    import torch

    from ldmcli import pipeline
    from ldmcli.demo import DEMO_MODEL
    from ldmcli.demo.analysis import adherence, adherence_cases
    from sd15_file import write_sd15_file

    flag, settings = LOSSY_LEVERS[lever]
    model_file = write_sd15_file(workdir / "sd15-fp16.safetensors")
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {label: [] for label in settings}
    calls: dict[str, list[float]] = {label: [] for label in settings}
    for round_ in range(runs + 1 if runs else 0):  # round 0 warms the page cache and is not counted
        for i, (label, fields) in enumerate(settings.items()):
            args = [a for name, value in fields.items() for a in ("--" + name.replace("_", "-"), str(value))]
            wall, _, err = run_child(CHILD_LDM_STEPS, [
                "generate", PEER_PROMPT, "-n", "blurry", "-m", str(model_file), "--steps", "20", "--cfg-scale", "7.5",
                "-W", "512", "-H", "512", "--sampler", "dpmpp_2m", "-s", "0", "-o", str(out / f"{lever}-{i}.png"),
                "--overwrite", "-q", *args])
            record = json.loads(next(line for line in reversed(err.splitlines()) if line.startswith("{")))
            print(f"round {round_} {lever} {label}: {wall:.1f} s, {record}", flush=True)
            if round_:
                times[label].append(wall)
                calls[label].append(record["unet_total_s"])
    first = next(iter(settings))
    for label in settings if runs else ():
        ratios = [a / b for a, b in zip(times[label], times[first])]
        results.add(f"{flag}: one 512² SD1.5-shaped image, 20 steps, fresh processes", label,
                    f"whole image {statistics.median(times[label]):.1f} s ({', '.join(f'{t:.1f}' for t in times[label])}); "
                    f"U-Net total {statistics.median(calls[label]):.1f} s",
                    f"{statistics.median(ratios):.2f}x of {first}", "")
    model = pipeline.load(DEMO_MODEL, dtype=torch.bfloat16)
    pipeline.optimize(model)
    cases = adherence_cases()
    exact = None
    for label, fields in settings.items():
        with torch.inference_mode():
            rates, details = adherence(model, cases, list(range(seeds)), **fields)
        images = np.stack([d[3] for d in details]).astype(np.float64)
        if exact is None:
            exact = images
        mse = float(np.mean((images - exact) ** 2))
        psnr = "exact" if mse == 0 else f"{10 * math.log10(255.0 ** 2 / mse):.1f} dB"
        results.add(f"{flag} on the demo model (bf16, its 20 steps DPM++ 2M)", label,
                    "adherence colour / position / shape / all " +
                    " / ".join(f"{rates[k]:.3f}" for k in ("colour", "position", "shape", "all")) +
                    f" ({len(details)} images); PSNR against {first}: {psnr}", "", "")


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", default="text,unet,vae,image,load,tiles")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image-runs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ldm-bench")
    parser.add_argument("--src", help="run the load piece's ldm from this source tree (its src/ dir)")
    parser.add_argument("--load-steps", type=int, default=20)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--skip-peers", default="", help="peers piece: engines to leave out (e.g. sdcpp)")
    parser.add_argument("--sdcpp-steps", type=int, help="peers piece: shorter stable-diffusion.cpp runs, "
                        "the 20-step image estimated from their parts")
    parser.add_argument("--ldm-args", default="", help="peers piece: extra `ldm generate` arguments")
    parser.add_argument("--ldm-variant", action="append", default=[],
                        help="peers piece: also run ldm with these extra arguments (repeatable), e.g. '--tome 0.5'")
    parser.add_argument("--demo-seeds", type=int, default=4, help="seeds per adherence case (demo piece)")
    parser.add_argument("--demo-model", type=Path, help="demo model file [default: weights/ldm-demo.safetensors]")
    parser.add_argument("--with-ldm-fp32", action="store_true", help="also time ldm in fp32 (4 GB more memory)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    pieces = set(args.pieces.split(","))
    results = Results()
    results.note(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_load()} at start")
    folder = diffusers_folder(args.workdir) if pieces & {"text", "prompt", "unet", "vae", "encode", "image", "load", "peers",
                                                         "hires"} else None
    if pieces & {"text", "unet", "vae", "encode"}:
        piece_components(results, folder, args.runs, pieces, args.with_ldm_fp32)
    if "prompt" in pieces:
        piece_prompt(results, folder, args.runs)
    if "image" in pieces:
        piece_image(results, folder, args.image_runs)
    if "load" in pieces:
        piece_load(results, args.workdir, 3, args.src, args.load_steps, folder)
    if "tiles" in pieces:
        piece_tiles(results, args.workdir)
    if "lora" in pieces:
        piece_lora(results, args.workdir, args.runs)
    if "hires" in pieces:
        piece_hires(results, args.workdir, folder)
    if "lcm" in pieces:
        piece_lcm(results, args.workdir, args.image_runs)
    if "fewsteps" in pieces:
        piece_fewsteps(results, args.workdir, args.image_runs)
    for lever in LOSSY_LEVERS.keys() & pieces:
        piece_lossy(results, args.workdir, args.image_runs, args.demo_seeds, lever)
    if "peers" in pieces:
        piece_peers(results, args.workdir, folder, args.image_runs, set(filter(None, args.skip_peers.split(","))),
                    args.ldm_args.split(), args.sdcpp_steps, tuple(args.ldm_variant))
    if "compile" in pieces:
        piece_compile(results, args.workdir)
    if "profile" in pieces:
        piece_profile(results, diffusers_folder(args.workdir), args.runs)
    if "demo" in pieces:
        piece_demo(results, args.demo_seeds, args.demo_model)
    results.note(f"{machine_load()} at end")
    text = results.markdown()
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
