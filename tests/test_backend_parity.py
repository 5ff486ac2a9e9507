"""The Milvus backend (``SHITU_VECTOR_STORE=milvus``) behaves as the faiss one does.

* The index, API, versions, learning, report, CLI and UI tests run again with every named index
  in Milvus Lite (one slow test, in a child pytest: ``SHITU_TEST_VECTOR_STORE=milvus``).
* Store-level tests here, on synthetic vectors (no model): the same answers as an in-memory
  faiss index, replicas that see each other's changes, a change cut short, an exported gallery
  served as it is, restores across rebuilds.
* Two app processes serve one gallery through a ``milvus-lite server`` they share.

``SHITU_TEST_MILVUS_URI=http://host:port`` runs the replica, two-process and store tests against that
Milvus server instead (each under a collection prefix of its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (needed for a local Milvus .db)")
pytestmark = pytest.mark.milvus  # the optional Milvus store: runs with --full

from shitu import milvus_store  # noqa: E402
from shitu.errors import NotFound, ShiTuError  # noqa: E402
from shitu.index import GalleryIndex  # noqa: E402
from shitu.milvus_store import MilvusGallery, MilvusIndexStore  # noqa: E402
from shitu.transfer import to_milvus  # noqa: E402

from .conftest import MODEL_CACHE, free_port, milvus_lite_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 32
PARITY_MODULES = ["test_engine.py", "test_api.py", "test_versions.py", "test_learning.py", "test_report.py",
                  "test_cli.py", "test_pipeline.py", "ui"]  # fmt: skip


def clustered(n: int, seed: int = 0, groups: int = 30) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, DIM))
    which = np.arange(n) % groups
    x = (centres[which] + 0.6 * rng.normal(size=(n, DIM))).astype("float32")
    return x, [f"g{w}" for w in which]


@pytest.fixture
def store(tmp_path):
    """A store on a Milvus Lite file, or on ``SHITU_TEST_MILVUS_URI`` under a prefix of its own."""
    external = os.environ.get("SHITU_TEST_MILVUS_URI")
    uri = external or str(tmp_path / "m.db")
    prefix = f"t{os.urandom(4).hex()}_" if external else "shitu_"
    s = MilvusIndexStore(uri, prefix=prefix, lock_dir=tmp_path / "locks", keep_versions=3)
    yield s
    s.close()


@pytest.fixture
def lite_server(tmp_path):
    """``milvus-lite server`` in a child process: what several replicas share. With
    ``SHITU_TEST_MILVUS_URI`` set, that Milvus server instead (e.g. Milvus Standalone)."""
    if os.environ.get("SHITU_TEST_MILVUS_URI"):
        yield os.environ["SHITU_TEST_MILVUS_URI"]
        return
    with milvus_lite_server(tmp_path / "server.db") as uri:
        yield uri


# --- the same tests, on Milvus --------------------------------------------------------------------


@pytest.mark.slow
def test_the_index_and_api_tests_pass_with_every_index_in_milvus(tmp_path):
    """Runs the modules in :data:`PARITY_MODULES` again, with ``SHITU_TEST_VECTOR_STORE=milvus``
    (tests/conftest.py then gives every engine a Milvus Lite store in its data dir)."""
    env = {**os.environ, "SHITU_TEST_VECTOR_STORE": "milvus"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--full", "--basetemp", str(tmp_path / "t"),
         *[f"tests/{m}" for m in PARITY_MODULES]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    tail = "\n".join(proc.stdout.splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail and "error" not in tail.lower(), tail


# --- the store on synthetic vectors ---------------------------------------------------------------


@pytest.mark.parametrize("adapt", ["off", "on"])
def test_answers_match_an_in_memory_faiss_index_through_every_change(store, adapt):
    x, labels = clustered(300)
    local = GalleryIndex.build(x, labels, index_type="Flat", adapt=adapt, sources=[f"s{i}" for i in range(300)])
    served = store.put("a", local)
    assert isinstance(served, MilvusGallery) and served.summary()["vector_store"] == "milvus"
    assert (served.whitening is not None) == (adapt == "on")
    q = clustered(40, seed=7)[0]

    def same(a: GalleryIndex, b: GalleryIndex) -> None:
        sa, ia = a.search(q, 5)
        sb, ib = b.search(q, 5)
        assert (ia == ib).all()
        np.testing.assert_allclose(sa, sb, atol=1e-5)
        assert a.id_map == b.id_map and a.next_id == b.next_id

    same(local, served)
    extra, extra_labels = clustered(4, seed=3)
    for change in (
        lambda i: i.add(extra, extra_labels, sources=["n1", "n2", "n3", "n4"], thumbnails=[b"\xff\xd8a", None, None, None]),  # noqa: E501
        lambda i: i.remove([0, 5, 301]),
        lambda i: i.relabel([1, 2], "moved"),
    ):
        local = change(local)
        served = store.mutate("a", change)
        same(local, served)
    assert served.entry(300) == local.entry(300)  # source and thumbnail from the Milvus row
    # a fresh process's view: rows, labels, state
    again = MilvusIndexStore(store.uri, prefix=store.rows.prefix, keep_versions=3)
    try:
        same(local, again.get("a"))
        refit = again.mutate("a", lambda i: i.recalibrated(adapt))
        assert refit.calibration is not None and len(refit) == len(local)
    finally:
        again.close()


def test_replicas_see_each_others_changes_and_never_reuse_ids(lite_server, tmp_path, monkeypatch):
    monkeypatch.setattr(milvus_store, "SYNC_SECONDS", 0.0)  # check the version on every read
    prefix = f"r{os.urandom(4).hex()}_"  # a server may be shared with other runs
    one = MilvusIndexStore(lite_server, prefix=prefix, lock_dir=tmp_path / "locks-1")
    two = MilvusIndexStore(lite_server, prefix=prefix, lock_dir=tmp_path / "locks-2")  # another machine: no lock
    try:
        x, labels = clustered(60)
        one.put("shop", GalleryIndex.build(x, labels, index_type="HNSW32"))
        assert two.names() == ["shop"] and len(two.get("shop")) == 60
        new, _ = clustered(2, seed=5)
        one.mutate("shop", lambda i: i.add(new, ["fresh", "fresh"]))
        seen = two.get("shop")  # replayed from the version records, not reloaded
        assert seen.label(60) == "fresh" and seen.label(61) == "fresh" and seen.next_id == 62
        assert seen.search(new[:1], 1)[1][0, 0] == 60
        two.mutate("shop", lambda i: i.remove([60]))
        two.mutate("shop", lambda i: i.add(new[:1], ["again"]))  # id 62: 60 stays retired
        mine = one.get("shop")
        assert 60 not in mine and mine.label(62) == "again" and mine.next_id == 63
        assert [v["action"] for v in one.versions("shop")][:3] == ["add 1", "remove 1", "add 2"]
    finally:
        one.close()
        two.close()


def test_a_change_cut_short_leaves_a_consistent_gallery_and_retired_ids(store, monkeypatch):
    x, labels = clustered(50)
    store.put("a", GalleryIndex.build(x, labels, index_type="Flat"))
    new, _ = clustered(3, seed=9)
    real = store.rows.put_meta

    def killed(*args, **kwargs):
        raise RuntimeError("killed before the version was written")

    monkeypatch.setattr(store.rows, "put_meta", killed)
    with pytest.raises(RuntimeError):
        store.mutate("a", lambda i: i.add(new, ["n", "n", "n"]))
    monkeypatch.setattr(store.rows, "put_meta", real)
    later = MilvusIndexStore(store.uri, prefix=store.rows.prefix)  # what the next process sees
    try:
        index = later.get("a")
        assert len(index) == 53 and index.label(52) == "n"  # the rows are the truth: listed and searched
        assert index.search(new[2:3], 1)[1][0, 0] == 52
        after = later.mutate("a", lambda i: i.add(new[:1], ["m"]))
        assert after.label(53) == "m"  # the next id is past every id ever written
    finally:
        later.close()


def test_a_gallery_written_by_milvus_export_is_served_as_it_is(store):
    x, labels = clustered(120)
    exported = GalleryIndex.build(x, labels, index_type="Flat", adapt="on")
    to_milvus(exported, store.rows, "exported")
    served = store.get("exported")
    assert [v["action"] for v in store.versions("exported")] == ["adopt (milvus-export)"]
    assert served.id_map == exported.id_map and served.next_id == exported.next_id
    assert (served.search(x[:10], 1)[1][:, 0] == exported.search(x[:10], 1)[1][:, 0]).all()


def test_restore_reaches_back_across_rebuilds_while_versions_are_kept(store):
    x, labels = clustered(40)
    store.put("a", GalleryIndex.build(x, labels, index_type="Flat"))  # v1
    store.mutate("a", lambda i: i.remove([3]))  # v2
    v2 = store.get("a").id_map
    store.put("a", GalleryIndex.build(x[:10], labels[:10], index_type="HNSW32"))  # v3: a rebuild
    diff = store.changes("a", 3, against=2)
    assert (diff["removed_count"], diff["added_count"]) == (30, 1)  # ids 10-39 gone, id 3 back
    restored, record = store.restore("a", 2)
    assert restored.id_map == v2 and record["version"] == 4 and restored.index_type == "Flat"
    assert restored.next_id >= 40 and restored.search(x[:1], 1)[1][0, 0] == 0
    for _ in range(4):  # keep_versions=3: the first generation's archive is dropped
        store.mutate("a", lambda i: i.relabel([0], "z"))
    with pytest.raises(NotFound, match="no longer kept"):
        store.restore("a", 2)
    archived = [c for c in store.archive._client.list_collections() if c.startswith(store.archive.prefix)]
    assert len(archived) <= 2  # the rebuild's generation (rows, and nothing set aside) at most


def test_a_pca_whitened_index_is_refused_with_advice(store):
    x, labels = clustered(300)
    whitened = GalleryIndex.build(x, labels, index_type="Flat", whiten=True)
    with pytest.raises(ShiTuError, match="adapt instead of whiten"):
        store.put("w", whitened)
    assert store.names() == []


# --- two app processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_app_processes_serve_one_gallery_through_one_milvus(lite_server, tmp_path, sample_gallery):
    root, label_file = sample_gallery
    procs, bases = [], []
    prefix = f"a{os.urandom(4).hex()}_"  # both processes, and only they, use these collections
    try:
        for k in range(2):
            port = free_port()
            env = {**os.environ, "SHITU_DATA_DIR": str(tmp_path / f"data-{k}"), "SHITU_MODEL_DIR": str(MODEL_CACHE),
                   "SHITU_OFFLINE": "1", "SHITU_VECTOR_STORE": "milvus", "SHITU_MILVUS_URI": lite_server,
                   "SHITU_MILVUS_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}  # fmt: skip
            log = open(tmp_path / f"app-{k}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen([sys.executable, "-m", "shitu", "serve", "--port", str(port)], cwd=ROOT,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            bases.append(f"http://127.0.0.1:{port}")
        for k, base in enumerate(bases):
            deadline = time.monotonic() + 300
            while True:
                assert procs[k].poll() is None, (tmp_path / f"app-{k}.log").read_text(errors="replace")
                try:
                    if requests.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "the app did not start"
                time.sleep(0.5)

        import base64

        def post(base: str, path: str, payload: dict) -> dict:
            resp = requests.post(f"{base}{path}", json=payload, timeout=120)
            assert resp.status_code == 200, resp.text
            return resp.json()["result"]

        lines = [ln.split("\t") for ln in label_file.read_text(encoding="utf-8").splitlines()]
        first = [(root / rel, label) for rel, label in lines if Path(rel).stem in ("0", "1")]
        pairs = [{"image": base64.b64encode(p.read_bytes()).decode(), "label": lb} for p, lb in first]
        built = post(bases[0], "/shitu-index-build", {"indexKey": "shared", "imageLabelPairs": pairs[:-1]})
        assert len(built["idMap"]) == len(pairs) - 1
        time.sleep(milvus_store.SYNC_SECONDS + 0.2)
        query = {"image": pairs[-1]["image"], "indexKey": "shared"}
        answer = post(bases[1], "/shitu-infer", query)  # the other process serves what the first built
        assert answer["detectedObjects"]
        added = post(bases[1], "/shitu-index-add", {"indexKey": "shared", "imageLabelPairs": pairs[-1:]})
        assert added["imageCount"] == len(pairs)
        time.sleep(milvus_store.SYNC_SECONDS + 0.2)
        listed = requests.get(f"{bases[0]}/shitu-index/shared", timeout=30).json()["result"]
        assert listed["imageCount"] == len(pairs)
        removed = post(bases[0], "/shitu-index-remove", {"indexKey": "shared", "ids": [0]})
        assert "0" not in removed["idMap"]
        time.sleep(milvus_store.SYNC_SECONDS + 0.2)
        again = post(bases[1], "/shitu-index-add", {"indexKey": "shared", "imageLabelPairs": pairs[:1]})
        assert "0" not in again["idMap"] and str(len(pairs)) in again["idMap"]  # ids never reused
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
