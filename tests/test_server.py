"""`ldm serve` as its clients see it: a real server process on a free port, driven with A1111's Python client
(`webuiapi`) and with plain HTTP (httpx). The same request gives the same PNG bytes as `ldm generate`;
requests run one at a time in arrival order; the queue, interrupt, auth, hostile input and SIGTERM behave
as the README says. One server process is shared by the module (tiny model, 64x64, few steps); the auth and
SIGTERM checks start their own.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

LDM = [sys.executable, "-m", "ldmcli"]
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "weights" / "ldm-demo.safetensors"
SMALL = {"width": 64, "height": 64, "steps": 4, "sampler_name": "Euler a", "cfg_scale": 5}
LONG_STEPS = 1000  # the most a request may ask: many seconds of a tiny model, time to act while it runs


def default_signals() -> None:
    """In the child before exec: SIGTERM and SIGINT at their defaults, whatever this process inherited."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """An `ldm serve` process on a free port (--port 0: the port it says on stderr); its stderr kept in `log`."""

    def __init__(self, *args, env=None):
        # One CPU thread, as the in-process tiny-model tests use (conftest's one_thread): tiny tensors gain
        # nothing from more, and on a busy 2-core machine a thread team's handoffs cost 10x.
        self.proc = subprocess.Popen([*LDM, "serve", "--port", "0", "--threads", "1", *map(str, args)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     preexec_fn=default_signals)
        self.log: list[str] = []
        self.url = None
        listening = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                if "listening on http://" in line and self.url is None:
                    self.url = line.split("listening on ", 1)[1].split()[0]
                    listening.set()
            listening.set()

        self._reader = threading.Thread(target=drain, daemon=True)
        self._reader.start()
        if not listening.wait(120) or self.url is None:
            self.proc.kill()
            raise AssertionError("ldm serve did not start:\n" + "\n".join(self.log))
        self.port = int(self.url.rsplit(":", 1)[1])

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.proc.kill()
            self._reader.join(5)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_single_file):
    """$LDM_MODELS_DIR for the servers: the tiny model (symlinked); the demo model is listed from the
    repository's weights/. The two models a client switches between."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "tiny-sd1.safetensors").symlink_to(tiny_single_file)
    return folder


@pytest.fixture(scope="module")
def env(models_dir):
    return {**os.environ, "LDM_MODELS_DIR": str(models_dir)}


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="module")
def server(models_dir, env, output_dir):
    """The module's server: the tiny model, three requests may wait, images also saved to `output_dir`."""
    running = Server("-m", models_dir / "tiny-sd1.safetensors", "--queue", 3, "--output-dir", output_dir, env=env)
    yield running
    assert running.stop() == 0, "\n".join(running.log)


@pytest.fixture
def http(server):
    with server.client() as client:
        yield client


def generate_with_cli(tmp_path: Path, model: Path, request: dict, env: dict) -> list[bytes]:
    """The PNG files `ldm generate` writes for `request` as a line of a JSONL prompt file (one thread, as the
    servers here: the thread count may change convolutions' rounding)."""
    prompts = tmp_path / "request.jsonl"
    prompts.write_text(json.dumps(request) + "\n")
    out = tmp_path / "cli"
    result = subprocess.run([*LDM, "generate", "--prompts", prompts, "-m", model, "-o", f"{out}/", "-q", "--threads", "1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return [path.read_bytes() for path in sorted(out.glob("*.png"))]


def images_of(response: httpx.Response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image) for image in response.json()["images"]]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def progress(client: httpx.Client) -> dict:
    return client.get("/sdapi/v1/progress").json()


# --- the same bytes as ldm generate ------------------------------------------------------------------------


def test_txt2img_gives_the_bytes_ldm_generate_writes(server, http, models_dir, env, tmp_path, output_dir):
    request = {"prompt": "a red circle on a blue background", "seed": 11, "n_iter": 2, **SMALL}
    response = http.post("/sdapi/v1/txt2img", json=request)
    served = images_of(response)
    assert served == generate_with_cli(tmp_path, models_dir / "tiny-sd1.safetensors", request, env)
    body = response.json()
    assert body["parameters"] == request
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["all_prompts"] == [request["prompt"]] * 2
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 4, 5)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "tiny-sd1"
    # Each image carries A1111's infotext, the one `info` lists, and ldm's record
    for data, infotext in zip(served, info["infotexts"], strict=True):
        text = Image.open(io.BytesIO(data)).text
        assert text["parameters"] == infotext and "Seed: 1" in infotext and "Model: tiny-sd1" in infotext
        assert json.loads(text["ldm"])["seed"] in (11, 12)
    # --output-dir keeps the same files
    saved = {p.read_bytes() for p in output_dir.glob("*.png")}
    assert set(served) <= saved


