"""The engine: named indices that survive restarts, no lost or half-applied changes."""

from __future__ import annotations

import threading

import pytest

from shitu.engine import Engine
from shitu.errors import NotFound, ShiTuError
from shitu.gallery import GalleryBatch, GalleryItem, read_label_file

from .conftest import sample_index, stored_state


def snapshot(engine: Engine, name: str) -> tuple[dict, dict]:
    return engine.index(name).id_map, stored_state(engine)


@pytest.fixture
def built(engine, template, sample_gallery) -> Engine:
    """The sample gallery's index as ``drinks`` (Flat, the build's defaults)."""
    return sample_index(engine, "drinks", template, sample_gallery)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_indices_survive_a_restart(built, runtime):
    again = Engine(built.settings, runtime=runtime)
    assert again.index_names() == ["drinks"]
    assert again.index("drinks").id_map == built.index("drinks").id_map


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_bad_add_changes_nothing(built, sample_gallery):
    before = snapshot(built, "drinks")
    bad = GalleryBatch(items=[GalleryItem("broken.jpg", b"not an image", "x", line_no=1)])
    with pytest.raises(ShiTuError, match="line 1"):
        built.add("drinks", bad, skip_invalid=False)
    with pytest.raises(NotFound):
        built.remove("drinks", [0, 999])
    with pytest.raises(ShiTuError):
        built.add("drinks", GalleryBatch())
    assert snapshot(built, "drinks") == before


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_concurrent_adds_and_removes_lose_nothing(built, sample_gallery):
    root, _ = sample_gallery
    image = (root / "0" / "0.jpg").read_bytes()
    errors: list[Exception] = []

    def add(k: int) -> None:
        try:
            built.add("drinks", GalleryBatch(items=[GalleryItem(f"t{k}.jpg", image, f"thread {k}")]))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def remove(i: int) -> None:
        try:
            built.remove("drinks", [i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def query() -> None:
        for _ in range(3):
            index = built.index("drinks")
            assert len(index.id_map) == index.index.ntotal, "a query sees one whole version"

    threads = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    threads += [threading.Thread(target=remove, args=(i,)) for i in (0, 1)]
    threads += [threading.Thread(target=query)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    index = built.index("drinks")
    assert len(index) == 24 + 4 - 2
    assert sorted(v for v in index.id_map.values() if v.startswith("thread")) == [f"thread {k}" for k in range(4)]
    assert sorted(index.id_map)[-4:] == [24, 25, 26, 27], "each add got fresh ids"
    reloaded = Engine(built.settings, runtime=built._runtime).index("drinks")
    assert reloaded.id_map == index.id_map, "what is on disk is the last version"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_rename_delete_export_import(built):
    built.rename("drinks", "drinks2")
    assert built.index_names() == ["drinks2"]
    data = built.export_zip("drinks2")
    built.delete("drinks2")
    assert built.index_names() == []
    imported = built.import_zip("back", data)
    assert imported.image_count == 24 and built.index_names() == ["back"]
    with pytest.raises(ShiTuError, match="already exists"):
        built.import_zip("back", data)
    with pytest.raises(ShiTuError, match="invalid index name"):
        built.build("../evil", GalleryBatch())


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_recognize_named_index(built, sample_queries):
    result = built.recognize(sample_queries[2].read_bytes(), "drinks", whole_image="always", rec_threshold=0.0)
    assert result.index_name == "drinks"
    assert any(o.whole_image and o.label == "咖啡 coffee" for o in result.objects)


@pytest.mark.parametrize("nms_iou", [0.5, None], ids=["cross-box NMS", "no NMS"])
def test_a_result_decided_at_another_threshold_is_the_query_run_at_it(built, sample_queries, nms_iou):
    """What the studio's threshold slider redraws without a new query: one result decided again
    at each threshold gives every box, answer and near miss that running the query at that
    threshold gives (boxes merged by cross-box NMS merged again)."""
    photo = sample_queries[0].read_bytes()  # two products: several boxes, some near each other
    base = built.recognize(photo, "drinks", whole_image="always", rec_threshold=0.99, nms_iou=nms_iou)
    scores = sorted({score for box in base.boxes for _, score, _ in box.candidates})
    assert len(scores) >= 4, "the photo should give several candidates to decide between"
    picks = [0.0, scores[len(scores) // 2], (scores[1] + scores[2]) / 2, scores[-1], scores[-1] + 0.01]
    answers = set()
    for t in picks:
        again = built.recognize(photo, "drinks", whole_image="always", rec_threshold=t, nms_iou=nms_iou)
        redrawn = base.at_threshold(t)
        assert redrawn.rec_threshold == again.rec_threshold == t
        assert [o.to_dict() for o in redrawn.objects] == [o.to_dict() for o in again.objects], t
        answers.add(tuple(tuple(o.labels) for o in redrawn.objects))
    assert len(answers) >= 3, "the thresholds picked should change the answers"
    assert all(not o.recognized for o in base.objects)  # the base itself stays as it was decided


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_sample_index_is_built_once(engine, tmp_path):
    assert engine.ensure_sample_index() == "sample"
    first = stored_state(engine), engine.versions("sample")
    assert engine.ensure_sample_index() == "sample"
    assert (stored_state(engine), engine.versions("sample")) == first
    assert len(engine.index("sample").label_counts()) == 6


def test_settings_from_environment(monkeypatch, tmp_path):
    from shitu.config import Settings

    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.delenv("SHITU_MODEL_DIR", raising=False)
    monkeypatch.setenv("SHITU_URL_ALLOWLIST", "images.local, cdn.lan")
    monkeypatch.setenv("SHITU_MAX_IMAGE_PIXELS", "1000")
    settings = Settings.from_env()
    assert settings.indices_dir == tmp_path / "d" / "indices"
    assert settings.models_dir == tmp_path / "d" / "models"
    assert settings.url_allowlist == ("images.local", "cdn.lan") and settings.max_image_pixels == 1000


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_model_switch_waits_for_the_request_in_flight(tmp_path, sample_gallery, sample_queries, runtime):
    """A request started before a switch finishes on the model it started with; the old model is
    closed (its thread stopped, its predictors freed) only afterwards; new requests use the new one."""
    import numpy as np
    from PIL import Image

    from .conftest import make_settings

    engine = Engine(make_settings(tmp_path / "data"), isolate=False)  # owns its models, so it may close them
    root, labels = sample_gallery
    engine.build("g", read_label_file(labels, root))
    old = engine._runtime
    started, release = threading.Event(), threading.Event()
    real = old.analyze

    def slow_analyze(*args):
        started.set()
        assert release.wait(30)
        return real(*args)

    old.analyze = slow_analyze
    image = np.asarray(Image.open(sample_queries[1]).convert("RGB"))
    results = []
    worker = threading.Thread(target=lambda: results.append(engine.recognize(image, "g", whole_image="always")))
    worker.start()
    assert started.wait(30)
    engine.switch_recognition_model("PP-ShiTuV2_rec")
    assert engine._runtime is not old and not old._closed, "still serving the request in flight"
    release.set()
    worker.join(30)
    assert results and any(o.whole_image for o in results[0].objects)
    assert old._closed, "closed once its last request ended"
    again = engine.recognize(image, "g", whole_image="always")
    assert again.objects[0].labels == results[0].objects[0].labels
    engine.close()
    assert engine._runtime is None


def test_pipelined_gallery_embedding_keeps_order_and_reports_every_bad_line(engine, runtime, sample_gallery):
    """Decoding runs ahead of the models on threads: the features must still be each line's own,
    in line order, and a bad image anywhere must be reported with every other bad one."""
    import numpy as np

    from shitu.gallery import load_image

    root, labels = sample_gallery
    batch = read_label_file(labels, root)
    seen: list[tuple[int, int, str]] = []
    feats, kept, skipped = engine.embed_gallery(batch, progress=lambda d, t, w: seen.append((d, t, w)))
    assert [i.source for i in kept] == [i.source for i in batch.items] and not skipped
    one_by_one = np.concatenate([runtime.embed([load_image(i.image)]) for i in batch.items])
    assert np.abs(feats - one_by_one).max() < 1e-5  # the same vector for the same line
    assert all(i.thumbnail for i in kept)
    assert seen[0] == (0, len(batch.items), "embedding") and seen[-1][0] == len(batch.items)
    assert [d for d, *_ in seen] == sorted(d for d, *_ in seen)

    bad = GalleryBatch(items=list(read_label_file(labels, root).items))
    for n in (17, 3):
        bad.items[n] = GalleryItem(f"broken{n}.jpg", b"not an image", "x", line_no=bad.items[n].line_no)
    with pytest.raises(ShiTuError, match=r"2 gallery line\(s\) are unusable: line 4: .*; line 18: "):
        engine.embed_gallery(bad)
    feats, kept, skipped = engine.embed_gallery(bad, skip_invalid=True)
    assert [s.line_no for s in skipped] == [4, 18] and len(kept) == len(bad.items) - 2 == len(feats)


def test_paddle_math_threads_follow_the_machine(tmp_path):
    """PaddleX's default of 10 CPU math threads oversubscribes small machines; we use at most the
    cores this process may run on, or SHITU_CPU_THREADS."""
    from shitu.config import PipelineConfig
    from shitu.runtime import PADDLEX_CPU_THREADS, Runtime, usable_cores
    from tests.conftest import make_settings

    default = min(usable_cores(), PADDLEX_CPU_THREADS)
    for settings, expected in ((make_settings(tmp_path), default), (make_settings(tmp_path, cpu_threads=3), 3)):
        rt = Runtime(PipelineConfig(), settings, isolate=False)
        try:
            assert rt._executor._host.spec.cpu_threads == expected
        finally:
            rt.close()


@pytest.mark.slow  # worker processes: seconds each (runs with --full)
def test_a_large_gallery_is_shared_by_worker_processes_with_the_same_result(tmp_path, runtime, sample_gallery,
                                                                            monkeypatch):  # fmt: skip
    """SHITU_BUILD_WORKERS: chunks of a large gallery go to worker processes of their own (the
    models' host works only until one is up); each line must still get its own vector and
    thumbnail, in line order, bad lines reported wherever they land; the processes go when idle
    and when the runtime closes, and start again with the next large gallery."""
    import numpy as np

    import shitu.runtime
    from shitu.config import PipelineConfig
    from shitu.gallery import load_image
    from shitu.runtime import Runtime

    from .conftest import make_settings, wait_until

    monkeypatch.setattr(shitu.runtime, "LANE_MIN_IMAGES", 1)  # the sample gallery is small
    monkeypatch.setattr(shitu.runtime, "LANE_MIN_COLD_IMAGES", 1)
    root, labels = sample_gallery
    rt = Runtime(PipelineConfig(), make_settings(tmp_path / "rt", build_workers=3), isolate=False)
    try:
        engine = Engine(make_settings(tmp_path / "data"), runtime=rt)
        batch = read_label_file(labels, root)
        one_by_one = np.concatenate([runtime.embed([load_image(i.image)]) for i in batch.items])
        rt.start_gallery_lanes()  # as the studio does while a gallery uploads
        wait_until(lambda: rt._lanes._users == 0 and rt._lanes.running, "the gallery workers to load")
        lanes = list(rt._lanes._executors)
        assert len(lanes) == 3 and all(e.running for e in lanes)

        seen: list[tuple[int, str]] = []
        feats, kept, skipped = engine.embed_gallery(
            batch, progress=lambda d, t, w: seen.append((d, threading.current_thread().name))
        )
        assert len({name for _, name in seen if name.startswith("shitu-lane-")}) >= 2, seen
        assert [i.source for i in kept] == [i.source for i in batch.items] and not skipped
        assert np.abs(feats - one_by_one).max() < 1e-5
        assert all(i.thumbnail for i in kept)
        done = [d for d, _ in seen]
        assert done[0] == 0 and done[-1] == len(batch.items) and done == sorted(done)

        bad = GalleryBatch(items=list(read_label_file(labels, root).items))
        for n in (1, 13, 22):
            bad.items[n] = GalleryItem(f"broken{n}.jpg", b"not an image", "x", line_no=bad.items[n].line_no)
        with pytest.raises(ShiTuError, match=r"3 gallery line\(s\) are unusable: line 2: .*; line 14: .*; line 23: "):
            engine.embed_gallery(bad)
        feats, kept, skipped = engine.embed_gallery(bad, skip_invalid=True)
        assert [s.line_no for s in skipped] == [2, 14, 23] and len(kept) == len(feats) == len(bad.items) - 3
        keep = [n for n in range(len(bad.items)) if n not in (1, 13, 22)]
        assert np.abs(feats - one_by_one[keep]).max() < 1e-5

        rt._lanes.idle_seconds = 0.2  # the next release arms the shorter timer
        engine.embed_gallery(batch)
        wait_until(lambda: not rt._lanes.running and not any(e.running for e in lanes), "the idle workers to stop")
        feats, kept, _ = engine.embed_gallery(batch)  # a cold start: the host works while they start
        assert np.abs(feats - one_by_one).max() < 1e-5 and len(kept) == len(batch.items)
        lanes = list(rt._lanes._executors)
    finally:
        rt.close()
    assert lanes and all(not e.running for e in lanes)


def test_one_build_worker_keeps_the_gallery_in_the_models_process(tmp_path, monkeypatch):
    import shitu.runtime
    from shitu.config import PipelineConfig
    from shitu.runtime import Runtime

    from .conftest import make_settings

    monkeypatch.setattr(shitu.runtime, "LANE_MIN_COLD_IMAGES", 1)
    rt = Runtime(PipelineConfig(), make_settings(tmp_path, build_workers=1), isolate=False)
    try:
        with rt.gallery_lanes(10_000) as lanes:
            assert len(lanes) == 1
    finally:
        rt.close()
