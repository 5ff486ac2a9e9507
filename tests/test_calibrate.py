"""Calibration for real queries (issue #29): query-like views, the per-model prior, confirmed
answers, the uncertainty and the floor — the policy on synthetic scores, the rest through the
real stack (the offline starter models, the engine, faiss)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shitu import calibrate as cal
from shitu.api import create_api
from shitu.augment import VIEW_BUDGET, VIEWS_PER_PHOTO, make_views, query_view, view_plan
from shitu.calibrate import Calibration, Prior, QueryStats, calibrate_stats
from shitu.gallery import GalleryBatch, GalleryItem, read_label_file
from shitu.index import GalleryIndex
from shitu.stores.layout import VIEWS_FILE
from shitu.threshold import accepts

from .conftest import VECTOR_STORE
from .test_adapt import nuisance_gallery
from .test_api import fresh_engine, ok

# the Milvus store keeps a gallery's rows and state but not (yet) its views: its calibrations after a
# reload are made from the photos alone
faiss_only = pytest.mark.skipif(VECTOR_STORE == "milvus", reason="the Milvus store does not keep views")


@pytest.mark.parametrize(
    ("score", "threshold", "raw", "floor", "expected"),
    [
        (0.8, 0.7, None, None, True),
        (0.6, 0.7, None, None, False),
        (0.8, 0.7, 0.9, 0.75, True),
        (0.8, 0.7, 0.6, 0.75, False),  # near a product only in the fitted space: unknown
        (0.6, 0.7, 0.9, 0.75, False),
        (0.8, 0.7, float("nan"), 0.75, True),  # no unprojected feature to compare: the threshold decides
    ],
)
def test_the_threshold_policy(score, threshold, raw, floor, expected):
    assert accepts(score, threshold, raw, floor) is expected


def _stats(rng, *, photos=30, views_per_photo=4, real=0, view_shift=-0.05, real_shift=-0.03) -> QueryStats:
    """Photos whose unknowns score ~N(0.80, 0.02); their views ``view_shift`` lower, confirmed
    answers ``real_shift`` lower (a capture gap the photos do not show)."""
    parts = []
    for kind, n, shift, weight, groups in (
        (0, photos, 0.0, 1.0, np.arange(photos)),
        (1, photos * views_per_photo, view_shift, 1.0, np.repeat(np.arange(photos), views_per_photo)),
        (2, real, real_shift, cal.REAL_QUERY_WEIGHT, np.arange(photos, photos + real)),
    ):
        unknown = rng.normal(0.80 + shift, 0.02, n)
        known = unknown + 0.08
        parts.append(QueryStats(known, np.ones(n, bool), unknown, np.full(n, 0.9), np.full(n, 0.7),
                                np.full(n, weight), groups.astype(np.int64), np.full(n, kind, np.int8)))  # fmt: skip
    return QueryStats.concat(parts)


def test_views_moved_up_by_the_model_offset_set_the_threshold_and_say_how_sure():
    rng = np.random.default_rng(0)
    stats = _stats(rng, photos=40)
    photos_only = calibrate_stats(stats, entries=40, views=False)
    no_prior = Prior(offset=0.05, offset_sd=0.005, a=0.0, b=0.0, tau=float("inf"), source="test")
    c = calibrate_stats(stats, entries=40, prior=no_prior)
    # the views sit 0.05 below the photos and the offset says real queries sit 0.05 above the views
    assert c.threshold == pytest.approx(photos_only.threshold, abs=0.01)
    assert c.evidence["estimate"] == "gallery photos and query-like views" and c.evidence["views"] == 160
    assert c.uncertainty is not None and cal.MIN_OFFSET_SPREAD <= c.uncertainty < 0.1
    assert photos_only.uncertainty is None  # the photos alone, as before: no claim
    # a model without a measured offset: the photos' own point (views are kept but not trusted)
    fallback = calibrate_stats(stats, entries=40, prior=cal.FALLBACK_PRIOR)
    assert fallback.threshold == pytest.approx(photos_only.threshold, abs=1e-3)
    assert fallback.evidence["estimate"] == "gallery photos"
    # the prior's level pulls a small gallery a little, never by more than its weight says
    level = Prior(offset=0.05, offset_sd=0.005, a=0.70, b=0.0, tau=0.01, source="test")
    pulled = calibrate_stats(stats, entries=40, prior=level)
    w = pulled.evidence["prior_weight"]
    assert 0 < w < 0.5
    assert pulled.threshold == pytest.approx(w * 0.70 + (1 - w) * pulled.evidence["own_threshold"], abs=1e-3)
    text = pulled.describe()
    assert text.startswith(f"threshold {pulled.threshold:.2f} ± ") and "40 photos, 160 query-like views" in text


def test_confirmed_answers_move_the_threshold_towards_how_real_queries_score():
    rng = np.random.default_rng(1)
    prior = Prior(offset=0.05, offset_sd=0.005, a=0.0, b=0.0, tau=float("inf"), source="test")
    before = calibrate_stats(_stats(rng, photos=20, real=0), entries=20, prior=prior)
    after = calibrate_stats(_stats(rng, photos=20, real=12, real_shift=-0.06), entries=32, prior=prior,
                            taught=range(20, 32))  # fmt: skip
    assert after.evidence["confirmed"] == 12 and after.taught == list(range(20, 32))
    assert after.evidence["confirmed_threshold"] < before.threshold - 0.03
    assert after.threshold < before.threshold - 0.02, "real answers say the photos are too strict"
    assert after.uncertainty < before.uncertainty
    assert "12 confirmed answers" in after.describe()


def test_plain_background_photos_are_told_from_real_ones_through_their_thumbnails():
    from shitu.gallery import make_thumbnail, plain_background, plain_share
    from shitu.sample import _photo

    photo = np.asarray(_photo("coffee"))
    canvas = np.full((500, 500, 3), 255, np.uint8)
    canvas[60:440, 40:460] = np.asarray(Image.fromarray(photo).resize((420, 380)))
    assert not plain_background(photo) and plain_background(canvas)
    gray = np.where(canvas == 255, 128, canvas).astype(np.uint8)  # another plain colour
    assert plain_background(gray)
    assert plain_share([make_thumbnail(photo), make_thumbnail(canvas), make_thumbnail(gray)]) == pytest.approx(2 / 3)
    assert plain_share([None, b"not a jpeg"]) is None


def test_a_plain_background_gallery_gets_the_models_plain_prior_in_proportion():
    real = Prior(offset=0.04, offset_sd=0.01, a=0.78, b=0.0, tau=0.01, source="real", photos_offset=0.0,
                 photos_sd=0.007)  # fmt: skip
    plain = Prior(offset=0.0, offset_sd=0.012, a=0.74, b=0.0, tau=0.02, source="plain", photos_offset=-0.05,
                  photos_sd=0.015)  # fmt: skip
    saved = dict(cal.PRIORS)
    cal.PRIORS.update({"m|raw": real, "m|raw|plain": plain})
    try:
        assert cal.prior_for("m", "raw") is real and cal.prior_for("m", "raw", 0.0) is real
        assert cal.prior_for("m", "raw", 1.0) is plain
        half = cal.prior_for("m", "raw", 0.5)
        assert half.offset == pytest.approx(0.02) and half.a == pytest.approx(0.76)
        assert half.photos_offset == pytest.approx(-0.025) and "50% plain" in half.source
        assert cal.prior_for("m", "adapted", 1.0) is cal.FALLBACK_PRIOR  # nothing measured for that space
        cal.PRIORS.update({"n|raw": real})
        assert cal.prior_for("n", "raw", 1.0) is real  # a model without a plain prior: its own
    finally:
        cal.PRIORS.clear()
        cal.PRIORS.update(saved)
    # the plain prior's smaller offset lowers the threshold of the same scores; the record says why
    rng = np.random.default_rng(4)
    stats = _stats(rng, photos=30)
    views_real = calibrate_stats(stats, entries=30, prior=dataclasses.replace(real, tau=float("inf")), plain=0.0)
    views_plain = calibrate_stats(stats, entries=30, prior=dataclasses.replace(plain, tau=float("inf")), plain=1.0)
    assert views_plain.threshold < views_real.threshold - 0.02
    assert views_plain.evidence["plain_share"] == 1.0
    assert "30 photos (30 on a plain background)" in views_plain.describe()
    assert "plain" not in views_real.describe()


def test_calibration_records_round_trip_and_old_ones_still_load():
    rng = np.random.default_rng(2)
    prior = Prior(offset=0.05, offset_sd=0.005, a=0.8, b=0.0, tau=0.05, source="test")
    c = calibrate_stats(_stats(rng), entries=30, prior=prior, floor=True, taught=[3, 4])
    assert c.floor is not None and c.taught == [3, 4]
    assert Calibration.from_dict(c.to_dict()) == c
    old = {k: v for k, v in c.to_dict().items() if k not in ("uncertainty", "floor", "evidence", "taught")}
    back = Calibration.from_dict(old)
    assert back.threshold == c.threshold and back.uncertainty is None and back.floor is None and back.taught == []


def test_views_are_deterministic_bounded_and_query_like():
    photo = np.random.default_rng(3).integers(0, 255, size=(480, 360, 3), dtype=np.uint8)
    first, again = make_views(photo, 7, 2), make_views(photo, 7, 3)
    assert [v.shape for v in first] == [v.shape for v in again[:2]]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(make_views(photo, 8, 1)[0], first[0])  # another photo, another view
    view = query_view(photo, np.random.default_rng(0))
    assert view.dtype == np.uint8 and view.ndim == 3 and max(view.shape[:2]) <= 2 * 320
    assert view_plan(5).tolist() == [VIEWS_PER_PHOTO] * 5
    assert int(view_plan(10_000).sum()) == VIEW_BUDGET and view_plan(10_000).max() == 1


def test_an_adapted_index_has_a_floor_and_searches_the_raw_space_for_it(tmp_path):
    x, labels = nuisance_gallery(seed=1)
    index = GalleryIndex.build(x, labels, index_type="Flat", adapt="on")
    c = index.calibration
    assert c.protocol == "held-out folds" and c.floor is not None
    scores, ids = index.search(x[:4], topk=3)
    raw = index.raw_similarity(x[:4], ids)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert raw.shape == ids.shape and raw[0, 0] == pytest.approx(float(unit[0] @ unit[ids[0, 0]]), abs=1e-3)
    assert GalleryIndex.build(x, labels, index_type="Flat", adapt="off").raw_similarity(x[:1], ids[:1]) is None


@faiss_only
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_small_gallery_built_by_the_engine_is_calibrated_on_its_views_and_learns_from_teaching(
    tmp_path, runtime, sample_gallery, sample_queries
):
    engine = fresh_engine(runtime, tmp_path / "data")
    root, labels = sample_gallery
    engine.build("shop", read_label_file(labels, root))
    index = engine.index("shop")
    assert index.fit.views is not None and len(index.fit.views[0]) == VIEWS_PER_PHOTO * len(index)
    summary = index.summary()["calibration"]
    assert summary["uncertainty"] is not None and summary["uncertainty"] > 0
    assert summary["evidence"]["views"] == VIEWS_PER_PHOTO * len(index)
    assert summary["evidence"]["estimate"] == "gallery photos and query-like views", summary["evidence"]
    assert summary["confirmed_answers"] == 0
    assert summary["text"].startswith(f"threshold {summary['threshold']:.2f} ± ") and "24 photos" in summary["text"]
    assert (engine.settings.indices_dir / "shop" / VIEWS_FILE).exists()
    with TestClient(create_api(engine)) as client:  # the API says the same
        got = ok(client.get("/shitu-index/shop/calibration"))
        assert got["uncertainty"] == summary["uncertainty"] and got["summary"] == summary["text"]
        assert got["confirmedAnswers"] == 0 and got["evidence"]["views"] == summary["evidence"]["views"]

    rec = engine.recognize(sample_queries[0], "shop", whole_image="never", rec_threshold=0.0)
    obj = max(rec.objects, key=lambda o: o.det_score)
    report = engine.teach("shop", rec.image, obj.bbox, obj.candidate[0])
    taught = engine.index("shop")
    assert taught.calibration.taught == [report.added_ids[0]]
    assert taught.summary()["calibration"]["confirmed_answers"] == 1
    # relabelling the taught crop (a corrected answer) keeps it a confirmed answer under its new label
    engine.relabel("shop", report.added_ids[0], "新产品 new product")
    relabelled = engine.index("shop")
    assert relabelled.calibration.taught == [report.added_ids[0]]
    # it survives a reload from disk (the change log carries the calibration) and a refit
    engine2 = fresh_engine(runtime, tmp_path / "data")
    engine2.calibrate("shop")
    again = engine2.index("shop")
    assert again.calibration.taught == [report.added_ids[0]] and again.fit.views is not None
    assert again.calibration.evidence["views"] == VIEWS_PER_PHOTO * 24


@faiss_only
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def _built(tmp_path, runtime, sample_gallery, name: str):
    """A fresh engine with the sample gallery built as ``name``: ``(engine, the gallery's items)``."""
    engine = fresh_engine(runtime, tmp_path / "data")
    root, labels = sample_gallery
    items = read_label_file(labels, root).items
    engine.build(name, GalleryBatch(items=items))
    return engine, items


def test_adding_photos_keeps_the_views_of_the_build_and_drops_those_of_removed_photos(tmp_path, runtime,
                                                                                      sample_gallery):  # fmt: skip
    engine, items = _built(tmp_path, runtime, sample_gallery, "shop")
    first = engine.index("shop").ids[0]
    engine.remove("shop", [int(first)])
    index = engine.index("shop")
    assert index.calibration.evidence["views"] == VIEWS_PER_PHOTO * (len(items) - 1)
    extra = GalleryItem(source="again.jpg", image=items[1].image, label=items[1].label)
    engine.add("shop", GalleryBatch(items=[extra]))
    assert engine.index("shop").calibration.evidence["views"] == VIEWS_PER_PHOTO * (len(items) - 1)


@faiss_only
@pytest.mark.slow  # builds two galleries: --full (CI) runs it
def test_a_studio_gallery_is_seen_to_be_one_and_stays_one_through_changes(tmp_path, runtime, sample_gallery):
    from shitu.gallery import load_image

    engine, items = _built(tmp_path, runtime, sample_gallery, "photos")
    studio_items = []
    for k, item in enumerate(items):  # the same photos as studio shots: on a white canvas
        rgb = load_image(item.image)
        h, w = rgb.shape[:2]
        canvas = np.full((int(h * 1.4), int(w * 1.4), 3), 255, np.uint8)
        canvas[int(h * 0.2) : int(h * 0.2) + h, int(w * 0.2) : int(w * 0.2) + w] = rgb
        path = tmp_path / f"studio{k}.png"
        Image.fromarray(canvas).save(path)
        studio_items.append(GalleryItem(source=path.name, image=path, label=item.label))
    engine.build("studio", GalleryBatch(items=studio_items))
    photos, studio = engine.index("photos").calibration, engine.index("studio").calibration
    # the sample's photos are real ones, but for three Hubble deep fields: galaxies on black sky
    assert photos.evidence["plain_share"] == pytest.approx(3 / 24) and "(3 on a plain background)" in photos.describe()
    assert studio.evidence["plain_share"] == 1.0 and "24 photos (24 on a plain background)" in studio.describe()
    assert "plain" in studio.evidence["prior"]  # the starter model's plain prior was used
    # the studio, the report and the API say so, with how sure the threshold is
    from shitu.ui.summaries import calibration_markdown

    said = f"threshold {studio.threshold:.2f} ± {studio.uncertainty:.2f} from 24 photos (24 on a plain background"
    assert said in calibration_markdown(engine.info("studio"))
    assert "纯色背景" in calibration_markdown(engine.info("studio"), "zh")
    with TestClient(create_api(engine)) as client:
        assert said in client.get("/shitu-index/studio/report?format=html").text
        assert said in ok(client.get("/shitu-index/studio/calibration"))["summary"]
    # a removal recalibrates at once; a reload and a refit from stored features keep what the build saw
    engine.remove("studio", [int(engine.index("studio").ids[0])])
    assert engine.index("studio").calibration.evidence["plain_share"] == 1.0
    again = fresh_engine(runtime, tmp_path / "data")
    again.calibrate("studio")
    assert again.index("studio").calibration.evidence["plain_share"] == 1.0
