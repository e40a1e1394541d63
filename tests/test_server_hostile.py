"""`ldm serve` against hostile or unlucky clients: what a request that is refused leaves behind, a LoRA that
does not load, a failed model switch, credentials of another user, chunked bodies beyond the limit, SIGTERM
in the middle of a request of several images. (From a review that tried to break the server: each test
failed on the code before its fix, or fails when the behaviour it names is planted broken.)"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading

import httpx
import pytest
from PIL import Image

from test_server import SMALL, Server, images_of, progress, wait_for


@pytest.fixture(scope="module")
def review_models(tmp_path_factory, tiny_single_file):
    folder = tmp_path_factory.mktemp("review-models")
    (folder / "tiny-sd1.safetensors").symlink_to(tiny_single_file)
    (folder / "broken.safetensors").write_bytes(b"this is not a safetensors file")
    return folder


@pytest.fixture(scope="module")
def review_env(review_models):
    return {**os.environ, "LDM_MODELS_DIR": str(review_models)}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("review-loras")
    (folder / "bad.safetensors").write_bytes(b"junk, listed by /sdapi/v1/loras but not loadable")
    return folder


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("review-out")


@pytest.fixture(scope="module")
def srv(review_models, review_env, out_dir, lora_dir):
    running = Server("-m", review_models / "tiny-sd1.safetensors", "--output-dir", out_dir, "--lora-dir", lora_dir,
                     "--api-auth", "alice:s3cret,bob:hunter2", env=review_env)
    yield running
    running.stop()


@pytest.fixture
def http(srv):
    with srv.client(auth=("alice", "s3cret")) as client:
        yield client


def post_raw(client: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return client.post(path, content=raw, headers={"Content-Type": "application/json"})


def small_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- numbers and strings no answer could carry: refused before anything is made ---------------------------------


@pytest.mark.parametrize("field", ["eta", "denoising_strength", "comments", "steps", "seed"])
@pytest.mark.parametrize("literal", ["NaN", "1e400", '{"a": [Infinity]}', '"x\\ud800"'])
def test_unrepresentable_values_in_any_field_are_422(http, field, literal):
    raw = ('{"prompt": "a", "width": 64, "height": 64, "steps": 2, "%s": %s}' % (field, literal)).encode()
    response = post_raw(http, "/sdapi/v1/txt2img", raw)
    assert response.status_code == 422, response.text
    assert set(response.json()) == {"error", "detail", "body", "errors"}


def test_huge_cfg_scale_is_422_not_a_nan_image(http):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "a", **SMALL, "cfg_scale": 1e308})
    assert response.status_code == 422 and "cfg_scale must be between" in response.json()["detail"], response.text


def test_lone_surrogate_in_options_is_422(http):
    response = post_raw(http, "/sdapi/v1/options", b'{"sd_model_checkpoint": "\\ud800"}')
    assert response.status_code == 422, response.text


# --- a refused img2img request leaves no file behind, and its 422 names no path of the server ------------------


def test_refused_img2img_leaves_no_file_in_output_dir(http, out_dir):
    junk = base64.b64encode(os.urandom(1_000_000)).decode()  # 1 MB of random bytes, not an image
    response = http.post("/sdapi/v1/img2img", json={"prompt": "a", **SMALL, "init_images": [junk]})
    assert response.status_code == 422
    # (before the fix: out_dir/inputs/<sha>.img, 1,000,000 bytes, kept forever: any client could fill the disk
    # with 422s; and the 422 named the server's path of it)
    assert not list(out_dir.rglob("*.img")), "the refused request's bytes were kept"
    assert str(out_dir) not in response.json()["detail"], "the 422 names a path on the server"


# --- each fails when the behaviour it names is planted broken (test_server.py's tests did not) -------------------


def test_chunked_body_beyond_the_limit_is_413(http):
    """Planted: read_json's per-chunk size check removed (only Content-Length checked): test_server passes."""
    from ldmcli.limits import MAX_REQUEST_BYTES

    def chunks():
        for _ in range(MAX_REQUEST_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    response = http.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_right_password_of_another_user_is_401(srv):
    """Planted: the user name not compared (any user with a valid password gets in): test_server passes."""
    with srv.client(auth=("mallory", "s3cret")) as client:
        assert client.get("/health").status_code == 401
    with srv.client(auth=("alice", "hunter2")) as client:  # bob's password with alice's name
        assert client.get("/health").status_code == 401


def test_switch_to_a_broken_model_keeps_the_old_one(http):
    """Planted: a failed switch does not reload the old model: test_server passes."""
    response = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "broken.safetensors",
                                                     "CLIP_stop_at_last_layers": 2})
    assert response.status_code == 422 and "broken.safetensors" in response.json()["detail"]
    options = http.get("/sdapi/v1/options").json()
    # the refused request changed nothing: neither the model nor its other setting
    assert options["sd_model_checkpoint"] == "tiny-sd1.safetensors" and options["CLIP_stop_at_last_layers"] == 1
    assert len(images_of(http.post("/sdapi/v1/txt2img", json={"prompt": "a", "seed": 1, **SMALL}))) == 1


