"""Index versions (shitu/store.py history, shitu/fsutil.py swaps, Engine/API/CLI surfaces).

Every committed change is a version; earlier ones are kept (bounded), compared by their id maps
and restored as a new version. The store tests use small synthetic vectors through the real
:class:`IndexStore` / :class:`GalleryIndex` and real files; crashes are real subprocesses that die
at a chosen point of a save or are SIGKILLed at random moments. One test goes through the real
engine (starter models), the HTTP API and recognition.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from shitu.__main__ import main
from shitu.access import AccessPolicy
from shitu.api import create_api
from shitu.config import Settings, SettingsError
from shitu.engine import Engine
from shitu.errors import Conflict, NotFound, ShiTuError
from shitu.index import GalleryIndex
from shitu.stores.files import HISTORY_DIR
from shitu.stores.files import FileStore as IndexStore
from shitu.stores.layout import VECTOR_FILE, VERSION_FILE, load_index, save_index

from .conftest import CRASH_AT_NTH_CALL

REPO = Path(__file__).resolve().parents[1]
DIM = 16

# --- helpers ---------------------------------------------------------------------------------


def vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype("float32")


def store_with_history(root: Path, keep: int = 10, *, log: bool = False) -> IndexStore:
    """Index "a": v1 build (ids 0-5), v2 add 3 (6-8), v3 remove 2 (1, 2), v4 relabel 1 (0); each
    a full save (one copy per version), or with ``log`` records of the change log."""
    store = IndexStore(root, keep_versions=keep, log_changes=log)
    store.put("a", GalleryIndex.build(vectors(6, 0), ["cat", "cat", "dog", "dog", "cup", "cup"], index_type="Flat"))
    store.mutate("a", lambda i: i.add(vectors(3, 1), ["pen", "pen", "cat"]))
    store.mutate("a", lambda i: i.remove([1, 2]))
    store.mutate("a", lambda i: i.relabel([0], "tabby"))
    return store


V1 = {0: "cat", 1: "cat", 2: "dog", 3: "dog", 4: "cup", 5: "cup"}
V2 = {**V1, 6: "pen", 7: "pen", 8: "cat"}
V3 = {i: lab for i, lab in V2.items() if i not in (1, 2)}
V4 = {**V3, 0: "tabby"}


def history_dirs(root: Path, name: str) -> list[str]:
    """What is on disk under the history of ``name`` (hidden leftovers included)."""
    path = root / HISTORY_DIR / name
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def hidden_leftovers(root: Path, name: str) -> list[str]:
    """Temporary copies, journals and trash of ``name`` beside the indices and in its history."""
    found = [p.name for p in root.iterdir() if p.name.startswith((f".{name}.", f"..{name}."))]
    found += [p.name for p in (root / HISTORY_DIR).glob(f".{name}.*")] if (root / HISTORY_DIR).exists() else []
    found += [n for n in history_dirs(root, name) if n.startswith(".")]
    return sorted(found)


def assert_history_whole(root: Path, name: str, keep: int = 10) -> dict[int, dict[int, str]]:
    """The current version and every kept one load whole; numbers match their records and
    only go down. Returns number → id map."""
    store = IndexStore(root, keep_versions=keep)  # a fresh process's view
    listed = store.versions(name)
    numbers = [v["version"] for v in listed]
    assert numbers == sorted(numbers, reverse=True) and len(set(numbers)) == len(numbers), numbers
    assert [v["current"] for v in listed] == [True] + [False] * (len(listed) - 1)
    maps = {}
    catalog = store._catalog(name)
    for v in listed:
        # a version is a full save (its version file says which) plus the logged changes up to it
        path = catalog.where[v["version"]]
        assert path == root / name if v["current"] else path in (root / name, root / HISTORY_DIR / name / path.name)
        assert json.loads((path / VERSION_FILE).read_text())["version"] <= v["version"]
        index = load_index(path, until_version=v["version"])
        assert index.index.ntotal == len(index.id_map) == v["entries"], (v, len(index.id_map))
        maps[v["version"]] = index.id_map
    assert maps[numbers[0]] == store.get(name).id_map
    return maps


# --- 1. versions, actions, changes -----------------------------------------------------------


def test_every_change_is_a_version_with_its_action(tmp_path):
    store = store_with_history(tmp_path)
    listed = store.versions("a")
    assert [(v["version"], v["current"], v["action"], v["entries"], v["labels"]) for v in listed] == [
        (4, True, "relabel 1", 7, 5),
        (3, False, "remove 2", 7, 4),
        (2, False, "add 3", 9, 4),
        (1, False, "build", 6, 3),
    ]
    assert all(v["index_type"] == "Flat" and v["metric_type"] == "IP" and v["time"].endswith("Z") for v in listed)
    # each version's files are that version, loadable as an index
    assert assert_history_whole(tmp_path, "a") == {4: V4, 3: V3, 2: V2, 1: V1}
    assert history_dirs(tmp_path, "a") == ["1", "2", "3"]
    # a change that does several things at once says so
    store.mutate("a", lambda i: i.add(vectors(1, 2), ["hat"]).remove([3]))
    assert store.versions("a")[0]["action"] == "add 1, remove 1"


def test_changes_list_added_removed_and_relabelled_ids(tmp_path):
    store = store_with_history(tmp_path)
    c2 = store.changes("a", 2)
    assert (c2["against"], c2["action"], c2["entries_before"], c2["entries_after"]) == (1, "add 3", 6, 9)
    assert c2["added"] == [{"id": 6, "label": "pen"}, {"id": 7, "label": "pen"}, {"id": 8, "label": "cat"}]
    assert (c2["removed"], c2["relabelled"], c2["added_count"]) == ([], [], 3)
    c3 = store.changes("a", "v3")
    assert c3["removed"] == [{"id": 1, "label": "cat"}, {"id": 2, "label": "dog"}] and c3["added"] == []
    c4 = store.changes("a", 4)
    assert c4["relabelled"] == [{"id": 0, "from": "cat", "to": "tabby"}] and c4["relabelled_count"] == 1
    # the first version against nothing: everything was added
    c1 = store.changes("a", 1)
    assert c1["against"] == 0 and c1["added_count"] == 6 and c1["action"] == "build"
    # any pair, either way round: what restoring v1 onto v4 would do
    preview = store.changes("a", 1, against=4)
    assert preview["added"] == [{"id": 1, "label": "cat"}, {"id": 2, "label": "dog"}]
    assert [e["id"] for e in preview["removed"]] == [6, 7, 8]
    assert preview["relabelled"] == [{"id": 0, "from": "tabby", "to": "cat"}]
    # counts are complete, lists are capped
    capped = store.changes("a", 2, limit=1)
    assert capped["added_count"] == 3 and capped["added"] == [{"id": 6, "label": "pen"}]


def test_unknown_versions_and_bad_numbers_are_refused(tmp_path):
    store = store_with_history(tmp_path)
    before = history_dirs(tmp_path, "a"), store.get("a").id_map
    with pytest.raises(NotFound, match="has no version 9: the current one is 4"):
        store.changes("a", 9)
    with pytest.raises(NotFound, match="has no version 9"):
        store.restore("a", 9)
    with pytest.raises(NotFound, match="no index named 'b'"):
        store.versions("b")
    for bad in (0, -1, "x", True, "3.5"):
        with pytest.raises(ShiTuError, match="version number"):
            store.restore("a", bad)
    with pytest.raises(ShiTuError, match="already the current version"):
        store.restore("a", 4)
    assert (history_dirs(tmp_path, "a"), store.get("a").id_map) == before


# --- 2. restore ------------------------------------------------------------------------------


def test_restore_brings_back_the_exact_index_as_a_new_version(tmp_path):
    store = store_with_history(tmp_path)
    queries = np.concatenate([vectors(6, 0), vectors(3, 1), vectors(4, 9)])
    v2 = load_index(tmp_path / HISTORY_DIR / "a" / "2")
    expected_scores, expected_ids = v2.search(queries, topk=4)
    other_process = IndexStore(tmp_path)
    assert other_process.get("a").id_map == V4  # cached there

    index, record = store.restore("a", 2)
    assert index.id_map == V2 and (record["version"], record["action"]) == (5, "restore v2")
    for reader in (store, other_process, IndexStore(tmp_path)):  # this one, one with a stale cache, a fresh one
        current = reader.get("a")
        assert current.id_map == V2
        scores, ids = current.search(queries, topk=4)
        assert np.array_equal(ids, expected_ids) and np.allclose(scores, expected_scores)
    assert [(v["version"], v["action"]) for v in store.versions("a")] == [
        (5, "restore v2"), (4, "relabel 1"), (3, "remove 2"), (2, "add 3"), (1, "build"),
    ]  # fmt: skip
    changed = store.changes("a", 5)
    assert (changed["against"], changed["added_count"], changed["relabelled"]) == (4, 2, [{"id": 0, "from": "tabby",
                                                                                           "to": "cat"}])  # fmt: skip
    # ids handed out after v2 (none here) and since: never reused; the restore is undone the same way
    assert store.mutate("a", lambda i: i.add(vectors(1, 5), ["new"])).id_map[9] == "new"
    store.restore("a", 4)
    assert store.get("a").id_map == V4 and store.get("a").next_id == 10
    assert store.versions("a")[0]["action"] == "restore v4"
    assert_history_whole(tmp_path, "a")
    assert hidden_leftovers(tmp_path, "a") == []


def test_restore_never_hands_out_an_id_twice(tmp_path):
    store = IndexStore(tmp_path)
    store.put("a", GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="HNSW32"))
    store.mutate("a", lambda i: i.add(vectors(2, 1), ["p", "q"]))  # ids 3, 4
    store.restore("a", 1)
    assert store.get("a").next_id == 5
    added = store.mutate("a", lambda i: i.add(vectors(1, 2), ["r"]))
    assert added.id_map == {0: "x", 1: "y", 2: "z", 5: "r"}
    assert IndexStore(tmp_path).get("a").id_map == added.id_map


# --- 3. bounded history ----------------------------------------------------------------------


def test_history_keeps_at_most_the_configured_number_of_versions(tmp_path):
    store = store_with_history(tmp_path, keep=2)
    assert [v["version"] for v in store.versions("a")] == [4, 3, 2]
    assert history_dirs(tmp_path, "a") == ["2", "3"]
    with pytest.raises(NotFound, match="version 1 of index 'a' is no longer kept: it keeps versions 2–4"):
        store.changes("a", 1)
    with pytest.raises(NotFound, match="version 1 .* no longer kept"):
        store.restore("a", 1)
    with pytest.raises(NotFound, match="version 1 .* no longer kept"):
        store.changes("a", 2)  # its predecessor is gone: say so rather than guess
    assert store.changes("a", 2, against=0)["added_count"] == 9
    store.restore("a", 2)
    assert [v["version"] for v in store.versions("a")] == [5, 4, 3] and history_dirs(tmp_path, "a") == ["3", "4"]
    # a smaller bound (a restart with another setting) applies at once and prunes on the next change
    smaller = IndexStore(tmp_path, keep_versions=1, log_changes=False)
    assert [v["version"] for v in smaller.versions("a")] == [5, 4]
    smaller.mutate("a", lambda i: i.relabel([3], "d"))
    assert history_dirs(tmp_path, "a") == ["5"]


def test_history_can_be_switched_off(tmp_path):
    store = IndexStore(tmp_path, keep_versions=0)
    store.put("a", GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="Flat"))
    store.mutate("a", lambda i: i.relabel([0], "w"))
    assert [(v["version"], v["action"]) for v in store.versions("a")] == [(2, "relabel 1")]
    assert not (tmp_path / HISTORY_DIR).exists()
    assert hidden_leftovers(tmp_path, "a") == []
    # switched on again later: numbering goes on
    IndexStore(tmp_path, keep_versions=5).mutate("a", lambda i: i.relabel([1], "v"))
    # (versions 1 and 2 are still in the current copy: its full save and its change log)
    assert [v["version"] for v in IndexStore(tmp_path).versions("a")] == [3, 2, 1]


def test_the_bound_is_a_setting(tmp_path, monkeypatch):
    assert Settings.from_env(data_dir=tmp_path).history_versions == 10
    monkeypatch.setenv("SHITU_HISTORY_VERSIONS", "2")
    settings = Settings.from_env(data_dir=tmp_path)
    assert settings.history_versions == 2
    engine = Engine(settings)
    store, key = engine.locate("a")
    for k in range(4):
        store.put(key, GalleryIndex.build(vectors(2, k), ["x", "y"], index_type="Flat"))
    assert [v.version for v in engine.versions("a")] == [4, 3, 2]
    monkeypatch.setenv("SHITU_HISTORY_VERSIONS", "-1")
    with pytest.raises(SettingsError, match="SHITU_HISTORY_VERSIONS"):
        Settings.from_env(data_dir=tmp_path)


# --- 4. delete, rename, foreign directories, export/import ------------------------------------


def test_rename_moves_the_history_and_delete_deletes_it(tmp_path):
    store = store_with_history(tmp_path)
    before = [{k: v for k, v in version.items()} for version in store.versions("a")]
    store.rename("a", "b")
    assert store.versions("b") == before
    assert history_dirs(tmp_path, "a") == [] and history_dirs(tmp_path, "b") == ["1", "2", "3"]
    assert store.changes("b", 3)["removed_count"] == 2
    store.restore("b", 1)
    assert store.get("b").id_map == V1
    store.delete("b")
    assert not (tmp_path / HISTORY_DIR / "b").exists()
    assert hidden_leftovers(tmp_path, "b") == []
    # a new index of that name starts its own history
    store.put("b", GalleryIndex.build(vectors(2, 0), ["x", "y"], index_type="Flat"))
    assert [(v["version"], v["action"]) for v in store.versions("b")] == [(1, "build")]


def test_a_new_index_never_inherits_history_left_under_its_name(tmp_path):
    """History a crash left without its index (mid-delete, mid-rename, a quarantined index) is
    not the history of the next index of that name."""
    store = store_with_history(tmp_path)
    stray = tmp_path / HISTORY_DIR / "c"
    stray.mkdir(parents=True)
    (tmp_path / HISTORY_DIR / "a" / "2").rename(stray / "7")
    store.put("c", GalleryIndex.build(vectors(2, 0), ["x", "y"], index_type="Flat"))
    assert [v["version"] for v in store.versions("c")] == [1]
    assert not stray.exists()
    # renaming onto a name with stray history: the index's own history wins
    (tmp_path / HISTORY_DIR / "d" / "5").mkdir(parents=True)
    store.rename("a", "d")
    assert [v["version"] for v in store.versions("d")] == [4, 3, 1]  # (2 went to "c" above)
    assert history_dirs(tmp_path, "d") == ["1", "3"]


def test_a_user_directory_keeps_no_history_and_gets_no_extra_files(tmp_path):
    """A PaddleX-layout directory of the user's (``strict_names=False``) is left as PaddleX would."""
    folder = tmp_path / "mine"
    store = IndexStore(folder, strict_names=False, lock_dir=tmp_path / "locks")
    store.put("idx", GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="Flat"))
    store.mutate("idx", lambda i: i.relabel([0], "w"))
    assert sorted(p.name for p in folder.iterdir()) == ["idx"]
    assert sorted(p.name for p in (folder / "idx").iterdir()) == [
        "id_map.yaml", "shitu_entries.sqlite", "shitu_labels.npz", "shitu_meta.json", "vector.index",
    ]  # fmt: skip
    listed = store.versions("idx")
    assert [(v["version"], v["current"], v["entries"]) for v in listed] == [(1, True, 3)]
    assert store.changes("idx", 1)["added_count"] == 3
    with pytest.raises(NotFound, match="only indices in the data dir keep earlier versions"):
        store.restore("idx", 2)