def test_img2img_and_inpainting_give_the_bytes_ldm_generate_writes(server, http, models_dir, env, tmp_path, output_dir):
    rng = np.random.default_rng(0)
    init = png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask_pixels = np.zeros((64, 64, 3), np.uint8)
    mask_pixels[16:48, 16:48] = 255
    mask = png(mask_pixels)
    request = {"prompt": "a star", "seed": 3, "denoising_strength": 0.5, "mask_blur": 2, **SMALL, "steps": 6}
    sent = {**request, "init_images": [base64.b64encode(init).decode()], "mask": base64.b64encode(mask).decode(),
            "resize_mode": 1, "inpainting_fill": 1}
    served = images_of(http.post("/sdapi/v1/img2img", json=sent))
    assert len(served) == 1 and Image.open(io.BytesIO(served[0])).size == (64, 64)
    # The images a request sends are kept under the output folder's inputs/, named by their content: the
    # same request from a JSONL file names those files.
    stored = {name: output_dir / "inputs" / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
              for name, data in (("init_image", init), ("mask", mask))}
    assert all(path.read_bytes() == data for path, data in zip(stored.values(), (init, mask)))
    line = {**request, **{k: str(v) for k, v in stored.items()}, "resize_mode": "crop"}
    assert served == generate_with_cli(tmp_path, models_dir / "tiny-sd1.safetensors", line, env)
    text = Image.open(io.BytesIO(served[0])).text["parameters"]
    assert "Denoising strength: 0.5" in text and "Mask blur: 2" in text


def test_webuiapi_client_txt2img_img2img_png_info(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=4)
    result = api.txt2img(prompt="a white star", seed=5, width=64, height=64, cfg_scale=5)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [5]
    assert result.image.info["parameters"] == result.info["infotexts"][0]
    assert result.parameters["prompt"] == "a white star"
    again = api.img2img(images=[result.image], prompt="a white star", seed=5, width=64, height=64,
                        denoising_strength=0.5, cfg_scale=5)
    assert again.image.size == (64, 64) and "Denoising strength: 0.5" in again.info["infotexts"][0]
    # webuiapi sends inpainting keys ldm does not have (fill: 0, only masked: true): said, not refused
    keys = {note["key"] for note in again.info["not_honoured"]}
    assert "restore_faces" not in keys and "eta" in keys
    assert api.png_info(result.image).info == result.info["infotexts"][0]
    assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.get_progress()["state"]["job_count"] == 0


# --- models ----------------------------------------------------------------------------------------------------


def test_model_switch_through_options(server, http, env, tmp_path):
    import webuiapi

    titles = [m["title"] for m in http.get("/sdapi/v1/sd-models").json()]
    assert "tiny-sd1.safetensors" in titles and "ldm-demo.safetensors" in titles
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd1.safetensors"
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    try:
        api.util_set_model("ldm-demo.safetensors")
        assert api.util_get_current_model() == "ldm-demo.safetensors"
        request = {"prompt": "a large red circle on the left, blue background", "seed": 2, **SMALL,
                   "override_settings": {"CLIP_stop_at_last_layers": 1}}
        response = http.post("/sdapi/v1/txt2img", json=request)
        assert json.loads(response.json()["info"])["sd_model_name"] == "ldm-demo"
        assert images_of(response) == generate_with_cli(tmp_path, DEMO, request, env)
        # A1111's title with a hash, and the model's name, name it too
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1 [0123456789]"}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd1.safetensors"
    finally:
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1.safetensors"})


def test_clip_skip_option_is_the_default_of_requests(http):
    try:
        assert http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        info = json.loads(http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 1, **SMALL}).json()["info"])
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
        own = {"prompt": "a cat", "seed": 1, **SMALL, "override_settings": {"CLIP_stop_at_last_layers": 1}}
        assert json.loads(http.post("/sdapi/v1/txt2img", json=own).json()["info"])["clip_skip"] == 1
    finally:
        http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


# --- the queue, interrupt, disconnects -----------------------------------------------------------------------


