"""The generate command's work: validate every job, plan every file, load the model once, make and save.

Human messages go to stderr; with --json, one JSON object per finished image (and a closing summary)
goes to stdout. Exit codes: 0 ok, 1 some image failed (NaN/Inf images included: never saved), 2 bad input
(before any model loads), 130 interrupted, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ldmcli.errors import LdmError, Terminated
from ldmcli.generation import decoder_for, encodes, image_inputs, latents_for, output_size, total_steps
from ldmcli.jobs import ImageTask, Job, check_job
from ldmcli.limits import DEFAULT_MAX_PIXELS
from ldmcli.outputs import check_outputs, plan_images

EXIT_OK, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 130


@dataclass(frozen=True)
class RunOptions:
    model: Path
    template: str
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 1  # images per U-Net batch (within a job); never changes an image
    prediction: str | None = None  # "eps" | "v" overrides what the model says or what is guessed
    compile: bool = False  # torch.compile the U-Net and VAE decoder (inductor, cached on disk)
    tile_vae: str = "auto"  # on | off | auto: tiled VAE decode above AUTO_TILE_PIXELS
    threads: int | None = None  # CPU intra-op threads (None: PyTorch's default, one per core)
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest width x height accepted (limits.py)
    vae: Path | None = None  # a VAE file or folder used instead of the checkpoint's own
    taesd: Path | None = None  # a tiny autoencoder that decodes instead of the VAE (`taesd_file`)
    lora_dir: Path | None = None  # where LoRAs named in prompts are looked up first (--lora-dir)
    lora_files: Mapping[str, Path] = field(default_factory=dict)  # tag name -> file already found (--from-png, by hash)
    embeddings_dir: Path | None = None  # where embeddings named in prompts are looked up first
    embedding_files: Mapping[str, Path] = field(default_factory=dict)  # name -> file already found (--from-png, by hash)
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    grid: bool = False
    json: bool = False
    quiet: bool = False


# JSON allows these raw inside strings, but line-splitting readers (Python's str.splitlines, some
# JavaScript) break a line at them: one JSON object a line must escape them.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"}


def json_line(record: dict) -> str:
    """One JSON object on one line, whatever line separators its strings hold."""
    text = json.dumps(record, ensure_ascii=False)
    for raw, escaped in _LINE_BREAKS.items():
        text = text.replace(raw, escaped)
    return text


@dataclass
class Report:
    """Where messages go: human lines to stderr, machine lines to stdout.

    Neither is needed to make the images: a closed stderr (`2>&-`) or one whose reader left drops the
    human lines, a closed stdout the --json records; the run and its exit code go on as before.
    """

    json: bool = False
    quiet: bool = False
    counts: dict = field(default_factory=lambda: {"made": 0, "skipped": 0, "failed": 0})
    stdout_closed: bool = False  # the --json reader went away (`| head`)
    stderr_closed: bool = False  # nowhere to say anything: `2>&-`, or a reader that went away
    total: int = 0  # this process's images, once planned
    started: float | None = None  # when making began (after planning), for the summary's seconds
    summarized: bool = False  # the summary is out: an interrupt after it must not print another

    def say(self, message: str) -> None:
        if self.quiet or self.stderr_closed:
            return
        if sys.stderr is None:  # Python found file descriptor 2 closed at startup
            self.stderr_closed = True
            return
        try:
            try:
                print(message, file=sys.stderr, flush=True)
            except UnicodeEncodeError:  # a stream that cannot show every character: escaped, then
                print(message.encode("ascii", "backslashreplace").decode("ascii"), file=sys.stderr, flush=True)
        except (OSError, ValueError):  # EPIPE, EIO; ValueError: a closed stream
            self.stderr_closed = True
            try:  # the unflushed line would fail again at exit, and make the exit code 120
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
            except (OSError, ValueError, AttributeError):  # a stderr without a file descriptor (tests)
                pass

    def emit(self, record: dict) -> None:
        if not self.json or self.stdout_closed or sys.stdout is None:
            return
        try:
            try:
                line = json_line(record)
                line.encode(sys.stdout.encoding or "utf-8")
            except UnicodeEncodeError:  # a stdout that cannot show every character: the same record, ASCII
                line = json.dumps(record, ensure_ascii=True)
            # One write of the whole line: processes sharing a run (torchrun) share stdout, and print()'s
            # separate write of the newline, unbuffered (PYTHONUNBUFFERED), let another's line in between.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self._stdout_gone()

    def _stdout_gone(self) -> None:
        """The --json reader left: the images are the work and stdout only its report, so the run
        goes on without the records (the human lines and the summary stay on stderr); exit as usual."""
        self.stdout_closed = True
        try:  # the unflushed line would fail again at exit ("Exception ignored ... BrokenPipeError")
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a file descriptor (tests)
            pass
        self.say("stdout was closed: no more --json records; the images are still being made")

    @property
    def progress(self) -> bool:
        if self.json or self.quiet or self.stderr_closed or sys.stderr is None:
            return False
        try:
            return sys.stderr.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def finish(self, stopped: KeyboardInterrupt | None = None, share: ProcessShare | None = None) -> int:
        """Say how the run ended and print its summary (stderr; stdout too with --json); the exit code.

        For every run that began: one stopped by Ctrl-C or SIGTERM while it read its prompts, loaded
        its model or planned (0 made) as one stopped while making images."""
        if stopped is not None:
            how = "terminated (SIGTERM)" if isinstance(stopped, Terminated) else "interrupted"
            self.say(f"{how}: finished images are saved; re-run with --skip-existing to make the rest")
        seconds = 0.0 if self.started is None else time.perf_counter() - self.started
        summary = {**self.counts, "total": self.total, "interrupted": stopped is not None, "seconds": round(seconds, 3)}
        if share is not None and share.world > 1:
            summary.update(process=share.rank, processes=share.world)
        self.summarized = True
        self.emit({"summary": summary})
        self.say(f"done: {summary['made']} made, {summary['skipped']} skipped, {summary['failed']} failed "
                 f"in {summary['seconds']:.1f} s")
        if stopped is not None:
            return getattr(stopped, "exit_code", EXIT_INTERRUPTED)  # 130 for Ctrl-C, 143 for SIGTERM
        return EXIT_FAILURE if self.counts["failed"] else EXIT_OK


def resolve_device(device: str) -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LdmError("--device cuda: no CUDA device is available")
    if device == "mps" and not (mps is not None and mps.is_available()):
        raise LdmError("--device mps: MPS is not available")
    return device


# Tiled VAE decoding: above this many pixels with --tile-vae auto (strictly more than SDXL's native
# 1024x1024, so every model's native size decodes exactly as diffusers does); tiles of 512 px with
# 128 px blended overlaps at SD's 8x latent factor.
AUTO_TILE_PIXELS = 1024 * 1024
VAE_TILE_PIXELS, VAE_TILE_OVERLAP_PIXELS = 512, 128


def vae_tile(mode: str, width: int, height: int, factor: int) -> tuple[int, int] | None:
    """(tile side, overlap) in latent pixels of the VAE decode of an image, or None to decode it whole."""
    if mode == "off" or (mode == "auto" and width * height <= AUTO_TILE_PIXELS):
        return None
    return VAE_TILE_PIXELS // factor, VAE_TILE_OVERLAP_PIXELS // factor


def prepare(
    jobs: list[Job], options: RunOptions, defaults: dict | None = None, share: ProcessShare | None = None
) -> tuple[list[ImageTask], list[ImageTask]]:
    """Everything checkable without the model: every job's values and LoRA files, every output path.

    Returns (all tasks, this process's tasks still to do). Only this process's output paths are
    checked: other processes of a shared run may already be writing theirs.
    """
    share = share or ProcessShare()
    checked = check_jobs(jobs, options, defaults)
    tasks = plan_images(checked, options.template)
    mine = [t for t in tasks if share.owns(t)]
    todo = check_outputs(mine, overwrite=options.overwrite, skip_existing=options.skip_existing)
    if options.grid:
        _check_grid_path(tasks, overwrite=options.overwrite or options.skip_existing)
    return tasks, todo


def check_jobs(jobs: list[Job], options: RunOptions, defaults: dict | None = None) -> list[Job]:
    """The jobs with the fields nobody set filled with the model's `defaults` and everything about them
    that can be checked without the model checked: values (`check_job`), clip skip against the model,
    LoRA files, init images and masks, the refiner. LdmError (exit 2 for the CLI, 422 for the server)."""
    checked = [check_job(_sized_to_image(job), defaults, max_pixels=options.max_pixels) for job in jobs]
    _check_clip_skip(checked, options, defaults)
    for job in checked:
        lora_set(job, options)  # a LoRA name that finds no file, or weights that do not read: exit 2 now
        try:
            if job.request.from_image:  # unreadable files, a mask of another size: exit 2 now, not after loading
                image_inputs(job.request, options.max_pixels)
            if job.request.refiner is not None:
                check_refiner(options.model, job.request.refiner, options.prediction)
        except LdmError as exc:
            raise LdmError(f"{job.source}: {exc}") from None
    return checked


def run_generate(jobs: list[Job], options: RunOptions, defaults: dict | None = None,
                 report: Report | None = None) -> int:
    """Make every image of `jobs` not yet made; `defaults` are the model's recommended values.

    `report`: the run's, when the caller made it before reading the prompts, so that an interrupt
    before this (reading, loading headers) also ends with the summary (`Report.finish`).
    """
    report = report or Report(json=options.json, quiet=options.quiet)
    share: ProcessShare | None = None
    stopped: KeyboardInterrupt | None = None  # Ctrl-C, or SIGTERM (cli.py raises Terminated for it)
    try:
        share = ProcessShare.from_environment()
        tasks, todo = prepare(jobs, options, defaults, share)
        mine = [t for t in tasks if share.owns(t)]
        report.total = len(mine)
        _say_notes(mine, report)
        if share.world > 1:
            report.say(f"process {share.rank + 1} of {share.world}: {len(mine)} image(s)")
        report.counts["skipped"] = len(mine) - len(todo)
        if report.counts["skipped"]:
            report.say(f"skipping {report.counts['skipped']} existing image(s)")
        remade = [t for t in todo if options.skip_existing and t.path.exists()]
        if remade:
            report.say(f"remaking {len(remade)} incomplete image(s) (empty or cut short), e.g. {remade[0].path}")
        _remove_leftovers(tasks, report)
        report.started = time.perf_counter()
        device = share.device(options.device) if todo else None
        for loras, group in _by_lora_set(todo, options):
            # Each set of LoRAs is merged into freshly read weights, never subtracted from merged ones:
            # exact, and the jobs of one set run together so that each set is merged once.
            model = load_model(options, report, device, loras, encoder=any(encodes(t.job.request) for t in group),
                               pack_unet=packing_pays([t.job.request for t in group]))
            for name in dict.fromkeys(t.job.request.refiner for t in group if t.job.request.refiner is not None):
                model.refiners[name] = load_refiner(options, report, device, name)
            _encode_up_front(model, group)
            stop = _make_all(model, group, options, report)
            del model
            if stop:
                break
        if options.grid and share.wait_for_everyone() and share.rank == 0:
            _write_grid(tasks, report)
    except KeyboardInterrupt as exc:
        stopped = exc
    return report.finish(stopped, share)


# At most this many notes of one job on its stderr line; --json records carry them all.
NOTES_PER_LINE = 12


def _say_notes(tasks: list[ImageTask], report: Report) -> None:
    """One `note:` line per job with notes (what its source asked for that ldm does not do, then the
    rest worth saying), before anything loads. The --json records carry the full lists."""
    for job in {t.job_index: t.job for t in tasks}.values():
        if not job.notes:
            continue
        missing = [n.text() for n in job.notes if not n.honoured]
        remarks = [n.text() for n in job.notes if n.honoured]
        parts = ([f"not honoured: {'; '.join(missing[:NOTES_PER_LINE])}"] if missing else []) + remarks[:NOTES_PER_LINE]
        more = len(missing) - NOTES_PER_LINE
        report.say(f"note: {job.source}: " + "; ".join(parts) + (f" (and {more} more: see --json)" if more > 0 else ""))


def _remove_leftovers(tasks: list[ImageTask], report: Report) -> None:
    """Remove the temporary files killed runs left in this run's output folders (only save_png's own,
    only unlocked ones: `image.remove_stale_temp_files`)."""
    from ldmcli.image import remove_stale_temp_files

    removed = [path for folder in sorted({t.path.parent for t in tasks}) for path in remove_stale_temp_files(folder)]
    if removed:
        report.say(f"removed {len(removed)} unfinished temporary file(s) a stopped run left, e.g. {removed[0]}")


@dataclass(frozen=True)
class ProcessShare:
    """This process's place among the processes `accelerate launch` (or torchrun) started.

    Images are independent and their names fixed in advance, so process `rank` simply makes the images
    whose index % world == rank: no communication, and a re-run with --skip-existing resumes the same way.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> ProcessShare:
        """The share `accelerate launch`/torchrun describe in RANK, WORLD_SIZE and LOCAL_RANK; LdmError
        naming the variable for a value that is not a whole number in its range (WORLD_SIZE=0 would
        divide by zero, RANK=5 of WORLD_SIZE=2 make nothing and succeed)."""
        world = _environment_number("WORLD_SIZE", 1, minimum=1)
        rank = _environment_number("RANK", 0)
        if rank >= world:
            raise LdmError(f"RANK={rank} is not below WORLD_SIZE={world}: process ranks are 0 to WORLD_SIZE - 1")
        return cls(rank, world, _environment_number("LOCAL_RANK", 0))

    def owns(self, task: ImageTask) -> bool:
        return task.index % self.world == self.rank

    def device(self, requested: str) -> str:
        """Each process on its own GPU when there are GPUs."""
        device = resolve_device(requested)
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def wait_for_everyone(self) -> bool:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        return True


