"""Features fitted to the user's own gallery, switched on only where held-out numbers say so.

Generic features (the starter pack's ImageNet MobileNetV2 above all) spend most of their
variance on differences that do not tell two products apart — lighting, pose, background —
while the labels of a gallery say exactly which differences do not matter: those between
photos of the same product. :class:`Projection` ``supervised`` learns that from the gallery:

1. centre and keep the top principal directions (``SUPERVISED_DIMS``);
2. whiten the *within-label* scatter there (shrunk towards a multiple of the identity so
   that galleries with few photos per label, or products never seen, stay well-conditioned).

Directions along which photos of one product vary are squeezed, the rest stretched; cosine
similarity in the new space is a Mahalanobis-style metric learnt in closed form (no gradient
descent, ~0.3 s for 1k × 1280 on two cores).

:func:`adapt` decides whether to use it by K-fold cross-validation on the gallery itself: each
fold's images are removed from the gallery *and* from the fit, queried against the rest, and
the projection is kept only if their recall@1 beats the raw features'. The same held-out
queries give the calibration (:mod:`shitu.calibrate`): their best scores as known queries, and
their best scores once their whole label is removed as unknown ones — so the threshold is not
measured on data the projection was fitted on. The query-like views of the held-out photos and
the confirmed answers among them are scored the same way, in the fold's projection.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from shitu.calibrate import (
    REAL_QUERY_WEIGHT,
    Calibration,
    QueryStats,
    calibrate_gallery,
    calibrate_stats,
    prior_for,
    query_stats,
    row_lookup,
)

ADAPT_MODES = ("auto", "on", "off")
SUPERVISED_DIMS = 384  # principal directions kept before the within-label whitening
SHRINKAGE = 0.2  # within-label scatter shrunk this far towards a scaled identity
MIN_ENTRIES = 40  # fewer entries cannot estimate a within-label scatter worth using
MIN_LABELS = 3
FOLDS = 5
MAX_CV_ENTRIES = 12000  # larger galleries are cross-validated on a sample of whole labels
MAX_FIT_ENTRIES = 50000  # and fitted on one: a 1280-d scatter is well estimated long before (memory stays ~0.5 GB)
SMALL_PRODUCT = 5e7  # multiply-adds under which a projection stays off BLAS's thread team (see Projection.apply)
MIN_GAIN = 0.005  # "helps": held-out recall@1 at least half a point above the raw features'


@dataclass
class Projection:
    """``x -> normalize((x - mean) @ matrix)``; ``kind`` is ``supervised`` or ``pca-whitening``."""

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (D, d)
    kind: str = "pca-whitening"

    @property
    def input_dim(self) -> int:
        return self.mean.shape[0]

    @property
    def output_dim(self) -> int:
        return self.matrix.shape[1]

    def apply(self, features: np.ndarray) -> np.ndarray:
        centred = np.asarray(features, dtype=np.float32) - self.mean
        if centred.size * self.output_dim < SMALL_PRODUCT:
            # A query's few crops: NumPy's own loop on this thread (~0.1 ms for 3 crops). A BLAS product
            # wakes BLAS's thread team, whose threads then busy-wait on the cores the model worker
            # needs for the next query: a query against an adapted index took 2.2x as long.
            out = np.einsum("ij,jk->ik", centred, self.matrix)
        else:
            out = centred @ self.matrix
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    @classmethod
    def fit_supervised(
        cls, features: np.ndarray, labels: Sequence[str], *, dims: int = SUPERVISED_DIMS, shrinkage: float = SHRINKAGE
    ) -> "Projection":
        x = np.asarray(features, dtype=np.float64)
        mean, basis = principal_directions(x, dims)
        keep = basis.shape[1]
        z = (x - mean) @ basis
        _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
        means = np.zeros((counts.size, keep))
        np.add.at(means, inverse, z)
        means /= counts[:, None]
        within = (z - means[inverse])[counts[inverse] > 1]  # a single photo says nothing about its label's spread
        scatter = within.T @ within / max(1, len(within))
        scatter = (1 - shrinkage) * scatter + shrinkage * (np.trace(scatter) / keep) * np.eye(keep)
        try:
            # W with W^T S W = I from the Cholesky factor (S = L L^T, W = L^-T): the same cosine geometry
            # as S^-1/2 (they differ by a rotation), ~100x cheaper than an eigendecomposition
            whitening = np.linalg.inv(np.linalg.cholesky(scatter)).T
        except np.linalg.LinAlgError:
            eigval, eigvec = np.linalg.eigh(scatter)
            whitening = eigvec / np.sqrt(np.maximum(eigval, 1e-9 * eigval.max()))
        matrix = basis @ whitening
        return cls(mean.astype(np.float32), matrix.astype(np.float32), "supervised")


def principal_directions(features: np.ndarray, dims: int = SUPERVISED_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, basis (D, k))``: the top ``k <= dims`` principal directions of the features, from an
    eigendecomposition of the smaller of the Gram (n × n) and the covariance (D × D) matrices —
    2-3x cheaper than an SVD of the data, same subspace."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    wide = centred.shape[0] < centred.shape[1]
    eigval, eigvec = np.linalg.eigh(centred @ centred.T if wide else centred.T @ centred)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    singular = np.sqrt(np.maximum(eigval, 0.0))
    keep = int(min(dims, np.sum(singular > 1e-6 * singular[0]))) if singular[0] > 0 else 1
    basis = (centred.T @ eigvec[:, :keep]) / np.maximum(singular[:keep], 1e-12) if wide else eigvec[:, :keep]
    return mean, basis


@dataclass
class Adaptation:
    """What :func:`adapt` measured and decided (stored with the index, shown in the report)."""

    mode: str
    applied: bool
    reason: str
    raw_recall: float | None = None  # held-out recall@1, raw features
    adapted_recall: float | None = None  # held-out recall@1, projection fitted without the queries
    queries: int = 0
    folds: int = 0
    seconds: float = 0.0
    kind: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict | None) -> "Adaptation | None":
        if not isinstance(data, dict) or "mode" not in data:
            return None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        try:
            return cls(**known)
        except TypeError:
            return None


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _folds(labels: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Image-level folds, spread evenly over each label so a label is never held out whole
    when it has at least two photos."""
    fold_of = np.empty(len(labels), dtype=np.int64)
    offset = int(rng.integers(k))
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        fold_of[rows] = (np.arange(len(rows)) + offset) % k
        offset = (offset + len(rows)) % k
    return [np.flatnonzero(fold_of == f) for f in range(k)]


