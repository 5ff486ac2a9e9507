"""Calibration on small galleries, held out (issue #29): before → after.

Protocol (drink gallery, ``gallery.txt``: 987 photos, 196 labels):

* **label halves** — the labels are split in two halves at random (seeds 0 and 1, both ways:
  four splits). The prior (:data:`shitu.calibrate.PRIORS`) is fitted on sub-galleries drawn from
  one half only; the galleries evaluated are drawn from the *other* half, so nothing fitted has
  seen their labels.
* **small galleries** — 3–20 labels, 15–100 photos, drawn at random from the evaluated half
  (every label keeps at least one photo out of the gallery). Each is built as the studio builds
  it (:func:`shitu.adapt.adapt`, ``auto``: adapted where cross-validation says so), with the
  query-like views the build makes (:func:`shitu.augment.view_plan`).
* **queries** — every photo of the gallery's labels that is *not* in the gallery, as the studio
  sees a query: the detector's boxes (whole image when none), each crop embedded, the box with
  the best score answers. **Unknowns**: the same queries against the gallery without their label.
* **gap** — per gallery, shown-correct (right label and accepted) at the calibrated threshold,
  against the best any single threshold on the raw similarity reaches while rejecting 80 % of
  that gallery's unknowns (the lowest such threshold, chosen with hindsight). Reported: median
  and 90th percentile of the gap by gallery size, and the share of unknowns rejected.
* **before** — the calibration as it was (raw similarities of the gallery's own photos,
  leave-one-out or held-out folds); **after** — calibrated scores, views, prior.
* **studio photos** — the capture gap of the issue's logo gallery, reproduced where real queries
  exist: the same protocol with each gallery photo replaced by its product (the detector's best
  box) on a white canvas, queried with the real photos. The plain-background prior
  (:data:`shitu.calibrate.PRIORS` ``|plain``) is fitted on the *other* label half cut out onto
  gray, black and wide white canvases: neither the labels nor the exact capture condition of the
  evaluated galleries were seen by it. Also reported: after 3 answers a user confirmed (Teach).
* **full gallery** — see ``bench/gallery_intelligence.py`` (end to end through the engine).
* **non-products** — crops of things that are not products (table, plate, hand, glass, wall,
  food, background patches) from the drink test photos and scikit-image's bundled photos,
  queried against the full drink gallery (built as the studio builds it) and against the small
  galleries: the share accepted as some product at the default threshold.

The official PP-ShiTuV2 embeddings (``ppshituv2_reference/``) allow the same protocol with
whole-photo queries only (no detector crops, no views: the official model does not run here).

    python bench/calibration_small.py [--data ../shared/data/drink_dataset] [--galleries 200]
    python bench/calibration_small.py --fit-prior   # print the per-model prior table (all labels)
    python bench/calibration_small.py --build-cost  # a full build with and without views

Features are cached in ``$TMPDIR/shitu-calibration-bench`` (never in ~/.cache or ~/.paddlex).
Writes bench/results/calibration_small.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# small matrices, many of them: BLAS's threads would only spin against each other (28x slower here)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu import calibrate as cal  # noqa: E402
from shitu.adapt import adapt  # noqa: E402
from shitu.augment import VIEWS_PER_PHOTO, make_views, view_plan  # noqa: E402
from shitu.calibrate import Prior  # noqa: E402
from shitu.threshold import accepts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(tempfile.gettempdir()) / "shitu-calibration-bench"
SIZES = ((15, 30), (30, 60), (60, 101))

# Non-product crops: (photo, box as fractions x1, y1, x2, y2 of the photo, what it shows). The
# drink test photos' products are avoided by hand; scikit-image's photos are used whole and in
# parts (none shows a drink product).
TEST_PHOTO_CROPS = [
    ("002.jpeg", (0.0, 0.65, 0.38, 1.0), "wooden table"),
    ("002.jpeg", (0.72, 0.62, 1.0, 1.0), "wooden table"),
    ("002.jpeg", (0.0, 0.0, 0.38, 0.55), "wall"),
    ("002.jpeg", (0.72, 0.0, 1.0, 0.55), "wall"),
    ("005.jpeg", (0.0, 0.15, 0.3, 0.75), "christmas tree"),
    ("005.jpeg", (0.7, 0.45, 1.0, 0.78), "croissant"),
    ("005.jpeg", (0.62, 0.0, 1.0, 0.4), "background"),
    ("005.jpeg", (0.0, 0.72, 0.32, 1.0), "pine cone, table"),
    ("100.jpeg", (0.0, 0.62, 0.3, 1.0), "plate of salad"),
    ("100.jpeg", (0.72, 0.72, 1.0, 1.0), "plate with strawberries"),
    ("110.jpeg", (0.0, 0.0, 1.0, 0.3), "stone wall"),
    ("110.jpeg", (0.0, 0.0, 0.33, 0.55), "stone wall"),
    ("110.jpeg", (0.0, 0.86, 1.0, 1.0), "marble table"),
    ("110.jpeg", (0.0, 0.55, 0.33, 1.0), "marble table"),
    ("112.jpeg", (0.0, 0.0, 0.25, 0.5), "pool table"),
    ("112.jpeg", (0.72, 0.15, 1.0, 0.7), "pool table"),
    ("112.jpeg", (0.0, 0.85, 1.0, 1.0), "pool table edge"),
    ("112.jpeg", (0.0, 0.3, 0.3, 0.8), "hand"),
    ("99.jpg", (0.0, 0.2, 0.26, 0.72), "glass of juice"),
    ("99.jpg", (0.0, 0.65, 0.45, 1.0), "waffle on a plate"),
    ("99.jpg", (0.84, 0.5, 1.0, 0.9), "orange"),
    ("mosilian.jpeg", (0.25, 0.42, 0.52, 0.97), "glass of milk"),
    ("mosilian.jpeg", (0.0, 0.35, 0.25, 0.75), "plain background"),
    ("nongfu_spring.jpeg", (0.0, 0.0, 0.3, 0.5), "wall"),
    ("nongfu_spring.jpeg", (0.7, 0.55, 1.0, 1.0), "floor"),
    ("youjia.jpeg", (0.84, 0.15, 1.0, 0.75), "wooden table"),
    ("003.jpeg", (0.72, 0.2, 1.0, 0.9), "flames"),
]
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "coins", "brick",
                  "grass", "gravel", "clock", "horse", "moon", "page", "immunohistochemistry", "retina",
                  "motorcycle", "colorwheel", "text", "checkerboard")  # fmt: skip
SKIMAGE_CROPS = [
    ("coffee", (0.05, 0.0, 0.95, 0.85), "cup of coffee on a plate"),
    ("coffee", (0.0, 0.75, 1.0, 1.0), "table"),
    ("astronaut", (0.35, 0.05, 0.7, 0.5), "face"),
    ("astronaut", (0.0, 0.55, 0.35, 1.0), "flag and suit"),
    ("chelsea", (0.15, 0.0, 0.85, 1.0), "cat"),
    ("rocket", (0.3, 0.0, 0.7, 1.0), "rocket"),
    ("camera", (0.25, 0.05, 0.75, 0.8), "man with a camera"),
]
RANDOM_PATCHES = 2  # random patches per scikit-image photo (30–80 % of each side)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- features -----------------------------------------------------------------------------------
@dataclass
class Features:
    name: str
    labels: np.ndarray  # (n,)
    whole: np.ndarray  # (n, D) gallery photos, as an index stores them
    views: np.ndarray | None  # (n, VIEWS_PER_PHOTO, D) query-like views, as the build makes them
    regions: list[np.ndarray]  # per photo: its query crops (R, D), as predict embeds them
    nonproducts: np.ndarray | None  # (m, D)
    nonproduct_names: list[str]
    seconds: dict
    plain: np.ndarray | None = None  # (n,) each photo on a plain background (read off its thumbnail)


def _nonproduct_images(data: Path) -> tuple[list[np.ndarray], list[str]]:
    from skimage import data as skdata

    from shitu.gallery import load_image
    from shitu.sample import _photo

    images, names = [], []

    def cut(rgb: np.ndarray, box) -> np.ndarray:
        h, w = rgb.shape[:2]
        x1, y1, x2, y2 = box
        return np.ascontiguousarray(rgb[int(y1 * h) : int(y2 * h), int(x1 * w) : int(x2 * w)])

    for fname, box, what in TEST_PHOTO_CROPS:
        images.append(cut(load_image(data / "test_images" / fname), box))
        names.append(f"{fname}: {what}")
    rng = np.random.default_rng(0)
    for name in SKIMAGE_PHOTOS:
        rgb = np.asarray(_photo(name)) if name != "checkerboard" else np.repeat(skdata.checkerboard()[..., None], 3, 2)
        images.append(rgb)
        names.append(f"skimage {name}")
        h, w = rgb.shape[:2]
        for _ in range(RANDOM_PATCHES):
            fw, fh = rng.uniform(0.3, 0.8, 2)
            x0, y0 = rng.uniform(0, 1 - fw), rng.uniform(0, 1 - fh)
            images.append(cut(rgb, (x0, y0, x0 + fw, y0 + fh)))
            names.append(f"skimage {name}: random patch")
    for name, box, what in SKIMAGE_CROPS:
        images.append(cut(np.asarray(_photo(name)), box))
        names.append(f"skimage {name}: {what}")
    return images, names


def starter_features(data: Path, cache: Path) -> Features:
    """Embed the drink gallery with the active (starter) model: photos, views, query crops and
    non-product crops; cached by model fingerprint."""
    from shitu.config import PipelineConfig, Settings
    from shitu.gallery import load_image, read_label_file
    from shitu.runtime import Runtime

    os.environ.setdefault("PADDLE_PDX_CACHE_HOME", str(cache / "paddlex"))
    settings = Settings.from_env(offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR"), data_dir=cache / "data")
    runtime = Runtime(PipelineConfig(), settings, isolate=False)
    model = runtime.feature_model
    key = model.replace(":", "_").replace("/", "_")
    path = cache / f"{key}.npz"
    batch = read_label_file(data / "gallery.txt", data).require_clean()
    labels = np.array([i.label for i in batch.items])
    if path.exists():
        runtime.close()
        flags_path = cache / f"{key}-plain.npy"
        if not flags_path.exists():
            np.save(flags_path, plain_flags(load_image(i.image) for i in batch.items))
        z = np.load(path, allow_pickle=False)
        offsets = z["offsets"]
        regions = [z["regions"][offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        names = json.loads(str(z["nonproduct_names"]))
        return Features(model, labels, z["whole"], z["views"], regions,
                        z["nonproducts"], names, json.loads(str(z["seconds"])),
                        np.load(flags_path))  # fmt: skip
    seconds = {}
    np_images, np_names = _nonproduct_images(data)  # first: a mistake here fails fast
    images = [load_image(i.image) for i in batch.items]
    t = time.perf_counter()
    whole = runtime.embed(images, batch_size=16)
    seconds["embed photos"] = time.perf_counter() - t
    t = time.perf_counter()
    views_rgb = [v for n, im in enumerate(images) for v in make_views(im, n, VIEWS_PER_PHOTO)]
    seconds["make views"] = time.perf_counter() - t
    t = time.perf_counter()
    views = runtime.embed(views_rgb, batch_size=16).reshape(len(images), VIEWS_PER_PHOTO, -1)
    seconds["embed views"] = time.perf_counter() - t
    t = time.perf_counter()
    regions = []
    for im in images:
        _, feats, _ = runtime.analyze(im, runtime.default_det_threshold, "auto")
        regions.append(feats)
    seconds["query crops"] = time.perf_counter() - t
    nonproducts = runtime.embed(np_images, batch_size=16)
    runtime.close()
    offsets = np.cumsum([0] + [len(r) for r in regions])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, whole=whole, views=views, regions=np.concatenate(regions), offsets=offsets,
             nonproducts=nonproducts, nonproduct_names=json.dumps(np_names), seconds=json.dumps(seconds))  # fmt: skip
    np.save(cache / f"{key}-plain.npy", plain_flags(images))
    return Features(model, labels, whole, views, regions, nonproducts, np_names, seconds,
                    np.load(cache / f"{key}-plain.npy"))  # fmt: skip


def official_features(data: Path) -> Features | None:
    ref = data / "ppshituv2_reference"
    if not (ref / "embeddings.npy").exists():
        return None
    rows = [ln.split("\t") for ln in (ref / "rows.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    x = np.load(ref / "embeddings.npy").astype(np.float32)
    return Features("official:PP-ShiTuV2_rec", np.array([r[1] for r in rows]), x, None, [v[None] for v in x],
                    None, [], {})  # fmt: skip


# --- building and querying a gallery as the studio does ------------------------------------------
@dataclass
class Built:
    apply: object  # raw features -> the index's search space
    vectors: np.ndarray
    raw: np.ndarray  # the entries' raw unit features (the floor compares in this space)
    labels: np.ndarray
    calibration: cal.Calibration
    adapted: bool


def build(f: Features, rows: np.ndarray, after: bool, taught: tuple[np.ndarray, np.ndarray] | None = None
          ) -> Built | None:  # fmt: skip
    """The gallery of ``rows`` as :meth:`GalleryIndex.build` makes it (``adapt="auto"``): with
    the build's views (``after``) or as before views existed. ``taught``: ``(features, labels)``
    of query crops a user confirmed, added as :meth:`Engine.teach` adds them."""
    ids = np.arange(len(rows))
    views = None
    if after and f.views is not None:
        plan = view_plan(len(rows))
        src = np.repeat(ids, plan)
        views = (src, np.concatenate([f.views[rows[i], : plan[i]] for i in ids])) if len(src) else None
    x, y, taught_ids = f.whole[rows], f.labels[rows], []
    if taught is not None:
        taught_ids = list(range(len(rows), len(rows) + len(taught[0])))
        x, y = np.vstack([x, taught[0]]), np.concatenate([y, taught[1]])
        ids = np.arange(len(x))
    plain = float(f.plain[rows].mean()) if after and f.plain is not None else None
    projection, calibration, _ = adapt(x, y, mode="auto", ids=ids, views=views, taught=taught_ids,
                                       feature_model=f.name, use_views=after, plain=plain)  # fmt: skip
    if calibration is None:
        return None
    if not after:
        calibration.floor = None  # before: no floor either
    apply = projection.apply if projection is not None else unit
    return Built(apply, apply(x), unit(x), y, calibration, projection is not None)


def answer(b: Built, regions: np.ndarray, drop: str | None = None) -> tuple[str, float, bool, bool]:
    """What predict answers for a photo's query crops: ``(label, score, accepted, above the
    floor)`` of the box whose best match scores highest; ``drop``: a label taken out of the
    gallery."""
    sims = b.apply(regions) @ b.vectors.T
    if drop is not None:
        sims[:, b.labels == drop] = -np.inf
    r, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
    score = float(sims[r, j])
    raw = float(unit(regions[r]) @ b.raw[j])
    c = b.calibration
    return str(b.labels[j]), score, accepts(score, c.threshold, raw, c.floor), c.floor is None or raw >= c.floor


def lowest_rejecting(unknown: np.ndarray, share: float = cal.TARGET_REJECTION) -> float:
    """The lowest threshold that rejects ``share`` of ``unknown`` scores (hindsight)."""
    s = np.sort(unknown)
    i = int(np.ceil(share * len(s))) - 1
    return float(np.clip(np.nextafter(s[min(max(i, 0), len(s) - 1)], np.inf), -1.0, 1.0))  # -inf: rejected anyway


def evaluate(f: Features, gallery: np.ndarray, queries: np.ndarray, after: bool, teach: int = 0) -> dict | None:
    """One gallery against its queries; ``teach``: that many of the queries (at random, fixed
    seed) are confirmed answers first — their best crop added as taught — and are not queried."""
    taught = None
    if teach:
        pick = np.random.default_rng(len(gallery)).permutation(len(queries))
        chosen, queries = queries[pick[:teach]], queries[pick[teach:]]
        crops = [f.regions[q][int(np.argmax((unit(f.regions[q]) @ unit(f.whole[gallery]).T).max(1)))] for q in chosen]
        taught = (np.stack(crops), f.labels[chosen])
    b = build(f, gallery, after, taught)
    if b is None:
        return None
    truth = f.labels[queries]
    known = [answer(b, f.regions[q]) for q in queries]
    unknown = [answer(b, f.regions[q], drop=t) for q, t in zip(queries, truth)]
    correct = np.array([k[0] == y for k, y in zip(known, truth)])
    shown = float(np.mean(correct & np.array([k[2] for k in known])))
    rejected = float(np.mean([not u[2] for u in unknown]))
    raw_known, raw_unknown = np.array([k[1] for k in known]), np.array([u[1] for u in unknown])
    oracle = lowest_rejecting(raw_unknown)  # what the prior is fitted to, too
    best = float(np.mean(correct & (raw_known >= oracle)))
    c = b.calibration
    out = {"entries": len(gallery), "labels": len(set(f.labels[gallery].tolist())), "queries": len(queries),
           "threshold": c.threshold, "uncertainty": c.uncertainty, "floor": c.floor, "shown": shown, "best": best,
           "gap": best - shown, "rejected": rejected, "top1": float(correct.mean()), "adapted": b.adapted,
           "oracle": oracle, "prior_weight": c.evidence.get("prior_weight"),
           "views_threshold": c.evidence.get("views_threshold") if after else None,
           "photos_threshold": c.evidence.get("photos_threshold")}  # fmt: skip
    if f.nonproducts is not None:
        out["nonproducts_accepted"] = float(np.mean([answer(b, v[None])[2] for v in f.nonproducts]))
    return out


def draw(rng: np.random.Generator, f: Features, pool: list[str], lo: int = 15, hi: int = 100,
         max_labels: int = 20) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """A random gallery of ``lo``–``hi`` photos of 3–``max_labels`` labels from ``pool`` (each label
    keeps a photo out of it) and its queries (the labels' other photos)."""
    rows_of = {lab: np.flatnonzero(f.labels == lab) for lab in pool}
    pool = [lab for lab in pool if len(rows_of[lab]) >= 2]
    while True:
        n = int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))) if hi > 100 else int(rng.integers(lo, hi + 1))
        k = int(rng.integers(3, min(max_labels, len(pool)) + 1))
        chosen = rng.choice(pool, k, replace=False)
        room = np.array([len(rows_of[lab]) - 1 for lab in chosen])
        if room.sum() < n or n < k:
            continue
        take = np.ones(k, int)
        while take.sum() < n:
            i = int(rng.integers(k))
            take[i] += take[i] < room[i]
        gallery, queries = [], []
        for lab, m in zip(chosen, take):
            rows = rng.permutation(rows_of[lab])
            gallery += rows[:m].tolist()
            queries += rows[m:].tolist()
        return np.array(gallery), np.array(queries)


