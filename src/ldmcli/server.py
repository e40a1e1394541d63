"""`ldm serve`: A1111's HTTP API (`/sdapi/v1/...`) in front of one resident model, on FastAPI + uvicorn.

This module is the HTTP side only: routes, authentication, body limits, errors in A1111's shapes, and
the process's life (start, SIGTERM). Requests become jobs in `server_request` (the command line's own
reading of an A1111 request), are made one at a time by `server_worker` (the command line's own
`run.load_model` / `run.make_images`), and name models through `server_models`.

Errors never carry a traceback: what a client got wrong is 422 (A1111's exception body: `error`,
`detail`, `body`, `errors`), a full queue 429 with Retry-After, a stopping server 503, a wrong or missing
password 401.
"""

import asyncio
import base64
import binascii
import json
import math
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmcli.errors import LdmError
from ldmcli.limits import MAX_REQUEST_BYTES
from ldmcli.server_worker import QueueFull, ShuttingDown, Work, Worker

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# How often a waiting request checks that its client is still there (seconds).
DISCONNECT_POLL = 0.5

# The A1111 settings `/sdapi/v1/options` reads and writes besides sd_model_checkpoint, with A1111's defaults
# and the check of a value a client sets (`server_request.SETTING_FIELDS` says what each sets in a request).
SETTINGS: dict[str, tuple[Any, str]] = {
    "CLIP_stop_at_last_layers": (1, "clip"),
    "eta_noise_seed_delta": (0, "seed"),
    "randn_source": ("GPU", "rng"),
    "pad_cond_uncond": (False, "bool"),
}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    credentials: tuple[tuple[str, str], ...] = ()  # --api-auth USER:PASS pairs; empty: no authentication
    input_dir: Path | None = None  # where img2img's base64 images become files
    keep_inputs: bool = False  # kept there (--output-dir: the images' records name them), else deleted once answered


class ApiError(Exception):
    """An answer other than 200, in A1111's exception shape."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException", headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.error, self.headers = status, detail, error, headers or {}


def error_body(error: str, detail: str) -> dict:
    """A1111's body for a failed API call (`modules/api/api.py` handle_exception)."""
    return {"error": error, "detail": detail, "body": "", "errors": detail}


def parse_credentials(text: str) -> tuple[tuple[str, str], ...]:
    """--api-auth "USER:PASS[,USER:PASS]" (A1111's format); ValueError naming what is wrong."""
    pairs = []
    for entry in text.split(","):
        user, colon, password = entry.strip().partition(":")
        if not colon or not user or not password:
            raise ValueError("expected USER:PASS, or several separated by commas (a user and a password in each)")
        try:
            entry.encode("utf-8")
        except UnicodeEncodeError:  # bytes of another encoding on the command line: no client could send them
            raise ValueError("users and passwords must be UTF-8 text") from None
        pairs.append((user, password))
    return tuple(pairs)


