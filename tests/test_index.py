"""GalleryIndex: every index type and metric, removal, id policy, persistence, PaddleX interop."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from shitu.errors import NotFound, ShiTuError
from shitu.fsutil import recover_dir
from shitu.index import GalleryIndex
from shitu.stores.layout import ALT_ID_MAP_FILE, ID_MAP_FILE, load_index, save_index
from shitu.vectors import ivf_nlist

TYPES = ["Flat", "IVF", "HNSW32"]
METRICS = ["IP", "L2"]


def clustered(n: int, dim: int = 32, centers: int = 50, spread: float = 0.35, seed: int = 0, views: int = 0):
    """Unit vectors around random centres, like embeddings of products photographed many times.
    ``views`` picks another set of photos of the same products (same centres, new noise)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    rng = np.random.default_rng([seed, views]) if views else rng
    labels = rng.integers(0, centers, size=n)
    x = c[labels] + spread * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype("float32"), [f"item-{k}" for k in labels]


@pytest.fixture(scope="module")
def data():
    return clustered(200)


@pytest.mark.parametrize("index_type", TYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_build_search_finds_itself(data, index_type, metric):
    x, labels = data
    idx = GalleryIndex.build(x, labels, index_type=index_type, metric_type=metric)
    scores, ids = idx.search(x[:20], topk=3)
    assert ids[:, 0].tolist() == list(range(20))
    # similarities, not distances, for both metrics: self-match is 1
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    assert (np.diff(scores, axis=1) <= 1e-6).all(), "best first"


@pytest.mark.parametrize("index_type", TYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_remove_works_for_every_type(data, index_type, metric):
    x, labels = data
    idx = GalleryIndex.build(x, labels, index_type=index_type, metric_type=metric)
    smaller = idx.remove([0, 5, 199])
    assert len(smaller) == 197 and len(idx) == 200, "the original is untouched"
    assert {0, 5, 199}.isdisjoint(smaller.id_map)
    _, ids = smaller.search(x[[0, 1, 5, 7]], topk=1)
    assert ids[1, 0] == 1 and ids[3, 0] == 7, "remaining ids still map to their own vectors"
    assert ids[0, 0] not in (0, 5, 199) and ids[2, 0] not in (0, 5, 199)
    # every remaining vector still finds itself: the id map was not scrambled by the removal
    kept = [i for i in range(200) if i not in (0, 5, 199)]
    _, ids = smaller.search(x[kept], topk=1)
    assert ids[:, 0].tolist() == kept


def test_remove_unknown_id_changes_nothing(data):
    x, labels = data
    idx = GalleryIndex.build(x, labels, index_type="Flat")
    with pytest.raises(NotFound, match="999"):
        idx.remove([1, 999])
    assert len(idx) == 200


def test_cannot_remove_everything(data):
    x, labels = data
    idx = GalleryIndex.build(x[:2], labels[:2], index_type="Flat")
    with pytest.raises(ShiTuError, match="at least one"):
        idx.remove([0, 1])


@pytest.mark.parametrize("metric", METRICS)
def test_ivf_with_three_images(metric):
    x, labels = clustered(3, seed=3)
    idx = GalleryIndex.build(x, labels, index_type="IVF", metric_type=metric)
    assert ivf_nlist(3) == 1
    _, ids = idx.search(x, topk=1)
    assert ids[:, 0].tolist() == [0, 1, 2]
    assert len(idx.remove([1])) == 2
    assert len(idx.add(x[:1], ["again"])) == 4


def test_ivf_retrains_when_it_outgrows_its_lists():
    x, labels = clustered(4000, seed=4)
    idx = GalleryIndex.build(x[:100], labels[:100], index_type="IVF")
    grown = idx.add(x[100:], labels[100:])
    import faiss

    assert faiss.downcast_index(grown.index.index).nlist == ivf_nlist(4000) > ivf_nlist(100)
    _, ids = grown.search(x[:50], topk=1)
    assert ids[:, 0].tolist() == list(range(50))


@pytest.mark.parametrize("index_type", TYPES)
def test_ids_are_never_reused(data, index_type):
    x, labels = data
    idx = GalleryIndex.build(x[:10], labels[:10], index_type=index_type)
    idx = idx.remove([9])  # the largest id
    idx = idx.add(x[10:12], labels[10:12])
    assert sorted(idx.id_map)[-2:] == [10, 11], "PaddleX would hand out id 9 again"


def test_l2_threshold_uses_similarity(data):
    x, labels = data
    idx = GalleryIndex.build(x, labels, index_type="Flat", metric_type="L2")
    scores, ids = idx.search(x[:5], topk=5)
    ip = GalleryIndex.build(x, labels, index_type="Flat", metric_type="IP")
    ip_scores, ip_ids = ip.search(x[:5], topk=5)
    np.testing.assert_allclose(scores, ip_scores, atol=1e-4)
    assert (ids == ip_ids).all()


@pytest.mark.slow
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("index_type", ["HNSW32", "IVF"])
def test_approximate_search_matches_exact(index_type, metric):
    """A hard synthetic gallery (2000 products x 10 views, 256-d): with faiss's defaults
    (efSearch 16, nprobe 1) the nearest neighbour of new views agrees with exact search for
    only ~98% (HNSW) / ~70% (IVF) of queries; with calibrated parameters for >= 99%."""
    x, labels = clustered(20000, dim=256, centers=2000, spread=1.2, seed=5)
    queries = clustered(500, dim=256, centers=2000, spread=1.2, seed=5, views=1)[0]  # same products, new views
    exact = GalleryIndex.build(x, labels, index_type="Flat", metric_type=metric).search(queries, topk=1)[1][:, 0]
    approx_index = GalleryIndex.build(x, labels, index_type=index_type, metric_type=metric)
    approx = approx_index.search(queries, topk=1)[1][:, 0]
    assert (approx == exact).mean() >= 0.99, approx_index.search_params
    assert set(approx_index.search_params) == {"efSearch" if index_type == "HNSW32" else "nprobe", "agreement"}
    assert approx_index.search_params["agreement"] >= 0.995 and approx_index.search_shortfall is None


def test_an_approximate_index_that_cannot_match_exact_search_says_so(tmp_path, monkeypatch, caplog, engine):
    """Structureless vectors (64-d Gaussian noise) with efSearch held at 1: the graph search misses
    the true neighbour for many queries. The index records how often it agrees, warns, keeps the
    warning across save/load, and the studio shows it; IVF on the same vectors reaches exact."""
    import shitu.vectors as vectors_module
    from shitu.ui.summaries import calibration_markdown

    x = np.random.default_rng(3).normal(size=(3000, 64)).astype("float32")
    labels = [f"item-{k % 300}" for k in range(len(x))]
    monkeypatch.setattr(vectors_module, "HNSW_EF_CANDIDATES", (1,))
    with caplog.at_level("WARNING", logger="shitu.vectors"):
        hnsw = GalleryIndex.build(x, labels, index_type="HNSW32", adapt="off")
    reached = hnsw.search_params["agreement"]
    assert hnsw.search_params["efSearch"] == 1 and 0 < reached < 0.995
    assert f"only {reached:.1%}" in hnsw.search_shortfall and "efSearch 1:" in hnsw.search_shortfall
    assert hnsw.search_shortfall in caplog.text and hnsw.summary()["search_shortfall"] == hnsw.search_shortfall
    save_index(hnsw, tmp_path / "hnsw")
    again = load_index(tmp_path / "hnsw")
    assert again.search_params == hnsw.search_params and again.search_shortfall == hnsw.search_shortfall
    shown = engine.info(tmp_path / "hnsw")  # what the studio reads
    assert shown.search_shortfall == hnsw.search_shortfall
    assert "Rebuild as IVF or Flat" in calibration_markdown(shown)
    assert "IVF 或 Flat" in calibration_markdown(shown, "zh")

    ivf = GalleryIndex.build(x, labels, index_type="IVF", adapt="off")
    assert ivf.search_params["agreement"] >= 0.995 and ivf.search_shortfall is None
    save_index(ivf, tmp_path / "ivf")
    assert "Rebuild" not in calibration_markdown(engine.info(tmp_path / "ivf"))


@pytest.mark.parametrize("index_type", TYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_save_load_identical_results(tmp_path, data, index_type, metric):
    x, labels = data
    idx = GalleryIndex.build(
        x, labels, index_type=index_type, metric_type=metric, sources=[f"{k}.jpg" for k in range(200)],
        thumbnails=[b"\xff\xd8thumb"] * 200, feature_model="test:model",
    )  # fmt: skip
    idx = idx.remove([3])
    save_index(idx, tmp_path / "idx")
    back = load_index(tmp_path / "idx")
    s1, i1 = idx.search(x, topk=5)
    s2, i2 = back.search(x, topk=5)
    assert (i1 == i2).all()
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert back.id_map == idx.id_map and back.next_id == idx.next_id == 200
    assert back.entry(4).source == "4.jpg" and back.entry(4).thumbnail == b"\xff\xd8thumb"
    assert back.feature_model == "test:model" and back.index_type == index_type


def test_paddlex_layout_and_interop(tmp_path, data):
    """Ours loads in PaddleX 3.7.2 and PaddleX's IndexData.save loads here."""
    from paddlex.inference.pipelines.components.faisser import FaissBuilder, FaissIndexer, IndexData

    x, labels = data
    ours = GalleryIndex.build(x, labels, index_type="Flat", metric_type="IP")
    save_index(ours, tmp_path / "ours")
    info = yaml.safe_load((tmp_path / "ours" / ID_MAP_FILE).read_text(encoding="utf-8"))
    assert set(info) >= {"index_type", "metric_type", "id_map"}
    preds = FaissIndexer(str(tmp_path / "ours"))(x[:3], score_thres=0.5, hamming_radius=0, topk=1)
    assert [p["label"][0] for p in preds] == labels[:3]

    def fake_features(items):  # PaddleX's builder takes a predict function; give it our vectors
        return [{"feature": x[int(i)]} for i in items]

    theirs = FaissBuilder.build(
        [str(i) for i in range(200)], labels, fake_features, metric_type="IP", index_type="Flat"
    )
    theirs.save(str(tmp_path / "theirs"))
    loaded = load_index(tmp_path / "theirs")
    assert loaded.id_map == dict(enumerate(labels))
    assert loaded.search(x[:3], topk=1)[1][:, 0].tolist() == [0, 1, 2]
    assert isinstance(theirs, IndexData)


def test_reads_index_info_yaml_name(tmp_path, data):
    x, labels = data
    save_index(GalleryIndex.build(x, labels, index_type="Flat"), tmp_path / "i")
    (tmp_path / "i" / ID_MAP_FILE).rename(tmp_path / "i" / ALT_ID_MAP_FILE)
    assert len(load_index(tmp_path / "i")) == 200


def test_failed_save_leaves_previous_version(tmp_path, data, monkeypatch):
    import faiss

    x, labels = data
    save_index(GalleryIndex.build(x[:10], labels[:10], index_type="Flat"), tmp_path / "i")
    bigger = load_index(tmp_path / "i").add(x[10:20], labels[10:20])

    def broken(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError):
        save_index(bigger, tmp_path / "i")
    monkeypatch.undo()
    assert len(load_index(tmp_path / "i")) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["i"], "no temporary leftovers"


def test_recover_interrupted_swap_rolls_forward_to_the_complete_copy(tmp_path, data):
    import json

    x, labels = data
    save_index(GalleryIndex.build(x[:10], labels[:10], index_type="Flat"), tmp_path / "i")
    save_index(GalleryIndex.build(x[:12], labels[:12], index_type="Flat"), tmp_path / ".i.tmp-5678")  # the new copy
    (tmp_path / ".i.swap").write_text(json.dumps({"new": ".i.tmp-5678", "old": ".i.old-1234abcd"}))
    (tmp_path / "i").rename(tmp_path / ".i.old-1234abcd")  # crash between the two renames
    recover_dir(tmp_path / "i")
    assert len(load_index(tmp_path / "i")) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i"], "journal and old copy cleaned up"


def test_leftovers_without_a_journal_are_never_restored(tmp_path, data):
    """A deleted or renamed index must not come back from an old crash's leftovers."""
    x, labels = data
    save_index(GalleryIndex.build(x[:10], labels[:10], index_type="Flat"), tmp_path / ".i.old-1234abcd")
    save_index(GalleryIndex.build(x[:10], labels[:10], index_type="Flat"), tmp_path / ".i.tmp-99")
    recover_dir(tmp_path / "i")
    assert list(tmp_path.iterdir()) == [], "leftovers removed, nothing resurrected"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index_type": "LSH"}, "index_type"),
        ({"metric_type": "hamming"}, "metric_type"),
    ],
)
def test_bad_build_arguments(data, kwargs, message):
    x, labels = data
    with pytest.raises(ShiTuError, match=message):
        GalleryIndex.build(x, labels, **kwargs)


def test_dimension_mismatch_is_explained(data):
    x, labels = data
    idx = GalleryIndex.build(x, labels, index_type="Flat")
    with pytest.raises(ShiTuError, match="different recognition model"):
        idx.add(np.ones((1, 8), "float32"), ["x"])
    with pytest.raises(ShiTuError, match="different recognition model"):
        idx.search(np.ones((1, 8), "float32"))


@pytest.mark.parametrize("index_type", TYPES)
def test_whitened_index_round_trip(tmp_path, index_type):
    x, labels = clustered(300, dim=48, centers=30, spread=0.6, seed=8)
    idx = GalleryIndex.build(x, labels, index_type=index_type, whiten=True)
    assert idx.whitening is not None and idx.dim == 48 and idx.summary()["whitened"]
    assert idx.suggested_rec_threshold is not None
    assert idx.search(x[:10], topk=1)[1][:, 0].tolist() == list(range(10))
    extra = clustered(2, dim=48, centers=30, spread=0.6, seed=9)[0]
    grown = idx.add(extra, ["new a", "new b"]).remove([0, 1])
    assert grown.search(extra, topk=1)[1][:, 0].tolist() == [300, 301], "added raw features are whitened too"
    save_index(grown, tmp_path / "w")
    back = load_index(tmp_path / "w")
    assert back.whitening is not None and back.suggested_rec_threshold == idx.suggested_rec_threshold
    np.testing.assert_allclose(back.search(x, topk=3)[0], grown.search(x, topk=3)[0], atol=1e-5)
    assert (back.search(x, topk=3)[1] == grown.search(x, topk=3)[1]).all()


def test_whitening_needs_enough_images():
    x, labels = clustered(50, dim=48, seed=8)
    idx = GalleryIndex.build(x, labels, index_type="Flat", whiten=True)
    assert idx.whitening is None
    # still calibrated, leave-one-out on the raw features (the whitened threshold needs no whitening)
    assert idx.calibration is not None and idx.calibration.protocol == "leave-one-out"


def test_relabel_many_entries_at_once_keeps_vectors_and_ids():
    import numpy as np

    from shitu.index import GalleryIndex

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 16)).astype(np.float32)
    index = GalleryIndex.build(feats, [f"l{i % 5}" for i in range(50)], index_type="Flat")
    changed = index.relabel([3, 7, 8, 9], "  new  ")
    labels = {e.id: e.label for e in changed.entries}
    assert [labels[i] for i in (3, 7, 8, 9)] == ["new"] * 4 and labels[4] == "l4"
    assert {e.id: e.label for e in index.entries}[3] == "l3"  # the original is untouched
    assert np.array_equal(changed.vectors()[1], index.vectors()[1]) and changed.id_map.keys() == index.id_map.keys()
    assert {e.id: e.label for e in index.relabel(5, "one").entries}[5] == "one"
    with pytest.raises(ShiTuError):
        index.relabel([3, 999], "x")


