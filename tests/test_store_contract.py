"""The gallery store contract (:class:`shitu.stores.base.GalleryStore`), checked on every backend.

One test class, parametrized over the backends: files in a directory, Milvus Lite (a local file),
and a Milvus server when ``SHITU_TEST_MILVUS_URI`` is set. A new vector store is one module under
``shitu/stores/`` plus one line in :data:`BACKENDS` here. Synthetic vectors (no model): answers
equal to an in-memory faiss index through every change, versions, restores, failed changes,
another process's view, moving galleries in and out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shitu.errors import Conflict, NotFound, ShiTuError
from shitu.index import GalleryIndex
from shitu.stores.base import GalleryStore
from shitu.stores.files import FileStore

DIM = 32


def open_files(tmp_path: Path) -> Callable[[], GalleryStore]:
    return lambda: FileStore(tmp_path / "indices", lock_dir=tmp_path / "locks", keep_versions=3)


def open_milvus(uri: str, prefix: str, tmp_path: Path) -> Callable[[], GalleryStore]:
    from shitu.stores.milvus import MilvusStore

    return lambda: MilvusStore(uri, prefix=prefix, lock_dir=tmp_path / "locks", keep_versions=3)


def open_milvus_lite(tmp_path: Path) -> Callable[[], GalleryStore]:
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (the Milvus store is optional)")
    return open_milvus(str(tmp_path / "m.db"), "shitu_", tmp_path)


def open_milvus_server(tmp_path: Path) -> Callable[[], GalleryStore]:
    uri = os.environ.get("SHITU_TEST_MILVUS_URI")
    if not uri:
        pytest.skip("set SHITU_TEST_MILVUS_URI to test a Milvus server")
    pytest.importorskip("pymilvus")
    return open_milvus(uri, f"c{os.urandom(4).hex()}_", tmp_path)  # a server may be shared with other runs


BACKENDS = [
    pytest.param(open_files, id="files"),
    pytest.param(open_milvus_lite, id="milvus-lite", marks=pytest.mark.milvus),
    pytest.param(open_milvus_server, id="milvus-server", marks=pytest.mark.milvus),
]


def clustered(n: int, seed: int = 0, groups: int = 30) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, DIM))
    which = np.arange(n) % groups
    x = (centres[which] + 0.6 * rng.normal(size=(n, DIM))).astype("float32")
    return x, [f"g{w}" for w in which]


def same_answers(a: GalleryIndex, b: GalleryIndex, queries: np.ndarray) -> None:
    sa, ia = a.search(queries, 5)
    sb, ib = b.search(queries, 5)
    assert (ia == ib).all()
    np.testing.assert_allclose(sa, sb, atol=1e-5)
    assert a.id_map == b.id_map and a.next_id == b.next_id


@pytest.fixture(params=BACKENDS)
def opener(request, tmp_path) -> Callable[[], GalleryStore]:
    """Opens the backend's store on this test's data; each call is another process's view of it."""
    return request.param(tmp_path)


@pytest.fixture
def store(opener):
    s = opener()
    yield s
    s.close()


