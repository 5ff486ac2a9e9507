"""Data safety of stored indices (shitu/store.py, shitu/fsutil.py) against real processes.

Each test checks the outcome it is about *and* that nothing else changed: the other indices'
files on disk and their versions in memory. Writers beside the "server" (an :class:`Engine`
in this process whose cache holds an index) are real subprocesses: the CLI, ``python -c``
scripts over :class:`Engine`, processes that crash at a chosen point of a save or are
SIGKILLed at random times.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from shitu.api import create_api
from shitu.engine import Engine
from shitu.errors import DamagedIndex, NotFound, ShiTuError
from shitu.gallery import GalleryBatch, GalleryItem
from shitu.index import GalleryIndex
from shitu.stores.layout import META_FILE, load_index

from .conftest import CRASH_AT_NTH_CALL, MODEL_CACHE

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_SIZE = 24  # the whole sample gallery: 6 labels × 4 views, ids 0..23

# --- helpers ---------------------------------------------------------------------------------


def child_env(data_dir: Path) -> dict[str, str]:
    """The environment of a CLI or script run beside the server: same data dir, same models."""
    env = dict(os.environ, SHITU_MODEL_DIR=str(MODEL_CACHE), SHITU_OFFLINE="1", SHITU_DATA_DIR=str(data_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cli(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m shitu <args>`` in a fresh process; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "shitu", *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=child_env(data_dir), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd[2:])} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def spawn(data_dir: Path, script: str, *args: str | Path) -> subprocess.Popen:
    """``python -c script args`` beside the server; stdout and stderr together in one pipe (a
    full stderr pipe nobody reads cannot block it)."""
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=child_env(data_dir),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_ready(proc: subprocess.Popen) -> None:
    """Block until a child script says it is ready (libraries may print to stdout first)."""
    for line in proc.stdout:
        if line.strip() == "ready":
            drain(proc)
            return
    raise AssertionError(f"the child exited with {proc.wait()} before it was ready: {proc.stdout.read()}")


def drain(proc: subprocess.Popen) -> None:
    """Read the child's output from now on in the background. Otherwise a child that prints more
    than a pipe holds (64 KiB) while the test is busy elsewhere blocks on its next print, and a
    test that waits for it to exit waits forever (this hung CI for 90 minutes)."""
    if hasattr(proc, "drained"):
        return
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    proc.drained = (reader, lines)  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """The rest of a child's output once it exits (it is killed after ``timeout`` seconds).
    Read through ``proc.stdout`` itself: ``communicate(timeout=...)`` reads the pipe's file
    descriptor and would drop lines that :func:`wait_ready` already buffered."""
    drain(proc)
    reader, lines = proc.drained  # type: ignore[attr-defined]
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        reader.join()
        proc.wait()
    finally:
        timer.cancel()
    return "".join(lines)


def acks(out: str) -> list[dict]:
    """The ``ACK {json}`` lines a child script printed (each on a line of its own)."""
    return [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ACK {")]


def install(engine: Engine, name: str, template: Path) -> Path:
    """A copy of the template index under ``name`` (no embedding needed)."""
    target = engine.settings.indices_dir / name
    shutil.copytree(template, target)
    return target


def write_labels(path: Path, lines: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{rel}\t{label}\n" for rel, label in lines), encoding="utf-8")
    return path


def batch_of(root: Path, pairs: list[tuple[str, str]]) -> GalleryBatch:
    return GalleryBatch(items=[GalleryItem(rel, (root / rel).read_bytes(), label) for rel, label in pairs])


def files_of(engine: Engine, names: list[str]) -> dict[str, str]:
    """Checksums of every file of these indices (and of their leftovers, if any)."""
    root = engine.settings.indices_dir
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and any(rel.parts[0] in (n, f".{n}.swap") or rel.parts[0].startswith(f".{n}.") for n in names):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def snapshot(engine: Engine, names: list[str]) -> tuple[dict[str, str], dict[str, dict[int, str]]]:
    """What must not change: these indices on disk and as the engine holds them."""
    return files_of(engine, names), {n: engine.index(n).id_map for n in names}


def consistent(index: GalleryIndex) -> GalleryIndex:
    assert index.index.ntotal == len(index.id_map) == len(index.entries), "vectors and labels disagree"
    return index


def assert_consistent(engine: Engine, name: str) -> GalleryIndex:
    """The index in memory and on disk: one whole version, the same one."""
    in_memory = consistent(engine.index(name))
    on_disk = consistent(load_index(engine.settings.indices_dir / name))
    assert on_disk.id_map == in_memory.id_map and on_disk.next_id == in_memory.next_id
    return in_memory


def leftovers(engine: Engine, name: str) -> list[str]:
    """Anything a save, delete or crash of ``name`` leaves beside the indices."""
    root = engine.settings.indices_dir
    return sorted(p.name for p in root.iterdir() if p.name.startswith((f".{name}.", f"..{name}.swap")))


@pytest.fixture
def keep(engine, template) -> tuple[dict, dict]:
    """A bystander index "keep" and its snapshot: every test checks it is left alone."""
    install(engine, "keep", template)
    return snapshot(engine, ["keep"])


# --- 1. the CLI beside a running server --------------------------------------------------------


@pytest.mark.slow
def test_cli_append_beside_a_running_server_loses_nothing(engine, template, sample_gallery, keep, tmp_path):
    root, _ = sample_gallery
    install(engine, "t1", template)
    served = engine.index("t1")  # the server's cache now holds this version
    assert sorted(served.id_map) == list(range(TEMPLATE_SIZE))

    cli_pairs = [("0/1.jpg", "cli 0"), ("1/1.jpg", "cli 1"), ("2/1.jpg", "cli 2")]
    done = run_cli(engine.settings.data_dir, "append", "--index", "t1", "--gallery-root", root,
                   "--labels", write_labels(tmp_path / "cli.txt", cli_pairs))  # fmt: skip
    assert "added 3" in done.stdout
    # the server, its cache one version behind, writes next
    report = engine.add("t1", batch_of(root, [("3/1.jpg", "server 0"), ("4/1.jpg", "server 1")]))
    assert report.added_ids == [27, 28], "ids continue after the CLI's, none reused"

    expected = {**served.id_map, 24: "cli 0", 25: "cli 1", 26: "cli 2", 27: "server 0", 28: "server 1"}
    assert report.id_map == expected
    assert assert_consistent(engine, "t1").id_map == expected
    assert Engine(engine.settings, runtime=engine._runtime).index("t1").id_map == expected  # as a restart sees it
    assert snapshot(engine, ["keep"]) == keep


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_cli_remove_beside_a_running_server_is_seen_by_it(engine, template, sample_gallery, keep):
    root, _ = sample_gallery
    install(engine, "t1", template)
    added = engine.add("t1", batch_of(root, [("0/2.jpg", "server 0"), ("1/2.jpg", "server 1")]))
    assert added.added_ids == [24, 25]
    client = TestClient(create_api(engine))
    assert client.get("/shitu-index/t1").json()["result"]["imageCount"] == 26  # cached by the server

    done = run_cli(engine.settings.data_dir, "remove", "--index", "t1", "--ids", "3", "25")
    assert "now 24 entries" in done.stdout
    listing = client.get("/shitu-index/t1", params={"limit": 1000}).json()["result"]
    expected = {i: label for i, label in added.id_map.items() if i not in (3, 25)}
    assert listing["imageCount"] == 24 and listing["idMap"] == {str(i): lab for i, lab in sorted(expected.items())}
    assert assert_consistent(engine, "t1").id_map == expected
    # the id the CLI removed is never handed out again, by either writer
    again = engine.add("t1", batch_of(root, [("2/2.jpg", "server 2")]))
    assert again.added_ids == [26]
    assert assert_consistent(engine, "t1").id_map == {**expected, 26: "server 2"}
    assert snapshot(engine, ["keep"]) == keep


# --- 2. writers in several processes ----------------------------------------------------------

ADDER = r"""
import json, sys
from pathlib import Path
from shitu.engine import Engine
from shitu.gallery import GalleryBatch, GalleryItem
name, tag, count, *images = sys.argv[1:]
engine = Engine(isolate=False)
engine.prepare_models()
print("\nready", flush=True)
for k in range(int(count)):
    image = Path(images[k % len(images)])
    report = engine.add(name, GalleryBatch(items=[GalleryItem(image.name, image.read_bytes(), f"{tag} {k}")]))
    print("\nACK", json.dumps({"ids": report.added_ids, "label": f"{tag} {k}"}), flush=True)
