"""HTTP API tests (shitu/api.py) through the real stack: FastAPI, the engine, PaddleX starter models, faiss.

Every bad-input case checks the whole contract: the HTTP status, an envelope whose ``errorCode``
equals it, a readable ``errorMsg``, and an index store that is byte-for-byte and in-memory the
same afterwards. The last tests drive a real uvicorn server with ``requests``, the way PaddleX's
client example does. No network is needed: URL tests use literal addresses and a local server.
"""

from __future__ import annotations

import base64
import http.server
import inspect
import io
import struct
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

from shitu import api
from shitu.api import create_api
from shitu.engine import Engine
from shitu.sample import SAMPLE_SUBJECTS

from .conftest import stored_state

pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
LABELS = list(SAMPLE_SUBJECTS)
BUILD, ADD, REMOVE, INFER = "/shitu-index-build", "/shitu-index-add", "/shitu-index-remove", "/shitu-infer"
RELABEL = "/shitu-index-relabel"

# --- helpers ---------------------------------------------------------------------------------


def b64(data: bytes | Path) -> str:
    raw = data.read_bytes() if isinstance(data, Path) else data
    return base64.b64encode(raw).decode("ascii")


def gallery_pairs(sample_gallery: tuple[Path, Path], views: range = range(4)) -> list[tuple[Path, str]]:
    """(image path, label) for the chosen views of every sample label, in label order."""
    root, label_file = sample_gallery
    pairs = []
    for line in label_file.read_text(encoding="utf-8").splitlines():
        rel, label = line.split("\t")
        if int(Path(rel).stem) in views:
            pairs.append((root / rel, label))
    return pairs


def payload_pairs(pairs: list[tuple[Path, str]]) -> list[dict[str, str]]:
    return [{"image": b64(path), "label": label} for path, label in pairs]


def png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims ``width``×``height`` pixels but holds almost no data:
    what a decompression bomb looks like to a server that only reads headers."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def fresh_engine(runtime, data_dir: Path) -> Engine:
    """An engine on an empty data dir, sharing the session's models and their (offline) settings."""
    return Engine(runtime.settings.model_copy(update={"data_dir": data_dir}), runtime=runtime)


def snapshot(engine: Engine) -> tuple:
    """Everything a request could change: index files on disk, indices in memory, the active index."""
    files = stored_state(engine)
    memory = {name: engine.index(name).id_map for name in engine.index_names()}
    return files, memory, engine.settings.default_index


def ok(resp) -> dict:
    body = resp.json()
    assert resp.status_code == 200, body
    assert body["errorCode"] == 0 and body["errorMsg"] == "Success"
    assert uuid.UUID(body["logId"]).version == 4
    return body["result"]


def assert_error(resp, status: int, fragment: str) -> None:
    body = resp.json()
    assert resp.status_code == status, body
    assert body["errorCode"] == status
    assert uuid.UUID(body["logId"])
    assert "result" not in body
    assert fragment.lower() in body["errorMsg"].lower(), body["errorMsg"]


def top_label(result: dict) -> str | None:
    """The label of the most confidently recognised object."""
    best = max((o for o in result["detectedObjects"] if o["recResults"]), key=lambda o: o["recResults"][0]["score"])
    return best["recResults"][0]["label"]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_engine(tmp_path_factory, runtime) -> Engine:
    """One engine for the module (tests that change settings restore them with monkeypatch)."""
    return fresh_engine(runtime, tmp_path_factory.mktemp("api") / "data")


@pytest.fixture(scope="module")
def client(api_engine):
    with TestClient(create_api(api_engine)) as c:
        yield c


@pytest.fixture(scope="module")
def base(client, api_engine, sample_gallery) -> str:
    """The whole sample gallery (6 labels × 4 views) as index "base", also the active index."""
    body = {"imageLabelPairs": payload_pairs(gallery_pairs(sample_gallery)), "indexKey": "base"}
    result = ok(client.post(BUILD, json=body))
    assert result["imageCount"] == 24
    api_engine.settings.default_index = "base"
    return "base"


@pytest.fixture(scope="module")
def good_image(sample_gallery) -> str:
    return b64(sample_gallery[0] / "0" / "0.jpg")


@pytest.fixture
def small_index(client, sample_gallery) -> tuple[str, dict[str, str]]:
    """A fresh 3-entry index (cat, cat, coffee) that a test may change."""
    pairs = gallery_pairs(sample_gallery, range(2))[:3]
    result = ok(client.post(BUILD, json={"imageLabelPairs": payload_pairs(pairs)}))
    return result["indexKey"], result["idMap"]