def _environment_number(name: str, default: int, minimum: int = 0) -> int:
    """A whole number from environment variable `name` (`default` when unset), at least `minimum`."""
    text = os.environ.get(name)
    if text is None:
        return default
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 9) or int(digits) < minimum:
        raise LdmError(f"{name}={text!r} in the environment: expected a whole number of at least {minimum} "
                       "(set by accelerate launch or torchrun)")
    return int(digits)


def lora_set(job: Job, options: RunOptions):
    """The LoRAs `job` merges (`lora_uses.resolve_loras` of its prompt's tags), found in the LoRA folders."""
    from ldmcli.lora_uses import resolve_loras

    return resolve_loras(job.request.prompt, options.lora_dir, found=options.lora_files)


def check_refiner(model: Path, refiner: str, prediction: str | None = None) -> Path:
    """The refiner's file, found (`models_dir.resolve_model`) and checked from headers to be an SDXL refiner
    for an SDXL base, before anything loads."""
    from ldmcli.errors import CheckpointError
    from ldmcli.models_dir import resolve_model

    path = resolve_model(refiner)
    spec, base = _header_spec(path, None), _header_spec(Path(model), prediction)
    if not spec.refiner:
        raise CheckpointError(f"--refiner {refiner}: {path} is {spec.display_name}, not an SDXL refiner")
    if base.family != "sdxl" or base.refiner:
        raise CheckpointError(f"--refiner {refiner}: the base model is {base.display_name}; a refiner finishes SDXL "
                              "base models")
    return path


