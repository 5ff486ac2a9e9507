"""The change log: commits that cost O(change), survive a kill, and fold back into PaddleX's layout.

Everything runs through the real store (faiss, SQLite, files on disk); no model is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from shitu import changelog
from shitu.changelog import LOG_FILE
from shitu.entrymeta import ENTRIES_FILE
from shitu.index import GalleryIndex
from shitu.stores.files import COMPACT_MIN_CHANGES
from shitu.stores.files import FileStore as IndexStore
from shitu.stores.layout import ID_MAP_FILE, VECTOR_FILE, VERSION_FILE, load_index

REPO = Path(__file__).resolve().parents[1]
DIM = 32


def clustered(n: int, seed: int = 0, groups: int = 40) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, DIM))
    which = rng.integers(0, groups, size=n)
    x = (centres[which] + 0.6 * rng.normal(size=(n, DIM))).astype("float32")
    return x, [f"g{w}" for w in which]


def queries(n: int, seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype("float32")


def exact_top1(index: GalleryIndex, q: np.ndarray) -> np.ndarray:
    ids, vecs = index.vectors()
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return ids[np.argmax(qn @ vecs.T, axis=1)]


def churn(store: IndexStore, name: str, rounds: int, seed: int = 1) -> None:
    """Adds (with sources and thumbnails), removals of old and new ids, relabels."""
    rng = np.random.default_rng(seed)
    for k in range(rounds):
        x, labels = clustered(3, seed=100 + k)
        store.mutate(name, lambda i, x=x, labels=labels, k=k: i.add(
            x, labels, sources=[f"new/{k}-{j}.jpg" for j in range(3)], thumbnails=[b"\xff\xd8jpeg%d" % k, None, b"t"]))
        index = store.get(name)
        victims = rng.choice(index.ids, size=2, replace=False).tolist()
        store.mutate(name, lambda i, v=victims: i.remove(v))
        store.mutate(name, lambda i, k=k: i.relabel([int(i.ids[k % len(i)])], f"re{k}"))


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32", "IVF"])
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_changes_are_logged_and_compaction_changes_no_answer(tmp_path, index_type):
    x, labels = clustered(600)
    store = IndexStore(tmp_path, compact_in_background=False)
    store.put("g", GalleryIndex.build(x, labels, index_type=index_type, sources=[f"s{i}" for i in range(600)]))
    vector_file = (tmp_path / "g" / VECTOR_FILE).stat()
    churn(store, "g", 8)
    # nothing but the log and the entries file changed: the full save is untouched
    assert (tmp_path / "g" / VECTOR_FILE).stat().st_ino == vector_file.st_ino
    assert changelog.size(tmp_path / "g" / LOG_FILE) > 0
    before = store.get("g")
    assert before.pending_changes > 0 and len(before) == 600 + 24 - 16
    q = np.concatenate([x[40:120] + 0.3 * queries(80), x[:40]])  # new photos of gallery products, and gallery photos
    s_before, i_before = before.search(q, topk=5)
    fresh = IndexStore(tmp_path).get("g")  # another process: full save + replayed log
    s_fresh, i_fresh = fresh.search(q, topk=5)
    assert np.array_equal(i_fresh, i_before) and np.allclose(s_fresh, s_before, atol=1e-6)
    assert fresh.id_map == before.id_map and fresh.next_id == before.next_id

    assert store.compact("g")
    after = store.get("g")
    assert after.pending_changes == 0 and not (tmp_path / "g" / LOG_FILE).exists()
    assert after.id_map == before.id_map and after.next_id == before.next_id
    s_after, i_after = after.search(q, topk=5)
    if index_type == "Flat":  # exact search: the very same answers
        assert np.array_equal(i_after, i_before) and np.allclose(s_after, s_before, atol=1e-5)
    else:  # approximate search: both agree with exact search as calibrated
        truth = exact_top1(before, q)
        assert np.mean(i_before[:, 0] == truth) >= 0.97 and np.mean(i_after[:, 0] == truth) >= 0.97
    # PaddleX's layout again: its files alone hold the current index
    info = yaml.safe_load((tmp_path / "g" / ID_MAP_FILE).read_text(encoding="utf-8"))
    assert {int(k): v for k, v in info["id_map"].items()} == before.id_map
    import faiss

    assert faiss.read_index(str(tmp_path / "g" / VECTOR_FILE)).ntotal == len(before)
    # sources and thumbnails of added entries survived both
    newest = int(after.ids[-3])
    assert after.entry(newest).source.startswith("new/") and after.entry(newest).thumbnail.startswith(b"\xff\xd8")
    assert after.entry(0).source == "s0" or 0 not in after


def test_versions_live_in_the_log_and_can_be_restored(tmp_path):
    x, labels = clustered(50)
    store = IndexStore(tmp_path, compact_in_background=False)
    store.put("g", GalleryIndex.build(x, labels, index_type="Flat"))
    store.mutate("g", lambda i: i.add(x[:2], ["p", "q"]))
    store.mutate("g", lambda i: i.remove([0, 1]))
    store.mutate("g", lambda i: i.relabel([5], "r"))
    maps = {v: load_index(tmp_path / "g", until_version=v).id_map for v in (1, 2, 3, 4)}
    assert [(v["version"], v["action"]) for v in store.versions("g")] == [
        (4, "relabel 1"), (3, "remove 2"), (2, "add 2"), (1, "build")]  # fmt: skip
    assert store.changes("g", 3)["removed"] == [{"id": 0, "label": labels[0]}, {"id": 1, "label": labels[1]}]
    assert store.compact("g")  # the log moves into the history with its versions
    assert [v["version"] for v in store.versions("g")] == [4, 3, 2, 1]
    index, record = store.restore("g", 2)
    assert index.id_map == maps[2] and record["action"] == "restore v2" and index.next_id == 52
    assert store.changes("g", 5, against=4)["added_count"] == 2
    store.restore("g", 4)
    assert IndexStore(tmp_path).get("g").id_map == maps[4]


def test_a_torn_record_is_ignored_and_cut_off_by_the_next_writer(tmp_path):
    x, labels = clustered(30)
    store = IndexStore(tmp_path)
    store.put("g", GalleryIndex.build(x, labels, index_type="Flat"))
    store.mutate("g", lambda i: i.relabel([1], "kept"))
    good = store.get("g").id_map
    log_path = tmp_path / "g" / LOG_FILE
    size = changelog.size(log_path)
    torn = changelog.encode({"version": 3, "changes": [{"op": "relabel", "label": "lost", "arrays": {"ids": 0}}]},
                            [np.array([2], dtype=np.int64)])  # fmt: skip
    with open(log_path, "ab") as fh:
        fh.write(torn[: len(torn) // 2])  # a writer killed mid-append
    reader = IndexStore(tmp_path)
    assert reader.get("g").id_map == good
    reader.mutate("g", lambda i: i.relabel([3], "after"))
    assert changelog.size(log_path) > size and changelog.valid_length(log_path) == changelog.size(log_path)
    assert IndexStore(tmp_path).get("g").id_map == {**good, 3: "after"}
    # a damaged byte in a record: that record and everything after it are not applied
    data = bytearray(log_path.read_bytes())
    data[size + 20] ^= 0xFF
    log_path.write_bytes(bytes(data))
    assert IndexStore(tmp_path).get("g").id_map == good


def test_a_reader_in_another_process_applies_only_the_new_records(tmp_path):
    x, labels = clustered(40)
    writer = IndexStore(tmp_path)
    writer.put("g", GalleryIndex.build(x, labels, index_type="HNSW32"))
    reader = IndexStore(tmp_path)
    first = reader.get("g")
    writer.mutate("g", lambda i: i.add(x[:1] * 2, ["twin"]))
    second = reader.get("g")
    assert second is not first and second.id_map[40] == "twin"
    assert second.base is first.base  # the full save was not read again
    assert reader.get("g") is second


def test_background_compaction_keeps_every_commit_made_meanwhile(tmp_path):
    x, labels = clustered(200)
    store = IndexStore(tmp_path)
    store.put("g", GalleryIndex.build(x, labels, index_type="Flat"))
    extra, extra_labels = clustered(COMPACT_MIN_CHANGES + 20, seed=5)
    for k in range(0, COMPACT_MIN_CHANGES, 250):
        store.mutate("g", lambda i, k=k: i.add(extra[k : k + 250], extra_labels[k : k + 250]))
    # the last add made the log due: a compaction runs while these commits go on
    for k in range(COMPACT_MIN_CHANGES, COMPACT_MIN_CHANGES + 20):
        store.mutate("g", lambda i, k=k: i.add(extra[k : k + 1], [f"late{k}"]))
    store.wait_for_compactions(60)
    expected = store.get("g").id_map
    assert len(expected) == 200 + COMPACT_MIN_CHANGES + 20
    fresh = IndexStore(tmp_path).get("g")
    assert fresh.id_map == expected
    assert changelog.size(tmp_path / "g" / LOG_FILE) < 200_000  # what was committed after the compaction began
    assert json.loads((tmp_path / "g" / VERSION_FILE).read_text())["compacted"] is True


KILLED_WRITER = r"""
import sys
import numpy as np
from shitu.stores.files import FileStore as IndexStore
store = IndexStore(sys.argv[1])
rng = np.random.default_rng()
print("ready", flush=True)
n = 0
while True:
    n += 1
    store.mutate("g", lambda i: i.add(rng.normal(size=(1, 32)).astype("float32"), [f"{sys.argv[2]}-{n}"],
                                      thumbnails=[b"x" * 3000]))
    print(n, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_append_loses_only_unacknowledged_changes(tmp_path):
    x, labels = clustered(100)
    IndexStore(tmp_path).put("g", GalleryIndex.build(x, labels, index_type="Flat"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path), f"r{round_}"], env=env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3 + 0.2 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].split()
        acknowledged = int(out[-1]) if out else 0
        index = IndexStore(tmp_path).get("g")
        added = {label for label in index.id_map.values() if label.startswith(f"r{round_}-")}
        # every acknowledged add of this round is there (one more may have committed unprinted)
        assert {f"r{round_}-{n}" for n in range(1, acknowledged + 1)} <= added
        assert len(added) <= acknowledged + 1
        assert index.index.ntotal == len(index)
        assert all(index.entry(i).thumbnail == b"x" * 3000 for i in index.ids[-3:].tolist() if i >= 100)
    assert (tmp_path / "g" / ENTRIES_FILE).exists()