class _ImageServer(http.server.BaseHTTPRequestHandler):
    """Local stand-in for "a URL the server can reach": /cat.jpg, /slow, /big, /stream, /moved, /gone."""

    cat: bytes = b""
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits.append(self.path)
        if self.path == "/cat.jpg":
            self._send(200, self.cat)
        elif self.path == "/slow":
            time.sleep(2.0)
            self._send(200, self.cat)
        elif self.path == "/big":
            self._send(200, self.cat * 8)
        elif self.path == "/stream":  # no Content-Length: the size is only known by counting
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(8):
                self.wfile.write(self.cat)
            self.close_connection = True
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/cat.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"not here")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_server(sample_queries):
    _ImageServer.cat = sample_queries[1].read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


# --- endpoints that work ---------------------------------------------------------------------


def test_routes_run_in_the_threadpool_and_are_documented(client):
    """Plain ``def`` routes: FastAPI runs the blocking engine calls off the event loop. /health is the
    one exception: answered on the loop (its listing on a thread of its own), never behind the pool."""
    for route in client.app.routes:
        if isinstance(route, APIRoute):
            health = route.path == "/health" and "GET" in route.methods
            assert inspect.iscoroutinefunction(route.endpoint) == health, route.path
    spec = client.get("/openapi.json").json()
    assert {BUILD, ADD, REMOVE, RELABEL, INFER, "/shitu-index/{indexKey}", "/health"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"imageLabelPairs", "indexKey", "indexType", "metricType"} <= set(schemas["BuildIndexRequest"]["properties"])
    infer_fields = {"image", "indexKey", "detThreshold", "recThreshold", "topk", "visualize"}
    assert infer_fields <= set(schemas["InferRequest"]["properties"])
    assert "security" in spec["paths"][BUILD]["post"] and "security" not in spec["paths"][INFER]["post"]
    assert "security" in spec["paths"][RELABEL]["post"]
    assert {"ids", "label", "indexKey"} <= set(schemas["RelabelImagesRequest"]["properties"])
    assert client.get("/docs").status_code == 200


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_health_lists_models_and_indices(client, api_engine, base):
    result = ok(client.get("/health"))
    assert result["status"] == "ok"
    assert {"detection", "recognition"} <= set(result["models"])
    assert base in result["indices"] and result["activeIndex"] == base
    # which store serves: faiss files, or Milvus Lite in the data dir (SHITU_TEST_VECTOR_STORE=milvus)
    assert result["vectorStore"] == {"faiss": "faiss", "milvus": "milvus_lite"}[api_engine.settings.vector_store]


def test_health_never_calls_starter_copies_in_paddlex_cache_official(runtime, tmp_path, monkeypatch):
    """Starter model dirs copied into PaddleX's cache (e.g. by an earlier mirror test) are what
    they are: /health names the starter pack for both stages, with the reason."""
    import shutil

    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    for stage, name in (("detection", "PP-ShiTuV2_det"), ("recognition", "PP-ShiTuV2_rec")):
        shutil.copytree(getattr(runtime, stage).model_dir, tmp_path / "pdx" / "official_models" / name)
    engine = Engine(runtime.settings.model_copy(update={"data_dir": tmp_path / "data"}), isolate=False)
    try:
        with TestClient(create_api(engine)) as c:
            models = ok(c.get("/health"))["models"]
        for stage in ("detection", "recognition"):
            assert models[stage]["source"] == "starter", models[stage]
            assert "starter pack (it has starter.json)" in models[stage]["reason"]
    finally:
        engine.close()


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_without_key_generates_one_with_flat_ip_defaults(client, api_engine, sample_gallery):
    pairs = gallery_pairs(sample_gallery, range(1))  # one view per label
    result = ok(client.post(BUILD, json={"imageLabelPairs": payload_pairs(pairs)}))
    key = result["indexKey"]
    assert len(key) == 32 and int(key, 16) >= 0
    assert result["idMap"] == {str(i): label for i, label in enumerate(LABELS)}
    assert result["imageCount"] == 6
    listing = ok(client.get(f"/shitu-index/{key}"))
    assert (listing["indexType"], listing["metricType"]) == ("Flat", "IP")
    assert listing["featureModel"] == api_engine.feature_model
    assert listing["idMap"] == result["idMap"] and listing["labelCount"] == 6
    assert api_engine.index(key).id_map == {i: label for i, label in enumerate(LABELS)}


def test_build_with_name_type_and_metric(client, sample_gallery, sample_queries):
    pairs = gallery_pairs(sample_gallery, range(2))
    body = {"imageLabelPairs": payload_pairs(pairs), "indexKey": "hnsw-l2", "indexType": "HNSW32", "metricType": "L2"}
    result = ok(client.post(BUILD, json=body))
    assert result["indexKey"] == "hnsw-l2" and result["imageCount"] == 12
    listing = ok(client.get("/shitu-index/hnsw-l2"))
    assert (listing["indexType"], listing["metricType"]) == ("HNSW32", "L2")
    infer = ok(client.post(INFER, json={"image": b64(sample_queries[2]), "indexKey": "hnsw-l2", "visualize": False}))
    assert top_label(infer) == LABELS[1]


