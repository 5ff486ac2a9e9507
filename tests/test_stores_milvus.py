"""What only the Milvus store does (``SHITU_VECTOR_STORE=milvus``); what every store does is in
tests/test_store_contract.py (synthetic vectors) and tests/test_engine_contract.py (every front
end, with the real models), both run on Milvus Lite too.

* Replicas on several machines (no shared lock) that see each other's changes through the version
  records, on one ``milvus-lite server`` (or ``SHITU_TEST_MILVUS_URI``).
* A change cut short between Milvus's writes, a gallery written by ``shitu milvus-export`` served as
  it is, a PCA-whitened index refused with advice.
* Two app processes serving one gallery.
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

from shitu.errors import ShiTuError  # noqa: E402
from shitu.index import GalleryIndex  # noqa: E402
from shitu.stores import milvus as milvus_store  # noqa: E402
from shitu.stores.milvus import MilvusStore  # noqa: E402
from shitu.transfer import to_milvus  # noqa: E402

from .conftest import MODEL_CACHE, free_port, milvus_lite_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


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
    s = MilvusStore(uri, prefix=prefix, lock_dir=tmp_path / "locks", keep_versions=3)
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


# --- the store on synthetic vectors ---------------------------------------------------------------


def test_replicas_see_each_others_changes_and_never_reuse_ids(lite_server, tmp_path, monkeypatch):
    monkeypatch.setattr(milvus_store, "SYNC_SECONDS", 0.0)  # check the version on every read
    prefix = f"r{os.urandom(4).hex()}_"  # a server may be shared with other runs
    one = MilvusStore(lite_server, prefix=prefix, lock_dir=tmp_path / "locks-1")
    two = MilvusStore(lite_server, prefix=prefix, lock_dir=tmp_path / "locks-2")  # another machine: no lock
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
    later = MilvusStore(store.uri, prefix=store.rows.prefix, state_path=store.state.path)  # the next process
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
                   "SHITU_MILVUS_PREFIX": prefix, "PYTHONUNBUFFERED": "1",
                   # what both replicas share beside Milvus: the version records (shitu.stores.milvus_state)
                   "SHITU_MILVUS_STATE": str(tmp_path / "milvus_state.sqlite")}  # fmt: skip
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


def _legacy_blob_rows(key: str, group: str, data: bytes) -> list[dict]:
    """How versions before the sidecar stored bytes: base64 parts in ``<prefix>blob`` (49149 bytes a part)."""
    import base64

    size = 49149
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    return [{"key": f"{key}#0123456789abcdef#{n}", "name": key, "grp": group, "part": n, "total": len(parts),
             "data": base64.b64encode(p).decode("ascii"), "vec": [1.0, 0.0]} for n, p in enumerate(parts)]  # fmt: skip


def test_state_written_by_earlier_versions_moves_out_of_placeholder_collections(tmp_path):
    """Heads once lived in ``<prefix>meta`` and records and projections in ``<prefix>blob``, both with a
    2-d placeholder vector. Opening such data moves heads onto the gallery collections and the rest into
    the SQLite sidecar, drops both collections, and serves the same gallery with its history."""
    import sqlite3

    from pymilvus import DataType

    uri = str(tmp_path / "m.db")
    x, labels = clustered(80)
    store = MilvusStore(uri, lock_dir=tmp_path / "locks")
    store.put("shop", GalleryIndex.build(x, labels, index_type="Flat", adapt="on"))
    new, _ = clustered(2, seed=3)
    store.mutate("shop", lambda i: i.add(new, ["fresh", "fresh"]))
    before = store.get("shop")
    assert before.whitening is not None  # a projection to move as well
    expected = (before.search(x[:5], 3), [v["action"] for v in store.versions("shop")], before.next_id)
    client, coll = store.rows.connection.client, store.rows._collection("shop")
    head = client.describe_collection(coll)["properties"]["shitu.head"]
    with sqlite3.connect(store.state.path) as db:
        records = db.execute("SELECT gallery, version, body FROM records").fetchall()
        projections = db.execute("SELECT key, gallery, data FROM projections").fetchall()
    assert len(records) == 2 and len(projections) == 1
    # write it as the earlier versions did, and forget the new places
    for name, fields in (("shitu_meta", [("key", 256), ("value", 65535)]),
                         ("shitu_blob", [("key", 600), ("name", 520), ("grp", 520), ("data", 65535)])):  # fmt: skip
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(fields[0][0], DataType.VARCHAR, is_primary=True, max_length=fields[0][1])
        for field, size in fields[1:]:
            schema.add_field(field, DataType.VARCHAR, max_length=size)
        if name == "shitu_blob":
            schema.add_field("part", DataType.INT64)
            schema.add_field("total", DataType.INT64)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)
        params = client.prepare_index_params()
        params.add_index(field_name="vec", index_type="FLAT", metric_type="IP")
        client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")
    client.insert("shitu_meta", [{"key": coll, "value": head, "vec": [1.0, 0.0]}])
    rows = [r for g, v, body in records for r in _legacy_blob_rows(f"log/{g}/{v:010d}", f"log/{g}", body.encode())]
    rows += [r for key, g, data in projections for r in _legacy_blob_rows(key, f"projection/{g}", data)]
    client.insert("shitu_blob", rows)
    client.drop_collection_properties(coll, property_keys=["shitu.head"])
    state_file = store.state.path
    store.close()
    state_file.unlink()

    again = MilvusStore(uri, lock_dir=tmp_path / "locks")
    try:
        served = again.get("shop")
        scores, ids = served.search(x[:5], 3)
        assert np.array_equal(ids, expected[0][1]) and np.allclose(scores, expected[0][0], atol=1e-5)
        assert [v["action"] for v in again.versions("shop")] == expected[1] and served.next_id == expected[2]
        listed = again.rows.connection.client.list_collections()
        assert "shitu_meta" not in listed and "shitu_blob" not in listed
        with sqlite3.connect(state_file) as db:
            assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 2
        again.mutate("shop", lambda i: i.remove([0]))  # and it goes on from there
        assert 0 not in again.get("shop") and len(again.versions("shop")) == 3
    finally:
        again.close()