def _sample(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of whole labels, at random, up to about ``limit`` entries (all rows if fewer)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    chosen, total = [], 0
    for label in rng.permutation(np.unique(labels)):
        rows = np.flatnonzero(labels == label)
        chosen.append(rows)
        total += len(rows)
        if total >= limit:
            break
    return np.sort(np.concatenate(chosen))


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _fold(
    x: np.ndarray, y: np.ndarray, held: np.ndarray, is_taught: np.ndarray,
    view_rows: np.ndarray | None, view_x: np.ndarray | None,
) -> tuple[int, int, list[QueryStats]]:  # fmt: skip
    """One fold: the projection fitted without ``held``; ``(raw hits, adapted hits, the held-out
    photos', confirmed answers' and views' open-set scores)``."""
    train = np.setdiff1d(np.arange(len(y)), held)
    projection = Projection.fit_supervised(x[train], y[train])
    gallery, queries_x = projection.apply(x[train]), projection.apply(x[held])
    photo = ~is_taught[held]
    stats = [
        query_stats(queries_x[photo], y[held][photo], gallery, y[train], group=held[photo],
                    raw=(x[held][photo], x[train])),
        query_stats(queries_x[~photo], y[held][~photo], gallery, y[train], kind=2, weight=REAL_QUERY_WEIGHT,
                    group=held[~photo], raw=(x[held][~photo], x[train])),
    ]  # fmt: skip
    if view_rows is not None and view_x is not None:
        mine = np.isin(view_rows, held)  # views of this fold's photos: not fitted on either
        stats.append(query_stats(projection.apply(view_x[mine]), y[view_rows[mine]], gallery, y[train], kind=1,
                                 group=view_rows[mine], raw=(view_x[mine], x[train])))  # fmt: skip
    # recall@1 counts every held-out query (a label with no photo left is a miss for both)
    adapted_hits = int(np.sum(y[train][(queries_x @ gallery.T).argmax(axis=1)] == y[held]))
    raw_hits = int(np.sum(y[train][(x[held] @ x[train].T).argmax(axis=1)] == y[held]))
    return raw_hits, adapted_hits, stats


def adapt(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    mode: str = "auto",
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    ids: np.ndarray | None = None,
    views: tuple[np.ndarray, np.ndarray] | None = None,
    taught: Sequence[int] = (),
    feature_model: str | None = None,
    use_views: bool = True,
    plain: float | None = None,
) -> tuple[Projection | None, Calibration | None, Adaptation]:
    """Decide on and fit a supervised projection for this gallery; calibrate the result.

    ``mode``: ``auto`` (use it if cross-validation says it helps), ``on`` (use it whenever the
    gallery allows one), ``off`` (raw features; the calibration is then leave-one-out).
    ``ids`` (each row's entry id), ``views`` (``(entry id of its photo, raw view features)``),
    ``taught`` (entry ids of confirmed answers), ``feature_model`` and ``plain`` (the share of photos on a
    plain background; both pick its prior) feed the
    calibration (:func:`shitu.calibrate.calibrate_gallery`); ``use_views=False`` sets the
    threshold from the photos alone, as before views (for the benchmarks).
    Returns ``(projection or None, calibration or None, what was measured)``.
    """
    if mode not in ADAPT_MODES:
        raise ValueError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {mode!r}")
    start = time.perf_counter()
    raw = _unit(features)
    labels = np.asarray([str(x) for x in labels])
    counts = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    repeated = sum(1 for c in counts.values() if c > 1)

    ids = np.arange(len(raw)) if ids is None else np.asarray(ids, dtype=np.int64)
    views = views if views is not None and len(views[0]) else None

    def raw_only(reason: str, **measured) -> tuple[None, Calibration | None, Adaptation]:
        unit_views = (views[0], _unit(views[1])) if views is not None else None
        calibration = calibrate_gallery(raw, labels, ids=ids, views=unit_views, taught=taught,
                                        feature_model=feature_model, use_views=use_views,
                                        plain=plain)  # fmt: skip
        seconds = round(time.perf_counter() - start, 3)
        return None, calibration, Adaptation(mode, False, reason, seconds=seconds, **measured)

    if mode == "off":
        return raw_only("switched off")
    if len(raw) < MIN_ENTRIES or len(counts) < MIN_LABELS or repeated < MIN_LABELS:
        return raw_only(
            f"too small to learn from: {len(raw)} entries, {len(counts)} labels, {repeated} with 2+ photos "
            f"(needs {MIN_ENTRIES}+ entries and {MIN_LABELS}+ labels with 2+ photos)"
        )

    rng = np.random.default_rng(seed)
    rows = _sample(labels, MAX_CV_ENTRIES, rng)
    x, y = raw[rows], labels[rows]
    rows_of = row_lookup(ids[rows])
    is_taught = np.zeros(len(rows), bool)
    taught_rows = rows_of(np.asarray(list(taught), dtype=np.int64))
    is_taught[taught_rows[taught_rows >= 0]] = True
    view_rows = view_x = None
    if views is not None:
        view_rows = rows_of(np.asarray(views[0], dtype=np.int64))
        view_x = _unit(np.asarray(views[1])[view_rows >= 0])
        view_rows = view_rows[view_rows >= 0]
    raw_hits = adapted_hits = 0
    queries = 0
    stats: list[QueryStats] = []
    folds = [f for f in _folds(y, FOLDS, rng) if len(f)]
    fit_rows = _sample(labels, MAX_FIT_ENTRIES, rng)
    # The folds and the final fit side by side, one core each, BLAS on one thread: on a shared or busy
    # machine a multi-threaded BLAS's spinning barriers stall (987 drink features: 7-14 s with 2 BLAS
    # threads at load 7, 1.3-2.8 s like this), and on an idle one the folds still use every core. The
    # final fit starts at once, before the folds say whether it is kept (wasted only when it is not).
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(max_workers=_cores()) as pool:
        final = pool.submit(Projection.fit_supervised, raw[fit_rows], labels[fit_rows])
        runs = [pool.submit(_fold, x, y, held, is_taught, view_rows, view_x) for held in folds]
        for n, run in enumerate(runs):
            if progress:
                progress(n, len(folds), "adapting")
            raw_fold, adapted_fold, fold_stats = run.result()
            raw_hits += raw_fold
            adapted_hits += adapted_fold
            queries += len(folds[n])
            stats += fold_stats
        projection = final.result()
    if progress:
        progress(len(folds), len(folds), "adapting")
    raw_recall, adapted_recall = raw_hits / queries, adapted_hits / queries
    measured = {
        "raw_recall": round(raw_recall, 4),
        "adapted_recall": round(adapted_recall, 4),
        "queries": queries,
        "folds": len(folds),
        "kind": "supervised",
    }
    if mode == "auto" and adapted_recall < raw_recall + MIN_GAIN:
        return raw_only(
            f"held-out recall@1 {adapted_recall:.3f} with the projection vs {raw_recall:.3f} without: not worth it",
            **measured,
        )
    calibration = calibrate_stats(
        QueryStats.concat(stats), entries=len(raw), prior=prior_for(feature_model, "adapted", plain),
        protocol="held-out folds", taught=ids[rows][is_taught].tolist(), floor=True, views=use_views, seed=seed,
        plain=plain,
    )  # fmt: skip
    reason = (
        f"held-out recall@1 {raw_recall:.3f} → {adapted_recall:.3f}"
        if mode == "auto"
        else f"switched on (held-out recall@1 {raw_recall:.3f} → {adapted_recall:.3f})"
    )
    return (
        projection,
        calibration,
        Adaptation(mode, True, reason, seconds=round(time.perf_counter() - start, 3), **measured),
    )