def fit_prior(fs: Features | list[Features], pool: list[str], galleries: int, seed: int) -> dict[str, Prior]:
    """The model's prior per space (``raw``/``adapted``, as the build decided) from random
    galleries of 15–400 photos drawn from ``pool`` (from each of several capture conditions in
    turn, ``fs`` a list): ``offset`` = mean (and ``offset_sd`` the spread) of real queries' 80 %
    point minus the views' one (``photos_offset``: minus the photos'); the level
    ``a + b ln(entries)`` through the real queries' point, ``tau`` its residual spread."""
    conditions = fs if isinstance(fs, list) else [fs]
    f = conditions[0]
    measuring = Prior(offset=0.0, offset_sd=0.0, a=0.0, b=0.0, tau=math.inf, source="none (fitting)")
    # (views and photos both at offset 0 with no spread: equal weights; their points are read apart)
    saved = dict(cal.PRIORS)
    for space in ("raw", "adapted", "raw|plain", "adapted|plain"):
        cal.PRIORS[f"{f.name}|{space}"] = measuring
    rng = np.random.default_rng(seed)
    found: dict[str, list[tuple]] = {"raw": [], "adapted": []}
    try:
        for n_gallery in range(galleries):
            f = conditions[n_gallery % len(conditions)]
            gallery, queries = draw(rng, f, pool, 15, 400, max_labels=80)
            r = evaluate(f, gallery, queries, after=True)
            if r is not None:
                views = r["views_threshold"] if f.views is not None else None
                found["adapted" if r["adapted"] else "raw"].append((r["entries"], r["oracle"], views,
                                                                    r["photos_threshold"]))  # fmt: skip
    finally:
        cal.PRIORS.clear()
        cal.PRIORS.update(saved)
    out = {}
    for space, rows in found.items():
        if len(rows) < 5:
            continue
        n, oracle = np.log([r[0] for r in rows]), np.array([r[1] for r in rows])
        b, a = np.polyfit(n, oracle, 1) if np.ptp(n) > 0 else (0.0, float(oracle.mean()))
        tau = float(np.std(oracle - (a + b * n)))
        gap = np.array([r[1] - r[2] for r in rows if r[2] is not None])
        photos = np.array([r[1] - r[3] for r in rows if r[3] is not None])
        out[space] = Prior(
            offset=round(float(gap.mean()), 4) if len(gap) else None,
            offset_sd=round(float(gap.std()), 4) if len(gap) else 0.0,
            a=round(float(a), 4), b=round(float(b), 4), tau=round(max(tau, 1e-3), 4),
            source=f"{len(rows)} {space} sub-galleries of {int(np.exp(n.min()))}-{int(np.exp(n.max()))} photos",
            photos_offset=round(float(photos.mean()), 4), photos_sd=round(float(photos.std()), 4),
            max_entries=int(round(np.exp(n.max()))),
        )  # fmt: skip
    return out