def test_send_images_false_and_include_init_images(http):
    """Untested by test_server: send_images false gives no images; parameters repeat init_images only when asked."""
    body = http.post("/sdapi/v1/txt2img", json={"prompt": "a", "seed": 1, **SMALL, "send_images": False}).json()
    assert body["images"] == []
    image = small_png()
    request = {"prompt": "a", "seed": 1, **SMALL, "init_images": [image], "denoising_strength": 0.5}
    assert http.post("/sdapi/v1/img2img", json=request).json()["parameters"]["init_images"] is None
    asked = http.post("/sdapi/v1/img2img", json={**request, "include_init_images": True}).json()
    assert asked["parameters"]["init_images"] == [image]


# --- a LoRA /sdapi/v1/loras lists that does not load: 422, and the model it was to be merged into stays -----------
# (before the fix: no model was left; every later request was 500 while /health said "ok")


def test_unloadable_lora_does_not_break_the_server(http):
    assert "bad" in {lora["name"] for lora in http.get("/sdapi/v1/loras").json()}
    refused = http.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:bad:1>", **SMALL})
    assert refused.status_code == 422, refused.text
    assert http.get("/health").json()["status"] == "ok"  # the model it had is resident again at once
    after = http.post("/sdapi/v1/txt2img", json={"prompt": "a", "seed": 1, **SMALL})
    assert after.status_code == 200, after.text


# --- SIGTERM in the middle of a request of several images (test_server's SIGTERM test has one image) ------------


def test_sigterm_mid_request_answers_the_images_done_and_exits_0(review_models, review_env):
    """Planted: the worker not checking `stopping` between images (the whole request made after SIGTERM):
    test_server passes."""
    stopping = Server("-m", review_models / "tiny-sd1.safetensors", env=review_env)
    answers = {}

    def send():
        with stopping.client() as client:
            answers["r"] = client.post("/sdapi/v1/txt2img",
                                       json={"prompt": "a", "seed": 1, "n_iter": 3, **SMALL, "steps": 60})

    thread = threading.Thread(target=send)
    try:
        with stopping.client() as client:
            thread.start()
            wait_for(lambda: progress(client)["state"]["sampling_step"] > 0, "the first image to start")
        stopping.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        assert stopping.proc.wait(60) == 0
    finally:
        stopping.stop()
    info = json.loads(answers["r"].json()["info"])
    assert len(answers["r"].json()["images"]) == 1 and info["interrupted"] is True


# --- InputStore: which files of requests' images live, and how long ----------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
def test_input_files_live_while_a_request_uses_them(tmp_path, keep):
    from ldmcli.server_request import InputStore

    store = InputStore(tmp_path, keep=keep)
    first, second, refused = [], [], []
    shared = store.put(b"\x89PNG shared", "init_images[0]", first)
    assert store.put(b"\x89PNG shared", "init_images[0]", second) == shared  # one file for the same bytes
    assert shared.read_bytes() == b"\x89PNG shared" and first == [(shared, "init_images[0]")]
    alone = store.put(b"junk", "mask", refused)
    store.release(refused, accepted=False)
    assert not alone.exists() and refused == []  # a refused request's file goes at once
    store.release(first, accepted=True)
    assert shared.exists()  # the second request still uses it
    store.release(second, accepted=True)
    assert shared.exists() == keep  # kept beside the images (--output-dir), else gone with its last request


def test_a_file_there_before_the_server_is_never_deleted(tmp_path):
    from ldmcli.server_request import InputStore

    path = InputStore(tmp_path).put(b"there before", "mask", [])
    store = InputStore(tmp_path, keep=False)  # a new server, the file already in its folder
    assert store.put(b"there before", "mask", uses := []) == path
    store.release(uses, accepted=False)
    assert path.read_bytes() == b"there before"


def test_hide_names_the_field_not_the_path(tmp_path):
    from ldmcli.server_request import InputStore

    store = InputStore(tmp_path)
    path = store.put(b"junk", "init_images[0]", uses := [])
    assert InputStore.hide(f"cannot read {path}: not an image", uses) == "cannot read init_images[0]: not an image"