def test_a_directory_saved_without_a_version_file_is_one_version(tmp_path):
    """PaddleX's layout (or any plain save) has no version file: it is version 1, or the one after
    the newest kept; its copy in the history is described from its id map."""
    save_index(GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="Flat"), tmp_path / "p")
    store = IndexStore(tmp_path)
    assert [(v["version"], v["action"], v["entries"]) for v in store.versions("p")] == [(1, None, 3)]
    store.mutate("p", lambda i: i.remove([2]))
    listed = store.versions("p")
    assert [(v["version"], v["action"], v["entries"], v["labels"]) for v in listed] == [
        (2, "remove 1", 2, 2), (1, None, 3, 3),
    ]  # fmt: skip
    assert listed[1]["index_type"] == "Flat" and listed[1]["time"]
    assert store.changes("p", 2)["removed"] == [{"id": 2, "label": "z"}]
    # a plain save over a versioned index replaces the copy that held those versions (its full
    # save and its change log): it is a first version again, action unknown
    save_index(GalleryIndex.build(vectors(4, 1), list("abcd"), index_type="Flat"), tmp_path / "p")
    assert [(v["version"], v["action"]) for v in IndexStore(tmp_path).versions("p")] == [(1, None)]


def test_export_leaves_the_version_out_and_import_is_a_version(tmp_path):
    store = store_with_history(tmp_path)
    data = store.export_zip("a")
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert f"a/{VECTOR_FILE}" in names and not any(VERSION_FILE in n for n in names)
    store.import_zip("copy", data)
    assert [(v["version"], v["action"]) for v in store.versions("copy")] == [(1, "import")]
    store.import_zip("a", data, overwrite=True)
    assert [(v["version"], v["action"]) for v in store.versions("a")][:2] == [(5, "import"), (4, "relabel 1")]
    # a zip that carries someone's version file: ignored
    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as dst:
        for n in src.namelist():
            dst.writestr(n, src.read(n))
        dst.writestr(f"a/{VERSION_FILE}", json.dumps({"version": 99, "action": "forged"}))
    store.import_zip("other", buf.getvalue())
    assert [(v["version"], v["action"]) for v in store.versions("other")] == [(1, "import")]