# --- the protocol --------------------------------------------------------------------------------
def halves(f: Features, seed: int) -> list[tuple[list[str], list[str]]]:
    """Two (prior labels, evaluated labels) splits: a random half each way."""
    labels = sorted(set(f.labels.tolist()))
    perm = np.random.default_rng(seed).permutation(labels).tolist()
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    return [(a, b), (b, a)]


def small_galleries(f: Features, galleries: int, prior_galleries: int, seeds=(0, 1), say=print,
                    prior_from: Features | None = None, plain_from: list[Features] | None = None,
                    teach: int = 0) -> dict:  # fmt: skip
    """The small-gallery protocol; ``prior_from``: fit the prior on these features' other half
    (the real drink photos when ``f`` is a studio-photo variant), ``plain_from``: the plain
    prior on these capture conditions' other half; ``teach``: also evaluate after that many
    confirmed answers per gallery (row ``taught``)."""
    rows: dict[str, list[dict]] = {"before": [], "after": []}
    if teach:
        rows["taught"] = []
    priors = []
    for seed in seeds:
        for k, (prior_labels, eval_labels) in enumerate(halves(f, seed)):
            fitted = fit_prior(prior_from or f, prior_labels, prior_galleries, seed=100 + 2 * seed + k)
            if plain_from:
                plain = fit_prior(plain_from, prior_labels, prior_galleries, seed=200 + 2 * seed + k)
                fitted.update({f"{s}|plain": p for s, p in plain.items()})
            priors.append({s: p.__dict__ for s, p in fitted.items()})
            for s, p in fitted.items():
                say(f"  split {seed}/{k}, {s}: offset {p.offset} ± {p.offset_sd}, "
                    f"photos {p.photos_offset} ± {p.photos_sd}, level {p.a:+.3f} {p.b:+.3f} ln n "
                    f"± {p.tau} ({p.source})")  # fmt: skip
            saved = dict(cal.PRIORS)
            cal.PRIORS.update({f"{f.name}|{s}": p for s, p in fitted.items()})
            try:
                rng = np.random.default_rng(1000 + 2 * seed + k)
                for _ in range(galleries):
                    gallery, queries = draw(rng, f, eval_labels)
                    results = {when: evaluate(f, gallery, queries, after=when != "before",
                                              teach=teach if when == "taught" else 0) for when in rows}  # fmt: skip
                    if all(r is not None for r in results.values()):  # the same galleries in every row
                        for when, r in results.items():
                            rows[when].append(r)
            finally:
                cal.PRIORS.clear()
                cal.PRIORS.update(saved)
    return {"rows": rows, "priors": priors}