class BasicAuth:
    """ASGI middleware: with credentials, every request (every endpoint, /health too) needs one of them as
    HTTP basic auth, else 401 before any route runs or any body is read."""

    def __init__(self, app, credentials: tuple[tuple[str, str], ...]):
        self.app, self.credentials = app, credentials

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.credentials or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        response = JSONResponse({"detail": "Not authenticated"}, status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="ldm"'})
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        # Every pair compared, in constant time: how long a refusal takes says nothing about the password.
        matches = [secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
                   for u, p in self.credentials]
        return any(matches)


async def read_json(request) -> Any:
    """The request's JSON body, at most MAX_REQUEST_BYTES (413 beyond, even when Content-Length lies or is
    absent); malformed JSON is 422, and so are what Python's JSON reader takes but no answer can carry:
    NaN, Infinity and numbers beyond a float (1e400), and strings that are not Unicode (a lone surrogate
    escape, "\\ud800"). Each would otherwise pass the checks of a field ldm only notes, then fail the
    response's encoding after the image was made."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise ApiError(413, f"the request body is {int(declared):,} bytes, more than the limit of {MAX_REQUEST_BYTES:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise ApiError(413, f"the request body is more than the limit of {MAX_REQUEST_BYTES:,} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks), parse_constant=_not_a_number, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                       "JSONDecodeError") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, an integer of 4300+ digits, nesting too deep, NaN
        raise ApiError(422, f"the body is not usable JSON ({type(exc).__name__}: {str(exc)[:120]})",
                       "JSONDecodeError") from None
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "the body has a string that is not Unicode text (a lone surrogate escape such as "
                       "\\ud800)", "JSONDecodeError") from None
    return body


def _not_a_number(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the range of a number")
    return value


def create_app(worker: Worker, config: ServerConfig):
    """The FastAPI application: A1111's endpoints over `worker`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

    from ldmcli.server_request import InputStore

    app = FastAPI(title="ldm", docs_url=None, redoc_url=None, openapi_url=None)
    inputs = InputStore(config.input_dir or Path("inputs"), keep=config.keep_inputs)
    settings: dict[str, Any] = {}  # the settings a client set (POST /options); the rest are A1111's defaults
    report = worker.report

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(error_body(exc.error, exc.detail), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        detail = "; ".join(str(e.get("msg", e)) for e in exc.errors())
        return JSONResponse(error_body("RequestValidationError", detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request, exc: Exception):  # a bug of ours: one line in the log, no traceback to the client
        report.say(f"error: {type(exc).__name__}: {exc}")
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=500)

    async def queued(work: Work, request: Request | None = None):
        """Queue `work` and wait for its outcome. A client that leaves takes its waiting work with it (not
        begun: skipped; begun: it finishes, and its answer goes nowhere), noticed within DISCONNECT_POLL s."""
        try:
            worker.submit(work)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "QueueFull", {"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), "ShuttingDown", {"Retry-After": "5"}) from None
        outcome = asyncio.wrap_future(work.future)
        try:
            while True:
                done, _ = await asyncio.wait({outcome}, timeout=DISCONNECT_POLL)
                if done:
                    return outcome.result()
                if request is not None and await request.is_disconnected():
                    work.abandoned = True
                    outcome.cancel()
                    raise ApiError(499, "the client disconnected", "ClientDisconnected")
        except asyncio.CancelledError:
            work.abandoned = True
            raise
        except ShuttingDown as exc:
            raise ApiError(503, str(exc), "ShuttingDown", {"Retry-After": "5"}) from None
        except LdmError as exc:  # found only when the model was at hand (a refiner that is not one, ...)
            raise ApiError(422, str(exc), type(exc).__name__) from None

    def prepared_job(body: Any, kind: str, uses: list):
        """The request's job, checked as `ldm generate` checks a job (422 otherwise, the paths of the images it
        sent named by their fields, not by where the server keeps them)."""
        from ldmcli.run import check_jobs, recommended_defaults
        from ldmcli.server_request import check_names, request_job

        try:
            job = request_job(body, kind, inputs, settings, uses)
            check_names(job, worker.options.lora_dir)
            options = worker.options
            return check_jobs([job], options, recommended_defaults(options.model, options.prediction))[0]
        except LdmError as exc:
            raise ApiError(422, inputs.hide(str(exc), uses), type(exc).__name__) from None

    async def generate(request: Request, kind: str):
        from ldmcli.server_request import response

        body = await read_json(request)
        uses: list = []  # the files of the images this request sent (InputStore), released once it is made
        accepted, work = False, None
        try:
            # Decoding, hashing and checking images can take a while: off the event loop, which keeps
            # answering /health and /progress meanwhile.
            job = await asyncio.to_thread(prepared_job, body, kind, uses)
            for line in _note_lines(job):
                report.say(f"note: {kind}: {line}")
            accepted, work = True, Work(kind, job=job)
            outcome = await queued(work, request)
        finally:
            if work is None or work.future.done():
                inputs.release(uses, accepted)
            else:  # its client left while it runs: the files stay until it is made
                work.future.add_done_callback(lambda _done: inputs.release(uses, accepted))
        if not outcome.made and outcome.failed:
            raise ApiError(500, f"no image could be made: {outcome.failed} came out NaN/Inf (see the server's log)",
                           "NonFiniteError")
        send = not (isinstance(body.get("send_images"), bool) and body["send_images"] is False)
        return response(body, outcome.made, outcome.model, job, interrupted=outcome.interrupted,
                        failed=outcome.failed, send_images=send)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await generate(request, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await generate(request, "img2img")

    @app.get("/sdapi/v1/options")
    async def get_options():
        model = worker.model
        current = {key: settings.get(key, default) for key, (default, _) in SETTINGS.items()}
        return {"sd_model_checkpoint": worker.title, "sd_checkpoint_hash": getattr(model, "hash", None),
                **current, "samples_format": "png", "sd_vae": "Automatic",
                "sd_vae_decode_method": "Full" if worker.options.taesd is None else "TAESD"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        from ldmcli.server_models import find_listed

        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(422, "the body must be a JSON object of A1111 options")
        changes = {}
        for key, value in body.items():
            if key in SETTINGS:
                changes[key] = _setting(key, value)
        not_honoured = sorted(key for key in body if key not in SETTINGS and key != "sd_model_checkpoint")
        switch = None
        if "sd_model_checkpoint" in body:
            try:
                path = find_listed(body["sd_model_checkpoint"])
            except LdmError as exc:
                raise ApiError(422, str(exc), type(exc).__name__) from None
            if Path(path).resolve() != Path(worker.options.model).resolve():
                switch = path
        if not_honoured:
            report.say(f"note: options: not honoured: {', '.join(not_honoured)} (ldm has no such setting)")
        if switch is not None:
            report.say(f"switching to {switch}")
            await queued(Work("switch", model=switch))
        settings.update(changes)  # only once the switch, if any, succeeded: a refused request changes nothing
        return {"not_honoured": not_honoured} if not_honoured else None

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        from ldmcli.server_models import listed_models

        return [m.record() for m in listed_models(_known_hashes(worker))]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        return None  # sd-models reads the folders on every call: nothing is cached to refresh

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from ldmcli.samplers import A1111_ALIASES, SAMPLERS

        return [{"name": info.display_name, "options": {},
                 "aliases": [name, *(a for a, (s, sch) in A1111_ALIASES.items() if s == name and sch is None)]}
                for name, info in SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        from ldmcli.samplers import SCHEDULES

        found = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
                 {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1, "need_inner_model": True}]
        return found + [{"name": s.name, "label": s.display_name, "aliases": None, "default_rho": -1,
                         "need_inner_model": False} for s in SCHEDULES.values() if s.display_name]

    @app.get("/sdapi/v1/loras")
    async def loras():
        from ldmcli.server_models import listed_loras

        return listed_loras(worker.options.lora_dir)

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        return None

    @app.get("/sdapi/v1/scripts")
    async def scripts():  # clients (webuiapi) ask which extensions are there: none
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/progress")
    async def progress():
        return worker.progress.record(worker.waiting, worker.capacity)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        worker.interrupt()
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():  # A1111's skip moves on to the request's next image; ldm stops the request as interrupt does
        worker.interrupt()
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        from ldmcli.metadata import A1111_KEY, parse_a1111, png_text_of
        from ldmcli.server_request import decode_image

        body = await read_json(request)
        if not isinstance(body, dict):
            raise ApiError(422, 'the body must be a JSON object {"image": base64 PNG}')
        try:
            items = png_text_of(decode_image(body.get("image"), "image"))
            text = items.get(A1111_KEY, "")
            parameters = parse_a1111(text) if text else {}
        except LdmError as exc:
            raise ApiError(422, str(exc), type(exc).__name__) from None
        return {"info": text, "items": items, "parameters": parameters}

    @app.get("/health")
    async def health():
        """For a load balancer: 200 while requests are taken (with how busy the server is), 503 once stopping
        or while no model is loaded."""
        stopping = worker.stopping.is_set()
        unusable = stopping or worker.model is None  # no model: the last load failed, each request tries again
        body = {"status": "stopping" if stopping else "no model" if worker.model is None else "ok", "model": worker.title,
                "busy": worker.current is not None, "waiting": worker.waiting, "capacity": worker.capacity}
        return JSONResponse(body, status_code=503 if unusable else 200)

    return BasicAuth(app, config.credentials)


def _known_hashes(worker: Worker) -> dict:
    model = worker.model
    return {} if model is None else {Path(worker.options.model).resolve(): model.hash}


def _setting(key: str, value: Any) -> Any:
    """A setting's value checked (422 otherwise)."""
    from ldmcli.limits import MAX_CLIP_SKIP, MAX_SEED

    kind = SETTINGS[key][1]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind == "clip" and whole and 1 <= value <= MAX_CLIP_SKIP:
        return value
    if kind == "seed" and whole and 0 <= value <= MAX_SEED:
        return value
    if kind == "rng" and isinstance(value, str) and value.strip().upper() in ("GPU", "CPU", "NV"):
        return value.strip().upper()
    if kind == "bool" and isinstance(value, bool):
        return value
    wanted = {"clip": f"a whole number from 1 to {MAX_CLIP_SKIP}", "seed": "a whole number of at least 0",
              "rng": '"GPU", "CPU" or "NV"', "bool": "true or false"}[kind]
    raise ApiError(422, f"option {key} must be {wanted}, got {json.dumps(value, default=str)[:40]}")


def _note_lines(job) -> list[str]:
    missing = [n.text() for n in job.notes if not n.honoured]
    return [f"not honoured: {'; '.join(missing)}"] if missing else []


def serve(options, config: ServerConfig, *, capacity: int, output_dir: Path | None, report) -> int:
    """Load the model, then answer HTTP until SIGTERM or Ctrl-C; 0 after SIGTERM (the current image finished,
    queued requests refused with 503)."""
    import tempfile

    import uvicorn

    if config.host not in LOCAL_HOSTS and not config.credentials:
        report.say(f"warning: listening on {config.host}, beyond this machine, without --api-auth: anyone who can "
                   "reach the port can use the server")
    worker = Worker(options, capacity=capacity, output_dir=output_dir, report=report)
    worker.start()
    with tempfile.TemporaryDirectory(prefix="ldm-serve-inputs-") as scratch:
        # With --output-dir the images a request starts from are kept beside the images (their records name
        # them); without it they live as long as the server.
        inputs = output_dir / "inputs" if output_dir is not None else Path(scratch)
        app = create_app(worker, ServerConfig(config.host, config.port, config.credentials, inputs,
                                              keep_inputs=output_dir is not None))
        server = _uvicorn_server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                                access_log=False, lifespan="off"), worker, report)
        # uvicorn re-raises a SIGTERM it caught once it has shut down: under this handler that is a no-op, so a
        # SIGTERM ends the process with 0 after the graceful shutdown, not with the signal's death.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
            worker.shutdown()
            worker.join(timeout=60)
    return 0 if server.started else 1


def _uvicorn_server(config, worker: Worker, report):
    """uvicorn's Server, told about SIGTERM before it begins its graceful shutdown, so that the worker stops
    after the current image (uvicorn then waits for the answers still owed), and saying where it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            worker.shutdown()
            report.say(f"stopping ({signal.Signals(sig).name}): the current image finishes, queued requests get 503")
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            for server in getattr(self, "servers", []):
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    report.say(f"listening on http://{_url_host(host)}:{port} (A1111 API: /sdapi/v1/...)")

    return Server(config)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
