"""The pipeline through the real stack: PaddleX predictors (offline starter pack) + faiss."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shitu import GalleryIndex, ShiTuError, create_pipeline
from shitu.config import PipelineConfig
from shitu.models import try_official
from shitu.paddlex_api import as_batch
from shitu.results import RecognizedObject, ShiTuResult, merge_same_label
from shitu.runtime import Runtime
from shitu.sample import SAMPLE_SUBJECTS
from shitu.stores.layout import load_index

from .conftest import MODEL_CACHE, make_settings

LABELS = list(SAMPLE_SUBJECTS)


@pytest.fixture(scope="module")
def index(pipeline, sample_gallery) -> GalleryIndex:
    root, label_file = sample_gallery
    return pipeline.build_index(gallery_imgs=str(root), gallery_label=str(label_file), index_type="Flat")


def test_active_models_are_reported(pipeline):
    models = pipeline.models
    assert models["recognition"]["source"] == "starter"
    assert "offline starter pack" in models["recognition"]["description"]
    assert models["detection"]["source"] in ("starter", "none")


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_from_folder_and_label_file(index):
    assert len(index) == 24 and len(index.label_counts()) == 6
    assert index.entry(0).source == "0/0.jpg" and index.entry(0).thumbnail[:2] == b"\xff\xd8"
    assert index.feature_model.startswith("starter:")


def test_recognises_new_views(pipeline, index, sample_queries):
    """Held-out views of each subject are recognised as that subject (top-1)."""
    correct = 0
    for label, query in zip(LABELS, sample_queries[1:]):
        (res,) = pipeline.predict(str(query), index=index, whole_image="always", rec_threshold=0.0)
        whole = next(o for o in res.objects if o.whole_image)
        correct += whole.label == label
    assert correct == len(LABELS)


def test_all_input_kinds(pipeline, index, sample_queries, tmp_path):
    query = sample_queries[1]
    rgb = np.asarray(Image.open(query).convert("RGB"))
    (tmp_path / "dir").mkdir()
    shutil.copy(query, tmp_path / "dir" / "q.jpg")
    shutil.copy(sample_queries[2], tmp_path / "dir" / "r.jpg")

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(query.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{query.name}"
    try:
        inputs = [
            rgb[..., ::-1].copy(),  # numpy arrays are BGR, as in PaddleX
            Image.open(query),
            str(query),
            query,
            url,
            {"img": str(query)},
            query.read_bytes(),
        ]
        results = pipeline.predict(inputs, index=index, whole_image="always", rec_threshold=0.0)
        assert not isinstance(results, list), "a generator, like PaddleX"
        labels = [next(o.label for o in r.objects if o.whole_image) for r in results]
        assert labels == [LABELS[0]] * len(inputs)
        dir_results = list(pipeline.predict(str(tmp_path / "dir"), index=index))
        assert [Path(r["input_path"]).name for r in dir_results] == ["q.jpg", "r.jpg"]
    finally:
        server.shutdown()


def test_topk_and_thresholds_are_honoured(pipeline, index, sample_queries):
    (res,) = pipeline.predict(str(sample_queries[1]), index=index, whole_image="always", rec_threshold=0.0, rec_topk=3)
    whole = next(o for o in res.objects if o.whole_image)
    assert len(whole.labels) == 3 and len(set(whole.labels)) == 3, "top-k distinct labels"
    assert whole.scores == sorted(whole.scores, reverse=True)
    (res,) = pipeline.predict(str(sample_queries[1]), index=index, whole_image="always", rec_threshold=0.9999)
    assert all(not o.recognized for o in res.objects)
    # PaddleX's schema for an unrecognised box, so code reading labels[0] keeps working
    assert all(b["labels"] == [None] and b["rec_scores"] == [None] for b in res["boxes"])
    assert all(b["best_candidate"]["score"] < 0.9999 for b in res["boxes"]), "the near miss is kept"


def test_unrecognised_box_is_never_drawn_as_none(pipeline, index, sample_queries, tmp_path):
    (res,) = pipeline.predict(str(sample_queries[0]), index=index, whole_image="always", rec_threshold=0.9999)
    img = res.save_to_img(tmp_path)
    js = res.save_to_json(tmp_path / "out.json")
    assert img.name == "query_two_objects_res.jpg" and Image.open(img).size == res["input_img"].shape[1::-1]
    assert json.loads(js.read_text(encoding="utf-8"))["boxes"][0]["labels"] == [None]
    from shitu.render import caption

    captions = [caption(o, threshold=0.9999) for o in res.objects]
    assert captions and all(c.startswith("unknown · maybe ") and c.endswith(" < 1.00") for c in captions), captions
    assert not any("None" in c for c in captions)


def test_whole_image_modes(pipeline, index, sample_queries):
    def whole_boxes(mode):
        (res,) = pipeline.predict(str(sample_queries[0]), index=index, whole_image=mode)
        return [o for o in res.objects if o.whole_image], res

    assert len(whole_boxes("always")[0]) == 1
    never, res = whole_boxes("never")
    assert never == [] or pipeline.models["detection"]["source"] == "none"
    auto, res = whole_boxes("auto")
    assert len(auto) == (0 if any(not o.whole_image for o in res.objects) else 1)


def test_det_threshold_is_passed_to_the_detector(pipeline, index, sample_queries):
    def detections(threshold):
        (res,) = pipeline.predict(str(sample_queries[0]), index=index, det_threshold=threshold, whole_image="never")
        return [o.det_score for o in res.objects]

    low, high = detections(0.05), detections(0.6)
    assert all(s >= 0.6 for s in high) and all(s >= 0.05 for s in low)
    assert len(low) > len(high)


def test_cross_box_nms_merges_same_label_only():
    def obj(box, label, score):
        return RecognizedObject(bbox=box, det_score=0.9, labels=[label], scores=[score], ids=[0])

    a = obj((0, 0, 100, 100), "cola", 0.9)
    b = obj((5, 5, 105, 105), "cola", 0.8)  # same label, IoU ~0.82 → merged into a
    c = obj((5, 5, 105, 105), "tea", 0.7)  # overlapping but another label → kept
    d = obj((300, 0, 400, 100), "cola", 0.6)  # same label, elsewhere → kept
    e = RecognizedObject(bbox=(0, 0, 100, 100), det_score=0.5)  # unrecognised → kept
    kept = merge_same_label([b, c, a, d, e], iou=0.5)
    assert kept == [a, c, d, e]
    assert len(merge_same_label([a, b], iou=0.9)) == 2


def test_append_and_remove_by_file(pipeline, index, sample_gallery, tmp_path):
    root, _ = sample_gallery
    bigger = pipeline.append_index([str(root / "0" / "0.jpg")], ["extra"], index=index)
    assert len(bigger) == 25 and bigger.id_map[24] == "extra" and len(index) == 24
    (tmp_path / "ids.txt").write_text("24\n3\n", encoding="utf-8")
    smaller = pipeline.remove_index(remove_ids=str(tmp_path / "ids.txt"), index=bigger)
    assert 24 not in smaller.id_map and 3 not in smaller.id_map and len(smaller) == 23


def test_bad_gallery_line_fails_whole_build_with_line_number(pipeline, sample_gallery, tmp_path):
    root, label_file = sample_gallery
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    lines = label_file.read_text(encoding="utf-8").splitlines()[:3]
    (tmp_path / "g.txt").write_text(
        "\n".join([*(f"{root}/{ln}" for ln in lines), f"{tmp_path}/broken.jpg\tbad", f"{tmp_path}/nope.jpg\tx"]),
        encoding="utf-8",
    )
    with pytest.raises(ShiTuError, match=r"line 4.*not a readable image.*line 5|line 5.*line 4"):
        pipeline.build_index(gallery_imgs="/", gallery_label=str(tmp_path / "g.txt"))
    built = pipeline.build_index(gallery_imgs="/", gallery_label=str(tmp_path / "g.txt"), skip_invalid=True)
    assert len(built) == 3
    assert sorted(s.line_no for s in built.skipped) == [4, 5]


def test_index_from_another_model_is_refused(pipeline, index):
    foreign = GalleryIndex.build(np.eye(4, dtype="float32"), list("abcd"), index_type="Flat", feature_model="x:y")
    with pytest.raises(ShiTuError, match="rebuild"):
        list(pipeline.predict(np.zeros((32, 32, 3), np.uint8), index=foreign))


def test_bad_inputs(pipeline, index, tmp_path):
    with pytest.raises(ShiTuError, match="no such image"):
        pipeline.predict(str(tmp_path / "missing.jpg"), index=index)  # raised now, not on next()
    with pytest.raises(ShiTuError, match="no index"):
        pipeline.predict(np.zeros((8, 8, 3), np.uint8), index=None)
    with pytest.raises(TypeError):
        pipeline.predict(np.zeros((8, 8, 3), np.uint8), index=index, rec_thresold=0.5)  # misspelt
    with pytest.raises(ShiTuError, match="img"):
        list(pipeline.predict({"image": "x"}, index=index))
    with pytest.raises(ShiTuError, match="no index"):
        list(pipeline.predict(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ShiTuError, match="rec_topk"):
        list(pipeline.predict(np.zeros((8, 8, 3), np.uint8), index=index, rec_topk=0))


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_seed_script_shape(pipeline, sample_gallery, tmp_path):
    """PaddleX's example: build_index → save → predict(index=dir) → print/save."""
    root, label_file = sample_gallery
    index_data = pipeline.build_index(gallery_imgs=str(root), gallery_label=str(label_file), index_type="IVF")
    index_data.save(str(tmp_path / "my.index"))
    index_data = pipeline.append_index(
        gallery_imgs=str(root), gallery_label=str(label_file), index=str(tmp_path / "my.index")
    )
    index_data = pipeline.remove_index(remove_ids=[0, 1], index=index_data)
    index_data.save(str(tmp_path / "my.index"))
    out = list(pipeline.predict(str(root / "1" / "0.jpg"), index=str(tmp_path / "my.index")))
    assert isinstance(out[0], ShiTuResult) and isinstance(out[0], dict)
    assert len(load_index(tmp_path / "my.index")) == 46


