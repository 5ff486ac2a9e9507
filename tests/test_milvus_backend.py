"""The Milvus gallery backend against a real Milvus Lite (pure-Python milvus-lite 3.x) in tmp_path.

One test also runs ``milvus-lite server`` in a child process and talks to it over http, the way
several app replicas would share one Milvus.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (the Milvus backend is optional)")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (needed for a local Milvus .db)")
pytestmark = pytest.mark.milvus  # the optional Milvus store: runs with --full

from shitu.errors import Conflict, NotFound, ShiTuError, TooLarge, Unavailable  # noqa: E402
from shitu.stores.milvus_collections import MilvusCollections, escape_name, unescape_name  # noqa: E402

from .conftest import milvus_lite_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int = 1500, clusters: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Unit vectors around ``clusters`` centres, with queries that are fresh points of the same clusters."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(clusters, DIM)))
    which = rng.integers(0, clusters, n)
    vectors = _unit(centres[which] + 0.35 * rng.normal(size=(n, DIM)) / np.sqrt(DIM))
    queries = _unit(centres[rng.integers(0, clusters, 200)] + 0.35 * rng.normal(size=(200, DIM)) / np.sqrt(DIM))
    return vectors, queries, [f"class-{c}" for c in which]


def fill(store: MilvusCollections, name: str, vectors: np.ndarray, labels: list[str], ids=None, **create) -> np.ndarray:
    ids = np.arange(len(vectors), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    store.create(name, vectors.shape[1], **create)
    thumbs = [f"jpeg-{i}".encode() if i % 3 else None for i in ids]
    assert store.insert(name, ids, vectors, labels, [f"img/{i}.jpg" for i in ids], thumbs) == len(ids)
    return ids


@pytest.fixture
def store(tmp_path):
    with MilvusCollections(str(tmp_path / "galleries.db")) as s:
        yield s


def test_importing_the_module_does_not_import_pymilvus():
    code = "import sys, shitu.stores.milvus_collections; assert 'pymilvus' not in sys.modules, 'imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("metric", ["IP", "COSINE", "L2"])
def test_flat_search_agrees_with_exact_search_and_scores_are_cosine(store, metric):
    vectors, queries, labels = clustered()
    store.lite_flush_rows = 10**9  # keep the rows in Milvus Lite's memory until the explicit flush below
    ids = fill(
        store, "flat", vectors, labels, ids=np.arange(len(vectors)) * 7 + 3, metric_type=metric, index_type="Flat"
    )
    exact = queries @ vectors.T
    order = np.argsort(-exact, axis=1)[:, :5]
    for when in ("buffered", "flushed"):  # unflushed rows are searched from memory, flushed ones by their index
        scores, found = store.search("flat", queries, 5)
        assert scores.shape == found.shape == (len(queries), 5)
        assert scores.dtype == np.float32 and found.dtype == np.int64
        assert (found[:, 0] == ids[order[:, 0]]).all(), when  # recall@1 = 1
        np.testing.assert_allclose(scores, np.take_along_axis(exact, order, axis=1), atol=2e-5, err_msg=when)
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first, whatever the metric
        store.flush("flat")


@pytest.mark.parametrize(("index_type", "metric"), [("HNSW32", "IP"), ("HNSW32", "L2"), ("IVF", "IP")])
def test_approximate_indexes_find_the_exact_nearest_neighbour(tmp_path, index_type, metric):
    vectors, queries, labels = clustered(n=3000)
    path = str(tmp_path / "ann.db")
    with MilvusCollections(path) as store:
        ids = fill(store, "ann", vectors, labels, metric_type=metric, index_type=index_type)
        store.flush("ann")  # seals the rows; milvus-lite then builds the segment's index in the background
    # closing waited for that build; reopening loads the index, so this searches HNSW / IVF, not raw rows
    with MilvusCollections(path) as store:
        assert store.info("ann") == {"name": "ann", "dim": DIM, "metric_type": metric, "index_type": index_type}
        exact = queries @ vectors.T
        scores, found = store.search("ann", queries, 10)
        recall = float(np.mean(found[:, 0] == ids[np.argmax(exact, axis=1)]))
        assert recall >= 0.99, f"{index_type}/{metric} recall@1 {recall:.3f}"
        np.testing.assert_allclose(scores[:, 0], exact.max(axis=1), atol=1e-4)
        # the index really answers: a one-wide beam / one probed list misses many neighbours (about half)
        _, rough = store.search("ann", queries, 1, params={"ef": 1} if index_type == "HNSW32" else {"nprobe": 1})
        assert np.mean(rough[:, 0] == ids[np.argmax(exact, axis=1)]) < 0.9


def test_fewer_rows_than_k_are_padded(store):
    vectors, _, _ = clustered(n=3)
    fill(store, "tiny", vectors, ["a", "b", "c"], index_type="HNSW32")
    scores, ids = store.search("tiny", vectors[:2], 5)
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert np.isfinite(scores[:, :3]).all() and (scores[:, 3:] == -np.inf).all()
    empty_scores, empty_ids = store.search("tiny", np.zeros((0, DIM), np.float32), 4)
    assert empty_scores.shape == empty_ids.shape == (0, 4)
    store.create("empty", DIM, index_type="Flat")
    scores, ids = store.search("empty", vectors[:1], 2)
    assert (ids == -1).all() and (scores == -np.inf).all()


def test_deleted_rows_are_never_found_again(tmp_path):
    vectors, _, labels = clustered(n=400)
    path = str(tmp_path / "d.db")
    with MilvusCollections(path) as store:
        ids = fill(store, "g", vectors, labels, index_type="HNSW32")
        store.flush("g")
    with MilvusCollections(path) as store:  # the rows are in an indexed segment now; one more stays in memory
        store.insert("g", [1000], vectors[:1], ["late"], [""], [None])
        gone = np.append(ids[::4], 1000)
        assert store.delete("g", list(gone) + [999_999]) == len(gone)  # missing ids are not counted
        assert store.delete("g", gone) == 0
        assert store.count("g") == len(ids) + 1 - len(gone)
        _, found = store.search("g", vectors[ids[::4]], 20)
        assert not np.isin(found, gone).any()
        assert (found >= 0).all()  # the nearest remaining rows are found instead
        assert store.labels("g", gone) == {}
        assert not np.isin(store.vectors("g")[0], gone).any()


def test_relabel_keeps_vectors_sources_and_thumbnails(store):
    vectors, _, labels = clustered(n=60)
    fill(store, "g", vectors, labels, index_type="Flat")
    before = {r["id"]: r for r in store.get("g", [1, 2, 3])}
    assert store.relabel("g", [1, 2, 3, 12345], "renamed") == 3
    after = store.get("g", [3, 2, 1])
    assert [r["id"] for r in after] == [3, 2, 1]  # in the order asked
    for row in after:
        assert row["label"] == "renamed"
        assert (row["source"], row["thumbnail"]) == (before[row["id"]]["source"], before[row["id"]]["thumbnail"])
    assert before[1]["thumbnail"] == b"jpeg-1" and before[3]["thumbnail"] is None
    ids, vecs = store.vectors("g")
    np.testing.assert_array_equal(ids, np.arange(60))
    np.testing.assert_allclose(vecs, vectors, atol=1e-7)
    assert store.labels("g", [1, 4, -1]) == {1: "renamed", 4: labels[4]}
    assert store.label_counts("g")["renamed"] == 3
    _, found = store.search("g", vectors[[2]], 1)
    assert found[0, 0] == 2


def test_paging_is_in_id_order_and_filters_by_label(store):
    rng = np.random.default_rng(3)
    ids = rng.permutation(300) * 10  # inserted out of order
    awkward = ['say "cheese"', "it's", "back\\slash", "农夫山泉", "tab\there"]
    labels = [awkward[i % len(awkward)] for i in ids // 10]
    vectors = _unit(rng.normal(size=(300, DIM)))
    fill(store, "g", vectors, labels, ids=ids, index_type="Flat")
    first = store.page("g", 0, 7)
    assert [r["id"] for r in first] == [0, 10, 20, 30, 40, 50, 60]
    assert first[1] == {"id": 10, "label": awkward[1], "source": "img/10.jpg"}
    assert [r["id"] for r in store.page("g", 295, 50)] == [2950, 2960, 2970, 2980, 2990]
    assert store.page("g", 300, 10) == [] and store.page("g", 0, 0) == []
    every = [r["id"] for r in store.page("g", 0, 1000)]
    assert every == sorted(ids.tolist())
    for n, label in enumerate(awkward):
        rows = store.page("g", 2, 3, label=label)
        assert [r["id"] for r in rows] == [(n + 5 * k) * 10 for k in (2, 3, 4)]
        assert {r["label"] for r in rows} == {label}
    assert store.page("g", 0, 5, label="no such label") == []
    assert store.label_counts("g") == {label: 60 for label in sorted(awkward)}
    rows = list(store.iter_all("g", batch=64))
    assert [r["id"] for r in rows] == sorted(ids.tolist())
    by_id = dict(zip(ids.tolist(), vectors))
    np.testing.assert_allclose(rows[5]["vector"], by_id[rows[5]["id"]], atol=1e-7)
    assert rows[1]["thumbnail"] == b"jpeg-10" and rows[0]["thumbnail"] is None


def test_index_metadata_round_trip(store):
    store.create("g", DIM, meta={"next_id": 5, "feature_model": "PP-ShiTuV2_rec"})
    assert store.get_meta("g") == {"next_id": 5, "feature_model": "PP-ShiTuV2_rec"}
    meta = {"next_id": 77, "calibration": {"threshold": 0.42, "bins": [0.1, 0.2]}, "标签": "中文"}
    store.put_meta("g", meta)
    assert store.get_meta("g") == meta
    store.create("other", DIM)
    assert store.get_meta("other") == {} and store.get_meta("g") == meta
    store.drop("g")
    with pytest.raises(NotFound):
        store.get_meta("g")
    store.create("g", DIM)
    assert store.get_meta("g") == {}  # a new index never inherits the old one's metadata
    with pytest.raises(ShiTuError):
        store.put_meta("g", {"bad": float("nan")})
    with pytest.raises(TooLarge):
        store.put_meta("g", {"big": "x" * 70_000})
    with pytest.raises(NotFound):
        store.put_meta("missing", {})


def test_a_new_instance_on_the_same_file_sees_everything(tmp_path):
    path = str(tmp_path / "persist.db")
    vectors, queries, labels = clustered(n=300)
    with MilvusCollections(path) as first:
        fill(first, "shop-2024.v1", vectors, labels, index_type="HNSW32", meta={"next_id": 300})
        first.delete("shop-2024.v1", [7])
    # closing the last instance stopped the in-process server: this one reads the files again
    with MilvusCollections(path) as second:
        assert second.names() == ["shop-2024.v1"]
        assert second.count("shop-2024.v1") == 299
        assert second.get_meta("shop-2024.v1") == {"next_id": 300}
        assert second.info("shop-2024.v1")["index_type"] == "HNSW32"
        _, found = second.search("shop-2024.v1", vectors[[6, 7, 8]], 1)
        assert found[:, 0].tolist()[0::2] == [6, 8] and found[1, 0] != 7
        assert second.get("shop-2024.v1", [8])[0]["thumbnail"] == b"jpeg-8"


def test_two_instances_in_one_process_share_the_file(tmp_path):
    path = str(tmp_path / "shared.db")
    a, b = MilvusCollections(path), MilvusCollections(path)
    try:
        a.create("x", 4)
        a.close()  # b still uses the in-process server
        assert b.names() == ["x"] and b.count("x") == 0
    finally:
        a.close()
        b.close()


def test_writes_from_many_threads_are_serialised(store):
    store.create("g", DIM, index_type="HNSW32")
    vectors = _unit(np.random.default_rng(5).normal(size=(400, DIM)))
    store.lite_flush_rows = 150  # some threads also flush while others insert

    def add(part: int) -> None:
        ids = np.arange(part * 50, part * 50 + 50)
        store.insert("g", ids, vectors[ids], [f"t{part}"] * 50, [""] * 50, [None] * 50)
        store.relabel("g", ids[:5], f"r{part}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add, range(8)))
    assert store.count("g") == 400
    np.testing.assert_allclose(store.vectors("g")[1], vectors, atol=1e-7)
    assert store.label_counts("g") == {**{f"r{p}": 5 for p in range(8)}, **{f"t{p}": 45 for p in range(8)}}


def test_names_with_dashes_dots_and_other_letters(store):
    names = ["shop-2024.v1", "a_b", "a__b", "a-b", "a.b", "饮料-2", "x" * 64, "ü" * 64]
    for name in names:
        assert unescape_name(escape_name(name)) == name
        store.create(name, 4)
    assert store.names() == sorted(names)
    assert all(store.exists(n) for n in names) and not store.exists("a_b_")
    assert store.info("ü" * 64)["name"] == "ü" * 64  # its escaped name is too long: stored under a hash
    store.drop("a.b")
    assert "a.b" not in store.names() and store.exists("a-b")
    for bad in ["", "-lead", "trail.", "sp ace", "semi;colon", "y" * 65, "饮" * 61]:
        with pytest.raises(ShiTuError, match="invalid index name"):
            store.create(bad, 4)


def test_bad_requests_are_clear_errors_and_change_nothing(store, capfd):
    vectors, _, labels = clustered(n=10)
    fill(store, "g", vectors, labels, index_type="Flat")
    with pytest.raises(Conflict, match="already exists"):
        store.create("g", DIM)
    with pytest.raises(NotFound, match="no index named 'nope'"):
        store.search("nope", vectors[:1], 1)
    with pytest.raises(NotFound):
        store.drop("nope")
    with pytest.raises(Conflict, match="ids already in index 'g': 3"):
        store.insert("g", [100, 3], vectors[:2], ["a", "b"], ["", ""], [None, None])
    with pytest.raises(ShiTuError, match="same id twice"):
        store.insert("g", [100, 100], vectors[:2], ["a", "b"], ["", ""], [None, None])
    with pytest.raises(TooLarge, match="thumbnail"):
        store.insert("g", [100], vectors[:1], ["a"], [""], [b"x" * 50_000])
    with pytest.raises(ShiTuError, match=r"shape \(n, 32\)"):
        store.search("g", vectors[:1, :5], 1)
    with pytest.raises(ShiTuError, match="NaN"):
        store.insert("g", [100], np.full((1, DIM), np.nan), ["a"], [""], [None])
    with pytest.raises(ShiTuError, match="whole numbers"):
        store.delete("g", [-4])
    with pytest.raises(ShiTuError, match="unknown index type"):
        store.create("h", DIM, index_type="PQ")
    with pytest.raises(ShiTuError, match="label must not be empty"):
        store.relabel("g", [1], " ")
    assert store.count("g") == 10 and store.labels("g", [100]) == {}
    with pytest.raises(ShiTuError, match="must end in .db"):
        MilvusCollections(str(store.uri) + ".txt")
    with pytest.raises(Unavailable, match="cannot connect to Milvus at http://127.0.0.1:1"):
        MilvusCollections("http://127.0.0.1:1", timeout=2)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


SECOND_PROCESS = r"""
import sys
from shitu.errors import Unavailable
from shitu.stores.milvus_collections import MilvusCollections
try:
    with MilvusCollections(sys.argv[1]) as m:
        print("opened", m.names())