# --- 5. crashes --------------------------------------------------------------------------------

CRASHER = r"""
import os, pathlib, sys
import numpy as np
from shitu.index import GalleryIndex
from shitu.stores.files import FileStore as IndexStore
root, what, crash_on, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = IndexStore(root, log_changes=False)  # full saves: the swap of whole copies is what crashes here
store.get("a")
""" + CRASH_AT_NTH_CALL + r"""if what == "restore":
    store.restore("a", 2)
else:
    store.mutate("a", lambda i: i.relabel([3], "crashed"))
print("not crashed", flush=True)
"""

# (case, operation, what to crash on, which call, does the change survive, is the replaced copy kept)
CRASH_POINTS = [
    ("journal-written", "relabel", "replace", 2, False, False),
    ("between-renames", "relabel", "replace", 3, True, True),
    ("before-journal-removed", "relabel", "unlink", 1, True, True),
    # the one instant a crash costs history: after the swap is committed, before the old copy is
    # moved; the current version is whole and the history has a gap, never a half version
    ("before-history-move", "relabel", "replace", 4, True, False),
    ("restore-between-renames", "restore", "replace", 3, True, True),
    ("restore-before-journal-removed", "restore", "unlink", 1, True, True),
]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.parametrize(("what", "crash_on", "nth", "survives", "kept"), [c[1:] for c in CRASH_POINTS],
                         ids=[c[0] for c in CRASH_POINTS])  # fmt: skip
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_crash_mid_save_leaves_a_whole_current_version_and_a_whole_history(
    tmp_path, what, crash_on, nth, survives, kept
):
    store_with_history(tmp_path)
    done = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path), what, crash_on, str(nth)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 17, f"did not crash where intended ({done.returncode}): {done.stdout}{done.stderr}"
    expected = (V2 if what == "restore" else {**V4, 3: "crashed"}) if survives else V4

    maps = assert_history_whole(tmp_path, "a")  # a fresh process: recovers, then reads
    listed = IndexStore(tmp_path).versions("a")
    assert maps[listed[0]["version"]] == expected
    assert listed[0]["version"] == (5 if survives else 4)
    assert listed[0]["action"] == (("restore v2" if what == "restore" else "relabel 1") if survives else "relabel 1")
    assert (4 in maps and maps[4] == V4) == (kept or not survives)
    assert {1: V1, 2: V2, 3: V3}.items() <= maps.items()
    # the next write starts from the committed version and leaves nothing behind
    store = IndexStore(tmp_path)
    store.mutate("a", lambda i: i.relabel([4], "after"))
    assert store.get("a").id_map == {**expected, 4: "after"}
    assert hidden_leftovers(tmp_path, "a") == []
    assert_history_whole(tmp_path, "a")


