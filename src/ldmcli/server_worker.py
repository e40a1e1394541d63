"""The server's engine room: one resident model, one worker thread, a bounded queue in arrival order.

HTTP handlers (`server.py`) never touch the model: they put a `Work` item on the queue and await its
future. The worker thread takes the items one at a time, in the order they arrived, and makes each
request's images with the command line's own two steps (`run.load_model` once, `run.make_images` per
image), so a request gives the PNG bytes `ldm generate` gives. Everything about the current request that
another thread may ask (`/progress`, `/interrupt`, SIGTERM) goes through `Progress` and flags the worker
checks between denoising steps (interrupt) or between images (shutdown).
"""

from __future__ import annotations

import gc
import math
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldmcli.errors import LdmError
from ldmcli.jobs import ImageTask, Job, apply_model_family
from ldmcli.run import Report, RunOptions


class ServerLog(Report):
    """The server's log on stderr: the run's messages (loading, notes, failures, one line a request), without
    the progress bars a terminal gets from `ldm generate` (`/sdapi/v1/progress` reports progress)."""

    @property
    def progress(self) -> bool:
        return False


class QueueFull(Exception):
    """The queue holds `capacity` waiting requests: HTTP 429, with `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full: retry in about {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is stopping (SIGTERM): requests not begun are refused, HTTP 503."""


class Interrupted(Exception):
    """Raised from the sampler's step callback when a client asked `/interrupt` during that image."""


@dataclass
class Work:
    """One queued item: a request's job to make, or a model to switch to (`POST /options`)."""

    kind: str  # "txt2img" | "img2img" | "switch"
    job: Job | None = None
    model: Path | None = None  # for "switch"
    future: Future = field(default_factory=Future)
    interrupted: bool = False  # /interrupt arrived while it ran
    abandoned: bool = False  # its client went away before it began: skipped


@dataclass(frozen=True)
class Outcome:
    """What a request's work made: its images (`run.MadeImage`), whether /interrupt or a shutdown cut it
    short, how many images failed (NaN/Inf), and the model that made them."""

    made: list
    interrupted: bool
    failed: int
    model: object


@dataclass
class Progress:
    """The current request, as A1111's `/sdapi/v1/progress` reports it (`shared.state`)."""

    job: str = ""
    job_count: int = 0  # images of the current request
    job_no: int = 0  # images of it done
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    timestamp: str = "0"
    interrupted: bool = False

    def record(self, waiting: int, capacity: int) -> dict:
        """A1111's ProgressResponse (its formula: a request's done images plus the current one's steps, as a
        fraction; the ETA from the time so far), and ldm's `queue` (waiting requests, capacity)."""
        state = {"skipped": False, "interrupted": self.interrupted, "stopping_generation": False, "job": self.job,
                 "job_count": self.job_count, "job_timestamp": self.timestamp, "job_no": self.job_no,
                 "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}
        queue_state = {"waiting": waiting, "capacity": capacity}
        if self.job_count == 0:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                    "queue": queue_state}
        progress = self.job_no / self.job_count
        if self.sampling_steps:
            progress += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.started
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        return {"progress": min(progress, 1.0), "eta_relative": max(eta, 0.0), "state": state, "current_image": None,
                "textinfo": None, "queue": queue_state}