def _sized_to_image(job: Job) -> Job:
    """A job starting from an image, its width and height (those not given) the image's own size
    (`image_input.natural_size`), not the model's recommended one."""
    request = job.request
    missing = [side for side in ("width", "height") if side not in job.given]
    if not request.from_image or not missing:
        return job
    from ldmcli.image_input import natural_size

    try:
        width, height = natural_size(Path(request.init_image), request.pad)
    except (LdmError, ValueError) as exc:
        raise LdmError(f"{job.source}: {exc}") from None
    return job.setting(**{side: value for side, value in (("width", width), ("height", height)) if side in missing})


def _by_lora_set(todo: list[ImageTask], options: RunOptions):
    """The tasks grouped by the set of LoRAs their job merges, in order of each set's first task."""
    sets: dict[int, tuple] = {}  # job index -> its set, found once a job
    groups: dict = {}
    for task in todo:
        if task.job_index not in sets:
            sets[task.job_index] = lora_set(task.job, options)
        groups.setdefault(sets[task.job_index], []).append(task)
    return groups.items()


def load_refiner(options: RunOptions, report: Report, device: str, name: str):
    """An SDXL refiner for this run's requests, loaded and optimized as the base is (no LoRAs)."""
    from ldmcli import pipeline
    from ldmcli.device import choose_dtype
    from ldmcli.hashing import model_hash

    path = check_refiner(options.model, name, options.prediction)
    started = time.perf_counter()
    refiner = pipeline.load(path, device=device, dtype=choose_dtype(device, options.dtype)[0], taesd=options.taesd)
    refiner.vae.drop_encoder()
    pipeline.optimize(refiner, compile=options.compile)
    refiner.hash = model_hash(path)
    report.say(f"loaded refiner {refiner.name}: {refiner.spec.display_name}, in {time.perf_counter() - started:.1f} s")
    return refiner


