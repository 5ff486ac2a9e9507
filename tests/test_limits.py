"""One set of limits for every way in: values that used to become 5xx or cost gigabytes.

Ids past int64, labels no file can store, imports whose members expand a thousandfold, YAML alias
bombs, faiss files whose header declares more than they hold, an imported index about to hand
out ids past int64. Each is refused with the product's own message and changes nothing.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shitu.api import create_api
from shitu.engine import Engine
from shitu.errors import ShiTuError
from shitu.gallery import read_label_file
from shitu.index import GalleryIndex
from shitu.labels import MAX_LABEL_CHARS, clean_label
from shitu.stores.layout import ID_MAP_FILE, META_FILE, VECTOR_FILE, unzipped_index, zipped

from .conftest import make_settings, stored_state


def small_index(n: int = 12) -> GalleryIndex:
    rng = np.random.default_rng(0)
    return GalleryIndex.build(rng.normal(size=(n, 16)).astype("float32"), [f"l{i % 4}" for i in range(n)],
                              index_type="Flat")  # fmt: skip


def rezip(data: bytes, replace: dict[str, bytes], *, level: int = 6) -> bytes:
    """The .zip ``data`` with some members' bytes replaced."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = info.filename.rsplit("/", 1)[-1]
            dst.writestr(info.filename, replace.get(name, src.read(info)), compresslevel=level)
    return out.getvalue()


# --- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "label, message",
    [("bad\ud800x", "lone surrogate"), ("x\udc80", "lone surrogate"), ("a\tb", "control character"),
     ("line\nbreak", "control character"), ("x" * (MAX_LABEL_CHARS + 1), f"longer than {MAX_LABEL_CHARS}"),
     ("   ", "cannot be empty")],
)  # fmt: skip
def test_labels_no_file_can_store_are_refused(label, message):
    with pytest.raises(ShiTuError, match=message):
        clean_label(label)
    with pytest.raises(ShiTuError, match=message):
        small_index().relabel([0], label)
    with pytest.raises(ShiTuError, match=message):
        small_index().add(np.ones((1, 16), "float32"), [label])


def test_a_long_label_within_the_limit_and_any_script_are_kept():
    assert clean_label(" 元气森林 ") == "元气森林"
    assert clean_label("ß" * MAX_LABEL_CHARS) == "ß" * MAX_LABEL_CHARS
    assert clean_label("🥤 cola") == "🥤 cola"


