"""`ldm serve` against the engine it wraps (issue 20's measurements): run with `python benchmarks/bench_serve.py`.

1. Request overhead: one 64x64 demo-model image (its own 20 steps DPM++ 2M) made in this process with the
   engine step the server calls (`run.make_images` on a resident model: sampling, decoding, PNG encoding),
   against the same request sent to an `ldm serve` process over HTTP (JSON, queue, base64, response). The
   two alternate, so a slow phase of the machine falls on both; medians. Goal: at most 50 ms more.
2. Sustained throughput: 20 requests queued at once on one server, against 20 separate `ldm generate`
   processes one after another (each importing torch and loading the model), wall time for all 20.

Both sides use the same thread count (--threads, default 1: on a shared 2-core machine one thread is the
steadiest). Prints a table and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "ldm-demo.safetensors"
LDM = [sys.executable, "-m", "ldmcli"]
# The demo model's own recommendation (its header): 20 steps DPM++ 2M at CFG 5, 64x64
REQUEST = {"prompt": "a large red circle on the left, blue background", "width": 64, "height": 64, "steps": 20,
           "sampler_name": "DPM++ 2M", "cfg_scale": 5, "seed": 1}


def start_server(threads: int, queue: int):
    proc = subprocess.Popen([*LDM, "serve", "-m", str(DEMO), "--port", "0", "--threads", str(threads),
                             "--queue", str(queue)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "listening on http://" in line:
            url = line.split("listening on ", 1)[1].split()[0]
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, url
    raise SystemExit("ldm serve did not start")


def engine(threads: int):
    """The resident model and one task of REQUEST, made as the server's worker makes it."""
    from ldmcli.jobs import ImageTask, command_line_job, object_job
    from ldmcli.run import Report, RunOptions, check_jobs, load_model, make_images, recommended_defaults, resolve_device

    options = RunOptions(model=DEMO, template="", threads=threads)
    report = Report(quiet=True)
    model = load_model(options, report, resolve_device("auto"), encoder=True)
    job = object_job(REQUEST, command_line_job({}), "bench", a1111=True)
    job = check_jobs([job], options, recommended_defaults(DEMO))[0]
    task = ImageTask(job, 0, 0, 0, job.request.seed, Path("bench.png"))
    return lambda: make_images(model, [task], options, report)


def overhead(url: str, threads: int, runs: int) -> dict:
    import httpx

    make = engine(threads)
    bare, served = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        for _ in range(3):  # warm both up
            make()
            client.post("/sdapi/v1/txt2img", json=REQUEST).raise_for_status()
        for _ in range(runs):
            started = time.perf_counter()
            make()
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.post("/sdapi/v1/txt2img", json=REQUEST).raise_for_status()
            served.append(time.perf_counter() - started)
    return {"bare_ms": 1000 * statistics.median(bare), "served_ms": 1000 * statistics.median(served),
            "overhead_ms": 1000 * (statistics.median(served) - statistics.median(bare)),
            "overhead_ms_pairs_median": 1000 * statistics.median(s - b for s, b in zip(served, bare)), "runs": runs}


def throughput_server(url: str, count: int) -> float:
    import httpx

    def send(seed: int):
        with httpx.Client(base_url=url, timeout=600) as client:
            client.post("/sdapi/v1/txt2img", json={**REQUEST, "seed": seed}).raise_for_status()

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def throughput_processes(count: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        for seed in range(count):
            prompts = Path(folder) / f"{seed}.jsonl"
            prompts.write_text(json.dumps({**REQUEST, "seed": seed}) + "\n")
            subprocess.run([*LDM, "generate", "--prompts", str(prompts), "-m", str(DEMO), "-o", f"{folder}/{seed}/",
                            "-q", "--threads", str(threads)], check=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15, help="requests timed for the overhead")
    parser.add_argument("--count", type=int, default=20, help="requests for the throughput")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    proc, url = start_server(args.threads, queue=max(args.count, 16))
    try:
        result = overhead(url, args.threads, args.runs)
        served = throughput_server(url, args.count)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    separate = throughput_processes(args.count, args.threads)
    result.update(count=args.count, server_s=served, server_per_s=args.count / served, processes_s=separate,
                  processes_per_s=args.count / separate, speedup=separate / served, threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return
    print(f"64x64 demo image, 20 steps DPM++ 2M, {args.threads} thread(s), medians of {args.runs}")
    print(f"  engine step (run.make_images)   {result['bare_ms']:8.1f} ms")
    print(f"  POST /sdapi/v1/txt2img          {result['served_ms']:8.1f} ms")
    print(f"  overhead                        {result['overhead_ms']:8.1f} ms "
          f"(median of pairs {result['overhead_ms_pairs_median']:.1f} ms; goal <= 50 ms)")
    print(f"{args.count} requests")
    print(f"  one server, queued              {served:8.1f} s  {result['server_per_s']:.2f} images/s")
    print(f"  separate ldm generate processes {separate:8.1f} s  {result['processes_per_s']:.2f} images/s "
          f"({result['speedup']:.1f}x slower)")


if __name__ == "__main__":
    main()