# Packing an SD 1.5 U-Net's weights for oneDNN (`kernels.pack_for_cpu`) makes its first call about 3 s
# longer and each later one faster: by about 0.4 s at batch 1 (an unguided step: CFG 1) and 1.9 s at batch 2
# (a guided step), measured on SD1.5 shapes in bf16 on 2 cores (first call 5.15 s packed against 2.17 s
# unpacked, then 1.47-1.65 s against 1.96-1.99 s at batch 1; 7.13 s against 4.85 s, then 2.38 s against
# 4.31 s at batch 2). In seconds saved per call of each kind, against the one-time cost:
PACKING_COST_S = 3.0
PACKING_SAVES_S = {False: 0.4, True: 1.9}  # request.guided -> seconds saved per U-Net call


def packing_pays(requests) -> bool:
    """Whether packing the U-Net pays for itself over these requests' U-Net calls (a one-step Turbo image
    does not; two guided steps do). Counts each image's steps (a hires fix's second pass and a refiner's
    share included), as if each image were made alone."""
    saved = 0.0
    for request in requests:
        steps = request.steps
        if request.hires_scale is not None:
            steps += request.hires_steps or request.steps
        saved += steps * PACKING_SAVES_S[request.guided]
    return saved > PACKING_COST_S


def load_model(options: RunOptions, report: Report, device: str, loras=(), encoder: bool = False,
               pack_unet: bool = True):
    """The model of `options`, LoRAs merged, optimized, said on `report`; the VAE's encoder kept only if
    some image starts from one (`encoder`); the U-Net's weights packed unless `pack_unet` is False
    (`packing_pays`). The first of a run's two steps (then `make_images` per batch): `ldm generate` loads
    once per set of LoRAs, `ldm serve` keeps one resident."""
    from ldmcli import pipeline
    from ldmcli.hashing import model_hash
    from ldmcli.models_dir import extra_dirs

    from ldmcli.device import choose_dtype, configure_threads

    threads = configure_threads(options.threads) if device == "cpu" else None
    dtype, why = choose_dtype(device, options.dtype)
    started = time.perf_counter()
    model = pipeline.load(options.model, device=device, dtype=dtype, prediction=options.prediction, vae=options.vae,
                          taesd=options.taesd, loras=loras, embedding_dirs=extra_dirs("embedding", options.embeddings_dir),
                          embedding_files=options.embedding_files)
    if not encoder and not model.spec.inpainting:  # an inpainting U-Net's text-to-image encodes a grey image
        model.vae.drop_encoder()  # text-to-image only decodes
    done = pipeline.optimize(model, compile=options.compile, pack_unet=pack_unet)
    model.hash = model_hash(options.model)
    spec = model.spec
    where = f"{device}, {threads} threads" if threads else device
    report.say(f"loaded {model.name}: {spec.display_name}, {spec.prediction_type} prediction "
               f"({spec.prediction_source or 'family default'}), in {time.perf_counter() - started:.1f} s")
    report.say(f"running {why} on {where}" + (f"; {', '.join(done)}" if done else ""))
    if model.taesd_file is not None:
        report.say(f"decoding with the tiny autoencoder {model.taesd_file.name} ({model.taesd_file.source})")
    for lora in loras:
        report.say(f"merged LoRA {lora.name} ({lora.path}), text encoder x{lora.te_weight:g}, U-Net x{lora.unet_weight:g}")
    for note in [*spec.notes, *model.notes]:
        report.say(f"note: {note}")
    return model