# --- imports --------------------------------------------------------------------------------------
def test_a_member_that_expands_a_hundredfold_is_refused(tmp_path):
    data = zipped(small_index(), "g")
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
        dst.writestr("g/shitu_raw.npz", b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KB
    with pytest.raises(ShiTuError, match="expands more than 100 times"):
        with unzipped_index(out.getvalue(), tmp_path):
            pass
    assert list(tmp_path.iterdir()) == [], "nothing left behind"


def test_yaml_aliases_in_an_id_map_are_refused(tmp_path):
    laughs = b"a: &a ['x','x','x','x','x','x','x','x','x']\n" + b"".join(
        b"%c: &%c [*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c,*%c]\n" % ((98 + k, 98 + k) + (97 + k,) * 9) for k in range(8)
    ) + b"id_map: {0: *i}\nindex_type: Flat\nmetric_type: IP\n"
    data = rezip(zipped(small_index(), "g"), {ID_MAP_FILE: laughs, "shitu_labels.npz": b"not the arrays"})
    with pytest.raises(ShiTuError, match="anchors or aliases"):
        with unzipped_index(data, tmp_path):
            pass


def test_a_faiss_header_that_declares_more_than_the_file_holds_is_refused(tmp_path):
    data = zipped(small_index(), "g")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        vectors = bytearray(z.read(f"g/{VECTOR_FILE}"))
    patched = bytes(vectors[:8]) + struct.pack("<q", 1 << 40) + bytes(vectors[16:])  # ntotal: 2^40 vectors
    with pytest.raises(ShiTuError, match="header does not match"):
        with unzipped_index(rezip(data, {VECTOR_FILE: patched}), tmp_path):
            pass
    inner = bytearray(vectors)
    struct.pack_into("<Q", inner, 4 + 33 + 4 + 33, 1 << 40)  # the flat storage's size field
    with pytest.raises(ShiTuError, match="header does not match"):
        with unzipped_index(rezip(data, {VECTOR_FILE: bytes(inner)}), tmp_path):
            pass


def test_an_import_that_would_hand_out_ids_past_int64_is_refused(tmp_path):
    data = zipped(small_index(), "g")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        meta = json.loads(z.read(f"g/{META_FILE}"))
    meta["next_id"] = (1 << 63) - 1
    with pytest.raises(ShiTuError, match="hands out ids from 9223372036854775807"):
        with unzipped_index(rezip(data, {META_FILE: json.dumps(meta).encode()}), tmp_path):
            pass


def test_an_import_whose_labels_cannot_be_kept_is_refused(tmp_path):
    """YAML itself refuses a lone surrogate; the id map's arrays (checked against the YAML's hash,
    which whoever makes the .zip controls) could still carry one."""
    import hashlib

    data = zipped(small_index(1), "g")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        yaml_text = z.read(f"g/{ID_MAP_FILE}")
    names = json.dumps(["bad\ud800x"]).encode()  # JSON's escape keeps the lone surrogate
    arrays = io.BytesIO()
    np.savez(arrays, ids=np.array([0], np.int64), codes=np.array([0], np.int32), names=np.frombuffer(names, np.uint8),
             id_map_sha256=np.frombuffer(hashlib.sha256(yaml_text).digest(), np.uint8))  # fmt: skip
    with pytest.raises(ShiTuError, match="label that cannot be kept.*lone surrogate"):
        with unzipped_index(rezip(data, {"shitu_labels.npz": arrays.getvalue()}), tmp_path):
            pass


# --- through the HTTP API: a 4xx envelope, nothing changed ------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory, runtime, sample_gallery):
    engine = Engine(make_settings(tmp_path_factory.mktemp("limits") / "data"), runtime=runtime)
    root, labels = sample_gallery
    engine.build("shop", read_label_file(labels, root))
    with TestClient(create_api(engine)) as client:
        yield client, engine


def post_raw(client, path: str, text: str):
    return client.post(path, content=text.encode("utf-8"), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/shitu-index-remove", '{"indexKey": "shop", "ids": [9223372036854775808]}', "ids"),
        ("/shitu-index-remove", '{"indexKey": "shop", "ids": [18446744073709551616]}', "ids"),
        ("/shitu-index-relabel", '{"indexKey": "shop", "ids": [1], "label": "x\\udc80"}', "lone surrogate"),
        ("/shitu-index-relabel", '{"indexKey": "shop", "ids": [1], "label": "' + "y" * 300 + '"}', "longer than 256"),
        ("/shitu-index-add", '{"indexKey": "shop", "imageLabelPairs": [{"image": "IMG", "label": "bad\\ud800x"}]}',
         "lone surrogate"),
        ("/shitu-index-build", '{"indexKey": "new", "imageLabelPairs": [{"image": "IMG", "label": "\\ud800"}]}',
         "lone surrogate"),
    ],
)  # fmt: skip
def test_values_that_were_5xx_are_4xx_and_change_nothing(api, sample_queries, path, body, fragment):
    import base64

    client, engine = api
    before = stored_state(engine)
    image = base64.b64encode(sample_queries[1].read_bytes()).decode()
    resp = post_raw(client, path, body.replace("IMG", image))
    envelope = resp.json()
    assert 400 <= resp.status_code < 500 and envelope["errorCode"] == resp.status_code, envelope
    assert fragment in envelope["errorMsg"], envelope["errorMsg"]
    assert stored_state(engine) == before and engine.index_names() == ["shop"]


# --- liveness: a full model queue answers "busy" at once; /health never waits ------------------------
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_full_model_queue_answers_503_with_retry_after_and_health_still_answers(tmp_path, runtime, sample_gallery,
                                                                                   sample_queries):  # fmt: skip
    import base64
    import threading

    engine = Engine(make_settings(tmp_path / "data", max_waiting_requests=1), runtime=runtime)
    root, labels = sample_gallery
    engine.build("shop", read_label_file(labels, root))
    holding, release = threading.Event(), threading.Event()

    def hold_the_only_place() -> None:
        with engine._models():  # a long request using the models
            holding.set()
            release.wait(60)

    worker = threading.Thread(target=hold_the_only_place)
    worker.start()
    try:
        assert holding.wait(30)
        with TestClient(create_api(engine)) as client:
            image = base64.b64encode(sample_queries[1].read_bytes()).decode()
            busy = client.post("/shitu-infer", json={"indexKey": "shop", "image": image})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
            assert "busy" in busy.json()["errorMsg"]
            assert client.get("/health").status_code == 200, "health does not queue behind the models"
            release.set()
            worker.join(30)
            served = client.post("/shitu-infer", json={"indexKey": "shop", "image": image})
            assert served.status_code == 200, "the place is given back"
    finally:
        release.set()
        worker.join(30)