except Unavailable as e:
    print("refused:", e.message)
"""


def test_a_second_process_is_refused_with_advice_until_the_first_closes(tmp_path):
    path = str(tmp_path / "one-process.db")

    def other_process() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", SECOND_PROCESS, path], cwd=ROOT, capture_output=True, text=True, timeout=120
        )

    first = MilvusCollections(path)
    try:
        first.create("held", 4)
        other = other_process()
        assert "refused: the Milvus Lite file" in other.stdout, other.stdout + other.stderr
        assert "open in another process" in other.stdout and "milvus-lite server" in other.stdout
        assert "Traceback" not in other.stderr, other.stderr
    finally:
        first.close()
    assert "opened ['held']" in other_process().stdout


def test_replicas_share_one_milvus_lite_server(tmp_path):
    with milvus_lite_server(tmp_path / "server.db") as uri:
        with MilvusCollections(uri) as one, MilvusCollections(uri) as two:
            vectors, _, labels = clustered(n=50)
            fill(one, "g", vectors, labels, index_type="HNSW32", metric_type="L2", meta={"next_id": 50})
            assert two.names() == ["g"] and two.count("g") == 50
            two.put_meta("g", {"next_id": 60})
            assert one.get_meta("g") == {"next_id": 60}
            two.relabel("g", [4], "moved")
            assert one.labels("g", [4]) == {4: "moved"}
            scores, found = one.search("g", vectors[:3], 1)
            assert found[:, 0].tolist() == [0, 1, 2]
            np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


@pytest.mark.skipif(not os.environ.get("SHITU_TEST_MILVUS_URI"), reason="set SHITU_TEST_MILVUS_URI to test a server")
def test_an_external_milvus_server():
    """Against a real Milvus (e.g. Standalone): ``SHITU_TEST_MILVUS_URI=http://host:19530``."""
    prefix = f"shitu_test_{os.getpid()}_"
    with MilvusCollections(os.environ["SHITU_TEST_MILVUS_URI"], prefix=prefix) as store:
        try:
            vectors, queries, labels = clustered()
            for index_type, metric in (("Flat", "IP"), ("HNSW32", "L2"), ("IVF", "COSINE")):
                name = f"ext-{index_type}.{metric}"
                ids = fill(store, name, vectors, labels, index_type=index_type, metric_type=metric, meta={"a": 1})
                exact = queries @ vectors.T
                scores, found = store.search(name, queries, 5)
                assert np.mean(found[:, 0] == ids[np.argmax(exact, axis=1)]) >= 0.99
                np.testing.assert_allclose(scores[:, 0], exact.max(axis=1), atol=1e-4)
                assert store.delete(name, ids[:10]) == 10 and store.count(name) == len(ids) - 10
                assert store.relabel(name, ids[10:12], "z") == 2 and store.labels(name, ids[10:12]) == {
                    10: "z",
                    11: "z",
                }
                assert [r["id"] for r in store.page(name, 0, 3)] == [10, 11, 12]
                assert store.get_meta(name) == {"a": 1}
        finally:
            for name in store.names():
                store.drop(name)