# At most this many distinct texts are encoded before the first image (about 10 s on a CPU for
# SD1.5); a longer prompt file keeps its text encoder and encodes as it goes.
PROMPTS_UP_FRONT = 256
# Chunks of 77 tokens assumed per text when weighing the cache against the encoders: prompts of up
# to 300 tokens.
CHUNKS_PER_TEXT = 4


def _encode_up_front(model, todo: list[ImageTask]) -> None:
    """Encode the run's prompts now and release the text encoders, when that saves memory.

    The U-Net and VAE then run without the text encoder resident (SD1.5 in bf16: 0.25 GB less at the
    peak, SDXL 1.6 GB). Skipped when the cached embeddings would not be smaller than the encoders.
    """
    from ldmcli import text_conditioning

    requests = list(dict.fromkeys(t.job.request for t in todo))
    texts = {text for r in requests for batch, _ in text_conditioning.conditioning_keys(r) for text in batch}
    per_text = CHUNKS_PER_TEXT * 77 * model.spec.unet.context_dim * model.dtype.itemsize
    if len(texts) <= PROMPTS_UP_FRONT and len(texts) * per_text < text_conditioning.text_encoder_bytes(model):
        text_conditioning.encode_up_front(model, requests)


def _make_all(model, todo: list[ImageTask], options: RunOptions, report: Report) -> bool:
    """Make `todo`'s images; whether to stop the run (--fail-fast after a failure)."""
    from tqdm import tqdm

    with tqdm(total=len(todo), desc="images", unit="img", disable=not report.progress, position=0) as bar:
        batches = _batches(todo, options.batch_size)
        for number, batch in enumerate(batches, 1):
            try:
                failed = _make_batch(model, batch, options, report, last=number == len(batches))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one job's failure must not lose the others
                _report_failed(batch, exc, report)
                failed = True
            if failed and options.fail_fast:
                return True
            bar.update(len(batch))
    return False