def test_requests_run_in_arrival_order_and_a_full_queue_is_429(server):
    answers: dict[int, tuple[float, httpx.Response]] = {}

    def send(seed: int, steps: int):
        with server.client() as client:
            response = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": seed, **SMALL, "steps": steps})
            answers[seed] = (time.monotonic(), response)

    with server.client() as client:
        threads = [threading.Thread(target=send, args=(100, LONG_STEPS))]
        threads[0].start()
        wait_for(lambda: progress(client)["state"]["sampling_step"] > 0, "the first request to start")
        for number, seed in enumerate((101, 102, 103), 1):  # each one queued before the next is sent
            threads.append(threading.Thread(target=send, args=(seed, 2)))
            threads[-1].start()
            wait_for(lambda number=number: client.get("/health").json()["waiting"] == number, f"{number} waiting")
        full = client.post("/sdapi/v1/txt2img", json={"prompt": "a dog", **SMALL})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        assert "queue is full" in full.json()["detail"]
        assert progress(client)["queue"] == {"waiting": 3, "capacity": 3}
        client.post("/sdapi/v1/interrupt")
        for thread in threads:
            thread.join(120)
    order = sorted(answers, key=lambda seed: answers[seed][0])
    assert order == [100, 101, 102, 103]
    for seed in (101, 102, 103):
        assert json.loads(answers[seed][1].json()["info"])["all_seeds"] == [seed]


def test_interrupt_stops_the_current_image_only(server):
    """Three images asked, interrupted once the first is done: the images finished are the answer (ldm does
    not return a half-denoised image), and the request queued behind it still runs."""
    answers = {}

    def send(name: str, request: dict):
        with server.client() as client:
            answers[name] = client.post("/sdapi/v1/txt2img", json=request)

    first = threading.Thread(target=send, args=("long", {"prompt": "a cat", "seed": 8, "n_iter": 3, **SMALL,
                                                          "steps": 80}))
    with server.client() as client:
        first.start()
        wait_for(lambda: progress(client)["state"]["sampling_step"] > 0, "the first image to start")
        behind = threading.Thread(target=send, args=("behind", {"prompt": "a dog", "seed": 9, **SMALL}))
        behind.start()
        wait_for(lambda: client.get("/health").json()["waiting"] == 1, "the second request to queue")
        state = wait_for(lambda: (p := progress(client))["state"]["job_no"] >= 1 and p, "the first image to finish")
        assert 1 / 3 <= state["progress"] < 1 and state["eta_relative"] >= 0 and state["state"]["job_count"] == 3
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        first.join(120)
        behind.join(120)
    body = answers["long"].json()
    info = json.loads(body["info"])
    assert info["interrupted"] is True and 1 <= len(body["images"]) < 3
    assert info["all_seeds"] == [8, 9][: len(body["images"])] and len(info["infotexts"]) == len(body["images"])
    assert json.loads(answers["behind"].json()["info"])["interrupted"] is False
    assert len(images_of(answers["behind"])) == 1


def raw_post(port: int, request: dict) -> socket.socket:
    """A txt2img request sent on a bare socket, whose answer nobody will read."""
    body = json.dumps(request).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def test_a_client_that_disconnects_does_not_stop_others(server, http):
    """A client that leaves while its image is made: the image finishes, nobody else notices. One that leaves
    while its request waits: the request is skipped. One that leaves half-way through its request: nothing."""
    with raw_post(server.port, {"prompt": "a cat", "seed": 4, **SMALL, "steps": LONG_STEPS}):
        wait_for(lambda: progress(http)["state"]["sampling_step"] > 0, "the abandoned request to start")
    with raw_post(server.port, {"prompt": "a cat", "seed": 444, **SMALL}):
        wait_for(lambda: http.get("/health").json()["waiting"] == 1, "the second request to queue")
    time.sleep(1.5)  # the server looks for departed clients every half second
    http.post("/sdapi/v1/interrupt")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # half a request, then gone
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\"")
    assert len(images_of(http.post("/sdapi/v1/txt2img", json={"prompt": "a dog", "seed": 4, **SMALL}))) == 1
    assert http.get("/health").json()["status"] == "ok"
    assert "txt2img: skipped, its client left before it began" in server.log
    assert not any("seed 444" in line for line in server.log)


# --- the other endpoints -----------------------------------------------------------------------------------


def test_listing_endpoints_and_png_info(http):
    assert http.get("/health").json() == {"status": "ok", "model": "tiny-sd1.safetensors", "busy": False,
                                          "waiting": 0, "capacity": 3}
    samplers = http.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert "k_euler_a" in next(s for s in samplers if s["name"] == "Euler a")["aliases"]
    assert {"automatic", "karras", "exponential"} <= {s["name"] for s in http.get("/sdapi/v1/schedulers").json()}
    assert http.get("/sdapi/v1/loras").json() == []
    assert http.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    idle = progress(http)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    served = images_of(http.post("/sdapi/v1/txt2img", json={"prompt": "a (red:1.2) square", "seed": 1, **SMALL}))[0]
    answer = http.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + base64.b64encode(served).decode()})
    body = answer.json()
    assert body["info"].startswith("a (red:1.2) square\nSteps: 4") and body["parameters"]["Seed"] == "1"
    assert json.loads(body["items"]["ldm"])["prompt"] == "a (red:1.2) square"