engine.close()
"""


@pytest.mark.slow
def test_writers_in_two_processes_and_the_server_lose_nothing(engine, template, sample_gallery, keep):
    root, _ = sample_gallery
    install(engine, "t2", template)
    engine.index("t2")
    images = [root / str(n) / "3.jpg" for n in range(6)]
    writers = [spawn(engine.settings.data_dir, ADDER, "t2", tag, 10, *images) for tag in ("proc A", "proc B")]
    try:
        for w in writers:
            wait_ready(w)
        removed = []
        for id_ in range(8):  # the server removes while both processes add
            engine.remove("t2", [id_])
            removed.append(id_)
            time.sleep(0.2)
        outputs = [finish(w, 300) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    acked: dict[int, str] = {}
    for w, out in zip(writers, outputs):
        assert w.returncode == 0, out
        lines = acks(out)
        assert len(lines) == 10, out[-4000:]
        for line in lines:
            (id_,) = line["ids"]
            assert id_ not in acked, f"id {id_} was handed out twice"
            acked[id_] = line["label"]
    assert min(acked) == TEMPLATE_SIZE and sorted(acked) == list(range(TEMPLATE_SIZE, TEMPLATE_SIZE + 20))
    final = assert_consistent(engine, "t2")
    expected = {i: lab for i, lab in load_index(template).id_map.items() if i not in removed} | acked
    assert final.id_map == expected
    assert snapshot(engine, ["keep"]) == keep


MUTATOR = r"""
import json, sys, time
import numpy as np
from shitu.engine import Engine
name, tag, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
engine = Engine(isolate=False)
store, key = engine.locate(name)
dim = engine.index(name).dim
rng = np.random.default_rng()
print("\nready", flush=True)
mine, n, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end:
    n += 1
    vec, label = rng.normal(size=(1, dim)).astype("float32"), f"{tag}-{n}"
    index = store.mutate(key, lambda latest: latest.add(vec, [label]))
    mine.append(index.next_id - 1)
    print("\nACK", json.dumps({"add": mine[-1], "label": label}), flush=True)
    if len(mine) > 3:
        gone = mine.pop(0)
        print("\nACK", json.dumps({"removing": gone}), flush=True)
        engine.remove(name, [gone])
        print("\nACK", json.dumps({"remove": gone}), flush=True)