def _batches(tasks: list[ImageTask], size: int) -> list[list[ImageTask]]:
    """Consecutive tasks of the same job, at most `size` at a time."""
    batches: list[list[ImageTask]] = []
    for task in tasks:
        if batches and len(batches[-1]) < size and batches[-1][-1].job_index == task.job_index:
            batches[-1].append(task)
        else:
            batches.append([task])
    return batches


def _report_failed(tasks: list[ImageTask], exc: Exception, report: Report) -> None:
    report.counts["failed"] += len(tasks)
    for task in tasks:
        report.say(f"failed: {task.path} ({task.job.source}): {type(exc).__name__}: {exc}")
        report.emit({"error": f"{type(exc).__name__}: {exc}", "index": task.index,
                     "path": str(task.path), "prompt": task.job.request.prompt, "seed": task.seed})


def _make_batch(model, batch: list[ImageTask], options: RunOptions, report: Report, *, last: bool = False) -> bool:
    """Make and save one batch; `last`: the run's final batch, whose decode runs without the U-Net.
    Returns whether any image failed."""
    made = make_images(model, batch, options, report, last=last)
    for image in made:
        _save(image, options, report)
    return len(made) < len(batch)


@dataclass(frozen=True)
class MadeImage:
    """One image made: its task, its record (`metadata.image_record`), its PNG file's bytes (pixels and
    text chunks) and its share of the batch's seconds."""

    task: ImageTask
    record: dict
    png: bytes
    seconds: float