# --- hostile and careless requests --------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, message", [
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../../../etc/passwd"}, 422, "is a path"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}, 422, "is a path"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "weights/../tiny-sd1.safetensors"}, 422, "is a path"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "no-such-model"}, 422, "not a model /sdapi/v1/sd-models lists"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": 5}, 422, "must be the name of a model"),
    ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": "two"}, 422, "must be a whole number"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "refiner_checkpoint": "../../secret.safetensors", **SMALL}, 422, "is a path"),
    ("/sdapi/v1/txt2img", {"prompt": "a <lora:../../etc/passwd:1> cat", **SMALL}, 422, "not a LoRA"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "init_image": "/etc/passwd", **SMALL}, 422, "names a file on the server"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "width": 65536, "height": 65536}, 422, "more than the limit"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "steps": 100000}, 422, "steps must be between 1 and 1000"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "n_iter": 1000, "batch_size": 1000}, 422, "the limit is 64"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "steps": "many"}, 422, '"steps" must be a whole number'),
    ("/sdapi/v1/txt2img", {"prompt": 5, **SMALL}, 422, '"prompt" must be a string'),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "seed": 1.5}, 422, '"seed" must be a whole number'),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "override_settings": []}, 422, "must be an object"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", **SMALL, "sampler_name": "k_dpm_2"}, 422, "sampler"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "no_such_key": 1}, 422, "unknown field(s) no_such_key"),
    ("/sdapi/v1/txt2img", ["a cat"], 422, "must be a JSON object"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", **SMALL}, 422, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": ["not base64!"], **SMALL}, 422, "not base64"),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [base64.b64encode(b"GIF89a junk").decode()], **SMALL},
     422, "not an image"),
    ("/sdapi/v1/png-info", {"image": base64.b64encode(b"not a png").decode()}, 422, "not a PNG"),
])
def test_hostile_requests_get_a_4xx_with_a_message(http, path, body, status, message):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"error", "detail", "body", "errors"} and message in answer["detail"], answer
    assert "Traceback" not in response.text


@pytest.mark.parametrize("raw, message", [
    (b"{bad json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe", "JSON"),
    (b"\x80 not UTF-8", "JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not usable JSON"),
    # Python's reader takes these; no answer could carry them back in `parameters`
    (b'{"prompt": "a", "eta": NaN}', "NaN is not a number JSON allows"),
    (b'{"prompt": "a", "comments": {"a": [-Infinity]}}', "-Infinity is not a number JSON allows"),
    (b'{"prompt": "a", "s_noise": 1e400}', "1e400 is beyond the range of a number"),
    (b'{"prompt": "a", "steps": "x\\ud800"}', "not Unicode text"),
    (b'{"prompt": "a", "\\udc80": 1}', "not Unicode text"),
])
def test_malformed_bodies_get_422(http, raw, message):
    response = http.post("/sdapi/v1/txt2img", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_bodies_beyond_the_limit_get_413(http):
    from ldmcli.limits import MAX_REQUEST_BYTES

    response = http.post("/sdapi/v1/txt2img", content=b" " * (MAX_REQUEST_BYTES + 1))
    assert response.status_code == 413 and "limit" in response.json()["detail"]
    assert http.get("/sdapi/v1/nothing-here").status_code == 404


# --- authentication ---------------------------------------------------------------------------------------------


def test_api_auth_guards_every_endpoint(models_dir, env, server, http):
    import webuiapi

    guarded = Server("-m", models_dir / "tiny-sd1.safetensors", "--api-auth", "alice:s3cret,bob:hunter2", env=env)
    try:
        with guarded.client() as anonymous, guarded.client(auth=("alice", "wrong")) as wrong, \
                guarded.client(auth=("bob", "hunter2")) as bob:
            for method, path in [("GET", "/health"), ("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/sd-models"),
                                 ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/txt2img"),
                                 ("POST", "/sdapi/v1/interrupt"), ("GET", "/sdapi/v1/no-such-endpoint")]:
                for client in (anonymous, wrong):
                    response = client.request(method, path, json={"prompt": "a cat", **SMALL})
                    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
            assert bob.get("/health").status_code == 200
            assert len(images_of(bob.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "seed": 1, **SMALL}))) == 1
        api = webuiapi.WebUIApi(host="127.0.0.1", port=guarded.port, username="alice", password="s3cret")
        assert api.txt2img(prompt="a cat", seed=1, steps=4, width=64, height=64).image.size == (64, 64)
    finally:
        assert guarded.stop() == 0
    # and without --api-auth, nothing asks for it
    assert http.get("/health").status_code == 200 and http.get("/sdapi/v1/options").status_code == 200