"""


def check_acks(index: GalleryIndex, out: str) -> int:
    """Every write a mutator acknowledged is in ``index`` (a write it was killed in may or may
    not have landed); returns how many acknowledged writes there were."""
    lines = acks(out)
    added = {a["add"]: a["label"] for a in lines if "add" in a}
    removed = {a["remove"] for a in lines if "remove" in a}
    pending = {a["removing"] for a in lines if "removing" in a} - removed
    assert len(added) == sum("add" in a for a in lines), "an id was handed out twice"
    for id_, label in added.items():
        if id_ in removed:
            assert id_ not in index.id_map, f"removed id {id_} came back"
        elif id_ not in pending:
            assert index.id_map.get(id_) == label, f"acknowledged add {id_} ({label}) is lost"
    return len(added) + len(removed)


@pytest.mark.slow
def test_readers_never_see_a_half_saved_index_of_another_process(engine, template, keep):
    """The server reloads whenever another process commits; it must never read a mix of two
    versions (or a directory in the middle of its swap) and take it for a damaged index."""
    install(engine, "k", template)
    writer = spawn(engine.settings.data_dir, MUTATOR, "k", "w", 6)
    try:
        wait_ready(writer)
        reads, problems = 0, []
        while writer.poll() is None:
            try:
                consistent(engine.index("k"))
                reads += 1
            except ShiTuError as exc:  # collected: the assertion below shows them all
                problems.append(f"{type(exc).__name__}: {exc.message}")
        out = finish(writer, 60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, out
    assert problems == [], f"{len(problems)} failed reads of {reads + len(problems)}, e.g. {problems[:3]}"
    assert not (engine.settings.indices_dir / ".quarantine").exists(), "a healthy index was set aside"
    writes = check_acks(assert_consistent(engine, "k"), out)
    print(f"{reads} reads beside {writes} writes of another process")
    assert snapshot(engine, ["keep"]) == keep


# --- 3. deleted and renamed indices stay gone -------------------------------------------------


def zip_of_smaller_index(engine: Engine, template: Path) -> bytes:
    """An index export that differs from the template (10 entries), to write a name anew."""
    install(engine, "src", template)
    engine.remove("src", list(range(10, TEMPLATE_SIZE)))
    data = engine.export_zip("src")
    engine.delete("src")
    return data


def make_leftovers(engine: Engine, name: str, template: Path) -> list[str]:
    """Complete copies of an index under the names a crash mid-save or mid-delete leaves."""
    made = [f".{name}.old-1234abcd", f".{name}.tmp-89abcdef", f".{name}.old-deleted"]
    for leftover in made:
        shutil.copytree(template, engine.settings.indices_dir / leftover, dirs_exist_ok=True)
    return sorted(made)


def assert_gone(engine: Engine, name: str) -> None:
    """Not listed, not found, not restored from any leftover: by this engine and by a restart."""
    for eng in (engine, Engine(engine.settings, runtime=engine._runtime)):
        assert name not in eng.index_names()
        assert not eng.exists(name)
        with pytest.raises(NotFound, match=f"no index named '{name}'"):
            eng.index(name)


def test_a_deleted_index_never_comes_back(engine, template, keep):
    new_version = zip_of_smaller_index(engine, template)
    install(engine, "a", template)
    engine.index("a")
    engine.delete("a")
    assert leftovers(engine, "a") == []
    make_leftovers(engine, "a", template)
    assert_gone(engine, "a")
    assert make_leftovers(engine, "a", template) == leftovers(engine, "a")
    with pytest.raises(NotFound):  # a write that fails
        engine.remove("a", [0])
    assert leftovers(engine, "a") == []
    assert_gone(engine, "a")
    # a write that succeeds makes a new index of that name, from what it was given
    make_leftovers(engine, "a", template)
    engine.import_zip("a", new_version)
    assert leftovers(engine, "a") == []
    assert assert_consistent(engine, "a").id_map == {i: lab for i, lab in load_index(template).id_map.items()
                                                     if i < 10}  # fmt: skip
    assert engine.index_names() == ["a", "keep"]
    assert snapshot(engine, ["keep"]) == keep


def test_a_renamed_index_never_comes_back_under_its_old_name(engine, template, keep):
    new_version = zip_of_smaller_index(engine, template)
    install(engine, "a", template)
    engine.index("a")
    engine.rename("a", "b")
    b_before = snapshot(engine, ["b"])
    make_leftovers(engine, "a", template)
    assert_gone(engine, "a")
    assert sorted(consistent(engine.index("b")).id_map) == list(range(TEMPLATE_SIZE))
    make_leftovers(engine, "a", template)
    with pytest.raises(NotFound):
        engine.rename("a", "c")
    assert leftovers(engine, "a") == [] and engine.index_names() == ["b", "keep"]
    make_leftovers(engine, "a", template)
    engine.import_zip("a", new_version)
    assert leftovers(engine, "a") == []
    assert len(assert_consistent(engine, "a")) == 10
    assert engine.index_names() == ["a", "b", "keep"]
    assert snapshot(engine, ["b", "keep"]) == (b_before[0] | keep[0], b_before[1] | keep[1])


# --- 4. crashes in the middle of a save -------------------------------------------------------

CRASHER = r"""
import os, pathlib, sys
from shitu.engine import Engine
name, label, crash_on, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engine = Engine(isolate=False)
engine.index(name)
store, key = engine.locate(name)
relabelled = engine.index(name).relabel([0], label)
""" + CRASH_AT_NTH_CALL + r"""store.put(key, relabelled, action="relabel 1")  # a full save (a plain relabel is logged)
print("not crashed", flush=True)
"""

# (case, what to crash on, which call, does the save survive, the state a crash leaves)
CRASH_POINTS = [
    ("journal-written", "replace", 2, False, {"journal", "tmp"}),  # 1st replace writes the journal
    ("between-renames", "replace", 3, True, {"journal", "tmp", "old", "no-target"}),
    ("before-journal-removed", "unlink", 1, True, {"journal", "old"}),
]


def crash_save(engine: Engine, name: str, label: str, crash_on: str, nth: int) -> None:
    """A real process that dies at a chosen point of a save of ``name`` (relabelling id 0)."""
    proc = spawn(engine.settings.data_dir, CRASHER, name, label, crash_on, nth)
    out = finish(proc, 120)
    assert proc.returncode == 17, f"did not crash where intended ({proc.returncode}): {out}"


def disk_state(engine: Engine, name: str) -> set[str]:
    found = {p.split(".")[-1].split("-")[0] for p in leftovers(engine, name)}
    state = {"journal" if k == "swap" else k for k in found}
    if not (engine.settings.indices_dir / name).exists():
        state.add("no-target")
    return state


@pytest.mark.parametrize("crash_on, nth, survives, state", [c[1:] for c in CRASH_POINTS],
                         ids=[c[0] for c in CRASH_POINTS])  # fmt: skip
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_an_interrupted_save_rolls_forward_or_back_whole(engine, template, keep, crash_on, nth, survives, state):
    install(engine, "a", template)
    old_label = engine.index("a").id_map[0]  # the server holds the old version
    crash_save(engine, "a", "relabelled", crash_on, nth)
    assert disk_state(engine, "a") == state
    expected = "relabelled" if survives else old_label

    for eng in (Engine(engine.settings, runtime=engine._runtime), engine):  # a restart, and the running server
        assert "a" in eng.index_names()
        index = consistent(eng.index("a"))
        assert index.id_map[0] == expected and len(index) == TEMPLATE_SIZE
    if "no-target" in state:  # reading an index whose swap was cut short finishes the swap
        assert leftovers(engine, "a") == []
    engine.relabel("a", [1], "next write")
    assert leftovers(engine, "a") == []
    final = assert_consistent(engine, "a")
    assert (final.id_map[0], final.id_map[1]) == (expected, "next write")
    assert snapshot(engine, ["keep"]) == keep


def test_cleanup_of_one_index_never_touches_another_with_a_similar_name(engine, template, keep):
    """``a.old-1234abcd`` is a valid index name: a write to ``a`` must not take the copies
    that an interrupted save of that index left (``.a.old-1234abcd.tmp-*``) for its own."""
    other = "a.old-1234abcd"
    install(engine, "a", template)
    install(engine, other, template)
    crash_save(engine, other, "relabelled", "replace", 3)  # between its two renames
    assert disk_state(engine, other) == {"journal", "tmp", "old", "no-target"}
    engine.relabel("a", [1], "write to a")
    assert consistent(engine.index(other)).id_map[0] == "relabelled", "the other index's save was lost"
    assert engine.index_names() == ["a", other, "keep"]
    assert leftovers(engine, "a") == [] and leftovers(engine, other) == []
    assert snapshot(engine, ["keep"]) == keep


@pytest.mark.slow
def test_processes_killed_at_random_times_leave_a_whole_index(engine, template, keep):
    """SIGKILL a process that keeps adding and removing, 10 times at random moments: every
    time, a fresh engine loads one whole version holding every acknowledged write."""
    install(engine, "k", template)
    rng = random.Random(20261127)
    interrupted = 0
    for round_ in range(10):
        proc = spawn(engine.settings.data_dir, MUTATOR, "k", f"r{round_}", 60)
        try:
            wait_ready(proc)
            time.sleep(rng.uniform(0.05, 0.8))
            os.kill(proc.pid, signal.SIGKILL)
            out = finish(proc, 30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        interrupted += bool(leftovers(engine, "k"))
        fresh = Engine(engine.settings, runtime=engine._runtime)
        index = consistent(fresh.index("k"))
        assert check_acks(index, out) > 0
        fresh.relabel("k", [TEMPLATE_SIZE - 1], f"after kill {round_}")
        assert leftovers(engine, "k") == []
        assert consistent(load_index(engine.settings.indices_dir / "k")).id_map[TEMPLATE_SIZE - 1] == (
            f"after kill {round_}"
        )
        assert consistent(engine.index("k")).id_map == fresh.index("k").id_map  # the server follows
    print(f"{interrupted} of 10 kills left a save or delete unfinished")
    assert snapshot(engine, ["keep"]) == keep


# --- 5. a damaged index -----------------------------------------------------------------------


def damage(engine: Engine, name: str) -> None:
    (engine.settings.indices_dir / name / META_FILE).write_bytes(b"\x00garbage{not json")


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_damaged_sample_index_is_rebuilt_when_the_app_starts(engine, template, keep):
    from app import build_app

    install(engine, "sample", template)
    Engine(engine.settings, runtime=engine._runtime).relabel("sample", [0], "not the sample's label")
    damage(engine, "sample")  # the server has not read it yet (a copy in memory would stay valid)
    build_app(engine)
    index = assert_consistent(engine, "sample")
    assert len(index) == TEMPLATE_SIZE and index.id_map[0] != "not the sample's label"
    quarantined = list((engine.settings.indices_dir / ".quarantine").iterdir())
    assert [p.name.split("-")[0] for p in quarantined] == ["sample"]
    assert (quarantined[0] / META_FILE).read_bytes().startswith(b"\x00garbage"), "kept for inspection"
    assert snapshot(engine, ["keep"]) == keep


def test_a_damaged_index_is_set_aside_once_and_the_others_keep_working(engine, template, keep, sample_queries):
    install(engine, "x", template)
    damage(engine, "x")
    assert engine.index_names() == ["keep", "x"]  # not known to be damaged until read
    with pytest.raises(DamagedIndex) as caught:
        engine.index("x")
    message = caught.value.message
    assert "'x'" in message and "damaged" in message and META_FILE in message and "rebuild" in message
    assert str(engine.settings.data_dir) not in message and "/" not in message, message
    with pytest.raises(NotFound, match="no index named 'x'"):
        engine.index("x")
    assert engine.index_names() == ["keep"]
    quarantine = engine.settings.indices_dir / ".quarantine"
    assert [p.name.split("-")[0] for p in quarantine.iterdir()] == ["x"]
    result = engine.recognize(sample_queries[1], "keep")
    assert result.objects and result.index_name == "keep"
    assert snapshot(engine, ["keep"]) == keep


def test_a_damaged_index_through_the_http_api(engine, template, keep, sample_queries):
    install(engine, "y", template)
    damage(engine, "y")
    client = TestClient(create_api(engine))
    image = base64.b64encode(sample_queries[1].read_bytes()).decode()
    resp = client.post("/shitu-infer", json={"image": image, "indexKey": "y", "visualize": False})
    body = resp.json()
    assert 400 <= resp.status_code < 600 and body["errorCode"] == resp.status_code, body
    assert "damaged" in body["errorMsg"] and str(engine.settings.data_dir) not in body["errorMsg"]
    assert "result" not in body
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["result"]["indices"] == ["keep"]
    resp = client.post("/shitu-infer", json={"image": image, "indexKey": "y", "visualize": False})
    assert resp.status_code == 404 and resp.json()["errorCode"] == 404
    resp = client.post("/shitu-infer", json={"image": image, "indexKey": "keep", "visualize": False})
    assert resp.status_code == 200 and resp.json()["result"]["detectedObjects"]
    assert snapshot(engine, ["keep"]) == keep


# --- 6. index names are limited in bytes -------------------------------------------------------

WIDE = "\U00020000"  # a CJK ideograph: one character, four bytes in UTF-8


def all_files(engine: Engine) -> dict[str, str]:
    root = engine.settings.data_dir
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}  # fmt: skip


def test_index_names_are_limited_in_bytes(engine, template, keep, sample_gallery):
    root, _ = sample_gallery
    too_wide = WIDE * 61  # 61 characters, 244 bytes
    assert len(too_wide) <= 64
    batch = batch_of(root, [("0/0.jpg", "cat")])
    before = all_files(engine)
    with pytest.raises(ShiTuError, match="invalid index name .*at most 180 bytes"):
        engine.build(too_wide, batch)
    client = TestClient(create_api(engine))
    pair = {"image": base64.b64encode((root / "0/0.jpg").read_bytes()).decode(), "label": "cat"}
    resp = client.post("/shitu-index-build", json={"imageLabelPairs": [pair], "indexKey": too_wide})
    assert resp.status_code == 400 and resp.json()["errorCode"] == 400
    assert "invalid index name" in resp.json()["errorMsg"]
    with pytest.raises(ShiTuError, match="invalid index name"):
        engine.rename("keep", too_wide)
    with pytest.raises(ShiTuError, match="invalid index name"):
        engine.rename("keep", "k" * 65)
    assert all_files(engine) == before and engine.index_names() == ["keep"]

    # the longest names allowed work end to end, writes (journal, temp copies, lock) included
    ascii_name, wide_name = "n" * 64, WIDE * 45  # 64 characters; 180 bytes
    assert ok_build(client, pair, ascii_name) == {"0": "cat"}
    engine.rename(ascii_name, wide_name)
    engine.add(wide_name, batch_of(root, [("1/0.jpg", "coffee")]))
    engine.relabel(wide_name, [0], "still a cat")
    assert assert_consistent(engine, wide_name).id_map == {0: "still a cat", 1: "coffee"}
    assert engine.index_names() == ["keep", wide_name] and leftovers(engine, wide_name) == []
    assert snapshot(engine, ["keep"]) == keep


def ok_build(client: TestClient, pair: dict, key: str) -> dict[str, str]:
    resp = client.post("/shitu-index-build", json={"imageLabelPairs": [pair], "indexKey": key})
    assert resp.status_code == 200, resp.json()
    return resp.json()["result"]["idMap"]


# --- 7. the HTTP API refuses what the schema does not allow -----------------------------------


def test_empty_index_key_and_boolean_ids_are_refused(engine, template, keep, sample_gallery):
    root, _ = sample_gallery
    install(engine, "sample", template)  # the default index: "" must not silently mean it
    engine.index("sample")
    client = TestClient(create_api(engine))
    image = base64.b64encode((root / "0" / "0.jpg").read_bytes()).decode()
    names = ["keep", "sample"]
    before = snapshot(engine, names)
    cases = [
        ("/shitu-infer", {"image": image, "indexKey": ""}, "indexKey"),
        ("/shitu-index-add", {"imageLabelPairs": [{"image": image, "label": "x"}], "indexKey": ""}, "indexKey"),
        ("/shitu-index-remove", {"ids": [0], "indexKey": ""}, "indexKey"),
        ("/shitu-index-remove", {"ids": [True], "indexKey": "sample"}, "ids[0]"),
        ("/shitu-index-remove", {"ids": [True]}, "ids[0]"),
        ("/shitu-index-remove", {"ids": [1.0], "indexKey": "sample"}, "ids[0]"),
        ("/shitu-index-remove", {"ids": ["1"], "indexKey": "sample"}, "ids[0]"),
    ]
    for path, payload, fragment in cases:
        resp = client.post(path, json=payload)
        body = resp.json()
        assert resp.status_code == 422 and body["errorCode"] == 422, (path, payload, body)
        assert fragment in body["errorMsg"], body["errorMsg"]
        assert snapshot(engine, names) == before, (path, payload)
    assert snapshot(engine, names) == before