def _mean(values: np.ndarray) -> str:
    return f"{np.nanmean(values):.3f}" if np.isfinite(values).any() else "  -  "


def table(rows: dict[str, list[dict]], say) -> dict:
    out = {}
    say("photos  | galleries | gap median (before → after) | gap p90 (before → after) | unknown rejected "
        "(before → after) | non-products accepted | ± (after) | adapted")  # fmt: skip
    for lo, hi in (*SIZES, (15, 101)):
        sel = {w: [r for r in rows[w] if lo <= r["entries"] < hi] for w in rows}
        if not sel["after"]:
            continue
        g = {w: np.array([r["gap"] for r in sel[w]]) for w in sel}
        rej = {w: np.array([r["rejected"] for r in sel[w]]) for w in sel}
        npa = {w: np.array([r.get("nonproducts_accepted", np.nan) for r in sel[w]]) for w in sel}
        unc = np.array([r["uncertainty"] or 0 for r in sel["after"]])
        name = f"{lo}-{hi - 1}" if (lo, hi) != (15, 101) else "15-100"
        adapted = np.mean([r["adapted"] for r in sel["after"]])
        say(f"{name:7s} | {len(sel['after']):9d} | {np.median(g['before']):+.3f} → {np.median(g['after']):+.3f}"
            f"              | {np.quantile(g['before'], .9):+.3f} → {np.quantile(g['after'], .9):+.3f}"
            f"           | {rej['before'].mean():.3f} → {rej['after'].mean():.3f}"
            f"                | {_mean(npa['before'])} → {_mean(npa['after'])}"
            f"         | {np.median(unc):.3f}     | {adapted:.0%}")  # fmt: skip
        out[name] = {
            w: {"galleries": len(sel[w]), "gap_median": round(float(np.median(g[w])), 4),
                "gap_p90": round(float(np.quantile(g[w], .9)), 4), "unknown_rejected": round(float(rej[w].mean()), 4),
                "unknown_rejected_median": round(float(np.median(rej[w])), 4),
                "nonproducts_accepted": round(float(np.nanmean(npa[w])), 4) if np.isfinite(npa[w]).any() else None,
                "shown": round(float(np.mean([r["shown"] for r in sel[w]])), 4),
                "best": round(float(np.mean([r["best"] for r in sel[w]])), 4)}
            for w in sel
        }  # fmt: skip
    return out