def test_add_then_remove_never_reuses_ids(client, small_index, sample_gallery):
    key, id_map = small_index
    assert id_map == {"0": LABELS[0], "1": LABELS[0], "2": LABELS[1]}
    removed = ok(client.post(REMOVE, json={"ids": [2], "indexKey": key}))
    assert removed == {"idMap": {"0": LABELS[0], "1": LABELS[0]}, "imageCount": 2}
    extra = gallery_pairs(sample_gallery, range(3, 4))[2:4]  # rocket, astronaut
    added = ok(client.post(ADD, json={"imageLabelPairs": payload_pairs(extra), "indexKey": key}))
    assert added == {"idMap": {"0": LABELS[0], "1": LABELS[0], "3": LABELS[2], "4": LABELS[3]}, "imageCount": 4}
    assert ok(client.get(f"/shitu-index/{key}"))["idMap"] == added["idMap"]


def test_a_change_can_answer_without_the_whole_id_map(client, small_index, sample_gallery):
    """PaddleX's answer lists every entry (O(entries): megabytes at 1M); ``returnIdMap: false``
    answers with the count and the ids that changed."""
    key, _ = small_index
    extra = gallery_pairs(sample_gallery, range(3, 4))[2:4]
    added = ok(client.post(ADD, json={"imageLabelPairs": payload_pairs(extra), "indexKey": key, "returnIdMap": False}))
    assert added == {"imageCount": 5, "addedIds": [3, 4]}
    removed = ok(client.post(REMOVE, json={"ids": [4, 0, 4], "indexKey": key, "returnIdMap": False}))
    assert removed == {"imageCount": 3, "removedIds": [0, 4]}
    relabelled = ok(client.post(RELABEL, json={"ids": [1], "label": "x", "indexKey": key, "returnIdMap": False}))
    assert relabelled == {"imageCount": 3, "changedIds": [1]}
    assert ok(client.get(f"/shitu-index/{key}"))["idMap"] == {"1": "x", "2": LABELS[1], "3": LABELS[2]}


def test_relabel_keeps_ids_and_vectors(client, api_engine, runtime, small_index, sample_queries):
    key, id_map = small_index
    assert id_map == {"0": LABELS[0], "1": LABELS[0], "2": LABELS[1]}
    vectors_before = api_engine.index(key).vectors()
    relabelled = ok(client.post(RELABEL, json={"ids": [0, 1], "label": "  tabby  ", "indexKey": key}))
    assert relabelled == {"idMap": {"0": "tabby", "1": "tabby", "2": LABELS[1]}, "imageCount": 3}
    assert ok(client.get(f"/shitu-index/{key}"))["idMap"] == relabelled["idMap"]
    reloaded = Engine(api_engine.settings.model_copy(), runtime=runtime)  # what is on disk
    assert reloaded.index(key).id_map == {0: "tabby", 1: "tabby", 2: LABELS[1]}
    ids, vectors = api_engine.index(key).vectors()
    assert (ids == vectors_before[0]).all() and (vectors == vectors_before[1]).all()
    # recognition answers with the new label: a new view of the cat is now a "tabby"
    body = {"image": b64(sample_queries[1]), "indexKey": key, "visualize": False, "recThreshold": 0}
    infer = ok(client.post(INFER, json=body))
    assert top_label(infer) == "tabby"
    assert LABELS[0] not in {r["label"] for o in infer["detectedObjects"] for r in o["recResults"]}
    # giving an entry the label it has is allowed and changes nothing
    assert ok(client.post(RELABEL, json={"ids": [1], "label": "tabby", "indexKey": key})) == relabelled


def test_omitted_index_key_means_the_default_index(client, api_engine, small_index, sample_gallery, monkeypatch):
    key, _ = small_index
    monkeypatch.setattr(api_engine.settings, "default_index", key)
    extra = gallery_pairs(sample_gallery, range(1))[5:]
    assert ok(client.post(ADD, json={"imageLabelPairs": payload_pairs(extra)}))["imageCount"] == 4
    assert ok(client.post(REMOVE, json={"ids": [0]}))["imageCount"] == 3
    assert api_engine.index(key).id_map == {1: LABELS[0], 2: LABELS[1], 3: LABELS[5]}


