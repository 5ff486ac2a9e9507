"""Gallery adaptation (supervised projection chosen by cross-validation) and calibration."""

from __future__ import annotations

import numpy as np
import pytest

from shitu.adapt import Projection, adapt
from shitu.calibrate import TARGET_REJECTION, Calibration, calibrate, calibrate_gallery
from shitu.errors import ShiTuError
from shitu.index import GalleryIndex
from shitu.stores.layout import load_index, save_index


def nuisance_gallery(labels: int = 30, per_label: int = 6, dim: int = 64, seed: int = 0, nuisance: float = 3.0):
    """Products whose photos vary a lot along a few shared directions (pose, light) that say
    nothing about the product: nearest neighbours on raw features are often wrong, and a
    projection learnt from the labels can squeeze those directions away."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels, dim))
    nuisance_basis = np.linalg.qr(rng.normal(size=(dim, 6)))[0]  # (dim, 6)
    rows, names = [], []
    for k in range(labels):
        for _ in range(per_label):
            x = centres[k] * 0.35 + nuisance * nuisance_basis @ rng.normal(size=6) + 0.15 * rng.normal(size=dim)
            rows.append(x + 4.0)  # a shared offset, as ReLU features have
            names.append(f"product {k}")
    return np.asarray(rows, dtype=np.float32), names


def heldout_recall(index: GalleryIndex, queries: np.ndarray, truth: list[str]) -> float:
    _, ids = index.search(queries, topk=1)
    return float(np.mean([index.entry(int(i)).label == t for i, t in zip(ids[:, 0], truth, strict=True)]))


def test_projection_is_chosen_when_it_helps_and_generalises_to_new_photos(tmp_path):
    x, labels = nuisance_gallery(seed=1)
    projection, calibration, record = adapt(x, labels, mode="auto")
    assert record.applied and projection is not None and projection.kind == "supervised"
    assert record.adapted_recall > record.raw_recall + 0.1, record
    assert calibration.protocol == "held-out folds"

    # new photos of the same products (never seen by the fit): the adapted index finds them
    raw_index = GalleryIndex.build(x, labels, index_type="Flat", adapt="off")
    adapted = GalleryIndex.build(x, labels, index_type="Flat", adapt="auto")
    queries, truth = nuisance_gallery(seed=1, per_label=2)  # same centres (seed), new draws
    queries, truth = queries[::2][:40], truth[::2][:40]
    queries += np.random.default_rng(5).normal(scale=0.01, size=queries.shape).astype(np.float32)
    assert heldout_recall(adapted, queries, truth) > heldout_recall(raw_index, queries, truth) + 0.1
    assert adapted.summary()["projection"] == "supervised"
    assert adapted.summary()["adaptation"]["applied"] is True

    save_index(adapted, tmp_path / "a")
    back = load_index(tmp_path / "a")
    assert back.whitening.kind == "supervised" and back.adaptation.applied
    assert back.calibration.threshold == adapted.calibration.threshold
    np.testing.assert_allclose(back.search(queries, topk=3)[0], adapted.search(queries, topk=3)[0], atol=1e-5)


def test_projection_stays_off_when_it_does_not_help():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(25, 48))
    x = np.repeat(centres, 5, axis=0) + 0.05 * rng.normal(size=(125, 48))  # already perfectly separated
    labels = [f"l{k}" for k in range(25) for _ in range(5)]
    projection, calibration, record = adapt(x.astype(np.float32), labels, mode="auto")
    assert projection is None and not record.applied
    assert "not worth it" in record.reason and record.raw_recall == 1.0
    assert calibration is not None and calibration.protocol == "leave-one-out"
    forced, _, forced_record = adapt(x.astype(np.float32), labels, mode="on")
    assert forced is not None and forced_record.applied


def test_small_galleries_are_not_adapted_and_say_why():
    x, labels = nuisance_gallery(labels=4, per_label=3)
    projection, _, record = adapt(x, labels, mode="on")
    assert projection is None and "too small" in record.reason
    with pytest.raises(ValueError, match="adapt must be one of"):
        adapt(x, labels, mode="sometimes")
    with pytest.raises(ShiTuError, match="adapt must be one of"):
        GalleryIndex.build(x, labels, adapt="sometimes")


def test_calibrated_threshold_rejects_the_promised_share_of_unknown_products():
    x, labels = nuisance_gallery(labels=40, seed=7)
    index = GalleryIndex.build(x, labels, index_type="Flat", adapt="auto")
    c = index.calibration
    assert c.chosen.unknown_rejected >= TARGET_REJECTION
    assert index.suggested_rec_threshold == c.threshold

    # products that are really not in the gallery: drop 10 labels, query their photos
    gone = {f"product {k}" for k in range(10)}
    keep = [i for i, lab in enumerate(labels) if lab not in gone]
    partial = GalleryIndex.build(x[keep], [labels[i] for i in keep], index_type="Flat", adapt="auto")
    unknown = x[[i for i, lab in enumerate(labels) if lab in gone]]
    scores, _ = partial.search(unknown, topk=1)
    rejected = float(np.mean(scores[:, 0] < partial.calibration.threshold))
    assert rejected >= TARGET_REJECTION - 0.15, rejected  # measured on photos the calibration never saw


def test_curve_shape_and_round_trip():
    rng = np.random.default_rng(0)
    known = rng.normal(0.8, 0.05, 300)
    correct = rng.random(300) < 0.9
    unknown = rng.normal(0.6, 0.05, 300)
    c = calibrate(known, correct, unknown)
    ts = [p.threshold for p in c.points]
    assert ts == sorted(ts) and len(ts) > 20
    rejected = [p.unknown_rejected for p in c.points]
    accepted = [p.correct_accepted + p.wrong_accepted for p in c.points]
    assert rejected == sorted(rejected) and accepted == sorted(accepted, reverse=True)
    assert c.chosen.unknown_rejected >= TARGET_REJECTION
    # the lowest such threshold: one step lower breaks the promise
    assert float(np.mean(unknown < c.threshold - 0.002)) < TARGET_REJECTION + 0.01
    assert Calibration.from_dict(c.to_dict()) == c
    assert Calibration.from_dict({"threshold": 1}) is None
    assert calibrate(known[:5], correct[:5], unknown[:5]) is None
    assert calibrate_gallery(np.eye(4, dtype="float32"), ["a", "a", "b", "b"]) is None  # 2 labels


def test_changes_keep_calibration_current_and_user_choice_survives(tmp_path):
    x, labels = nuisance_gallery(labels=12, per_label=4, seed=4)
    raw = GalleryIndex.build(x, labels, index_type="Flat", adapt="off")
    picked = raw.with_threshold(0.5)
    assert picked.calibration.threshold == 0.5 and picked.calibration.chosen_by == "user"
    grown = picked.add(x[:3] + 0.01, ["product 0"] * 3)
    # a raw-feature index recalibrates on every change; the user's threshold stays
    assert grown.calibration.known > picked.calibration.known
    assert grown.calibration.threshold == 0.5 and grown.changes_since_calibration == 0
    with pytest.raises(ShiTuError, match="between -1 and 1"):
        raw.with_threshold(2)

    adapted = GalleryIndex.build(*nuisance_gallery(seed=2), index_type="HNSW32", adapt="on")
    changed = adapted.add(x[:2, :64], ["new", "new"]).remove([0]).relabel(5, "renamed")
    assert changed.changes_since_calibration == 4
    assert changed.summary()["calibration"]["changes_since"] == 4
    save_index(changed, tmp_path / "c")
    back = load_index(tmp_path / "c")
    assert back.changes_since_calibration == 4
    refitted = back.recalibrated()
    assert refitted.changes_since_calibration == 0 and refitted.whitening.kind == "supervised"
    assert [e.id for e in refitted.entries] == [e.id for e in back.entries]
    assert refitted.entry(5).label == "renamed" and refitted.next_id == back.next_id
    # the refit projection still finds every stored entry as its own nearest neighbour
    ids, _ = back.vectors()
    own = refitted.raw_features(ids[:20])
    assert refitted.search(own, topk=1)[1][:, 0].tolist() == ids[:20].tolist()
    turned_off = back.recalibrated("off")
    assert turned_off.whitening is None and turned_off.calibration.protocol == "leave-one-out"
    assert turned_off.search(own, topk=1)[1][:, 0].tolist() == ids[:20].tolist()


def test_projection_apply_is_unit_norm_and_float32():
    x, labels = nuisance_gallery(seed=9)
    p = Projection.fit_supervised(x, labels)
    out = p.apply(x[:5].astype(np.float64))
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_a_query_projects_off_blas_and_agrees_with_the_gallery_s_blas_product(monkeypatch):
    """A few crops are projected by NumPy's own loop (BLAS's thread team, once woken, busy-waits on
    the cores the model worker needs); a gallery by BLAS. Both give the same vectors."""
    import shitu.adapt

    x, labels = nuisance_gallery(seed=4, labels=60, per_label=8, dim=1280)
    p = Projection.fit_supervised(x, labels)
    few, many = x[:3], x
    assert few.size * p.output_dim < shitu.adapt.SMALL_PRODUCT <= many.size * p.output_dim
    small_path = p.apply(few)
    monkeypatch.setattr(shitu.adapt, "SMALL_PRODUCT", 0)  # everything through BLAS
    assert np.allclose(small_path, p.apply(few), atol=1e-5)
    assert np.allclose(p.apply(many)[:3], small_path, atol=1e-5)
    # and the top match of each query is the same either way
    gallery = p.apply(many)
    assert ((small_path @ gallery.T).argmax(1) == (p.apply(few) @ gallery.T).argmax(1)).all()