# Studio-style galleries made from the real photos: each photo's product box (the detector's best)
# on a plain canvas. Such a gallery resembles itself more than real photos resemble it — the
# capture gap of the logo gallery, reproduced where real queries exist. The white one is
# evaluated; the plain prior is fitted on the others (another colour or margin), so the white
# galleries' capture condition is one the prior never saw.
CANVASES = {"white": ((255, 255, 255), 0.2), "gray": ((128, 128, 128), 0.2), "black": ((0, 0, 0), 0.2),
            "white-wide": ((255, 255, 255), 0.6)}  # fmt: skip
PLAIN_PRIOR_FROM = ("gray", "black", "white-wide")


def on_canvas(rgb: np.ndarray, box, colour=(255, 255, 255), margin: float = 0.2) -> np.ndarray:
    """The product's ``box`` of a real photo centred on a square ``colour`` canvas ``1 + margin``
    times its longer side."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, max(x2, x1 + 1)), min(h, max(y2, y1 + 1))
    crop = rgb[y1:y2, x1:x2]
    ch, cw = crop.shape[:2]
    side = int(max(ch, cw) * (1 + margin))
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = colour
    oy, ox = (side - ch) // 2, (side - cw) // 2
    canvas[oy : oy + ch, ox : ox + cw] = crop
    return canvas


def plain_flags(images) -> np.ndarray:
    """Each photo on a plain background or not, read off its thumbnail as the build does."""
    from shitu.gallery import make_thumbnail, plain_share

    return np.array([plain_share([make_thumbnail(np.asarray(im))]) == 1.0 for im in images])


def canvas_features(data: Path, cache: Path, real: Features, name: str) -> Features:
    """The drink gallery as studio photos on canvas ``name`` (:data:`CANVASES`) with their views,
    queried with the real photos' crops (:func:`starter_features`)."""
    from shitu.config import PipelineConfig, Settings
    from shitu.errors import ShiTuError
    from shitu.gallery import load_image, read_label_file
    from shitu.runtime import Runtime

    key = real.name.replace(":", "_").replace("/", "_")
    path, boxes_path = cache / f"{key}-canvas-{name}.npz", cache / f"{key}-boxes.npy"
    if not path.exists():
        settings = Settings.from_env(offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR"), data_dir=cache / "data")
        runtime = Runtime(PipelineConfig(), settings, isolate=True)  # a detector crash restarts the worker
        batch = read_label_file(data / "gallery.txt", data).require_clean()
        photos = [load_image(item.image) for item in batch.items]
        if not boxes_path.exists():
            boxes = []
            for rgb in photos:
                try:
                    found = runtime.detect(rgb, runtime.default_det_threshold)
                except ShiTuError:
                    found = []
                boxes.append(max(found, key=lambda b: b[1])[0] if found else (0, 0, rgb.shape[1], rgb.shape[0]))
            np.save(boxes_path, np.asarray(boxes, dtype=np.float64))
        colour, margin = CANVASES[name]
        images = [on_canvas(rgb, box, colour, margin) for rgb, box in zip(photos, np.load(boxes_path))]
        whole = runtime.embed(images, batch_size=16)
        views_rgb = [v for n, im in enumerate(images) for v in make_views(im, n, VIEWS_PER_PHOTO)]
        views = runtime.embed(views_rgb, batch_size=16).reshape(len(images), VIEWS_PER_PHOTO, -1)
        runtime.close()
        np.savez(path, whole=whole, views=views, plain=plain_flags(images))
    z = np.load(path)
    return Features(real.name, real.labels, z["whole"], z["views"], real.regions, real.nonproducts,
                    real.nonproduct_names, {}, z["plain"])  # fmt: skip


def full_gallery_nonproducts(f: Features, say) -> dict:
    """Non-product crops against the whole drink gallery, built as the studio builds it."""
    rows = np.arange(len(f.labels))
    out = {}
    for when in ("before", "after"):
        b = build(f, rows, after=when == "after")
        answers = [answer(b, v[None]) for v in f.nonproducts]
        accepted = [(n, a) for n, a in zip(f.nonproduct_names, answers) if a[2]]
        c = b.calibration
        out[when] = {"threshold": c.threshold, "floor": c.floor, "accepted": round(len(accepted) / len(answers), 4),
                     "accepted_crops": [f"{n} -> {a[0]} {a[1]:.3f}" for n, a in accepted]}  # fmt: skip
        say(f"{when:6s}: threshold {c.threshold:.3f}, floor {c.floor}: {len(accepted)}/{len(answers)} non-product "
            f"crops accepted ({len(accepted) / len(answers):.1%})"
            + "".join(f"\n          {n} -> {a[0]} {a[1]:.3f}" for n, a in accepted))  # fmt: skip
    return out


def prior_table(f: Features | list[Features], galleries: int, say, suffix: str = "", source: str = "drink gallery"
                ) -> dict:  # fmt: skip
    first = f[0] if isinstance(f, list) else f
    fitted = fit_prior(f, sorted(set(first.labels.tolist())), galleries, seed=7)
    fitted = {f"{space}{suffix}": p for space, p in fitted.items()}
    f = first
    for space, p in fitted.items():
        say(f'    "{f.name}|{space}": Prior(offset={p.offset}, offset_sd={p.offset_sd}, a={p.a}, b={p.b}, '
            f'tau={p.tau}, photos_offset={p.photos_offset}, photos_sd={p.photos_sd}, max_entries={p.max_entries},'
            f'\n        source="{source}, {p.source}"),')  # fmt: skip
    return {s: p.__dict__ for s, p in fitted.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "drink_dataset"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--galleries", type=int, default=60, help="evaluated galleries per split (4 splits)")
    parser.add_argument("--prior-galleries", type=int, default=60, help="galleries the prior is fitted on, per split")
    parser.add_argument("--fit-prior", action="store_true", help="print the prior table from all labels and stop")
    parser.add_argument("--build-cost", action="store_true", help="only time a full build with and without views")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.perf_counter()
    load = os.getloadavg()
    say(f"# Calibration on small galleries, held out ({os.cpu_count()} cores, load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start)")  # fmt: skip
    starter = starter_features(args.data, CACHE)
    official = official_features(args.data)
    if args.build_cost:
        result = build_cost(args.data, say)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "calibration_build_cost.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (RESULTS / "calibration_build_cost.json").write_text(json.dumps(result), encoding="utf-8")
        return
    if args.fit_prior:
        say("PRIORS = {")
        for f in (starter, official):
            if f is not None:
                prior_table(f, 200, say)
        canvases = [canvas_features(args.data, CACHE, starter, name) for name in CANVASES]
        prior_table(canvases, 200, say, "|plain", "drink products on plain canvases (" + ", ".join(CANVASES) + ")")
        say("}")
        return
    out: dict = {"model": starter.name, "embedding_seconds": starter.seconds}
    say(f"\nfeature model: {starter.name}; features cached in {CACHE}")
    canvases = {name: canvas_features(args.data, CACHE, starter, name) for name in CANVASES}
    plain_from = [canvases[name] for name in PLAIN_PRIOR_FROM]
    say(f"\n## starter model: drink photos, queries through the detector ({args.galleries * 4} galleries; "
        f"{starter.plain.mean():.1%} of the photos on a plain background)")
    res = small_galleries(starter, args.galleries, args.prior_galleries, say=say, plain_from=plain_from)
    out["starter"] = {"table": table(res["rows"], say), "priors": res["priors"], "galleries": res["rows"]}

    studio = canvases["white"]
    say(f"\n## starter model: studio-photo galleries (each photo's product on white), real photos as queries — "
        f"the capture gap of the issue's logo gallery; {studio.plain.mean():.1%} of the photos on a plain background; "
        f"prior from the real photos of the other half, plain prior from the other half on "
        f"{', '.join(PLAIN_PRIOR_FROM)} canvases")  # fmt: skip
    res = small_galleries(studio, args.galleries, args.prior_galleries, say=say, prior_from=starter,
                          plain_from=plain_from, teach=3)  # fmt: skip
    out["studio"] = {"table": table(res["rows"], say), "priors": res["priors"]}
    say("\n   ... and after 3 confirmed answers per gallery (Teach; those 3 queries are not counted):")
    out["studio"]["taught"] = table({"before": res["rows"]["after"], "after": res["rows"]["taught"]}, say)

    if official is not None:
        say(f"\n## official PP-ShiTuV2 embeddings: whole photos as queries, no views ({args.galleries * 4} galleries)")
        res = small_galleries(official, args.galleries, args.prior_galleries, say=say)
        out["official"] = {"table": table(res["rows"], say), "priors": res["priors"]}

    say("\n## non-product crops against the whole drink gallery (starter model, adapt auto)")
    out["nonproducts_full"] = full_gallery_nonproducts(starter, say)
    load = os.getloadavg()
    say(f"\n{time.perf_counter() - started:.0f} s; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration_small.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    slim = {k: ({kk: vv for kk, vv in v.items() if kk != "galleries"} if isinstance(v, dict) else v)
            for k, v in out.items()}  # fmt: skip
    (RESULTS / "calibration_small.json").write_text(json.dumps(slim, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()


def build_cost(data: Path, say) -> dict:
    """What the views add to a build: the whole drink gallery built through the engine with the
    views (as now) and without (as before), alternated, best of two each."""
    import shitu.engine
    from shitu.config import PipelineConfig, Settings
    from shitu.engine import Engine
    from shitu.gallery import read_label_file

    settings = Settings.from_env(offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR"), data_dir=CACHE / "data")
    engine = Engine(settings, config=PipelineConfig(), isolate=False)
    batch = read_label_file(data / "gallery.txt", data).require_clean()
    real_plan = shitu.engine.view_plan
    best = {"with views": math.inf, "without views": math.inf}
    try:
        for _ in range(2):
            for name in best:
                shitu.engine.view_plan = real_plan if name == "with views" else (lambda n: np.zeros(n, np.int64))
                t = time.perf_counter()
                engine.build_index(batch, adapt="auto")
                best[name] = min(best[name], time.perf_counter() - t)
    finally:
        shitu.engine.view_plan = real_plan
        engine.close()
    load = os.getloadavg()
    say(f"build of {len(batch.items)} photos (adapt auto): without views {best['without views']:.1f} s, with "
        f"{int(view_plan(len(batch.items)).sum())} views {best['with views']:.1f} s "
        f"(+{best['with views'] - best['without views']:.1f} s); load average {load[0]:.1f} {load[1]:.1f} "
        f"{load[2]:.1f}")
    return {k: round(v, 2) for k, v in best.items()}