MUTATOR = r"""
import sys
import numpy as np
from shitu.stores.files import FileStore as IndexStore
root = sys.argv[1]
store = IndexStore(root, keep_versions=3)
rng = np.random.default_rng()
print("ready", flush=True)
n = 0
while True:
    n += 1
    vec = rng.normal(size=(2, 16)).astype("float32")
    index = store.mutate("a", lambda latest: latest.add(vec, [f"n{n}", f"m{n}"]))
    if len(index) > 12:
        ids = sorted(index.id_map)[:2]
        store.mutate("a", lambda latest: latest.remove(ids))
    if n % 5 == 0:
        versions = store.versions("a")
        if len(versions) > 1:
            store.restore("a", versions[-1]["version"])
"""


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_processes_killed_at_random_times_leave_whole_versions(tmp_path):
    store_with_history(tmp_path, keep=3)
    rng = random.Random(20261127)
    for round_ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", MUTATOR, str(tmp_path)], cwd=REPO, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read()
        maps = assert_history_whole(tmp_path, "a", keep=3)
        assert 1 <= len(maps) <= 4
        store = IndexStore(tmp_path, keep_versions=3)
        store.mutate("a", lambda i, r=round_: i.relabel([max(i.id_map)], f"after kill {r}"))
        assert hidden_leftovers(tmp_path, "a") == []
        assert len(history_dirs(tmp_path, "a")) <= 3
        maps = assert_history_whole(tmp_path, "a", keep=3)
        newest, previous = sorted(maps, reverse=True)[:2]
        diff = store.changes("a", newest)
        assert diff["against"] == previous and diff["relabelled_count"] == 1