# --- the whole app: Gradio's routes under the same limits ---------------------------------------------
@pytest.fixture(scope="module")
def studio(tmp_path_factory, runtime, sample_gallery):
    """The real app (HTTP API + Gradio UI), small limits so they are cheap to reach."""
    from app import build_app

    engine = Engine(make_settings(tmp_path_factory.mktemp("studio") / "data", max_event_bytes=64 * 1024,
                                  max_upload_bytes_per_client=300_000), runtime=runtime)  # fmt: skip
    root, labels = sample_gallery
    engine.build("shop", read_label_file(labels, root))
    with TestClient(build_app(engine, prepare_sample=False)) as client:
        yield client, engine


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_gradio_event_calls_take_small_bodies_only(studio):
    """A 100 MiB /run/filter_entries took 213 s and 6 GB; event calls name files, they do not carry them."""
    client, engine = studio
    before = stored_state(engine)
    padded = json.dumps({"data": ["shop", [], "1 " * 40_000], "session_hash": "abc"})
    for path in ("/gradio_api/call/filter_entries", "/gradio_api/run/filter_entries", "/gradio_api/queue/join"):
        resp = client.post(path, content=padded, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and "SHITU_MAX_EVENT_BYTES" in resp.json()["errorMsg"], path
    chunked = client.post("/gradio_api/call/filter_entries", content=iter([padded.encode()]),
                          headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413, "a body without Content-Length is counted as it arrives"
    page = client.post("/", content=b"x" * 100_000)
    assert page.status_code == 413
    assert stored_state(engine) == before


@pytest.mark.parametrize(
    "payload, message",
    [({"data": [], "fn_index": 0, "session_hash": ""}, "session_hash"),
     ({"data": [], "fn_index": 0}, "session_hash"),
     ({"data": "x", "fn_index": 0, "session_hash": "ok"}, "data must be a list"),
     ({"data": [], "fn_index": True, "session_hash": "ok"}, "fn_index"),
     ([1, 2], "JSON object")],
)  # fmt: skip
def test_a_malformed_queue_join_is_a_400_not_a_500(studio, payload, message):
    client, _ = studio
    resp = client.post("/gradio_api/queue/join", json=payload)
    assert resp.status_code == 400 and message in resp.json()["errorMsg"], resp.text


def test_uploads_are_counted_per_address(studio, sample_queries):
    client, _ = studio
    photo = sample_queries[1].read_bytes()
    answers = []
    for _ in range(300_000 // len(photo) + 2):
        resp = client.post("/gradio_api/upload", files={"files": ("photo.jpg", photo, "image/jpeg")})
        answers.append(resp.status_code)
        if resp.status_code == 429:
            assert int(resp.headers["Retry-After"]) > 0
            assert "uploaded more than 300,000 bytes" in resp.json()["errorMsg"]
            break
    assert answers[0] == 200 and answers[-1] == 429, answers


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_second_gallery_job_is_busy_not_queued(tmp_path, runtime, sample_gallery):
    import threading

    engine = Engine(make_settings(tmp_path / "data", max_gallery_jobs=1), runtime=runtime)
    root, labels = sample_gallery
    holding, release = threading.Event(), threading.Event()

    def one_long_build() -> None:
        with engine._gallery_job(1000):
            holding.set()
            release.wait(60)

    worker = threading.Thread(target=one_long_build)
    worker.start()
    try:
        assert holding.wait(30)
        batch = read_label_file(labels, root)
        batch.items = batch.items * 2  # 48 images: a job (a few photos would not count)
        with pytest.raises(ShiTuError, match="galleries are being embedded already") as busy:
            engine.build("second", batch)
        assert busy.value.retry_after == 30 and engine.index_names() == []
        assert engine.build("small", read_label_file(labels, root)).image_count == 24, "24 photos are not a job"
    finally:
        release.set()
        worker.join(30)
    assert engine.build("second", batch).image_count == 48


# --- the server: connections that never send a request, forwarded addresses ------------------------
def test_a_connection_that_sends_no_request_is_dropped(monkeypatch, api):
    import socket

    from shitu import limits
    from shitu.api import serving

    client, engine = api
    monkeypatch.setattr(limits, "HEADER_TIMEOUT", 0.5)
    with serving(create_api(engine)) as base:
        host, port = base.split("//")[1].rstrip("/").split(":")
        with socket.create_connection((host, int(port))) as idle, socket.create_connection((host, int(port))) as half:
            half.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            idle.settimeout(30)
            half.settimeout(30)
            assert idle.recv(1) == b"", "closed by the server"
            assert half.recv(1) == b""


def test_forwarded_addresses_are_not_believed_without_a_trusted_proxy(api):
    """Rotating X-Forwarded-For used to dodge the sign-in lock-out (uvicorn believed it from loopback)."""
    import requests

    from shitu.access import AccessPolicy
    from shitu.api import serving

    _, engine = api
    app = create_api(engine, AccessPolicy(token="s3cret", restricted=True))
    with serving(app) as base:
        codes = [
            requests.post(f"{base}shitu-index-remove", json={"indexKey": "shop", "ids": [0]}, timeout=30,
                          headers={"Authorization": "Bearer guess", "X-Forwarded-For": f"203.0.113.{k}"}).status_code
            for k in range(7)
        ]  # fmt: skip
    assert codes[:5] == [401] * 5 and codes[5:] == [429, 429], codes