@pytest.mark.parametrize("subject", range(len(LABELS)), ids=[SAMPLE_SUBJECTS[lab][0] for lab in LABELS])
def test_infer_recognises_a_new_view_of_each_subject(client, base, sample_queries, subject):
    body = {"image": b64(sample_queries[1 + subject]), "indexKey": base, "visualize": False}
    result = ok(client.post(INFER, json=body))
    assert result["image"] is None
    assert top_label(result) == LABELS[subject]
    for obj in result["detectedObjects"]:
        x1, y1, x2, y2 = obj["bbox"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2 and 0 < obj["score"] <= 1



def test_infer_accepts_every_spelling_of_base64(client, base, sample_queries):
    """Plain base64 takes a fast path; a data: URI, the URL-safe alphabet, missing padding and
    line breaks are normalised first: all of them are the same image and the same answer."""
    raw = sample_queries[2].read_bytes()
    plain = base64.b64encode(raw).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    assert "-" in urlsafe or "_" in urlsafe, "the sample must exercise the URL-safe alphabet"
    spellings = {
        "plain": plain,
        "data URI": "data:image/jpeg;base64," + plain,
        "URL-safe, unpadded": urlsafe,
        "wrapped at 76": "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76)),
    }
    answers = {
        name: ok(client.post(INFER, json={"image": text, "indexKey": base, "visualize": False}))["detectedObjects"]
        for name, text in spellings.items()
    }
    assert answers["plain"] and top_label({"detectedObjects": answers["plain"]}) == LABELS[1]
    assert all(a == answers["plain"] for a in answers.values())

def test_infer_composite_finds_both_objects_and_draws_them(client, base, sample_queries):
    """Default visualize: the answer carries a JPEG of the input's size with the boxes drawn."""
    result = ok(client.post(INFER, json={"image": b64(sample_queries[0])}))  # active index = base
    found = {o["recResults"][0]["label"] for o in result["detectedObjects"] if o["recResults"]}
    assert {LABELS[0], LABELS[1]} <= found
    drawn = Image.open(io.BytesIO(base64.b64decode(result["image"])))
    assert drawn.format == "JPEG"
    assert drawn.size == Image.open(sample_queries[0]).size


def test_infer_honours_topk_and_thresholds(client, base, sample_queries):
    image = b64(sample_queries[4])  # astronaut
    three = ok(client.post(INFER, json={"image": image, "recThreshold": 0.0, "topk": 3, "visualize": False}))
    for obj in three["detectedObjects"]:
        labels = [r["label"] for r in obj["recResults"]]
        scores = [r["score"] for r in obj["recResults"]]
        assert len(labels) == 3 == len(set(labels)) and scores == sorted(scores, reverse=True)
    one = ok(client.post(INFER, json={"image": image, "recThreshold": 0.0, "topk": 1, "visualize": False}))
    assert all(len(o["recResults"]) == 1 for o in one["detectedObjects"])
    strict = ok(client.post(INFER, json={"image": image, "recThreshold": 1.0, "visualize": False}))
    assert strict["detectedObjects"] and all(o["recResults"] == [] for o in strict["detectedObjects"])
    # nothing passes detection: the whole image is recognised instead
    width, height = Image.open(sample_queries[4]).size
    whole = ok(client.post(INFER, json={"image": image, "detThreshold": 1.0, "visualize": False}))
    assert [o["bbox"] for o in whole["detectedObjects"]] == [[0.0, 0.0, float(width), float(height)]]
    assert top_label(whole) == LABELS[3]


def test_index_listing_is_paged(client, base):
    full = ok(client.get(f"/shitu-index/{base}", params={"limit": 1000}))
    assert full["imageCount"] == 24 and len(full["idMap"]) == 24 and full["labelCount"] == 6
    page = ok(client.get(f"/shitu-index/{base}", params={"offset": 5, "limit": 4}))
    assert list(page["idMap"]) == ["5", "6", "7", "8"] and page["imageCount"] == 24
    assert (page["offset"], page["limit"]) == (5, 4)
    assert ok(client.get(f"/shitu-index/{base}", params={"offset": 100}))["idMap"] == {}
    assert_error(client.get(f"/shitu-index/{base}", params={"limit": 0}), 422, "limit")
    assert_error(client.get("/shitu-index/no-such-index"), 404, "no index named 'no-such-index'")


def test_infer_fetches_allowlisted_urls(client, api_engine, base, image_server, monkeypatch):
    monkeypatch.setattr(api_engine.settings, "url_allowlist", ("127.0.0.1",))
    result = ok(client.post(INFER, json={"image": f"{image_server}/cat.jpg", "visualize": False}))
    assert top_label(result) == LABELS[0]
    built = ok(client.post(BUILD, json={"imageLabelPairs": [{"image": f"{image_server}/cat.jpg", "label": "cat"}]}))
    assert built["idMap"] == {"0": "cat"}


# --- bad input: 4xx envelope, nothing changed -------------------------------------------------


@dataclass
class Ctx:
    key: str
    ids: list[int]
    image: str


def _pairs(*images: str) -> list[dict[str, str]]:
    return [{"image": image, "label": f"label {k}"} for k, image in enumerate(images)]


NOT_AN_IMAGE = b64(b"plain text, certainly not a picture")
BOMB = b64(png_header(10_000, 10_000))  # over SHITU_MAX_IMAGE_PIXELS (40M) but under PIL's own limit
HUGE_BOMB = b64(png_header(50_000, 50_000))  # over PIL's limit too
BAD_INPUT = [
    # (case, path, payload builder, status, errorMsg fragment)
    ("build-empty-pairs", BUILD, lambda c: {"imageLabelPairs": []}, 400, "imageLabelPairs is empty"),
    ("add-empty-pairs", ADD, lambda c: {"imageLabelPairs": [], "indexKey": c.key}, 400, "imageLabelPairs is empty"),
    ("build-no-pairs", BUILD, lambda c: {"indexKey": "x"}, 422, "imageLabelPairs: Field required"),
    ("build-pairs-not-a-list", BUILD, lambda c: {"imageLabelPairs": "a.jpg"}, 422, "imageLabelPairs"),
    ("build-pair-without-label", BUILD, lambda c: {"imageLabelPairs": [{"image": c.image}]}, 422,
     "imageLabelPairs[0].label: Field required"),
    ("build-blank-label", BUILD, lambda c: {"imageLabelPairs": [{"image": c.image, "label": " "}]}, 400,
     "imageLabelPairs[0].label is empty"),
    ("build-unknown-index-type", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image), "indexType": "LSH"}, 422,
     "indexType"),
    ("build-bad-key", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image), "indexKey": "../x"}, 400,
     "invalid index name"),
    ("build-existing-key", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image), "indexKey": c.key}, 409,
     "already exists"),
    ("build-invalid-base64", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image, "not*base64!")}, 400,
     "imageLabelPairs[1].image is neither an http(s) URL nor valid base64"),
    ("build-not-an-image", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image, NOT_AN_IMAGE)}, 400,
     "imageLabelPairs[1].image is not an image"),
    ("build-bomb", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image, BOMB)}, 413, "10000x10000 pixels"),
    ("build-huge-bomb", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image, HUGE_BOMB)}, 413, "too many pixels"),
    ("build-private-url", BUILD, lambda c: {"imageLabelPairs": _pairs(c.image, "http://192.168.1.20/a.jpg")}, 403,
     "non-public address"),
    ("add-invalid-base64", ADD, lambda c: {"imageLabelPairs": _pairs(c.image, "%%%"), "indexKey": c.key}, 400,
     "nor valid base64"),
    ("add-not-an-image", ADD, lambda c: {"imageLabelPairs": _pairs(c.image, NOT_AN_IMAGE), "indexKey": c.key}, 400,
     "is not an image"),
    ("add-bomb", ADD, lambda c: {"imageLabelPairs": _pairs(c.image, BOMB), "indexKey": c.key}, 413, "pixels"),
    ("add-loopback-url", ADD, lambda c: {"imageLabelPairs": _pairs(c.image, "http://127.0.0.1:9/a.jpg")}, 403,
     "non-public address"),
    ("add-unknown-key", ADD, lambda c: {"imageLabelPairs": _pairs(c.image), "indexKey": "no-such-index"}, 404,
     "no index named 'no-such-index'"),
    ("remove-unknown-key", REMOVE, lambda c: {"ids": [0], "indexKey": "no-such-index"}, 404, "no index named"),
    ("remove-unknown-ids", REMOVE, lambda c: {"ids": [0, 999_999], "indexKey": c.key}, 404,
     "1 id(s) are not in the index: 999999"),
    ("remove-no-ids", REMOVE, lambda c: {"ids": [], "indexKey": c.key}, 400, "no ids"),
    ("remove-ids-not-numbers", REMOVE, lambda c: {"ids": ["first"], "indexKey": c.key}, 422, "ids[0]"),
    ("remove-every-entry", REMOVE, lambda c: {"ids": c.ids, "indexKey": c.key}, 400, "cannot remove every entry"),
    ("relabel-unknown-key", RELABEL, lambda c: {"ids": [0], "label": "x", "indexKey": "no-such-index"}, 404,
     "no index named 'no-such-index'"),
    ("relabel-unknown-ids", RELABEL, lambda c: {"ids": [0, 999_999], "label": "x", "indexKey": c.key}, 404,
     "no entries with ids 999999"),
    ("relabel-no-ids", RELABEL, lambda c: {"ids": [], "label": "x", "indexKey": c.key}, 400, "no ids"),
    ("relabel-ids-not-numbers", RELABEL, lambda c: {"ids": ["0-3"], "label": "x", "indexKey": c.key}, 422, "ids[0]"),
    ("relabel-empty-label", RELABEL, lambda c: {"ids": [0], "label": "", "indexKey": c.key}, 400,
     "the new label is empty"),
    ("relabel-blank-label", RELABEL, lambda c: {"ids": [0], "label": " \t ", "indexKey": c.key}, 400,
     "the new label is empty"),
    ("relabel-no-label", RELABEL, lambda c: {"ids": [0], "indexKey": c.key}, 422, "label: Field required"),
    ("relabel-label-not-text", RELABEL, lambda c: {"ids": [0], "label": 7, "indexKey": c.key}, 422, "label"),
    ("relabel-bad-key", RELABEL, lambda c: {"ids": [0], "label": "x", "indexKey": "../x"}, 400,
     "invalid index name"),
    ("infer-no-image", INFER, lambda c: {"indexKey": c.key}, 422, "image: Field required"),
    ("infer-empty-image", INFER, lambda c: {"image": "  "}, 400, "image is empty"),
    ("infer-invalid-base64", INFER, lambda c: {"image": "./demo4.jpg"}, 400, "nor valid base64"),
    ("infer-not-an-image", INFER, lambda c: {"image": NOT_AN_IMAGE}, 400, "image is not an image"),
    ("infer-bomb", INFER, lambda c: {"image": BOMB}, 413, "the limit is 40,000,000 pixels"),
    ("infer-huge-bomb", INFER, lambda c: {"image": HUGE_BOMB}, 413, "too many pixels"),
    ("infer-unknown-key", INFER, lambda c: {"image": c.image, "indexKey": "no-such-index"}, 404, "no index named"),
    ("infer-topk-zero", INFER, lambda c: {"image": c.image, "topk": 0}, 422, "topk"),
    ("infer-threshold-over-one", INFER, lambda c: {"image": c.image, "detThreshold": 2}, 422, "detThreshold"),
    ("infer-ftp-url", INFER, lambda c: {"image": "ftp://example.com/a.jpg"}, 400, "only http(s)"),
    ("infer-file-url", INFER, lambda c: {"image": "file:///etc/passwd"}, 400, "only http(s)"),
    ("infer-loopback-url", INFER, lambda c: {"image": "http://127.0.0.1:9/a.jpg"}, 403, "non-public address"),
    ("infer-localhost-url", INFER, lambda c: {"image": "http://localhost/a.jpg"}, 403, "non-public address"),
    ("infer-ipv6-loopback-url", INFER, lambda c: {"image": "http://[::1]/a.jpg"}, 403, "non-public address"),
    ("infer-private-url", INFER, lambda c: {"image": "https://10.0.0.7/a.jpg"}, 403, "non-public address"),
    ("infer-link-local-url", INFER, lambda c: {"image": "http://169.254.169.254/latest/meta-data/"}, 403,
     "SHITU_URL_ALLOWLIST"),
]  # fmt: skip