class Worker:
    """The resident model and the thread that uses it. `start` loads the model (LdmError if it cannot);
    `submit` queues work in arrival order (QueueFull, ShuttingDown); `interrupt` stops the current request's
    current image; `shutdown` lets the current image finish, then refuses the rest and ends the thread."""

    def __init__(self, options: RunOptions, *, capacity: int, output_dir: Path | None = None,
                 report: Report | None = None):
        self.options = options
        self.capacity = capacity
        self.output_dir = output_dir
        self.report = report or ServerLog()
        self.title = ""  # A1111's title of the resident model (`server_models.title_of`), set when it loads
        self.queue: queue.Queue[Work] = queue.Queue(maxsize=capacity)
        self.progress = Progress()
        self.model = None
        self.current: Work | None = None
        self.stopping = threading.Event()
        self.seconds_per_request = 1.0  # a running mean, for 429's Retry-After
        self._next_number = _first_free_number(output_dir)
        self._thread: threading.Thread | None = None
        self._device: str | None = None

    # --- called from the HTTP side ----------------------------------------------------------------

    def start(self) -> None:
        """Start the thread and wait for it to load the model; the load's LdmError is raised here."""
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(loaded,), name="ldm-worker", daemon=True)
        self._thread.start()
        loaded.result()

    def submit(self, work: Work) -> Work:
        """Queue `work` behind the requests already waiting; QueueFull when `capacity` are."""
        if self.stopping.is_set():
            raise ShuttingDown("the server is shutting down")
        try:
            self.queue.put_nowait(work)
        except queue.Full:
            raise QueueFull(self.retry_after()) from None
        return work

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: a request's mean time, for each one ahead."""
        return max(1, math.ceil(self.seconds_per_request * (self.queue.qsize() + 1) / max(self.capacity, 1)))

    def interrupt(self) -> None:
        """Stop the request being made at its current denoising step; the queued ones are untouched."""
        current = self.current
        if current is not None:
            current.interrupted = True
            self.progress.interrupted = True

    def shutdown(self) -> None:
        """SIGTERM: the current image finishes (its request answered with what is done), the queued requests
        are refused (503), the thread ends."""
        self.stopping.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def model_path(self) -> Path:
        return Path(self.options.model)

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    # --- the worker thread ----------------------------------------------------------------------------

    def _main(self, loaded: Future) -> None:
        from ldmcli.run import resolve_device

        try:
            # Loaded on this thread, which makes every image: its CPU thread settings are the ones in force.
            self._device = resolve_device(self.options.device)
            self.model = self._load(self.options)
            self.title = _title(self.options.model)
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread, which reports it
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        while True:
            try:
                work = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.stopping.is_set():
                    return
                continue
            if self.stopping.is_set():
                work.future.set_exception(ShuttingDown("the server is shutting down"))
                continue
            if work.abandoned or not work.future.set_running_or_notify_cancel():
                self.report.say(f"{work.kind}: skipped, its client left before it began")
                continue
            self.current = work
            started = time.perf_counter()
            try:
                work.future.set_result(self._switch(work.model) if work.kind == "switch" else self._generate(work))
            except BaseException as exc:  # noqa: BLE001 - the request's failure is its client's answer, not the server's end
                work.future.set_exception(exc)
            finally:
                self.current = None
                self.progress = Progress()
                took = time.perf_counter() - started
                self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * took

    def _load(self, options: RunOptions, loras=()):
        from ldmcli.run import load_model

        # The encoder stays: any request may start from an image. The text encoders stay: any request may
        # bring a new prompt (`ldm generate` releases them once a run's prompts are encoded).
        return load_model(options, self.report, self._device, loras, encoder=True)

    def _switch(self, path: Path) -> None:
        """Make the model at `path` the resident one. The old one goes first (one model in memory); if the new
        one does not load, the old one is loaded again and the error is the request's answer."""
        self.progress = Progress(job="switch", started=time.time(), timestamp=time.strftime("%Y%m%d%H%M%S"))
        old = self.options
        self._reload(replace(old, model=Path(path), prediction=None), (), fallback=(old, ()))
        self.title = _title(path)

    def _reload(self, options: RunOptions, loras, fallback: tuple) -> None:
        """Read the model again, as `options` and `loras` say (LoRAs are merged into freshly read weights, never
        subtracted; one model in memory, so the resident one goes first). If that fails, `fallback` (options,
        loras: what was resident) is read again and the error is the request's answer; if that fails too, no
        model is resident (`/health` says so) and the next request tries again."""
        self.model = None
        gc.collect()
        try:
            self.model = self._load(options, loras)
            self.options = options
        except BaseException:
            self.options = fallback[0]
            self.model = self._load(*fallback)
            raise

    def _generate(self, work: Work) -> Outcome:
        """Make `work`'s images one at a time, as `ldm generate` does at --batch-size 1 (so the same bytes), until
        they are done, /interrupt stops the current one (the images done are the answer) or SIGTERM arrives
        (the current image finishes)."""
        from ldmcli.errors import NonFiniteError
        from ldmcli.generation import total_steps
        from ldmcli.run import lora_set, make_images

        if self.model is None:  # an earlier load failed twice over (`_reload`): try again for each request
            self.model = self._load(self.options)
        job = apply_model_family(work.job, self.model.spec.family)
        loras = lora_set(job, self.options)
        if tuple(self.model.loras) != tuple(loras):
            self._reload(self.options, loras, fallback=(self.options, tuple(self.model.loras)))
        self._ensure_refiner(job)
        tasks = [ImageTask(job, 0, i, i, job.request.seed + i, self._path(job.request.seed + i))
                 for i in range(job.batch_count)]
        self.progress = Progress(job=work.kind, job_count=len(tasks), started=time.time(),
                                 sampling_steps=total_steps(self.model, job.request),
                                 timestamp=time.strftime("%Y%m%d%H%M%S"))
        made, failed, interrupted = [], 0, False
        started = time.perf_counter()
        for number, task in enumerate(tasks):
            if work.interrupted or self.stopping.is_set():
                interrupted = True
                break
            self.progress.job_no, self.progress.sampling_step = number, 0
            try:
                images = make_images(self.model, [task], self.options, self.report,
                                     on_step=lambda i, work=work: self._step(work, i))
            except Interrupted:
                interrupted = True
                break
            except NonFiniteError as exc:  # this image fails alone, as in `ldm generate`
                self.report.say(f"failed: {work.kind} image of seed {task.seed}: {exc}")
                images = []
            failed += 1 - len(images)
            made += images
        self._save(made)
        seeds = ", ".join(str(image.task.seed) for image in made) or "none"
        self.report.say(f"{work.kind}: {len(made)} of {len(tasks)} image(s) (seed {seeds}) in "
                        f"{time.perf_counter() - started:.1f} s" + (", interrupted" if interrupted else "")
                        + (f", {failed} failed" if failed else ""))
        return Outcome(made, interrupted, failed, self.model)

    def _step(self, work: Work, i: int) -> None:
        self.progress.sampling_step = i + 1
        if work.interrupted:
            raise Interrupted()

    def _ensure_refiner(self, job: Job) -> None:
        from ldmcli.run import load_refiner

        name = job.request.refiner
        if name is not None and name not in self.model.refiners:
            self.model.refiners[name] = load_refiner(self.options, self.report, self._device, name)

    def _path(self, seed: int) -> Path:
        """Where an image is saved with --output-dir (`NNNNN-SEED.png`, numbered on from the folder's images);
        without it, the name only (never written)."""
        number, self._next_number = self._next_number, self._next_number + 1
        name = f"{number:05d}-{seed}.png"
        return self.output_dir / name if self.output_dir is not None else Path(name)

    def _save(self, made: list) -> None:
        if self.output_dir is None:
            return
        from ldmcli.image import write_png

        for image in made:
            try:
                write_png(image.png, image.task.path)
            except (OSError, FileExistsError) as exc:  # the response still carries the image
                self.report.say(f"warning: could not save {image.task.path}: {exc}")


def _title(path: Path) -> str:
    from ldmcli.server_models import title_of

    return title_of(path)


_NUMBERED = re.compile(r"(\d+)-")


def _first_free_number(folder: Path | None) -> int:
    """The number after the highest `NNNNN-` image name in `folder`, as A1111 numbers on in its outputs."""
    if folder is None or not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name)) and len(m.group(1)) < 12]
    return max(numbers, default=-1) + 1


def check_output_dir(folder: Path) -> Path:
    """The --output-dir, made if missing; LdmError unless it is a folder ldm can write in."""
    import os

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LdmError(f"--output-dir {folder}: cannot make the folder ({exc.strerror or exc})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise LdmError(f"--output-dir {folder}: not a folder ldm can write in")
    return folder
