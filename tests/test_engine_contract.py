"""Every front end behaves the same whichever vector store keeps the galleries.

The same flows, through the real stack (the offline starter models in their worker process, the
engine, FastAPI, the CLI), with ``SHITU_VECTOR_STORE`` set to each backend: files in the data dir,
Milvus Lite, and a Milvus server when ``SHITU_TEST_MILVUS_URI`` is set. The store's own contract,
on synthetic vectors, is tests/test_store_contract.py.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from fastapi.testclient import TestClient

from shitu.__main__ import main
from shitu.api import create_api
from shitu.engine import Engine
from shitu.gallery import read_label_file
from shitu.sample import SAMPLE_SUBJECTS

from .conftest import MODEL_CACHE, make_settings

LABELS = list(SAMPLE_SUBJECTS)


def files(tmp_path) -> dict:
    return {"vector_store": "faiss"}


def milvus_lite(tmp_path) -> dict:
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (the Milvus store is optional)")
    return {"vector_store": "milvus"}  # the data dir's own Milvus Lite file


def milvus_server(tmp_path) -> dict:
    uri = os.environ.get("SHITU_TEST_MILVUS_URI")
    if not uri:
        pytest.skip("set SHITU_TEST_MILVUS_URI to test a Milvus server")
    return {"vector_store": "milvus", "milvus_uri": uri, "milvus_prefix": f"e{os.urandom(4).hex()}_"}


BACKENDS = [
    pytest.param(files, id="files"),
    pytest.param(milvus_lite, id="milvus-lite", marks=pytest.mark.milvus),
    pytest.param(milvus_server, id="milvus-server", marks=pytest.mark.milvus),
]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> dict:
    return request.param(tmp_path)


@pytest.fixture
def engine(backend, tmp_path, runtime):
    e = Engine(make_settings(tmp_path / "data", **backend), runtime=runtime)
    yield e
    e.close()


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ok(resp) -> dict:
    body = resp.json()
    assert resp.status_code == 200 and body["errorCode"] == 0, body
    return body["result"]


class TestEveryFrontEndOnEveryStore:
    @pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
    def test_recognise_change_and_restore_through_the_engine(self, engine, sample_gallery, sample_queries):
        root, labels = sample_gallery
        built = engine.build("shop", read_label_file(labels, root))
        assert built.image_count == 24 and engine.index_names() == ["shop"]
        for subject, query in zip(LABELS, sample_queries[1:], strict=True):
            result = engine.recognize(query, "shop")
            assert subject in [o.label for o in result.objects], subject
        gone = [i for i, label in engine.index("shop").id_map.items() if label == LABELS[0]]
        engine.remove("shop", gone)
        answer = engine.recognize(sample_queries[1], "shop")
        assert LABELS[0] not in [o.label for o in answer.objects]
        engine.relabel("shop", [gone[-1] + 1], "renamed")
        assert engine.index("shop").label(gone[-1] + 1) == "renamed"
        assert [v.action for v in engine.versions("shop")][:3] == ["relabel 1", f"remove {len(gone)}", "build"]
        restored = engine.restore("shop", 1)
        assert restored.summary["restored_from"] == 1 and engine.index("shop").label(gone[0]) == LABELS[0]
        assert LABELS[0] in [o.label for o in engine.recognize(sample_queries[1], "shop").objects]
        report = engine.report("shop")
        assert report.to_dict()["entries"] == 24

    @pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
    def test_learning_from_use_and_the_operating_point(self, engine, sample_gallery, sample_queries):
        root, labels = sample_gallery
        engine.build("shop", read_label_file(labels, root))
        result = engine.recognize(sample_queries[0], "shop")
        box = max(result.objects, key=lambda o: o.det_score)
        taught = engine.teach("shop", result.image, box.bbox, "taught label")
        index = engine.index("shop")
        assert taught.summary["taught_id"] == 24 and index.label(24) == "taught label"
        assert index.changes_since_calibration == 0, "calibrated again after the teach"
        picked = engine.set_threshold("shop", 0.5)
        assert picked.summary["calibration"]["chosen_by"] == "user" and engine.threshold("shop") == 0.5
        assert engine.calibration("shop").chosen_by == "user" and engine.info("shop").threshold == 0.5
        assert engine.versions("shop")[0].action == "threshold 0.500"

    @pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
    def test_the_http_api(self, engine, sample_gallery, sample_queries):
        root, labels = sample_gallery
        lines = [ln.split("\t") for ln in labels.read_text(encoding="utf-8").splitlines()]
        pairs = [{"image": b64(root / rel), "label": label} for rel, label in lines]
        with TestClient(create_api(engine)) as client:
            built = ok(client.post("/shitu-index-build", json={"indexKey": "api", "imageLabelPairs": pairs[:-2]}))
            assert len(built["idMap"]) == 22
            added = ok(client.post("/shitu-index-add", json={"indexKey": "api", "imageLabelPairs": pairs[-2:]}))
            assert added["imageCount"] == 24 and set(added["idMap"]) >= {"22", "23"}
            removed = ok(client.post("/shitu-index-remove", json={"indexKey": "api", "ids": [0, 22]}))
            assert "0" not in removed["idMap"] and "22" not in removed["idMap"]
            again = ok(client.post("/shitu-index-add", json={"indexKey": "api", "imageLabelPairs": pairs[:1]}))
            assert "24" in again["idMap"] and "0" not in again["idMap"], "ids are never reused"
            infer = ok(client.post("/shitu-infer", json={"indexKey": "api", "image": b64(sample_queries[2])}))
            labels_found = [r["label"] for o in infer["detectedObjects"] for r in o["recResults"]]
            assert LABELS[1] in labels_found
            listed = ok(client.get("/shitu-index/api"))
            assert listed["imageCount"] == 23 and listed["labelCount"] == 6
            versions = ok(client.get("/shitu-index/api/versions"))
            assert [v["version"] for v in versions["versions"]][:2] == [4, 3]
            health = ok(client.get("/health"))
            assert health["vectorStore"] == engine.vector_store

    @pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
    def test_the_command_line(self, engine, backend, tmp_path, sample_gallery, monkeypatch, capsys):
        root, labels = sample_gallery
        settings = engine.settings
        env = {"SHITU_DATA_DIR": str(settings.data_dir), "SHITU_MODEL_DIR": str(MODEL_CACHE), "SHITU_OFFLINE": "1",
               "SHITU_VECTOR_STORE": settings.vector_store}  # fmt: skip
        if backend.get("milvus_uri"):
            env |= {"SHITU_MILVUS_URI": backend["milvus_uri"], "SHITU_MILVUS_PREFIX": backend["milvus_prefix"]}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        engine.close()  # the CLI is another process's engine (Milvus Lite: one process per file)
        assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", "cli"]) == 0
        assert main(["remove", "--index", "cli", "--ids", "0-3"]) == 0
        capsys.readouterr()
        assert main(["info", "--index", "cli"]) == 0
        info = json.loads(capsys.readouterr().out)["indices"]["cli"]
        assert (info["entries"], info["labels"], info["next_id"]) == (20, 5, 24)
        assert main(["versions", "cli"]) == 0
        assert "remove 4" in capsys.readouterr().out
