"""Calibration, adaptation and learning from use through the real stack: PaddleX's predictors
(the offline starter pack), faiss, the engine, the FastAPI app and the CLI."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shitu.__main__ import main
from shitu.api import create_api
from shitu.errors import Conflict
from shitu.gallery import GalleryBatch, read_label_file

from .conftest import MODEL_CACHE, sample_index
from .test_api import assert_error, fresh_engine, ok, snapshot


def _box_of(engine, query, index: str = "shop"):
    """The most confident box of a recognition of ``query`` (against ``index``)."""
    rec = engine.recognize(query, index, whole_image="never", rec_threshold=0.0)
    assert rec.objects, "the detector finds the products of the composite query"
    return rec, max(rec.objects, key=lambda o: o.det_score)


@pytest.fixture
def shop(tmp_path, runtime, template, sample_gallery):
    return sample_index(fresh_engine(runtime, tmp_path / "data"), "shop", template, sample_gallery)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_every_index_is_calibrated_and_predict_uses_its_threshold(shop, sample_queries):
    index = shop.index("shop")
    c = index.calibration
    assert c is not None and c.protocol == "leave-one-out" and c.known == 24
    assert c.chosen.unknown_rejected >= 0.8, "the default point keeps the promise on its own gallery"
    assert not index.adaptation.applied and "too small" in index.adaptation.reason  # 24 photos
    rec = shop.recognize(sample_queries[1], "shop", whole_image="always")
    assert rec.rec_threshold == c.threshold  # no threshold given: the index's own
    shop.set_threshold("shop", 0.42)
    assert shop.recognize(sample_queries[1], "shop", whole_image="always").rec_threshold == 0.42
    assert shop.recognize(sample_queries[1], "shop", whole_image="always", rec_threshold=0.6).rec_threshold == 0.6
    assert shop.versions("shop")[0].action == "threshold 0.420"
    # a refit measures the curve again and goes back to the calibrated default
    shop.calibrate("shop", adapt="off")
    again = shop.calibration("shop")
    assert again.chosen_by == "default" and again.threshold == c.threshold


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_teaching_a_box_makes_the_next_query_recognise_it(shop, sample_queries):
    query = sample_queries[0]  # two products on one table
    rec, obj = _box_of(shop, query)
    before = len(shop.index("shop"))
    report = shop.teach("shop", rec.image, obj.bbox, "  新产品 new product  ")
    index = shop.index("shop")
    taught = index.entry(report.added_ids[0])
    assert len(index) == before + 1 and taught.label == "新产品 new product"
    assert taught.source.startswith("taught box (")
    thumb = Image.open(io.BytesIO(taught.thumbnail))
    box_w, box_h = obj.bbox[2] - obj.bbox[0], obj.bbox[3] - obj.bbox[1]
    assert abs(thumb.width / thumb.height - box_w / box_h) < 0.1, "the thumbnail is the box, not the whole photo"
    assert index.changes_since_calibration == 0, "the calibration followed the change"
    assert shop.versions("shop")[0].action == "add 1"

    again = shop.recognize(query, "shop", whole_image="never")
    same = min(again.objects, key=lambda o: np.abs(np.subtract(o.bbox, obj.bbox)).sum())
    assert same.labels and same.labels[0] == "新产品 new product" and same.scores[0] > 0.95


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_teaching_reuses_the_querys_feature_and_refuses_a_box_already_there(shop, sample_queries, monkeypatch):
    """The UI teaches with the feature its query computed: nothing is embedded again, the entry is
    what an embedding of the crop would have given, and the same box a second time is refused."""
    rec, obj = _box_of(shop, sample_queries[0])
    assert obj.feature is not None and rec.feature_model == shop.feature_model
    embedded, _, _ = shop.embed_gallery(GalleryBatch(items=[_item(rec, obj)]))

    def no_embedding(*args, **kwargs):
        raise AssertionError("the crop was embedded again")

    monkeypatch.setattr(shop, "embed_gallery", no_embedding)
    report = shop.teach("shop", rec.image, obj.bbox, "new product", feature=obj.feature,
                        feature_model=rec.feature_model)  # fmt: skip
    new_id = report.added_ids[0]
    index = shop.index("shop")
    assert index.entry(new_id).label == "new product" and index.changes_since_calibration == 0
    scores, ids = index.search(embedded, topk=1)
    assert ids[0, 0] == new_id and scores[0, 0] > 0.999, "the same vector an embedding of the crop gives"
    assert index.entry(new_id).thumbnail, "a thumbnail of the box"
    before = snapshot(shop)
    with pytest.raises(Conflict, match=f"this box is already entry #{new_id} \\(new product\\) of shop"):
        shop.teach("shop", rec.image, obj.bbox, "new product", feature=obj.feature, feature_model=rec.feature_model)
    with pytest.raises(Conflict, match=f"already entry #{new_id}"):  # under another label too: relabel it instead
        shop.teach("shop", rec.image, obj.bbox, "other", feature=obj.feature)
    assert snapshot(shop) == before
    monkeypatch.undo()
    # a feature from a model that no longer runs is not used: the crop is embedded (and found again)
    with pytest.raises(Conflict, match=f"already entry #{new_id}"):
        shop.teach("shop", rec.image, obj.bbox, "x", feature=np.ones_like(obj.feature), feature_model="another model")


def _item(rec, obj):
    from shitu.gallery import GalleryItem, crop_box

    return GalleryItem("crop", crop_box(rec.image, obj.bbox), "x")


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_teaching_refuses_bad_boxes_and_labels_and_changes_nothing(shop, sample_queries):
    rec, obj = _box_of(shop, sample_queries[0])
    before = snapshot(shop)
    with pytest.raises(Exception, match="label is empty"):
        shop.teach("shop", rec.image, obj.bbox, "  ")
    with pytest.raises(Exception, match="no area"):
        shop.teach("shop", rec.image, (5000, 5000, 6000, 6000), "x")
    with pytest.raises(Exception, match="four"):
        shop.teach("shop", rec.image, (1, 2, 3), "x")
    with pytest.raises(Exception, match="finite"):
        shop.teach("shop", rec.image, (0, 0, float("nan"), 10), "x")
    assert snapshot(shop) == before


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_adapted_index_is_refitted_when_taught(tmp_path, runtime, sample_gallery, sample_queries):
    """A gallery big enough to adapt (60 photos of 6 products, views repeated with small changes)."""
    engine = fresh_engine(runtime, tmp_path / "data")
    root, labels = sample_gallery
    items = read_label_file(labels, root).items
    batch = GalleryBatch(items=[*items, *items, *items[:12]])  # 60 entries: enough to learn from
    engine.build("big", batch, adapt="on")
    index = engine.index("big")
    assert index.adaptation.applied and index.whitening.kind == "supervised"
    assert index.calibration.protocol == "held-out folds"
    # a new photo of the first product (its gallery photos themselves would be refused as duplicates)
    rec = engine.recognize(sample_queries[1], "big", whole_image="always", rec_threshold=0.0)
    engine.teach("big", rec.image, rec.objects[0].bbox, items[0].label)
    taught = engine.index("big")
    assert len(taught) == 61 and taught.changes_since_calibration == 0
    assert taught.whitening is not index.whitening, "the projection was refitted with the new entry"
    assert engine.versions("big")[0].action.startswith("calibrate")
    # the report does not pass off leave-one-out in a space fitted to these entries as accuracy
    report = engine.report("big")
    assert any("optimistic" in note and "Held out" in note for note in report.notes)
    assert any(line.startswith("note: ") and "optimistic" in line for line in report.summary_lines()), "CLI too"
    from shitu.ui.evaluate import evaluate_index

    summary = evaluate_index(engine, "big")[0]
    assert f"recall@1 **{taught.adaptation.adapted_recall:.1%}**" in summary


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_http_calibration_threshold_and_taught_boxes(tmp_path, runtime, sample_gallery, sample_queries):
    engine = fresh_engine(runtime, tmp_path / "data")
    root, labels = sample_gallery
    engine.build("shop", read_label_file(labels, root))
    with TestClient(create_api(engine)) as client:
        got = ok(client.get("/shitu-index/shop/calibration"))
        assert got["threshold"] == engine.index("shop").calibration.threshold and got["chosenBy"] == "default"
        assert got["expected"]["unknown_rejected"] >= 0.8 and len(got["curve"]) > 10
        assert got["adaptation"]["applied"] is False
        set_ = ok(client.post("/shitu-index/shop/threshold", json={"threshold": 0.5}))
        assert set_["threshold"] == 0.5 and set_["chosenBy"] == "user"
        infer = ok(client.post("/shitu-infer", json={"image": base64.b64encode(sample_queries[1].read_bytes()).decode(),
                                                     "indexKey": "shop"}))  # fmt: skip
        assert infer is not None
        assert_error(client.post("/shitu-index/shop/threshold", json={"threshold": 3}), 422, "threshold")
        assert_error(client.get("/shitu-index/nope/calibration"), 404, "nope")
        refit = ok(client.post("/shitu-index/shop/calibration", json={"adapt": "off"}))
        assert refit["chosenBy"] == "default"

        # learn from use: a box of an /shitu-infer result, added under a corrected label
        data = sample_queries[0].read_bytes()
        result = ok(client.post("/shitu-infer", json={"image": base64.b64encode(data).decode(), "indexKey": "shop"}))
        box = max(result["detectedObjects"], key=lambda o: o["score"])["bbox"]
        before = snapshot(engine)
        bad = {"image": base64.b64encode(data).decode(), "label": "x", "bbox": [9000, 9000, 9100, 9100]}
        assert_error(client.post("/shitu-index-add", json={"imageLabelPairs": [bad], "indexKey": "shop"}), 400,
                     "imageLabelPairs[0].bbox")  # fmt: skip
        short = {**bad, "bbox": [1, 2, 3]}
        assert client.post("/shitu-index-add", json={"imageLabelPairs": [short], "indexKey": "shop"}).status_code == 422
        assert snapshot(engine) == before
        pair = {"image": base64.b64encode(data).decode(), "label": "corrected", "bbox": box}
        added = ok(client.post("/shitu-index-add", json={"imageLabelPairs": [pair], "indexKey": "shop"}))
        assert added["imageCount"] == 25 and "corrected" in added["idMap"].values()
        after = ok(client.post("/shitu-infer", json={"image": base64.b64encode(data).decode(), "indexKey": "shop"}))
        labels_now = [r["label"] for o in after["detectedObjects"] for r in o["recResults"]]
        assert "corrected" in labels_now


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_cli_calibrate_threshold_and_teach(tmp_path, monkeypatch, sample_gallery, sample_queries, capsys):
    monkeypatch.setenv("SHITU_MODEL_DIR", str(MODEL_CACHE))
    monkeypatch.setenv("SHITU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    root, labels = sample_gallery
    assert main(["build", "--gallery-root", str(root), "--labels", str(labels), "--index", "demo",
                 "--adapt", "off"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "adaptation (off): off — switched off" in out and "unknown objects rejected" in out
    assert main(["calibrate", "--index", "demo", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["calibration"]["threshold"] == printed["curve"]["threshold"] and printed["curve"]["points"]
    assert main(["threshold", "--index", "demo", "0.61"]) == 0
    assert "threshold 0.610 (picked by the user)" in capsys.readouterr().out
    assert main(["predict", str(sample_queries[0]), "--index", "demo", "--json", "--whole-image", "never"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rec_threshold"] == 0.61
    box = ",".join(str(v) for v in printed["boxes"][0]["coordinate"]) if "boxes" in printed else None
    if box is None:  # PaddleX's result layout: detected objects with a bbox
        box = ",".join(str(v) for v in printed["objects"][0]["bbox"])
    assert main(["teach", str(sample_queries[0]), "--index", "demo", "--box", box, "--label", "taught"]) == 0
    assert "added #24 (taught)" in capsys.readouterr().out
    assert main(["teach", str(sample_queries[0]), "--index", "demo", "--box", "1,2", "--label", "x"]) != 0
