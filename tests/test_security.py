"""A server no input or visitor can break: crash containment, who may change indices, what the UI's
own Gradio endpoints accept, and answers for unknown routes. Each test checks the answer *and*
that the indices are unchanged."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shitu.config import PipelineConfig
from shitu.engine import Engine
from shitu.gallery import read_label_file
from shitu.runtime import Runtime

from .conftest import make_settings, sample_index


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


RED = np.zeros((64, 64, 3), np.uint8)
RED[..., 0] = 255  # RGB red: the crashing test detector's poison


@pytest.fixture
def gallery_engine(engine, template, sample_gallery) -> Engine:
    return sample_index(engine, "g", template, sample_gallery)


def state(engine: Engine) -> tuple:
    return engine.index_names(), {n: engine.index(n).id_map for n in engine.index_names()}


def gradio_call(client: TestClient, name: str, data: list, session: str = "s1") -> tuple[str, object]:
    """Call a UI event through Gradio's own HTTP API: ("complete" | "error", payload)."""
    posted = client.post(f"/gradio_api/call/{name}", json={"data": data, "session_hash": session})
    assert posted.status_code == 200, posted.text
    event_id = posted.json()["event_id"]
    stream = client.get(f"/gradio_api/call/{name}/{event_id}").text
    kind, payload = None, None
    for line in stream.splitlines():
        if line.startswith("event: "):
            kind = line[7:].strip()
        elif line.startswith("data: ") and kind in ("complete", "error"):
            payload = json.loads(line[6:])
    return kind, payload


# --- 1. a native crash never takes the server down ---------------------------------------------------
@pytest.fixture(scope="module")
def crashing_runtime(tmp_path_factory):
    rt = Runtime(PipelineConfig(), make_settings(tmp_path_factory.mktemp("crash")), isolate=True,
                 factory="tests.crashing_models:create")  # fmt: skip
    yield rt
    rt.close()


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_segfault_in_a_model_costs_one_request_not_the_server(tmp_path, crashing_runtime, sample_gallery,
                                                                 sample_queries):  # fmt: skip
    from shitu.api import create_api

    engine = Engine(make_settings(tmp_path / "data"), runtime=crashing_runtime)
    root, labels = sample_gallery
    engine.build("g", read_label_file(labels, root))
    client = TestClient(create_api(engine))
    good = {"image": base64.b64encode(sample_queries[1].read_bytes()).decode(), "indexKey": "g"}
    assert client.post("/shitu-infer", json=good).status_code == 200
    before = state(engine)
    crashed = client.post("/shitu-infer", json={"image": base64.b64encode(jpeg(RED)).decode(), "indexKey": "g"})
    assert crashed.status_code == 503
    assert "detection" in crashed.json()["errorMsg"] and "crashed" in crashed.json()["errorMsg"]
    assert crashing_runtime.restarts >= 1
    assert client.get("/health").status_code == 200, "the server still answers"
    again = client.post("/shitu-infer", json=good)
    assert again.status_code == 200 and again.json()["result"]["detectedObjects"], "the next request is served"
    assert state(engine) == before


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_a_crash_is_a_toast_in_the_ui(tmp_path, crashing_runtime, sample_gallery):
    import gradio as gr

    from shitu.ui.recognize import recognize_image

    engine = Engine(make_settings(tmp_path / "data"), runtime=crashing_runtime)
    root, labels = sample_gallery
    engine.build("g", read_label_file(labels, root))
    with pytest.raises(gr.Error, match="detection model crashed"):
        recognize_image(engine, RED, "g")
    image, *_ = recognize_image(engine, np.full((64, 64, 3), 128, np.uint8), "g")
    assert image.size == (64, 64)


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_a_crash_in_a_build_worker_fails_the_build_and_changes_nothing(tmp_path, sample_gallery, monkeypatch):
    """A large gallery is shared by extra worker processes (SHITU_BUILD_WORKERS); one of them dying
    natively on an image fails that build with the model named, stores nothing, and the next
    build is served (the worker restarted)."""
    import shitu.runtime
    from shitu.errors import ModelCrashed
    from shitu.gallery import GalleryBatch, GalleryItem

    monkeypatch.setattr(shitu.runtime, "LANE_MIN_COLD_IMAGES", 1)
    rt = Runtime(PipelineConfig(), make_settings(tmp_path / "rt", build_workers=3), isolate=True,
                 factory="tests.crashing_models:create")  # fmt: skip
    try:
        engine = Engine(make_settings(tmp_path / "data"), runtime=rt)
        root, labels = sample_gallery
        good = read_label_file(labels, root)
        engine.build("g", good)
        before = state(engine)
        blue = np.zeros((64, 64, 3), np.uint8)
        blue[..., 2] = 255
        poisoned = GalleryBatch(items=list(read_label_file(labels, root).items))
        poisoned.items[-1] = GalleryItem("blue.png", png(blue), "x", line_no=poisoned.items[-1].line_no)
        with pytest.raises(ModelCrashed, match="recognition model crashed"):
            engine.build("g", poisoned, overwrite=True)
        with pytest.raises(ModelCrashed):
            engine.add("g", poisoned)
        assert state(engine) == before
        engine.build("h", good)
        assert len(engine.index("h").ids) == len(good.items)
    finally:
        rt.close()