# --- 6. the engine, the HTTP API and recognition ----------------------------------------------


def install(engine: Engine, name: str, template: Path) -> None:
    engine._store.put(name, load_index(template))  # version 1, "build", on either backend


def body_of(resp, status: int = 200) -> dict:
    body = resp.json()
    assert resp.status_code == status, body
    assert body["errorCode"] == (0 if status == 200 else status)
    return body.get("result", body)


def test_versions_through_the_engine_and_the_http_api(engine, template, sample_queries):
    install(engine, "t", template)
    client = TestClient(create_api(engine))
    query = sample_queries[1]
    before = engine.recognize(query, "t", whole_image="always", rec_threshold=0)
    best = before.objects[0].labels[0]
    assert best

    listed = body_of(client.get("/shitu-index/t/versions"))
    assert listed["current"] == 1 and listed["historyLimit"] == 10
    assert [(v["version"], v["action"], v["imageCount"], v["labelCount"]) for v in listed["versions"]] == [
        (1, "build", 24, 6)
    ]
    assert listed["versions"][0]["featureModel"] == engine.feature_model

    to_rename = [i for i, lab in engine.index("t").id_map.items() if lab == best]
    body_of(client.post("/shitu-index-relabel", json={"ids": to_rename, "label": "renamed", "indexKey": "t"}))
    body_of(client.post("/shitu-index-remove", json={"ids": [23], "indexKey": "t"}))
    assert engine.recognize(query, "t", whole_image="always", rec_threshold=0).objects[0].labels[0] == "renamed"

    listed = body_of(client.get("/shitu-index/t/versions"))["versions"]
    assert [(v["version"], v["current"], v["action"]) for v in listed] == [
        (3, True, "remove 1"), (2, False, f"relabel {len(to_rename)}"), (1, False, "build"),
    ]  # fmt: skip
    changes = body_of(client.get("/shitu-index/t/versions/2"))
    assert changes["against"] == 1 and changes["relabelledCount"] == len(to_rename)
    assert changes["relabelled"] == [{"id": i, "oldLabel": best, "newLabel": "renamed"} for i in sorted(to_rename)]
    assert changes["added"] == [] and changes["removed"] == []
    preview = body_of(client.get("/shitu-index/t/versions/1", params={"against": 3, "limit": 1}))
    assert preview["addedCount"] == 1 and preview["relabelledCount"] == len(to_rename)
    assert len(preview["relabelled"]) == 1

    restored = body_of(client.post("/shitu-index/t/versions/1/restore"))
    assert (restored["version"], restored["restoredFrom"], restored["imageCount"]) == (4, 1, 24)
    assert restored["idMap"] == {str(i): lab for i, lab in sorted(load_index(template).id_map.items())}
    after = engine.recognize(query, "t", whole_image="always", rec_threshold=0)
    assert [(o.labels, o.scores, o.ids) for o in after.objects] == [(o.labels, o.scores, o.ids) for o in before.objects]
    report = engine.restore("t", "v3")  # undo the restore
    assert (report.summary["version"], report.summary["restored_from"], len(report.id_map)) == (5, 3, 23)
    assert engine.versions("t")[0].action == "restore v3"

    # errors: in the envelope, nothing changes
    unchanged = engine.versions("t"), engine.index("t").id_map
    for path, status, fragment in [
        ("/shitu-index/t/versions/9", 404, "has no version 9"),
        ("/shitu-index/nope/versions", 404, "no index named 'nope'"),
        ("/shitu-index/nope/versions/1", 404, "no index named 'nope'"),
        ("/shitu-index/t/versions/abc", 422, "version"),
        ("/shitu-index/t/versions/0", 400, "version number"),
    ]:
        body = body_of(client.get(path), status)
        assert fragment in body["errorMsg"] and "result" not in body, (path, body)
    for path, status, fragment in [
        ("/shitu-index/t/versions/9/restore", 404, "has no version 9"),
        ("/shitu-index/t/versions/5/restore", 400, "already the current version"),
        ("/shitu-index/nope/versions/1/restore", 404, "no index named 'nope'"),
    ]:
        body = body_of(client.post(path), status)
        assert fragment in body["errorMsg"], (path, body)
    # restoring is a change: it needs the token like the others
    guarded = TestClient(create_api(engine, AccessPolicy.for_server("s3cret", None, host=None)))
    body_of(guarded.post("/shitu-index/t/versions/1/restore"), 401)
    assert (engine.versions("t"), engine.index("t").id_map) == unchanged
    ok = guarded.post("/shitu-index/t/versions/1/restore", headers={"Authorization": "Bearer s3cret"})
    assert body_of(ok)["version"] == 6
    body_of(client.get("/shitu-index/t/versions/1/restore"), 405)
    paths = client.get("/openapi.json").json()["paths"]
    assert "security" in paths["/shitu-index/{indexKey}/versions/{version}/restore"]["post"]
    assert "security" not in paths["/shitu-index/{indexKey}/versions"]["get"]


