"""Moving an index to Milvus (Milvus Lite, a local file) and back: nothing a user relies on changes.

Real stack: faiss indices in a real store, Milvus Lite through pymilvus, the CLI's commands.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (requirements-dev.txt)")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (requirements-dev.txt)")
pytestmark = pytest.mark.milvus  # the optional Milvus store: runs with --full

from shitu.__main__ import main  # noqa: E402
from shitu.errors import ShiTuError  # noqa: E402
from shitu.index import GalleryIndex  # noqa: E402
from shitu.stores.files import FileStore as IndexStore  # noqa: E402
from shitu.stores.milvus_collections import MilvusCollections  # noqa: E402
from shitu.transfer import from_milvus, to_milvus  # noqa: E402

DIM = 24


def gallery(n: int = 120, labels: int = 12, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels, DIM))
    which = np.arange(n) % labels
    x = (centres[which] + 0.7 * rng.normal(size=(n, DIM))).astype("float32")
    return x, [f"商品{w}" for w in which]


def stored_index(tmp_path, adapt: str) -> GalleryIndex:
    """Built, then changed: removals leave gaps in the ids, one threshold picked by hand."""
    x, labels = gallery()
    store = IndexStore(tmp_path / "data" / "indices")  # the data dir's store, as the engine and the CLI see it
    store.put("shop", GalleryIndex.build(x, labels, index_type="Flat", adapt=adapt, feature_model="m1",
                                         sources=[f"g/{i}.jpg" for i in range(len(x))],
                                         thumbnails=[b"\xff\xd8" + bytes([i]) for i in range(len(x))]))  # fmt: skip
    store.mutate("shop", lambda i: i.remove([3, 4, 50]))
    store.mutate("shop", lambda i: i.add(x[:2] + 0.05, ["new", "new"], sources=["n/0.jpg", "n/1.jpg"]))
    store.mutate("shop", lambda i: i.remove([120]))  # the newest id goes: it is still never handed out again
    if store.get("shop").calibration is not None:
        store.mutate("shop", lambda i: i.with_threshold(0.42))
    return store.get("shop")


@pytest.mark.parametrize("adapt", ["off", "on"])
def test_an_index_moves_to_milvus_and_back_unchanged(tmp_path, adapt):
    index = stored_index(tmp_path, adapt)
    assert (index.whitening is not None) == (adapt == "on")
    with MilvusCollections(str(tmp_path / "m.db")) as milvus:
        assert to_milvus(index, milvus, "shop") == len(index) == 118
        # Milvus holds the unprojected vectors: any client searches them with the model's own features
        x, _ = gallery()
        m_scores, m_ids = milvus.search("shop", x[10:20] / np.linalg.norm(x[10:20], axis=1, keepdims=True), 1)
        assert m_ids[:, 0].tolist() == list(range(10, 20)) and np.allclose(m_scores[:, 0], 1, atol=1e-3)  # (float16)
        back = from_milvus(milvus, "shop")
    assert back.id_map == index.id_map and back.next_id == index.next_id == 122
    assert (back.index_type, back.metric_type, back.feature_model) == ("Flat", "IP", "m1")
    assert back.entry(7).source == "g/7.jpg" and back.entry(7).thumbnail == b"\xff\xd8\x07"
    assert back.entry(121).source == "n/1.jpg" and back.entry(121).thumbnail is None
    q = gallery(seed=5)[0][:30]
    # an adapted index comes back refitted on its current entries: as the source refitted would be
    source = index.recalibrated() if adapt == "on" else index
    s1, i1 = source.search(q, topk=5)
    s2, i2 = back.search(q, topk=5)
    assert np.array_equal(i1[:, 0], i2[:, 0]) and np.allclose(s1[:, 0], s2[:, 0], atol=1e-3)
    assert np.mean(i1 == i2) >= 0.95
    assert back.suggested_rec_threshold == index.suggested_rec_threshold == 0.42
    assert back.calibration.chosen_by == "user" and (back.adaptation.mode if back.adaptation else "off") == adapt


def test_the_cli_exports_and_imports_through_a_milvus_lite_file(tmp_path, capsys):
    stored_index(tmp_path, "off")
    data, uri = tmp_path / "data", str(tmp_path / "cli.db")
    assert main(["--data-dir", str(data), "milvus-export", "--index", "shop", "--uri", uri]) == 0
    assert "118 entries" in capsys.readouterr().out
    # never overwritten unless asked
    assert main(["--data-dir", str(data), "milvus-export", "--index", "shop", "--uri", uri]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--data-dir", str(data), "milvus-import", "--index", "copy", "--source", "shop", "--uri", uri]) == 0
    assert "118 entries" in capsys.readouterr().out
    store = IndexStore(data / "indices")
    assert store.get("copy").id_map == store.get("shop").id_map
    assert store.versions("copy")[0]["action"] == "import"
    assert main(["--data-dir", str(data), "milvus-import", "--index", "copy", "--source", "shop", "--uri", uri]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_whitened_index_is_refused_and_nothing_is_left_in_milvus(tmp_path):
    x, labels = gallery(n=240, labels=12)
    index = GalleryIndex.build(x, labels, index_type="Flat", whiten=True)
    with MilvusCollections(str(tmp_path / "m.db")) as milvus:
        with pytest.raises(ShiTuError, match="PCA-whitened"):
            to_milvus(index, milvus, "w")
        assert not milvus.exists("w")


def test_an_exported_index_is_served_by_switching_the_vector_store(tmp_path, capsys, monkeypatch):
    """The move to Milvus in two steps: `shitu milvus-export`, then SHITU_VECTOR_STORE=milvus."""
    from shitu.config import Settings
    from shitu.engine import Engine

    stored_index(tmp_path, "on")
    data = tmp_path / "data"
    files = IndexStore(data / "indices").get("shop")
    assert main(["--data-dir", str(data), "milvus-export", "--index", "shop"]) == 0  # <data>/milvus.db
    capsys.readouterr()
    engine = Engine(Settings.from_env(data_dir=data, offline=True, vector_store="milvus"))
    try:
        assert engine.vector_store == "milvus_lite" and engine.index_names() == ["shop"]
        served = engine.index("shop")
        assert served.id_map == files.id_map and served.next_id == files.next_id
        assert served.entry(7).source == "g/7.jpg" and served.entry(7).thumbnail == b"\xff\xd8\x07"
        q = gallery(seed=5)[0][:20]
        assert np.array_equal(served.search(q, 1)[1], files.recalibrated().search(q, 1)[1])  # refitted once
        assert engine.versions("shop")[0].action == "adopt (milvus-export)"
    finally:
        engine.close()