def test_the_id_map_file_reads_back_as_the_labels_whatever_they_hold():
    """id_map.yaml is written directly (PyYAML takes ~10 s at 1M entries): PaddleX's YAML reader
    must read every label back as the same text."""
    import random

    from shitu.labels import LabelTable
    from shitu.stores.layout import id_map_yaml

    tricky = ["猫", "脉动", "yes", "No", "null", "~", "123", "1.5", "2024-01-01", "a: b", "a #b", " lead", "trail ",
              "-x", "?q", "[x]", "{y}", "!t", "&a", "*b", "'q'", '"d"', "a\nb", "t\tx", "Coca-Cola 330ml", "x/y (z)",
              "\u2028", "\x7f", "\x85", "#h", "%p", "@a", "`b", "a,b", "k:v", "<<", "=", ".inf", "NaN", "on", "y",
              "TRUE", "e\u0301", "a  b", "|", ">", "a\\b", "😀 emoji", "\ufeffbom", "\ud800"]  # fmt: skip
    rng = random.Random(0)
    alphabet = "ab猫 :#-'\"\\\n\t{}[],&*!|>%@`?.0123456789yYnN\u2028\x85😀"
    tricky += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(3000)]
    labels = LabelTable.of(list(range(len(tricky))), tricky)
    back = yaml.safe_load(id_map_yaml(labels, "HNSW32", "L2").decode("utf-8", "surrogatepass"))
    assert {int(k): str(v) for k, v in back["id_map"].items()} == dict(enumerate(tricky))
    assert (back["index_type"], back["metric_type"]) == ("HNSW32", "L2")
    assert yaml.safe_load(id_map_yaml(LabelTable.of([], []), "Flat", "IP").decode())["id_map"] == {}


def test_an_adapted_index_reloaded_from_its_log_keeps_each_entrys_own_raw_features(tmp_path):
    """Two logged adds, then a reload: every id must come back with the unprojected feature it
    was added with (the second add's record once carried the first add's features too, and a
    refit after a reload then paired ids with the wrong features)."""
    x, labels = clustered(400, seed=3)
    built = GalleryIndex.build(x, labels, index_type="Flat", adapt="on")
    assert built.whitening is not None and built.raw_chunks is not None
    store = IndexStore(tmp_path / "d", compact_in_background=False)
    store.put("a", built)
    first, second = clustered(2, seed=4)[0], clustered(3, seed=5)[0]
    store.mutate("a", lambda i: i.add(first, ["g1", "g2"]))
    store.mutate("a", lambda i: i.add(second, ["g3", "g4", "g5"]))
    reloaded = IndexStore(tmp_path / "d", compact_in_background=False).get("a")
    added = np.arange(400, 405)
    expected = np.concatenate([first, second])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(reloaded.raw_features(added), expected, atol=2e-3)  # float16 storage
    assert sum(len(ids) for ids, _ in reloaded.raw_chunks) == sum(len(f) for _, f in reloaded.raw_chunks) == 405