def make_images(model, batch: list[ImageTask], options: RunOptions, report: Report, *, last: bool = False,
                on_step: Callable[[int], None] | None = None) -> list[MadeImage]:
    """One batch of one job's images, as PNG bytes; nothing is written. The second of a run's two steps
    (after `load_model`), for `ldm generate` (which saves them) and `ldm serve` (which sends them).

    `last`: the run's final batch, whose decode runs without the U-Net (`pipeline.release_unet`).
    `on_step(i)`: called after each denoising step (progress; it may raise to stop the batch).
    An image whose latents or pixels come out NaN/Inf fails alone (reported on `report`, left out of the
    result): the batch's other images are made.
    """
    from tqdm import tqdm

    from ldmcli import pipeline
    from ldmcli.errors import NonFiniteError

    request = batch[0].job.request
    started = time.perf_counter()
    width, height = output_size(request)

    with tqdm(total=total_steps(model, request), desc="steps", leave=False, disable=not report.progress,
              position=1) as steps:
        def step(i, _x):
            steps.update(1)
            if on_step is not None:
                on_step(i)

        tile = vae_tile(options.tile_vae, width, height, model.spec.vae.downsample_factor)
        latents = latents_for(model, request, [t.seed for t in batch], callback=step, tile=tile,
                              max_pixels=options.max_pixels)
    if last:
        pipeline.release_unet(model)
    finite = pipeline.finite_rows(latents)
    for task, latent, ok in zip(batch, latents, finite):
        if not ok:
            try:
                pipeline.check_finite_latents(latent[None], [task.seed], model.dtype)
            except NonFiniteError as exc:
                _report_failed([task], exc, report)
    decoder = decoder_for(model, request)
    kept = [task for task, ok in zip(batch, finite) if ok]
    if not kept:
        return []
    latents = latents[[i for i, ok in enumerate(finite) if ok]]
    try:
        parts = [(kept, _decode(decoder, latents, tile, request.match, report))]
    except NonFiniteError:
        if len(kept) == 1:
            raise
        # Decode one image at a time so that the finite ones are still saved (an fp32 overflow is per image).
        parts = []
        for task, latent in zip(kept, latents):
            try:
                parts.append(([task], _decode(decoder, latent[None], tile, request.match, report)))
            except NonFiniteError as exc:
                _report_failed([task], exc, report)
    seconds = (time.perf_counter() - started) / len(batch)
    return [_encoded(model, task, image, seconds) for tasks, pixels in parts for task, image in zip(tasks, pixels.numpy())]


def _decode(model, latents, tile, match: str, report: Report):
    from ldmcli import pipeline

    try:
        return pipeline.decode_latents(model, latents, tile=tile, match=match)
    finally:  # also when the decode failed: the warning is part of the story
        for warning in model.warnings:  # e.g. a VAE decode that overflowed and was redone in fp32
            report.say(f"warning: {warning}")
        model.warnings.clear()


def _encoded(model, task: ImageTask, image, seconds: float) -> MadeImage:
    """The image's record and PNG bytes: its pixels with A1111's `parameters` text and ldm's record."""
    from ldmcli.image import png_bytes
    from ldmcli.metadata import image_record, png_text

    record = image_record(model, task)
    return MadeImage(task, record, png_bytes(image, text=png_text(model, record)), seconds)