# --- the process: flags, SIGTERM ------------------------------------------------------------------------------


def test_taesd_decodes_served_images_as_generate_does(models_dir, env, tmp_path):
    """`ldm serve --taesd`: the same PNG bytes as `ldm generate --taesd`; /options says A1111's decode method."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(5)
    AutoencoderTiny().save_pretrained(tmp_path / "taesd", safe_serialization=True)
    model = models_dir / "tiny-sd1.safetensors"
    request = {"prompt": "a red circle on a blue background", "seed": 3, **SMALL}
    running = Server("-m", model, "--taesd", tmp_path / "taesd", env=env)
    try:
        with running.client() as client:
            served = images_of(client.post("/sdapi/v1/txt2img", json=request))
            assert client.get("/sdapi/v1/options").json()["sd_vae_decode_method"] == "TAESD"
    finally:
        assert running.stop() == 0, "\n".join(running.log)
    prompts = tmp_path / "request.jsonl"
    prompts.write_text(json.dumps(request) + "\n")
    result = subprocess.run([*LDM, "generate", "--prompts", prompts, "-m", model, "-o", f"{tmp_path / 'cli'}/", "-q",
                             "--threads", "1", "--taesd", tmp_path / "taesd"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert served == [p.read_bytes() for p in sorted((tmp_path / "cli").glob("*.png"))]
    (tmp_path / "plain").mkdir()
    assert served != generate_with_cli(tmp_path / "plain", model, request, env)


@pytest.mark.parametrize("args, message", [
    (["--api-auth", "alice"], "expected USER:PASS"),
    (["--api-auth", "alice:"], "expected USER:PASS"),
    (["--port", "70000"], "70000 is not in the range"),
    (["--queue", "0"], "0 is not in the range"),
    (["-m", "no-such-model"], "model 'no-such-model' not found"),
    (["-m", "README.md"], "README.md"),
    (["--api-auth", b"al\xffice:pw"], "must be UTF-8"),  # bytes of another encoding
    (["--taesd", "README.md"], "README.md: not a weights file"),
])
def test_bad_flags_are_one_line_and_exit_2_before_loading(args, message):
    result = subprocess.run([*LDM, "serve", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            errors="replace")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "loaded" not in result.stderr


def test_sigterm_mid_image_finishes_it_and_exits_0(models_dir, env):
    """Listening beyond this machine without --api-auth is warned about; SIGTERM while an image is being made:
    that image's response arrives whole, the request queued behind it gets 503, and the process exits 0."""
    stopping = Server("-m", models_dir / "tiny-sd1.safetensors", "--host", "0.0.0.0", env=env)
    assert any("without --api-auth" in line for line in stopping.log)
    url = f"http://127.0.0.1:{stopping.port}"
    answers = {}

    def send(name, request):
        with httpx.Client(base_url=url, timeout=120) as client:
            answers[name] = client.post("/sdapi/v1/txt2img", json=request)

    running = threading.Thread(target=send, args=("running", {"prompt": "a cat", "seed": 1, **SMALL, "steps": 100}))
    queued = threading.Thread(target=send, args=("queued", {"prompt": "a dog", "seed": 2, **SMALL}))
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            running.start()
            wait_for(lambda: progress(client)["state"]["sampling_step"] > 0, "the image to start")
            queued.start()
            wait_for(lambda: client.get("/health").json()["waiting"] == 1, "the second request to queue")
        stopping.proc.send_signal(signal.SIGTERM)
        running.join(120)
        queued.join(120)
        assert stopping.proc.wait(60) == 0, "\n".join(stopping.log)
    finally:
        stopping.stop()
    done = answers["running"]
    assert done.status_code == 200 and json.loads(done.json()["info"])["interrupted"] is False
    image = Image.open(io.BytesIO(images_of(done)[0]))
    image.load()
    assert image.size == (64, 64) and "Steps: 100" in image.text["parameters"]
    assert answers["queued"].status_code == 503 and "shutting down" in answers["queued"].json()["detail"]
    assert not any("Traceback" in line for line in stopping.log), "\n".join(stopping.log)