@pytest.fixture(scope="module")
def ctx(client, base, good_image) -> Ctx:
    return Ctx(base, [int(i) for i in ok(client.get(f"/shitu-index/{base}"))["idMap"]], good_image)


@pytest.mark.parametrize("path, make, status, fragment", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_and_changes_nothing(client, api_engine, ctx, path, make, status, fragment):
    before = snapshot(api_engine)
    assert_error(client.post(path, json=make(ctx)), status, fragment)
    assert snapshot(api_engine) == before


@pytest.mark.parametrize("path", [BUILD, ADD, REMOVE, RELABEL, INFER])
def test_invalid_json_is_a_400(client, api_engine, base, path):
    before = snapshot(api_engine)
    resp = client.post(path, content=b'{"imageLabelPairs": [', headers={"Content-Type": "application/json"})
    assert_error(resp, 400, "not valid JSON")
    assert snapshot(api_engine) == before


@pytest.mark.parametrize(
    "content, content_type",
    [(b"", "application/json"), (b"[1, 2]", "application/json"), (b'{"image": "x"}', "text/plain")],
    ids=["no-body", "json-array", "not-json-content-type"],
)
def test_body_must_be_a_json_object(client, api_engine, base, content, content_type):
    before = snapshot(api_engine)
    resp = client.post(ADD, content=content, headers={"Content-Type": content_type})
    assert_error(resp, 422, "must be a JSON object")
    assert snapshot(api_engine) == before


def test_decompression_bomb_by_configured_pixel_limit(client, api_engine, ctx, monkeypatch):
    """A real photo over a small SHITU_MAX_IMAGE_PIXELS is refused whole, before decoding."""
    monkeypatch.setattr(api_engine.settings, "max_image_pixels", 10_000)
    before = snapshot(api_engine)
    assert_error(client.post(INFER, json={"image": ctx.image}), 413, "the limit is 10,000 pixels")
    assert_error(client.post(ADD, json={"imageLabelPairs": _pairs(ctx.image)}), 413, "imageLabelPairs[0].image is")
    assert snapshot(api_engine) == before


def test_oversized_bodies_are_refused(client, api_engine, ctx, monkeypatch):
    monkeypatch.setattr(api_engine.settings, "max_request_bytes", 4096)
    before = snapshot(api_engine)
    body = {"imageLabelPairs": _pairs(ctx.image), "indexKey": ctx.key}
    assert_error(client.post(ADD, json=body), 413, "larger than 4,096 bytes")  # by Content-Length
    chunks = (b" " * 1024 for _ in range(8))  # chunked: no Content-Length, counted as it arrives
    assert_error(client.post(ADD, content=chunks, headers={"Content-Type": "application/json"}), 413, "larger than")
    assert_error(client.post(INFER, json={"image": ctx.image}), 413, "SHITU_MAX_REQUEST_BYTES")
    assert snapshot(api_engine) == before
    # a small body still reaches the route
    assert_error(client.post(REMOVE, json={"ids": [999_999], "indexKey": ctx.key}), 404, "not in the index")


def test_bearer_token_guards_mutating_endpoints(api_engine, small_index, ctx, monkeypatch):
    key, _ = small_index
    monkeypatch.setattr(api_engine.settings, "api_token", "s3cret-token")
    client = TestClient(api.create_api(api_engine))  # the access policy is decided when the app is made
    before = snapshot(api_engine)
    add = {"imageLabelPairs": _pairs(ctx.image), "indexKey": key}
    assert_error(client.post(BUILD, json={"imageLabelPairs": _pairs(ctx.image)}), 401, "Authorization: Bearer")
    resp = client.post(ADD, json=add, headers={"Authorization": "Bearer wrong-token"})
    assert_error(resp, 401, "Bearer")
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert_error(client.post(REMOVE, json={"ids": [0], "indexKey": key}, headers={"Authorization": "s3cret-token"}),
                 401, "Bearer")  # fmt: skip
    assert_error(client.post(RELABEL, json={"ids": [0], "label": "x", "indexKey": key}), 401, "Bearer")
    assert snapshot(api_engine) == before
    # reads stay open; the right token opens the rest
    assert ok(client.post(INFER, json={"image": ctx.image, "indexKey": key, "visualize": False}))
    assert ok(client.get(f"/shitu-index/{key}"))["imageCount"] == 3
    auth = {"Authorization": "Bearer s3cret-token"}
    assert ok(client.post(REMOVE, json={"ids": [0], "indexKey": key}, headers=auth))["imageCount"] == 2
    assert ok(client.post(RELABEL, json={"ids": [1], "label": "x", "indexKey": key}, headers=auth))["idMap"]["1"] == "x"


def test_url_guard_refuses_before_connecting(client, api_engine, image_server, monkeypatch):
    """Without an allow-list entry the local server is never contacted; with one, redirects are
    checked hop by hop, and slow, oversized or missing images are 4xx."""
    before = snapshot(api_engine)
    _ImageServer.hits.clear()
    assert_error(client.post(INFER, json={"image": f"{image_server}/cat.jpg"}), 403, "127.0.0.1")
    assert _ImageServer.hits == []
    monkeypatch.setattr(api_engine.settings, "url_allowlist", ("127.0.0.1",))
    monkeypatch.setattr(api, "FETCH_TIMEOUT", 0.5)
    monkeypatch.setattr(api, "FETCH_MAX_BYTES", 4 * len(_ImageServer.cat))
    assert_error(client.post(INFER, json={"image": f"{image_server}/moved"}), 403, "10.0.0.1")
    assert_error(client.post(INFER, json={"image": f"{image_server}/slow"}), 408, "timed out")
    assert_error(client.post(INFER, json={"image": f"{image_server}/big"}), 413, "larger than")
    assert_error(client.post(INFER, json={"image": f"{image_server}/stream"}), 413, "larger than")
    assert_error(client.post(INFER, json={"image": f"{image_server}/gone.jpg"}), 400, "HTTP 404")
    add = {"imageLabelPairs": _pairs(f"{image_server}/cat.jpg", f"{image_server}/big"), "indexKey": "base"}
    assert_error(client.post(ADD, json=add), 413, "larger than")
    assert snapshot(api_engine) == before
    assert "/moved" in _ImageServer.hits and not any("10.0.0.1" in h for h in _ImageServer.hits)


def test_unknown_route_and_method_get_an_envelope(client):
    assert_error(client.get("/shitu-nothing"), 404, "not found")
    assert_error(client.get(BUILD), 405, "not allowed")


def test_gradio_mounted_at_root_does_not_shadow_the_api(api_engine, base):
    gr = pytest.importorskip("gradio")
    with gr.Blocks() as demo:
        gr.Markdown("UI")
    app = gr.mount_gradio_app(create_api(api_engine), demo, path="/")
    with TestClient(app) as c:
        assert ok(c.get("/health"))["activeIndex"] == base
        assert c.get("/docs").status_code == 200
        assert_error(c.post(REMOVE, json={"ids": [123_456]}), 404, "not in the index")
        assert c.get("/").status_code == 200 and "gradio" in c.get("/").text.lower()


# --- a real server, driven like PaddleX's client example --------------------------------------


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, runtime):
    import uvicorn

    engine = fresh_engine(runtime, tmp_path_factory.mktemp("live") / "data")
    server = uvicorn.Server(uvicorn.Config(create_api(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive()


def test_live_server_build_add_remove_infer(live_server, sample_gallery, sample_queries):
    base_url, engine = live_server
    cat0, cat1, coffee0 = [p for p, _ in gallery_pairs(sample_gallery, range(2))[:3]]
    coffee1 = sample_gallery[0] / "1" / "1.jpg"

    def post(path: str, payload: dict) -> dict:
        resp = requests.post(f"{base_url}{path}", json=payload, timeout=60)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["errorCode"] == 0 and body["errorMsg"] == "Success"
        return body["result"]

    pairs = [{"image": b64(cat0), "label": "猫 cat"}, {"image": b64(cat1), "label": "猫 cat"},
             {"image": b64(coffee0), "label": "咖啡 coffee"}]  # fmt: skip
    built = post(BUILD, {"imageLabelPairs": pairs})
    assert len(built["idMap"]) == 3 == built["imageCount"]
    key = built["indexKey"]
    added = post(ADD, {"imageLabelPairs": [{"image": b64(coffee1), "label": "咖啡 coffee"}], "indexKey": key})
    assert len(added["idMap"]) == 4
    removed = post(REMOVE, {"ids": [1], "indexKey": key})
    assert removed["idMap"] == {"0": "猫 cat", "2": "咖啡 coffee", "3": "咖啡 coffee"}
    result = post(INFER, {"image": b64(sample_queries[0]), "indexKey": key, "visualize": True})
    found = {o["recResults"][0]["label"] for o in result["detectedObjects"] if o["recResults"]}
    assert found == {"猫 cat", "咖啡 coffee"}
    drawn = Image.open(io.BytesIO(base64.b64decode(result["image"])))
    assert drawn.format == "JPEG" and drawn.size == Image.open(sample_queries[0]).size
    assert engine.index(key).id_map == {0: "猫 cat", 2: "咖啡 coffee", 3: "咖啡 coffee"}  # same object the UI uses
    # and from disk, as a restarted server would see it
    assert Engine(engine.settings, runtime=engine._runtime).index(key).id_map == engine.index(key).id_map


def test_live_server_concurrent_adds_and_streamed_limit(live_server, sample_gallery, monkeypatch):
    """Parallel adds to one index all land with distinct ids; a chunked upload over the limit
    is cut off by counting."""
    base_url, engine = live_server
    pairs = gallery_pairs(sample_gallery, range(1))
    key = requests.post(f"{base_url}{BUILD}", json={"imageLabelPairs": payload_pairs(pairs[:1])}, timeout=60).json()
    key = key["result"]["indexKey"]

    def add(pair: tuple[Path, str]) -> dict:
        body = {"imageLabelPairs": payload_pairs([pair]), "indexKey": key}
        return requests.post(f"{base_url}{ADD}", json=body, timeout=60).json()

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(add, pairs[1:5]))
    assert all(a["errorCode"] == 0 for a in answers)
    assert sorted(engine.index(key).id_map) == [0, 1, 2, 3, 4]
    assert sorted(engine.index(key).id_map.values()) == sorted(label for _, label in pairs[:5])

    monkeypatch.setattr(engine.settings, "max_request_bytes", 5000)
    resp = requests.post(f"{base_url}{ADD}", data=(b" " * 2048 for _ in range(3)),
                         headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert resp.status_code == 413 and resp.json()["errorCode"] == 413
    assert len(engine.index(key)) == 5


def test_models_are_listed_with_size_and_speed_and_switching_is_guarded(api_engine, monkeypatch):
    client = TestClient(api.create_api(api_engine))
    listed = ok(client.get("/shitu-models"))
    names = [m["name"] for m in listed["recognitionModels"]]
    assert names == ["PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base", "PP-ShiTuV2_rec_CLIP_vit_large"]
    assert all(m["size_mb"] > 0 and m["cpu_ms"] > 0 for m in listed["recognitionModels"])
    assert listed["active"]["recognition"]["source"] == "starter"
    # offline here: CLIP cannot be fetched, so the switch is refused and nothing changes
    refused = client.post("/shitu-models/recognition", json={"modelName": "PP-ShiTuV2_rec_CLIP_vit_base"})
    assert refused.status_code == 503 and "not available" in refused.json()["errorMsg"]
    assert api_engine.models()["recognition"]["model_name"] == "PP-ShiTuV2_rec"
    assert client.post("/shitu-models/recognition", json={"modelName": "nope"}).status_code == 422
    monkeypatch.setattr(api_engine.settings, "api_token", "t")
    guarded = TestClient(api.create_api(api_engine))
    assert guarded.post("/shitu-models/recognition", json={"modelName": "PP-ShiTuV2_rec"}).status_code == 401