def test_a_version_made_by_another_model_can_be_restored_and_says_so_when_searched(engine, template, sample_queries):
    install(engine, "m", template)
    store, key = engine.locate("m")
    other = GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="Flat", feature_model="some-other-model")
    store.put(key, other)  # v2: made by another model
    with pytest.raises(Conflict, match="was built with some-other-model"):
        engine.recognize(sample_queries[1], "m")
    engine.restore("m", 1)  # back to the active model's vectors: searchable again
    assert engine.recognize(sample_queries[1], "m", whole_image="always").objects
    engine.restore("m", 2)  # allowed; the index says which model made it, and searching says so
    assert [(v.version, v.feature_model) for v in engine.versions("m")][:2] == [
        (4, "some-other-model"), (3, engine.feature_model),
    ]  # fmt: skip
    with pytest.raises(Conflict, match="was built with some-other-model"):
        engine.recognize(sample_queries[1], "m")


# --- 7. the command line ---------------------------------------------------------------------


def test_cli_versions_changes_restore(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    store_with_history(tmp_path / "data" / "indices")

    assert main(["versions", "a"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("v4") and "current" in lines[0] and "relabel 1" in lines[0]
    assert "build" in lines[3] and "6 entries, 3 labels" in lines[3]
    assert main(["versions", "a", "--json"]) == 0
    assert [v["version"] for v in json.loads(capsys.readouterr().out)] == [4, 3, 2, 1]

    assert main(["changes", "a", "v3"]) == 0
    out = capsys.readouterr().out
    assert "a v3 (remove 2) against v2: 0 added, 2 removed, 0 relabelled; 9 -> 7 entries" in out
    assert "  - 1  cat" in out and "  - 2  dog" in out
    assert main(["changes", "a", "2", "--limit", "1"]) == 0
    assert "+ ... and 2 more" in capsys.readouterr().out
    assert main(["changes", "a", "1", "--against", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["relabelled"] == [{"id": 0, "from": "tabby", "to": "cat"}]

    assert main(["restore", "a", "1"]) == 0
    assert "a: version 1 restored as version 5 (6 entries, 3 labels)" in capsys.readouterr().out
    assert IndexStore(tmp_path / "data" / "indices").get("a").id_map == V1

    assert main(["restore", "a", "42"]) == 2
    assert "has no version 42" in capsys.readouterr().err
    assert main(["changes", "nothing-here", "1"]) == 2
    assert "no index named 'nothing-here'" in capsys.readouterr().err
    assert main(["versions", "a", "--json"]) == 0
    assert [v["action"] for v in json.loads(capsys.readouterr().out)][:2] == ["restore v1", "relabel 1"]


def test_cli_on_an_index_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "data"))
    save_index(GalleryIndex.build(vectors(3, 0), ["x", "y", "z"], index_type="Flat"), tmp_path / "mine")
    assert main(["versions", str(tmp_path / "mine")]) == 0
    assert capsys.readouterr().out.startswith("v1")
    assert main(["restore", str(tmp_path / "mine"), "2"]) == 2
    assert "only indices in the data dir" in capsys.readouterr().err