def _save(image: MadeImage, options: RunOptions, report: Report) -> None:
    from ldmcli.image import write_png

    task, record = image.task, image.record
    write_png(image.png, task.path, overwrite=options.overwrite or options.skip_existing)
    report.counts["made"] += 1
    report.say(f"wrote {task.path} (seed {task.seed}, {image.seconds:.1f} s)")
    report.emit({"path": str(task.path), **{k: v for k, v in record.items() if k != "version"},
                 "index": task.index, "seconds": round(image.seconds, 3),
                 "not_honoured": task.job.not_honoured, "notes": task.job.remarks})


def _grid_path(tasks: list[ImageTask]) -> Path:
    return tasks[0].path.parent / "grid.png"


def _check_grid_path(tasks: list[ImageTask], *, overwrite: bool) -> None:
    """LdmError unless --grid may write its contact sheet: no image of the run is (or, on a file
    system that ignores case, may be) the grid's file, which the sheet would replace once made, and
    nothing is there but a file it may replace (as `outputs.check_outputs` checks every output path:
    a FIFO, device or folder is refused whatever the flags)."""
    from ldmcli.outputs import _occupied

    grid = _grid_path(tasks)
    clash = next((t for t in tasks if t.path.parent == grid.parent and t.path.name.casefold() == grid.name.casefold()),
                 None)
    if clash is not None:
        raise LdmError(f"{clash.path} is image {clash.index} ({clash.job.source}) and the path --grid writes its "
                       "contact sheet to: name the images otherwise, or leave out --grid")
    if _occupied(grid) and not overwrite:
        raise LdmError(f"{grid} exists: use --skip-existing or --overwrite to replace the grid")


def _write_grid(tasks: list[ImageTask], report: Report) -> None:
    import numpy as np
    from PIL import Image

    from ldmcli.image import contact_sheet, is_complete_png, save_png

    done = [t for t in tasks if is_complete_png(t.path)]
    if not done:
        return
    images = [np.asarray(Image.open(t.path).convert("RGB")) for t in done]
    if len({i.shape for i in images}) > 1:
        report.say("no grid: the images differ in size")
        return
    captions = [f"{t.job.request.prompt} (seed {t.seed})" for t in done]
    path = _grid_path(tasks)
    save_png(contact_sheet(images, captions), path, overwrite=True, text={})
    report.say(f"wrote {path} ({len(done)} images)")


def recommended_defaults(model: Path, prediction: str | None = None) -> dict:
    """What the model calls for where the user said nothing: its native size, Turbo's or the demo model's
    steps/CFG/sampler. Read from headers and shapes only (safetensors headers, mmap-ed .ckpt), not weights."""
    spec = _header_spec(Path(model), prediction)
    return {"width": spec.native_size, "height": spec.native_size, **spec.recommended}


@functools.lru_cache(maxsize=4)
def _header_spec(model: Path, prediction: str | None):
    """The model's spec from its headers (read once a run: planning asks more than once)."""
    from ldmcli.detect import detect_spec
    from ldmcli.layout import read_components

    return detect_spec(read_components(model, meta=True), prediction=prediction)


def _check_clip_skip(jobs: list[Job], options: RunOptions, defaults: dict | None) -> None:
    """Refuse a clip skip beyond the model's text encoder before it loads. Checked when the caller read
    the model's headers for its `defaults` (the command line always does)."""
    asked = max((job.request.clip_skip for job in jobs), default=1)
    if defaults is None or asked == 1:
        return
    bound = _header_spec(Path(options.model), options.prediction).max_clip_skip
    job = next((job for job in jobs if job.request.clip_skip > bound), None)
    if job is not None:
        raise LdmError(f"{job.source}: clip skip {job.request.clip_skip} is beyond this model's text encoder: "
                       f"at most {bound}")