class TestGalleryStoreContract:
    @pytest.mark.parametrize("adapt", ["off", "on"])
    def test_answers_match_an_in_memory_index_through_every_change(self, store, opener, adapt):
        x, labels = clustered(300)
        local = GalleryIndex.build(x, labels, index_type="Flat", adapt=adapt, sources=[f"s{i}" for i in range(300)])
        served = store.put("a", local)
        assert (served.whitening is not None) == (adapt == "on")
        q = clustered(40, seed=7)[0]
        same_answers(local, served, q)
        extra, extra_labels = clustered(4, seed=3)
        changes = (
            lambda i: i.add(extra, extra_labels, sources=["n1", "n2", "n3", "n4"],
                            thumbnails=[b"\xff\xd8a", None, None, None]),
            lambda i: i.remove([0, 5, 301]),
            lambda i: i.relabel([1, 2], "moved"),
        )  # fmt: skip
        for change in changes:
            local = change(local)
            served = store.mutate("a", change)
            same_answers(local, served, q)
        assert served.entry(300) == local.entry(300)  # source and thumbnail kept with the entry
        again = opener()  # another process: rows, labels and state as committed
        try:
            same_answers(local, again.get("a"), q)
            refit = again.mutate("a", lambda i: i.recalibrated(adapt))
            assert refit.calibration is not None and len(refit) == len(local)
        finally:
            again.close()

    def test_every_commit_is_a_version_that_can_be_compared_and_restored(self, store):
        x, labels = clustered(40)
        store.put("a", GalleryIndex.build(x, labels, index_type="Flat"))  # v1
        store.mutate("a", lambda i: i.add(clustered(2, seed=1)[0], ["new", "new"]))  # v2: ids 40, 41
        store.mutate("a", lambda i: i.remove([3, 40]))  # v3
        v3 = store.get("a").id_map
        store.mutate("a", lambda i: i.relabel([7], "renamed"))  # v4
        listed = store.versions("a")
        assert [v["version"] for v in listed] == [4, 3, 2, 1] and listed[0]["current"]
        assert [v["action"] for v in listed] == ["relabel 1", "remove 2", "add 2", "build"]
        assert [v["entries"] for v in listed] == [40, 40, 42, 40]
        diff = store.changes("a", 3)
        assert (diff["added_count"], diff["removed_count"], diff["relabelled_count"]) == (0, 2, 0)
        assert diff["removed"] == [{"id": 3, "label": labels[3]}, {"id": 40, "label": "new"}]
        assert store.changes("a", 4)["relabelled"] == [{"id": 7, "from": labels[7], "to": "renamed"}]
        assert store.changes("a", "v2", against=0)["added_count"] == 42
        restored, record = store.restore("a", 3)
        assert restored.id_map == v3 and record["version"] == 5 and record["restored_from"] == 3
        assert store.versions("a")[0]["action"] == "restore v3"
        after = store.mutate("a", lambda i: i.add(clustered(1, seed=2)[0], ["later"]))
        assert after.label(42) == "later" and 40 not in after and 41 in after, "ids are never reused"
        undone, _ = store.restore("a", 4)  # the restore is itself a version: undone the same way
        assert undone.label(7) == "renamed" and undone.next_id == 43
        with pytest.raises(ShiTuError, match="already the current version"):
            store.restore("a", 7)
        with pytest.raises(NotFound, match="no version 9"):
            store.changes("a", 9)
        with pytest.raises(ShiTuError, match="version number"):
            store.restore("a", "latest")

    def test_only_the_last_versions_are_kept_and_the_message_says_which(self, store):
        x, labels = clustered(20)
        store.put("a", GalleryIndex.build(x, labels, index_type="Flat"))
        for k in range(5):
            store.mutate("a", lambda i, k=k: i.relabel([k], f"r{k}"))  # v2..v6
        kept = [v["version"] for v in store.versions("a")]
        assert kept == [6, 5, 4, 3]  # keep_versions=3: the current one and three before it
        with pytest.raises(NotFound, match=r"no longer kept: it keeps versions 3–6 \(at most 3 earlier ones\)"):
            store.restore("a", 2)

    def test_a_change_that_raises_changes_nothing(self, store, opener):
        x, labels = clustered(30)
        store.put("a", GalleryIndex.build(x, labels, index_type="Flat"))
        before = store.get("a")

        def broken(index: GalleryIndex) -> GalleryIndex:
            index.add(clustered(1, seed=4)[0], ["half"])
            raise RuntimeError("failed half-way")

        with pytest.raises(RuntimeError):
            store.mutate("a", broken)
        with pytest.raises(NotFound):
            store.mutate("a", lambda i: i.remove([999]))
        assert store.get("a").id_map == before.id_map and len(store.versions("a")) == 1
        fresh = opener()
        try:
            assert fresh.get("a").id_map == before.id_map and fresh.get("a").next_id == 30
        finally:
            fresh.close()

    def test_another_process_sees_every_commit_and_ids_stay_unique(self, store, opener):
        x, labels = clustered(30)
        store.put("shop", GalleryIndex.build(x, labels, index_type="HNSW32"))
        other = opener()
        try:
            assert other.names() == ["shop"] and len(other.get("shop")) == 30
            new = clustered(2, seed=5)[0]
            store.mutate("shop", lambda i: i.add(new, ["fresh", "fresh"]))
            seen = _latest(other, "shop", lambda g: 30 in g)
            assert seen.label(30) == "fresh" and seen.next_id == 32
            assert seen.search(new[:1], 1)[1][0, 0] == 30
            other.mutate("shop", lambda i: i.remove([30]))
            other.mutate("shop", lambda i: i.add(new[:1], ["again"]))  # id 32: 30 stays retired
            mine = _latest(store, "shop", lambda g: 32 in g)
            assert 30 not in mine and mine.label(32) == "again" and mine.next_id == 33
            assert [v["action"] for v in store.versions("shop")][:3] == ["add 1", "remove 1", "add 2"]
        finally:
            other.close()

    def test_threshold_picks_and_refits_are_versions(self, store):
        x, labels = clustered(200)
        store.put("a", GalleryIndex.build(x, labels, index_type="Flat", adapt="on"))
        picked = store.mutate("a", lambda i: i.with_threshold(0.5), action="threshold 0.500")
        assert picked.calibration.chosen_by == "user" and picked.suggested_rec_threshold == 0.5
        refit = store.mutate("a", lambda i: i.recalibrated("off"), action="calibrate (adapt off)")
        assert refit.whitening is None and refit.calibration is not None
        assert [v["action"] for v in store.versions("a")][:2] == ["calibrate (adapt off)", "threshold 0.500"]
        back, _ = store.restore("a", 2)
        assert back.whitening is not None and back.suggested_rec_threshold == 0.5

    def test_names_rename_delete_and_conflicts(self, store):
        x, labels = clustered(10)
        store.put("one", GalleryIndex.build(x, labels, index_type="Flat"))
        store.put("two", GalleryIndex.build(x[:5], labels[:5], index_type="Flat"))
        assert store.names() == ["one", "two"] and store.exists("one")
        with pytest.raises(Conflict):
            store.put("one", GalleryIndex.build(x, labels, index_type="Flat"), overwrite=False)
        with pytest.raises(Conflict):
            store.rename("one", "two")
        store.rename("one", "three")
        assert store.names() == ["three", "two"] and store.get("three").id_map == dict(enumerate(labels))
        store.delete("two")
        assert store.names() == ["three"] and not store.exists("two")
        with pytest.raises(NotFound, match="no index named 'two'"):
            store.get("two")
        with pytest.raises(ShiTuError, match="invalid index name"):
            store.get("../etc")

    def test_a_zip_export_imports_into_any_store_as_the_same_gallery(self, store, tmp_path):
        x, labels = clustered(120)
        store.put("a", GalleryIndex.build(x, labels, index_type="Flat", adapt="on",
                                          sources=[f"photo{i}.jpg" for i in range(120)]))  # fmt: skip
        store.mutate("a", lambda i: i.remove([4]))
        data = store.export_zip("a")
        files = FileStore(tmp_path / "elsewhere", keep_versions=0)
        imported = files.import_zip("b", data)
        back = store.import_zip("c", files.export_zip("b"))
        q = clustered(20, seed=8)[0]
        same_answers(store.get("a"), imported, q)
        same_answers(store.get("a"), back, q)
        assert back.entry(7).source == "photo7.jpg" and back.whitening is not None
        assert store.versions("c")[0]["action"] == "import"
        with pytest.raises(ShiTuError, match="not a readable .zip"):
            store.import_zip("d", b"not a zip")
        assert "d" not in store.names()

    def test_a_restore_reaches_back_across_rebuilds_while_versions_are_kept(self, store):
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
        for _ in range(4):  # keep_versions=3: the first build falls out of the kept window
            store.mutate("a", lambda i: i.relabel([0], "z"))
        with pytest.raises(NotFound, match="no longer kept"):
            store.restore("a", 2)


def _latest(store: GalleryStore, name: str, shows: Callable[[GalleryIndex], bool]) -> GalleryIndex:
    """The gallery as ``store`` sees it once another process's commit ``shows`` (a Milvus replica
    checks for newer versions at most every second)."""
    from .conftest import wait_until

    return wait_until(lambda: (lambda g: g if shows(g) else None)(store.get(name)), "the commit", limit=30)