def test_small_searches_run_on_one_faiss_thread_and_leave_the_setting_as_it_was(monkeypatch):
    """A query's few crops against a small gallery are searched by this thread alone (faiss's
    OpenMP team costs more than the search); the answers are the same either way, and neither
    this thread's setting nor another thread's is changed."""
    import threading

    import faiss
    import numpy as np

    import shitu.vectors
    from shitu.index import GalleryIndex

    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 64)).astype(np.float32)
    index = GalleryIndex.build(x, [str(i // 5) for i in range(500)], index_type="Flat", adapt="off")
    q = x[:3] + 0.05 * rng.standard_normal((3, 64)).astype(np.float32)
    seen: list[int] = []
    real_set = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (seen.append(n), real_set(n))[1])
    before = faiss.omp_get_max_threads()
    small = index.search(q, 5)
    assert seen == [1, before] and faiss.omp_get_max_threads() == before
    seen.clear()
    monkeypatch.setattr(shitu.vectors, "SMALL_SEARCH", 1)  # now every search counts as large
    large = index.search(q, 5)
    assert seen == []
    assert np.array_equal(small[1], large[1]) and np.allclose(small[0], large[0])

    other: list[int] = []
    worker = threading.Thread(target=lambda: other.append(faiss.omp_get_max_threads()))
    monkeypatch.setattr(shitu.vectors, "SMALL_SEARCH", 10**12)
    index.search(q, 5)
    worker.start()
    worker.join()
    assert other == [faiss.omp_get_max_threads()]