# --- 2. who may change indices ------------------------------------------------------------------------
@pytest.fixture
def app_client():
    """``app_client(engine, host)``: a client of the whole app with its lifespan running (Gradio's
    queue serves UI events only then)."""
    from app import build_app

    opened: list[TestClient] = []

    def make(engine: Engine, host: str | None = None) -> TestClient:
        client = TestClient(build_app(engine, prepare_sample=False, host=host))
        opened.append(client.__enter__())
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_public_server_without_a_token_is_read_only(gallery_engine, sample_queries, app_client):
    client = app_client(gallery_engine, host="0.0.0.0")
    before = state(gallery_engine)
    removed = client.post("/shitu-index-remove", json={"indexKey": "g", "ids": [0]})
    assert removed.status_code == 403 and "read-only" in removed.json()["errorMsg"]
    kind, payload = gradio_call(client, "delete_index", ["g", True])
    assert kind == "error" and "read-only" in json.dumps(payload)
    assert state(gallery_engine) == before
    infer = client.post("/shitu-infer", json={"image": base64.b64encode(sample_queries[1].read_bytes()).decode(),
                                              "indexKey": "g"})  # fmt: skip
    assert infer.status_code == 200, "recognising stays open to everyone"
    assert "read-only" in client.get("/config").text


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_with_a_token_changes_need_it_and_guessing_is_throttled(gallery_engine, app_client):
    gallery_engine.settings.api_token = "s3cret"
    client = app_client(gallery_engine, host="0.0.0.0")
    before = state(gallery_engine)
    assert client.post("/shitu-index-remove", json={"indexKey": "g", "ids": [0]}).status_code == 401
    kind, payload = gradio_call(client, "delete_index", ["g", True], session="visitor")
    assert kind == "error" and "access token" in json.dumps(payload)
    kind, payload = gradio_call(client, "sign_in", ["wrong"], session="visitor")
    assert kind == "error" and "wrong access token" in json.dumps(payload)
    assert state(gallery_engine) == before
    kind, _ = gradio_call(client, "sign_in", ["s3cret"], session="owner")
    assert kind == "complete"
    kind, _ = gradio_call(client, "remove_entries", ["g", "0-1", []], session="owner")
    assert kind == "complete" and {0, 1}.isdisjoint(gallery_engine.index("g").id_map)
    kind, payload = gradio_call(client, "remove_entries", ["g", "2", []], session="visitor")
    assert kind == "error", "signing in is per browser session"
    ok = client.post("/shitu-index-remove", json={"indexKey": "g", "ids": [2]},
                     headers={"Authorization": "Bearer s3cret"})  # fmt: skip
    assert ok.status_code == 200
    answers = [
        client.post("/shitu-index-remove", json={"indexKey": "g", "ids": [3]},
                    headers={"Authorization": "Bearer guess"}).status_code  # fmt: skip
        for _ in range(7)
    ]
    # the wrong UI sign-in above came from the same address: 1 + 4 failures reach the limit of 5
    assert answers[:4] == [401] * 4 and answers[4:] == [429, 429, 429]
    assert 3 in gallery_engine.index("g").id_map


# --- 3. the UI's own endpoints read only uploads --------------------------------------------------------
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_gradio_endpoints_refuse_files_that_were_not_uploaded(gallery_engine, tmp_path, app_client):
    client = app_client(gallery_engine)
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(secret)
    file_data = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    kind, payload = gradio_call(client, "recognize", [file_data, "g", 0.25, 0.85, 3, "auto", True, 0.5])
    assert kind == "error"
    before = state(gallery_engine)
    kind, _ = gradio_call(client, "build_index", [[file_data], None, "stolen", "Flat", "IP", True, False, False])
    assert kind == "error" and state(gallery_engine) == before
    assert client.get(f"/gradio_api/file={secret}").status_code in (403, 404)
    uploaded = client.post("/gradio_api/upload", files={"files": ("q.png", secret.read_bytes(), "image/png")})
    assert uploaded.status_code == 200
    mine = {"path": uploaded.json()[0], "meta": {"_type": "gradio.FileData"}}
    kind, _ = gradio_call(client, "recognize", [mine, "g", 0.25, 0.85, 3, "auto", True, 0.5])
    assert kind == "complete", "an uploaded file is fine"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_uploads_have_the_api_size_limit(gallery_engine, app_client):
    gallery_engine.settings.max_request_bytes = 50_000
    client = app_client(gallery_engine)
    big = client.post("/gradio_api/upload", files={"files": ("big.png", b"\0" * 80_000, "image/png")})
    assert big.status_code == 413


# --- 4. answers for unknown routes, and nothing private in /health ----------------------------------------
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_unknown_routes_and_wrong_methods_answer_in_the_envelope(gallery_engine, app_client):
    client = app_client(gallery_engine)
    for method, path, status in [("GET", "/no-such-page", 404), ("GET", "/shitu-nothing", 404),
                                 ("GET", "/shitu-infer", 405), ("POST", "/health", 405),
                                 ("DELETE", "/shitu-index/g", 405)]:  # fmt: skip
        answer = client.request(method, path)
        body = answer.json()
        assert answer.status_code == status and body["errorCode"] == status and body["errorMsg"], (path, body)
        assert "logId" in body and "detail" not in body
    assert client.request("POST", "/shitu-infer").headers.get("content-type", "").startswith("application/json")
    assert "POST" in client.get("/shitu-infer").headers["allow"]


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_health_and_models_show_no_server_paths(gallery_engine, app_client):
    from shitu.ui.models import models_markdown

    client = app_client(gallery_engine)
    text = client.get("/health").text
    for private in (str(gallery_engine.settings.data_dir), str(gallery_engine.settings.models_dir), "/root", "/tmp"):
        assert private not in text
    assert str(gallery_engine.settings.data_dir) not in models_markdown(gallery_engine)