# --- model resolution --------------------------------------------------------------------------
def test_local_model_dir_from_yaml_wins(runtime, tmp_path):
    starter_dir = Path(runtime.recognition.model_dir)
    shutil.copytree(starter_dir, tmp_path / "my_rec")
    config = PipelineConfig()
    config.recognition.model_dir = "my_rec"  # relative to the YAML file
    path = config.save(tmp_path / "PP-ShiTuV2.yaml")
    local = create_pipeline(str(path), data_dir=tmp_path / "data", model_dir=runtime.settings.models_dir, offline=True)
    assert local.models["recognition"]["source"] == "local"
    assert local.models["recognition"]["model_dir"] == "my_rec", "the dir's name, never a server path"
    assert local.config.recognition.model_dir == str((tmp_path / "my_rec").resolve())
    config.recognition.model_dir = str(tmp_path / "nowhere")
    config.save(path)
    with pytest.raises(ShiTuError, match="not a PaddleX model dir"):
        create_pipeline(str(path), offline=True)


def test_official_weights_in_paddlex_cache_are_preferred(runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    cached = tmp_path / "pdx" / "official_models" / "PP-ShiTuV2_rec"
    shutil.copytree(runtime.recognition.model_dir, cached, ignore=shutil.ignore_patterns("starter.json"))
    official = Runtime(PipelineConfig(), make_settings(tmp_path / "data"), isolate=False)
    assert official.recognition.source == "official"
    assert official.feature_model == "official:PP-ShiTuV2_rec"


@pytest.mark.parametrize(
    "what, expected",
    [("starter copy", "a copy of the offline starter pack (it has starter.json)"),
     ("another model", "the model 'PP-LCNet_x1_0', not PP-ShiTuV2_rec")],
)  # fmt: skip
def test_a_model_dir_in_paddlex_cache_that_is_not_official_is_never_called_official(
    runtime, tmp_path, monkeypatch, what, expected
):
    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    cached = tmp_path / "pdx" / "official_models" / "PP-ShiTuV2_rec"
    shutil.copytree(runtime.recognition.model_dir, cached)
    if what == "another model":
        (cached / "starter.json").unlink()
        spec = yaml.safe_load((cached / "inference.yml").read_text(encoding="utf-8"))
        spec["Global"]["model_name"] = "PP-LCNet_x1_0"
        (cached / "inference.yml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    rt = Runtime(PipelineConfig(), make_settings(tmp_path / "data"), isolate=False)
    assert rt.recognition.source == "starter", "the real starter pack runs instead"
    assert f"PaddleX's cache holds {expected} under PP-ShiTuV2_rec, so it is not used as official" in (
        rt.recognition.reason
    )
    assert rt.feature_model == runtime.feature_model, "indices built on the starter pack stay usable"
    assert (cached / "inference.yml").is_file(), "what the user put in PaddleX's cache is left alone"


def test_unreachable_hub_is_decided_with_a_reason(tmp_path, monkeypatch):

    import shitu.models as models

    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    monkeypatch.setattr(models, "_hub_failure", None)
    path, reason = try_official("PP-ShiTuV2_rec_CLIP_vit_base", offline=False)
    if path is not None:
        pytest.skip("a model hub is reachable from this machine")
    # offline: no hub answers; online, a large model may not arrive within the start-up deadline
    # (it is then fetched in the background, see tests/test_mirror.py)
    assert "\n" not in reason and ("no model hub reachable" in reason or "deadline" in reason or "stalled" in reason)


@pytest.mark.slow
def test_concurrent_predictions_do_not_mix(pipeline, index, sample_queries):
    """The UI and the API call one pipeline from many threads. Unguarded, PaddleX predictors
    mixed up two threads' batches, and Paddle Inference raised "std::exception" when run from
    a succession of new threads (as web servers' thread pools do)."""
    images = [np.asarray(Image.open(q).convert("RGB")) for q in sample_queries[1:5]]
    index = index.gallery  # the engine takes the GalleryIndex the PaddleX API's IndexData holds
    expected = [
        pipeline.engine.recognize(im, index, det_threshold=0.25, rec_threshold=0.0, rec_topk=1).to_dict()["boxes"]
        for im in images
    ]
    errors: list[BaseException] = []
    mismatches: list[int] = []

    def work(offset: int) -> None:
        for i in range(6):
            k = (i + offset) % len(images)
            try:
                got = pipeline.engine.recognize(images[k], index, det_threshold=0.25, rec_threshold=0.0, rec_topk=1)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                continue
            if [b["labels"][0] for b in got.to_dict()["boxes"]] != [b["labels"][0] for b in expected[k]]:
                mismatches.append(k)

    for t in range(12):  # one new thread after another
        thread = threading.Thread(target=work, args=(t,))
        thread.start()
        thread.join()
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]  # at the same time
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []


@pytest.mark.slow
def test_whitened_index_uses_its_own_threshold(pipeline, sample_queries, tmp_path):
    from shitu.sample import write_gallery

    root = tmp_path / "big"
    label_file = write_gallery(root, per_class=34)  # 204 images: enough to fit whitening
    whitened = pipeline.build_index(gallery_imgs=str(root), gallery_label=str(label_file), whiten=True)
    assert whitened.whitening is not None and len(whitened) == 204
    engine = pipeline.engine
    assert engine.rec_threshold_for(whitened) == whitened.suggested_rec_threshold < engine.default_rec_threshold
    correct = 0
    for label, query in zip(LABELS, sample_queries[1:]):
        (res,) = pipeline.predict(str(query), index=whitened, whole_image="always")  # threshold from the index
        correct += any(o.whole_image and o.label == label for o in res.objects)
    assert correct >= 5


def test_explicit_threshold_is_used_as_given(pipeline, index, sample_queries):
    """None means "the default"; an explicit 0.5 is 0.5 (it used to become the starter's 0.85)."""
    (res,) = pipeline.predict(str(sample_queries[1]), index=index, whole_image="always", rec_threshold=0.5)
    assert res["rec_threshold"] == 0.5
    (res,) = pipeline.predict(str(sample_queries[1]), index=index, whole_image="always")
    # no threshold given: the index's own calibrated one (every index with 3+ labels has one)
    assert res["rec_threshold"] == index.calibration.threshold == pipeline.engine.rec_threshold_for(index) != 0.5


def test_paddlex_style_script_runs_unchanged(pipeline, index, sample_queries, tmp_path, capsys):
    """What a PaddleX user writes, checked against PaddleX's own result class and schema."""
    from paddlex.inference.pipelines.pp_shitu_v2.result import ShiTuResult as PaddleXResult

    for res in pipeline.predict(str(sample_queries[0]), index=index):
        label = res["boxes"][0]["labels"][0]
        x1, y1, x2, y2 = res["boxes"][0]["coordinate"]
        assert isinstance(res, dict) and (label is None or isinstance(label, str)) and x2 > x1 and y2 > y1
        assert set(res.json["res"]) >= {"input_path", "boxes"}
        assert "input_img" not in res.json["res"] and res["input_img"].shape[2] == 3
        res.print(indent=2)
        res.print(format_json=True, indent=4, ensure_ascii=False)  # as the seed's pipeline docs write it
        res.print(json_format=True, indent=4, ensure_ascii=False)  # PaddleX's own parameter name
        res.print(True)
        res.save_to_json(tmp_path, indent=4, ensure_ascii=False)
        res.save_to_img(tmp_path)
        assert res.img["res"].size == res["input_img"].shape[1::-1]
        theirs = PaddleXResult(dict(res))  # PaddleX's own class accepts our dict ...
        assert json.loads(theirs._to_str(json_format=True))["res"]["boxes"] == res.json["res"]["boxes"]
        for box in res["boxes"]:  # ... and every box has PaddleX's keys and types
            assert {"labels", "rec_scores", "det_score", "coordinate"} <= set(box)
            assert len(box["labels"]) == len(box["rec_scores"]) and len(box["coordinate"]) == 4
    out = capsys.readouterr().out
    assert '"boxes"' in out and '"input_img"' not in out
    assert '\n    "res": {' in out, "format_json pretty-prints with the indent given"
    assert (tmp_path / "query_two_objects_res.json").exists() and (tmp_path / "query_two_objects_res.jpg").exists()


@pytest.mark.milvus
def test_the_seed_scripts_create_two_pipelines_in_one_process_on_milvus(tmp_path, sample_gallery, monkeypatch):
    """PaddleX's §2.2.3 creates a pipeline per snippet: both work on one Milvus Lite file (one
    connection per URI per process, shared)."""
    pytest.importorskip("milvus_lite")
    root, label_file = sample_gallery
    common = {"data_dir": tmp_path / "data", "model_dir": MODEL_CACHE, "offline": True, "vector_store": "milvus"}
    first = create_pipeline("PP-ShiTuV2", **common)
    second = create_pipeline("PP-ShiTuV2", **common)
    try:
        built = first.build_index(gallery_imgs=str(root), gallery_label=str(label_file), index_type="Flat")
        first.engine.build("shared", as_batch(str(root), str(label_file)))
        assert second.engine.index_names() == ["shared"] and len(second.engine.index("shared")) == len(built)
        edited = second.remove_index(remove_ids=[0, 1], index=built)
        assert len(edited) == len(built) - 2
    finally:
        first.close()
        second.close()
