"""A quality report on any gallery index, computed from its stored vectors and labels alone.

No model runs: everything comes from :meth:`GalleryIndex.vectors` (unit vectors in the index's
stored space, so cosine = inner product for IP and L2 indices, whitened or not) and the entries'
labels. One :func:`gallery_report` call feeds the UI's Evaluate tab, ``shitu evaluate``,
``GET /shitu-index/{indexKey}/report`` and :meth:`Engine.report`:

* **recall@1 / recall@5, leave-one-out**: each entry is a query against every *other* entry;
  recall@k is the share of queries with an entry of their own label among their k nearest
  (PaddleClas's retrieval recall@k). Entries whose label has a single image cannot be right and
  are left out (listed under "too few images"). Up to :data:`FULL_LIMIT` entries every entry is a
  query; above that a seeded random sample of :data:`SAMPLE_QUERIES` entries is searched against
  the *full* gallery, exactly (chunked matrix products in faiss), and the report says so.
  Similarities equal to :data:`TIE_DECIMALS` decimals (an exact duplicate's copies) rank in
  storage order, so results never depend on the search code's tie-breaking.
* **per label** recall, and the label its queries most often land on when wrong;
* **most confused label pairs**: leave-one-out top-1 errors between two labels, both directions;
* **suspected mislabelled entries**: at least :data:`MISLABEL_MIN_VOTES` of an entry's
  :data:`NEIGHBOURS` nearest neighbours agree on *one* other label, and no other image of its own
  label is as close as the best of those (so its label has images it could have matched, and
  matches none of them better);
* **near duplicates**: pairs with cosine >= :data:`DUPLICATE_SIMILARITY` among each entry's
  nearest neighbours — same label: redundant; different labels: conflicting (listed first; an
  entry of such a pair is not listed again as mislabelled, the pair carries the suggestion).
  Above :data:`FULL_LIMIT`, mislabels and duplicates come from an approximate neighbour pass over
  every entry (a temporary IVF index), and every suspected mislabel is confirmed exactly;
* **labels with too few images**: 1 (cannot be evaluated) or up to :data:`FRAGILE_IMAGES` (fragile);
* **the threshold curve**: the index's own :class:`~shitu.calibrate.Calibration` when it has one,
  else :func:`~shitu.calibrate.calibrate_gallery` on the stored vectors;
* **a 2-D map** of the embeddings coloured by label, outliers (wrong leave-one-out top-1, or
  suspected mislabelled) drawn as rings: exact t-SNE (sparse k-NN affinities, PCA start, exact
  repulsion in row blocks; no Barnes-Hut) on at most :data:`MAP_POINTS` entries — whole labels
  when sampled, those of outliers and their rivals first. About 1 s for 1,000 points and 3 s for
  2,500 on 2 cores (bench/results/report_scale.txt).

Exports: :meth:`GalleryReport.to_dict` (JSON), :meth:`~GalleryReport.to_csv` and
:meth:`~GalleryReport.to_html` (one self-contained page: inline CSS and SVG, thumbnails as
``data:`` URIs, no script). :func:`map_svg` and :func:`curve_svg` are public so the UI can embed
them. Every label is escaped: labels come from strangers.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from shitu import fonts
from shitu.calibrate import Calibration, calibrate_gallery
from shitu.errors import ShiTuError
from shitu.index import GalleryIndex

Progress = Callable[[int, int, str], None]  # (done, total, what), as the engine's

NEIGHBOURS = 5  # k of recall@k and of the mislabel vote
FULL_LIMIT = 20_000  # up to this many entries, every entry is a leave-one-out query
SAMPLE_QUERIES = 5_000  # above it, this many seeded random queries against the full gallery
SEED = 0
MISLABEL_MIN_VOTES = 4  # of the NEIGHBOURS nearest: a clear majority on one other label
DUPLICATE_SIMILARITY = 0.98  # cosine in the stored space at or above which two entries are near duplicates
FRAGILE_IMAGES = 2  # labels with at most this many images are listed (1 image: cannot be evaluated)
MAP_POINTS = 2_500  # entries drawn on the 2-D map at most (whole labels, seeded, beyond that)
MAP_PER_LABEL = 50  # images of one label drawn at most when the map is sampled
MAX_LISTED = 5_000  # rows kept per list (mislabelled, duplicates, outliers, pairs); counts stay complete
CONFUSION_EXAMPLES = 3  # example entries per side of a confused pair
TIE_DECIMALS = 5  # similarities equal to this many decimals are ties, broken by storage order
KNN_CHUNK = 2_048  # queries per exact search call (bounds memory; a progress step)
IVF_NPROBE = 6  # of ~4·sqrt(n) lists, probed by the all-entry neighbour pass above FULL_LIMIT
HTML_ROWS = 100  # rows per section in the HTML page (the CSVs have everything)
HTML_LABEL_ROWS = 300  # worst labels shown in the HTML page

TSNE_PERPLEXITY = 15.0  # ~45 neighbours: a label's few images and their closest rivals
TSNE_ITERATIONS = 300
TSNE_EXAGGERATION_ITERATIONS = 100
TSNE_BLOCK = 128  # rows of the dense repulsion computed at once (fits the CPU cache)
TSNE_THREADS = 2


# --- the report ------------------------------------------------------------------------------


@dataclass
class LabelRow:
    label: str
    images: int
    queries: int  # leave-one-out queries measured (0: a single image, or none sampled)
    recall_at_1: float | None
    recall_at_5: float | None
    confused_with: str | None = None  # where this label's wrong top-1 answers land most
    confused_count: int = 0


@dataclass
class Example:
    id: int  # a query entry of one label ...
    matched_id: int  # ... whose nearest other entry has the other label
    similarity: float


@dataclass
class ConfusedPair:
    label_a: str
    label_b: str
    errors: int  # leave-one-out top-1 errors between the two, both directions
    a_to_b: int
    b_to_a: int
    examples_a: list[Example] = field(default_factory=list)  # entries of label_a answered label_b
    examples_b: list[Example] = field(default_factory=list)


@dataclass
class Suspect:
    """An entry whose neighbours agree on another label."""

    id: int
    label: str
    suggested_label: str
    agree: int  # of its NEIGHBOURS nearest other entries, how many carry suggested_label
    neighbours: int
    similarity: float  # to the closest entry of suggested_label
    nearest_id: int  # that entry
    own_similarity: float | None  # to the closest other entry of its own label


@dataclass
class DuplicatePair:
    id_a: int
    id_b: int
    label_a: str
    label_b: str
    similarity: float
    conflicting: bool  # different labels: at least one of the two is wrong
    suggested_label: str | None = None  # for a conflicting pair: the label the neighbourhood supports


@dataclass
class Outlier:
    """An entry whose nearest other entry (leave-one-out top-1) has another label."""

    id: int
    label: str
    nearest_id: int
    nearest_label: str
    similarity: float


@dataclass
class FewImages:
    label: str
    images: int
    ids: list[int]

    @property
    def status(self) -> str:
        return "cannot be evaluated" if self.images < 2 else "fragile"


@dataclass
class MapPoint:
    id: int
    label: str
    x: float  # 0..1
    y: float  # 0..1
    outlier: bool


@dataclass
class GalleryReport:
    name: str | None
    entries: int
    labels: int
    index_type: str
    metric_type: str
    evaluable: int  # entries whose label has another image
    evaluated: int  # leave-one-out queries measured
    sampled: bool  # True when `evaluated` is a seeded random sample of `evaluable`
    recall_at_1: float | None
    recall_at_5: float | None
    per_label: list[LabelRow]
    confused_pairs: list[ConfusedPair]
    mislabelled: list[Suspect]
    mislabelled_count: int
    duplicates: list[DuplicatePair]  # conflicting first, then by similarity
    duplicate_counts: dict[str, int]  # {"conflicting": n, "redundant": n}
    few_images: list[FewImages]
    outliers: list[Outlier]
    outlier_count: int
    calibration: Calibration | None
    calibration_source: str  # "index" (the index's own) or "computed" (calibrate_gallery) or "none"
    map_points: list[MapPoint]
    map_total: int  # entries the map was sampled from
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seconds: float = 0.0
    thumbnails: dict[int, bytes] = field(default_factory=dict, repr=False)  # of the entries listed
    sources: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def map_sampled(self) -> bool:
        return len(self.map_points) < self.map_total

    def label_row(self, label: str) -> LabelRow | None:
        return next((r for r in self.per_label if r.label == label), None)

    # --- exports ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able values (no thumbnails)."""
        return {
            "name": self.name,
            "entries": self.entries,
            "labels": self.labels,
            "index_type": self.index_type,
            "metric_type": self.metric_type,
            "evaluation": {
                "protocol": "leave-one-out",
                "evaluable": self.evaluable,
                "evaluated": self.evaluated,
                "sampled": self.sampled,
                "seed": SEED,
                "neighbours": NEIGHBOURS,
            },
            "recall_at_1": self.recall_at_1,
            "recall_at_5": self.recall_at_5,
            "per_label": [asdict(r) for r in self.per_label],
            "confused_pairs": [asdict(p) for p in self.confused_pairs],
            "mislabelled": [asdict(s) for s in self.mislabelled],
            "mislabelled_count": self.mislabelled_count,
            "duplicates": [asdict(d) for d in self.duplicates],
            "duplicate_counts": dict(self.duplicate_counts),
            "duplicate_similarity": DUPLICATE_SIMILARITY,
            "few_images": [{**asdict(f), "status": f.status} for f in self.few_images],
            "outliers": [asdict(o) for o in self.outliers],
            "outlier_count": self.outlier_count,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "calibration_source": self.calibration_source,
            "map": {
                "method": "t-SNE (exact, PCA start) of the stored vectors",
                "total": self.map_total,
                "sampled": self.map_sampled,
                "points": [asdict(p) for p in self.map_points],
            },
            "notes": list(self.notes),
            "timings": dict(self.timings),
            "seconds": self.seconds,
        }

    def to_csv(self, kind: str = "labels") -> str:
        """CSV text: ``labels`` (one row per label), ``entries`` (flagged entries: suspected
        mislabelled, near duplicates, outliers; one row per entry and issue) or ``pairs``
        (confused label pairs). Text cells that a spreadsheet would run as a formula are
        prefixed with ``'``."""
        buf = io.StringIO()
        out = csv.writer(buf)
        if kind == "labels":
            few = {f.label: f.status for f in self.few_images}
            out.writerow(["label", "images", "queries", "recall_at_1", "recall_at_5", "confused_with",
                          "confused_count", "too_few_images"])  # fmt: skip
            for r in self.per_label:
                out.writerow([_cell(r.label), r.images, r.queries, _num(r.recall_at_1), _num(r.recall_at_5),
                              _cell(r.confused_with or ""), r.confused_count or "", few.get(r.label, "")])  # fmt: skip
        elif kind == "entries":
            out.writerow(["id", "label", "source", "issue", "suggested_label", "agree", "similarity", "related_id"])
            for s in self.mislabelled:
                out.writerow([s.id, _cell(s.label), _cell(self.sources.get(s.id, "")), "suspected mislabelled",
                              _cell(s.suggested_label), f"{s.agree}/{s.neighbours}", _num(s.similarity),
                              s.nearest_id])  # fmt: skip
            for d in self.duplicates:
                issue = "conflicting duplicate" if d.conflicting else "redundant duplicate"
                for me, other, label in ((d.id_a, d.id_b, d.label_a), (d.id_b, d.id_a, d.label_b)):
                    out.writerow([me, _cell(label), _cell(self.sources.get(me, "")), issue,
                                  _cell(d.suggested_label or ""), "", _num(d.similarity), other])  # fmt: skip
            for o in self.outliers:
                out.writerow([o.id, _cell(o.label), _cell(self.sources.get(o.id, "")), "outlier",
                              _cell(o.nearest_label), "", _num(o.similarity), o.nearest_id])  # fmt: skip
        elif kind == "pairs":
            out.writerow(["label_a", "label_b", "errors", "a_to_b", "b_to_a", "examples_a", "examples_b"])
            for p in self.confused_pairs:
                out.writerow([_cell(p.label_a), _cell(p.label_b), p.errors, p.a_to_b, p.b_to_a,
                              " ".join(str(e.id) for e in p.examples_a),
                              " ".join(str(e.id) for e in p.examples_b)])  # fmt: skip
        else:
            raise ShiTuError(f"unknown CSV table {kind!r}: use labels, entries or pairs")
        return buf.getvalue()

    def to_html(self, lang: str = "en") -> str:
        """One self-contained HTML page (UTF-8, inline CSS and SVG, thumbnails as data URIs)."""
        return _render_html(self, lang)

    def summary_lines(self) -> list[str]:
        """A short plain-text summary (the CLI prints it)."""
        return _summary_lines(self)


def _cell(text: str) -> str:
    """Defuse spreadsheet formulas in a CSV text cell (labels and file names come from strangers)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# --- computing it ----------------------------------------------------------------------------


class _Clock:
    """Times stages and forwards progress."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()
        self._t = self.start

    def step(self, done: int, total: int, what: str) -> None:
        if self.progress is not None:
            self.progress(done, total, what)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(self.timings.get(stage, 0.0) + now - self._t, 4)
        self._t = now


def gallery_report(index: GalleryIndex, *, name: str | None = None, progress: Progress | None = None) -> GalleryReport:
    """The report on ``index`` (see the module doc). ``progress(done, total, what)`` is called
    as stages advance. Deterministic: every sample is seeded."""
    clock = _Clock(progress)
    clock.step(0, 1, "reading vectors")
    ids, vectors = index.vectors()
    labels_of_row = index.labels_of(ids)
    names, codes = np.unique(np.asarray(labels_of_row, dtype=object).astype(str), return_inverse=True)
    codes = codes.astype(np.int64)
    n = len(ids)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    counts = np.bincount(codes, minlength=len(names))
    clock.lap("vectors")

    k = min(NEIGHBOURS, n - 1)
    evaluable = np.flatnonzero(counts[codes] >= 2)
    sampled = n > FULL_LIMIT and len(evaluable) > SAMPLE_QUERIES
    rng = np.random.default_rng(SEED)
    notes: list[str] = []

    # -- neighbours: exact for the queries; every entry's for mislabels and duplicates ---------
    if k < 1:
        queries = np.zeros(0, dtype=np.int64)
        q_sims = np.zeros((0, 0), np.float32)
        q_nbrs = np.zeros((0, 0), np.int64)
        all_sims, all_nbrs = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    elif not sampled:
        all_sims, all_nbrs = _exact_knn(vectors, np.arange(n), k, clock)
        queries = evaluable
        q_sims, q_nbrs = all_sims[queries], all_nbrs[queries]
    else:
        queries = np.sort(rng.choice(evaluable, size=SAMPLE_QUERIES, replace=False))
        q_sims, q_nbrs = _exact_knn(vectors, queries, k, clock)
        clock.lap("neighbours")
        all_sims, all_nbrs = _approximate_knn(vectors, k, clock)
        all_sims[queries], all_nbrs[queries] = q_sims, q_nbrs
        clock.lap("neighbours (all entries)")
        notes.append(
            f"Recall, confusions and outliers were measured on a seeded random sample of {len(queries):,} of "
            f"{len(evaluable):,} evaluable entries, each searched exactly against all {n:,}. Suspected mislabels "
            f"and near duplicates come from an approximate neighbour pass over every entry (IVF, {IVF_NPROBE} "
            "lists probed); every suspected mislabel is confirmed by an exact search."
        )
    clock.lap("neighbours")

    # -- leave-one-out recall, per label, confusions ------------------------------------------
    q_codes = codes[queries]
    if len(queries):
        hit1 = codes[q_nbrs[:, 0]] == q_codes
        hit5 = (codes[q_nbrs[:, :NEIGHBOURS]] == q_codes[:, None]).any(axis=1)
        recall1, recall5 = round(float(hit1.mean()), 4), round(float(hit5.mean()), 4)
    else:
        hit1 = hit5 = np.zeros(0, bool)
        recall1 = recall5 = None
    wrong = np.flatnonzero(~hit1)
    err_a, err_b = q_codes[wrong], codes[q_nbrs[wrong, 0]] if len(wrong) else np.zeros(0, np.int64)
    per_label = _label_rows(names, counts, q_codes, hit1, hit5, err_a, err_b)
    confused = _confused_pairs(names, ids, queries, q_nbrs, q_sims, wrong, err_a, err_b)
    order = np.argsort(-q_sims[wrong, 0], kind="stable") if len(wrong) else np.zeros(0, np.int64)
    outliers = [
        Outlier(
            int(ids[queries[w]]),
            str(names[err_a[j]]),
            int(ids[q_nbrs[w, 0]]),
            str(names[err_b[j]]),
            round(float(q_sims[w, 0]), 4),
        )  # fmt: skip
        for j, w in ((int(j), int(wrong[j])) for j in order[:MAX_LISTED])
    ]
    clock.lap("recall")

    # -- suspected mislabels (exactly confirmed) -----------------------------------------------
    suspects = _suspects(vectors, ids, names, codes, counts, all_sims, all_nbrs, exact=not sampled, clock=clock)
    clock.lap("mislabelled")

    # -- near duplicates ---------------------------------------------------------------------
    duplicates, dup_counts = _duplicates(ids, names, codes, all_sims, all_nbrs)
    by_id = {s.id: s for s in suspects}
    in_conflict: set[int] = set()
    for d in duplicates:
        if d.conflicting:
            in_conflict |= {d.id_a, d.id_b}
            s = by_id.get(d.id_a) or by_id.get(d.id_b)
            d.suggested_label = s.suggested_label if s else None
    # a conflicting duplicate is reported once, as a duplicate pair (which carries the suggestion)
    suspects = [s for s in suspects if s.id not in in_conflict]
    clock.lap("duplicates")

    by_label = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[by_label], np.arange(len(names) + 1))
    few = [
        FewImages(str(names[c]), int(counts[c]), sorted(int(i) for i in ids[by_label[starts[c] : starts[c + 1]]]))
        for c in np.flatnonzero(counts <= FRAGILE_IMAGES)
    ]
    few.sort(key=lambda f: (f.images, f.label))

    # -- the threshold curve -------------------------------------------------------------------
    clock.step(0, 1, "threshold curve")
    calibration = getattr(index, "calibration", None)
    source = "index"
    if calibration is None:
        # integer label codes compare like the labels themselves, and much faster
        calibration = calibrate_gallery(vectors, codes) if n >= 2 else None
        source = "computed" if calibration is not None else "none"
    clock.lap("calibration")

    # -- the map -------------------------------------------------------------------------------
    # outliers: a wrong nearest other entry (exact up to FULL_LIMIT; above it exact for the sampled
    # queries and from the all-entry pass for the rest) or a suspected mislabel
    k_ok = all_nbrs.shape[1] > 0
    wrong_top1 = np.zeros(n, bool)
    if k_ok:
        wrong_top1[evaluable] = codes[all_nbrs[evaluable, 0]] != codes[evaluable]
    wrong_top1[np.isin(ids, list(by_id))] = True
    partner = codes[all_nbrs[:, 0]] if k_ok else codes
    map_rows = _map_sample(codes, np.flatnonzero(wrong_top1), partner, rng)
    xy = tsne_2d(vectors[map_rows], progress=lambda d, t: clock.step(d, t, "map")) if len(map_rows) else None
    map_points = [
        MapPoint(int(ids[r]), str(names[codes[r]]), round(float(xy[j, 0]), 4), round(float(xy[j, 1]), 4),
                 bool(wrong_top1[r]))  # fmt: skip
        for j, r in enumerate(map_rows)
    ]
    if len(map_rows) < n:
        notes.append(
            f"The map shows {len(map_rows):,} of {n:,} entries: whole labels, first those of outliers and the labels "
            "they are confused with, then a seeded random choice of the others."
        )
    clock.lap("map")
    adaptation = getattr(index, "adaptation", None)
    if adaptation is not None and adaptation.applied and adaptation.adapted_recall is not None:
        notes.append(
            "The features were fitted to this gallery's own labels, so leave-one-out numbers here are optimistic "
            f"(each entry helped fit the space it is searched in). Held out — folds of the gallery removed from the "
            f"fit and from the search — recall@1 is {adaptation.adapted_recall:.1%} "
            f"(raw features: {adaptation.raw_recall:.1%})."
        )

    report = GalleryReport(
        name=name,
        entries=n,
        labels=len(names),
        index_type=index.index_type,
        metric_type=index.metric_type,
        evaluable=len(evaluable),
        evaluated=len(queries),
        sampled=bool(sampled),
        recall_at_1=recall1,
        recall_at_5=recall5,
        per_label=per_label,
        confused_pairs=confused,
        mislabelled=suspects[:MAX_LISTED],
        mislabelled_count=len(suspects),
        duplicates=duplicates[:MAX_LISTED],
        duplicate_counts=dup_counts,
        few_images=few,
        outliers=outliers,
        outlier_count=len(wrong),
        calibration=calibration,
        calibration_source=source,
        map_points=map_points,
        map_total=n,
        notes=notes,
    )
    _attach_media(report, index)
    clock.lap("thumbnails")
    report.timings = clock.timings
    report.seconds = round(time.perf_counter() - clock.start, 4)
    return report


def _exact_knn(vectors: np.ndarray, rows: np.ndarray, k: int, clock: _Clock) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest *other* rows of each of ``rows`` (by inner product = cosine), best first."""
    sims = np.empty((len(rows), k), np.float32)
    nbrs = np.empty((len(rows), k), np.int64)
    for start in range(0, len(rows), KNN_CHUNK):
        part = rows[start : start + KNN_CHUNK]
        d, i = faiss.knn(vectors[part], vectors, k + 1, faiss.METRIC_INNER_PRODUCT)
        sims[start : start + len(part)], nbrs[start : start + len(part)] = _drop_self(d, i, part, k)
        clock.step(min(start + KNN_CHUNK, len(rows)), len(rows), "neighbours")
    return sims, nbrs


def _drop_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 results (wherever exact ties put it; the last
    result when it is absent), keep k, best first. Similarities equal to 5 decimals (an exact
    duplicate's copies) are ordered by storage row, so ties never depend on the search code."""
    tie_order = np.lexsort((i, -np.round(d, TIE_DECIMALS), i == rows[:, None]), axis=-1)[:, :k]
    return np.take_along_axis(d, tie_order, axis=1), np.take_along_axis(i, tie_order, axis=1)


def _approximate_knn(vectors: np.ndarray, k: int, clock: _Clock) -> tuple[np.ndarray, np.ndarray]:
    """Every entry's k nearest others through a temporary IVF index (seeded k-means on a sample;
    for the all-entry passes above FULL_LIMIT, where exact search of every entry would take
    minutes). Similarities of what is found are exact."""
    n, dim = vectors.shape
    nlist = max(1, min(4096, int(round(4 * math.sqrt(n)))))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # a rough k-means is enough to bucket neighbours: few points and iterations keep it ~1 s at 100k
    ivf.cp.niter = 4
    ivf.cp.seed = SEED
    ivf.cp.max_points_per_centroid = 24
    ivf.cp.min_points_per_centroid = 1
    rng = np.random.default_rng(SEED + 1)
    train = vectors[np.sort(rng.choice(n, size=min(n, nlist * 24), replace=False))]
    ivf.train(train)
    ivf.add(vectors)
    ivf.nprobe = min(IVF_NPROBE, nlist)
    sims = np.empty((n, k), np.float32)
    nbrs = np.empty((n, k), np.int64)
    step = KNN_CHUNK * 8
    for start in range(0, n, step):
        rows = np.arange(start, min(n, start + step))
        d, i = ivf.search(vectors[rows], k + 1)
        d, i = _drop_self(d, i, rows, k)
        missing = i < 0  # fewer than k+1 candidates in the probed lists
        i[missing], d[missing] = rows[np.nonzero(missing)[0]], -np.inf
        sims[rows], nbrs[rows] = d, i
        clock.step(rows[-1] + 1, n, "neighbours (all entries)")
    return sims, nbrs


def _label_rows(names, counts, q_codes, hit1, hit5, err_a, err_b) -> list[LabelRow]:
    nl = len(names)
    queries = np.bincount(q_codes, minlength=nl)
    ok1 = np.bincount(q_codes, weights=hit1, minlength=nl)
    ok5 = np.bincount(q_codes, weights=hit5, minlength=nl)
    worst: dict[int, tuple[int, int]] = {}
    if len(err_a):
        pairs, pair_counts = np.unique(np.stack([err_a, err_b], axis=1), axis=0, return_counts=True)
        for (a, b), c in zip(pairs.tolist(), pair_counts.tolist()):
            if c > worst.get(a, (0, -1))[0]:
                worst[a] = (c, b)
    rows = []
    for c in range(nl):
        q = int(queries[c])
        conf = worst.get(c)
        rows.append(
            LabelRow(
                label=str(names[c]),
                images=int(counts[c]),
                queries=q,
                recall_at_1=round(float(ok1[c] / q), 4) if q else None,
                recall_at_5=round(float(ok5[c] / q), 4) if q else None,
                confused_with=str(names[conf[1]]) if conf else None,
                confused_count=int(conf[0]) if conf else 0,
            )
        )
    # worst first; labels that could not be measured last
    rows.sort(key=lambda r: (r.recall_at_1 is None, r.recall_at_1 or 0.0, r.recall_at_5 or 0.0, -r.images, r.label))
    return rows


def _confused_pairs(names, ids, queries, q_nbrs, q_sims, wrong, err_a, err_b) -> list[ConfusedPair]:
    if not len(wrong):
        return []
    lo, hi = np.minimum(err_a, err_b), np.maximum(err_a, err_b)
    keys, inverse, totals = np.unique(lo * len(names) + hi, return_inverse=True, return_counts=True)
    ranked = np.lexsort((keys, -totals))[:MAX_LISTED]
    pairs: dict[int, ConfusedPair] = {}
    for r in ranked.tolist():
        a, b = divmod(int(keys[r]), len(names))
        pairs[r] = ConfusedPair(str(names[a]), str(names[b]), int(totals[r]), 0, 0)
    for j in np.argsort(-q_sims[wrong, 0], kind="stable").tolist():  # most similar examples first
        p = pairs.get(int(inverse[j]))
        if p is None:
            continue
        w = int(wrong[j])
        ex = Example(int(ids[queries[w]]), int(ids[q_nbrs[w, 0]]), round(float(q_sims[w, 0]), 4))
        if str(names[err_a[j]]) == p.label_a:
            p.a_to_b += 1
            if len(p.examples_a) < CONFUSION_EXAMPLES:
                p.examples_a.append(ex)
        else:
            p.b_to_a += 1
            if len(p.examples_b) < CONFUSION_EXAMPLES:
                p.examples_b.append(ex)
    return [pairs[r] for r in ranked.tolist()]


def _suspects(vectors, ids, names, codes, counts, sims, nbrs, *, exact: bool, clock: _Clock) -> list[Suspect]:
    """Entries whose neighbours vote for one other label by a clear majority and which match
    no other image of their own label better than they match that label."""
    n, k = nbrs.shape
    need = min(MISLABEL_MIN_VOTES, k)
    if k < 3:
        return []
    candidates = _vote(codes, counts, nbrs)
    if not exact and len(candidates):
        # neighbours of the all-entry pass were approximate: confirm with an exact search
        d, i = _exact_knn(vectors, candidates, k, clock)
        sims, nbrs = sims.copy(), nbrs.copy()
        sims[candidates], nbrs[candidates] = d, i
        candidates = candidates[np.isin(candidates, _vote(codes, counts, nbrs, rows=candidates))]
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(len(names) + 1))
    out = []
    for row in candidates.tolist():
        nl = codes[nbrs[row]]
        votes = Counter(c for c in nl.tolist() if c != codes[row])
        suggested, agree = votes.most_common(1)[0]
        if agree < need:
            continue
        own = order[starts[codes[row]] : starts[codes[row] + 1]]
        own = own[own != row]
        own_best = float((vectors[own] @ vectors[row]).max())
        pick = np.flatnonzero(nl == suggested)
        best = int(pick[np.argmax(sims[row, pick])])
        if own_best >= float(sims[row, best]):
            continue  # an image of its own label is at least as close: not clearly mislabelled
        out.append(
            Suspect(
                id=int(ids[row]),
                label=str(names[codes[row]]),
                suggested_label=str(names[suggested]),
                agree=int(agree),
                neighbours=k,
                similarity=round(float(sims[row, best]), 4),
                nearest_id=int(ids[nbrs[row, best]]),
                own_similarity=round(own_best, 4),
            )  # fmt: skip
        )
    out.sort(key=lambda s: (-s.agree, -(s.similarity - (s.own_similarity or 0.0)), s.id))
    return out


def _vote(codes: np.ndarray, counts: np.ndarray, nbrs: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows (of ``rows``, default all) with >= MISLABEL_MIN_VOTES neighbours on one other label
    and another image of their own label."""
    rows = np.arange(len(nbrs)) if rows is None else rows
    k = nbrs.shape[1]
    need = min(MISLABEL_MIN_VOTES, k)
    nl = codes[nbrs[rows]]
    own = codes[rows][:, None]
    other = nl != own
    votes = np.zeros(nl.shape, np.int64)
    for c in range(k):
        votes[:, c] = ((nl == nl[:, c : c + 1]) & other).sum(axis=1) * other[:, c]
    keep = (votes.max(axis=1) >= need) & (counts[codes[rows]] >= 2)
    return rows[keep]


def _duplicates(ids, names, codes, sims, nbrs) -> tuple[list[DuplicatePair], dict[str, int]]:
    n, k = nbrs.shape
    if k == 0:
        return [], {"conflicting": 0, "redundant": 0}
    r, c = np.nonzero(sims >= DUPLICATE_SIMILARITY)
    a, b = np.arange(n)[r], nbrs[r, c]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key, first = np.unique(lo * n + hi, return_index=True)
    lo, hi, s = key // n, key % n, sims[r[first], c[first]]
    conflicting = codes[lo] != codes[hi]
    order = np.lexsort((hi, lo, -s, ~conflicting))
    pairs = [
        DuplicatePair(
            int(ids[lo[j]]),
            int(ids[hi[j]]),
            str(names[codes[lo[j]]]),
            str(names[codes[hi[j]]]),
            round(float(min(1.0, s[j])), 4),
            bool(conflicting[j]),
        )  # fmt: skip
        for j in order[:MAX_LISTED].tolist()
    ]
    return pairs, {"conflicting": int(conflicting.sum()), "redundant": int((~conflicting).sum())}


def _map_sample(codes: np.ndarray, flagged: np.ndarray, partner: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """At most MAP_POINTS rows, chosen as whole labels (at most MAP_PER_LABEL images each) so the
    map keeps clusters whole: first the labels of flagged rows and of the label each is confused
    with (``partner``), up to half the budget, then a seeded random choice of other labels."""
    n = len(codes)
    if n <= MAP_POINTS:
        return np.arange(n)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(int(codes.max()) + 2))
    shuffled = rng.permutation(flagged)
    priority = list(dict.fromkeys(c for r in shuffled.tolist() for c in (int(codes[r]), int(partner[r]))))
    rest = [int(c) for c in rng.permutation(int(codes.max()) + 1) if c not in set(priority)]
    chosen: list[np.ndarray] = []
    used = 0
    for step, labels in ((MAP_POINTS // 2, priority), (MAP_POINTS, rest)):
        for c in labels:
            rows = order[starts[c] : starts[c + 1]]
            if len(rows) > MAP_PER_LABEL:
                rows = np.sort(rng.choice(rows, MAP_PER_LABEL, replace=False))
            if used + len(rows) > step:
                if used >= step - 1:
                    break
                continue
            chosen.append(rows)
            used += len(rows)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _attach_media(report: GalleryReport, index: GalleryIndex) -> None:
    """Thumbnails and file names of the entries the report lists (the HTML page shows them)."""
    wanted: list[int] = []
    for p in report.confused_pairs[:HTML_ROWS]:
        for e in p.examples_a + p.examples_b:
            wanted += [e.id, e.matched_id]
    for s in report.mislabelled[:HTML_ROWS]:
        wanted += [s.id, s.nearest_id]
    for d in report.duplicates[:HTML_ROWS]:
        wanted += [d.id_a, d.id_b]
    listed = {s.id for s in report.mislabelled} | {o.id for o in report.outliers}
    listed |= {d.id_a for d in report.duplicates} | {d.id_b for d in report.duplicates}
    rows = index.sources(set(wanted) | listed, thumbnails=True)  # ids without a row are left out
    for i, (source, thumbnail) in rows.items():
        report.sources[i] = source
        if i in wanted and thumbnail:
            report.thumbnails[i] = thumbnail


# --- the 2-D map: exact t-SNE in numpy -------------------------------------------------------


def tsne_2d(
    x: np.ndarray, *, perplexity: float = TSNE_PERPLEXITY, iterations: int = TSNE_ITERATIONS,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:  # fmt: skip
    """2-D t-SNE of unit vectors ``x`` (n <= a few thousand), scaled into [0, 1]².

    Affinities from each point's ``3·perplexity`` nearest neighbours (cosine, exact), a PCA
    start (deterministic: no random seed to tune), early exaggeration, and exact repulsion
    computed in cache-sized row blocks — O(n²) per iteration, a few seconds for 2-3 thousand
    points. Below 5 points the PCA projection is returned."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    y = _pca_2d(x)
    if n >= 5:
        perplexity = max(2.0, min(perplexity, (n - 1) / 3.0))
        pi, pj, pv = _affinities(x, perplexity)
        y = _optimise(y / max(float(y[:, 0].std()), 1e-12) * 1e-4, pi, pj, pv, iterations, progress)
    lo, hi = y.min(axis=0), y.max(axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    out = (y - lo) / span
    out[:, np.flatnonzero(hi - lo <= 1e-12)] = 0.5
    return out


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection on the two main directions (eigenvectors of the D×D scatter matrix), signs fixed."""
    n = len(x)
    if n < 2:
        return np.zeros((n, 2), np.float32)
    centred = (x - x.mean(axis=0)).astype(np.float64)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    y = (centred @ vecs[:, ::-1][:, :2]).astype(np.float32)
    if y.shape[1] < 2:
        y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
    flip = np.sign(y[np.argmax(np.abs(y), axis=0), np.arange(2)])  # a fixed orientation
    return y * np.where(flip == 0, 1, flip)


def _affinities(x: np.ndarray, perplexity: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric sparse t-SNE affinities P (rows, cols, values), summing to 1."""
    n = len(x)
    k = min(n - 1, int(3 * perplexity))
    rows = np.arange(n)
    d, i = faiss.knn(x, x, k + 1, faiss.METRIC_INNER_PRODUCT)
    d, i = _drop_self(d, i, rows, k)
    d2 = np.maximum(2.0 - 2.0 * d.astype(np.float64), 0.0)
    d2 -= d2.min(axis=1, keepdims=True)
    target = math.log(perplexity)
    lo, hi, beta = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(60):  # bisection on each row's precision, all rows at once
        p = np.exp(-d2 * beta[:, None])
        total = p.sum(axis=1)
        entropy = np.log(total) + beta * (d2 * p).sum(axis=1) / total
        high = entropy > target
        lo = np.where(high, beta, lo)
        hi = np.where(high, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
    p = np.exp(-d2 * beta[:, None])
    p /= p.sum(axis=1, keepdims=True)
    r = np.concatenate([np.repeat(rows, k), i.ravel()])
    c = np.concatenate([i.ravel(), np.repeat(rows, k)])
    key, inverse = np.unique(r * n + c, return_inverse=True)
    values = np.bincount(inverse, weights=np.concatenate([p.ravel(), p.ravel()])) / (2.0 * n)
    return key // n, key % n, values.astype(np.float32)


def _optimise(y, pi, pj, pv, iterations: int, progress) -> np.ndarray:
    """Gradient descent with momentum and per-coordinate gains (as in van der Maaten's t-SNE);
    coordinates are kept as two contiguous rows (x's, y's) for fast gathers."""
    n = len(y)
    yt = np.ascontiguousarray(y.T, dtype=np.float32)  # (2, n)
    update = np.zeros_like(yt)
    gains = np.ones_like(yt)
    attraction = np.empty_like(yt)
    rate = max(n / 12.0 / 4.0, 50.0)  # scikit-learn's "auto" learning rate
    early = min(TSNE_EXAGGERATION_ITERATIONS, iterations // 3)
    workers = max(1, min(TSNE_THREADS, os.cpu_count() or 1, n // (4 * TSNE_BLOCK)))
    with ThreadPoolExecutor(workers, thread_name_prefix="shitu-map") as pool:
        for it in range(iterations):
            exaggeration, momentum = (12.0, 0.5) if it < early else (1.0, 0.8)
            dx = yt[0, pi] - yt[0, pj]
            dy = yt[1, pi] - yt[1, pj]
            w = pv / (1.0 + dx * dx + dy * dy)
            attraction[0] = np.bincount(pi, weights=w * dx, minlength=n)
            attraction[1] = np.bincount(pi, weights=w * dy, minlength=n)
            repulsion, z = _repulsion(yt, pool, workers)
            grad = 4.0 * (exaggeration * attraction - repulsion / max(z, 1e-12))
            same = (grad > 0) == (update > 0)
            gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
            update = momentum * update - rate * gains * grad
            yt += update
            yt -= yt.mean(axis=1, keepdims=True)
            if progress is not None and (it + 1) % 50 == 0:
                progress(it + 1, iterations)
    return yt.T


def _repulsion(yt: np.ndarray, pool: ThreadPoolExecutor, workers: int) -> tuple[np.ndarray, float]:
    """For coordinates ``yt`` (2, n): t-SNE's repulsive forces ``sum_j q_ij^2 (y_i - y_j)``
    (unnormalised) and ``Z = sum q_ij``, exactly, over all pairs. Each pair is computed once (a
    row block against the columns from its own start on; the far columns get the opposite
    force), in cache-sized row blocks shared among threads (numpy releases the GIL). Plain
    elementwise numpy: BLAS's threads, spinning against the caller's, made this 10x slower on a
    busy 2-core machine."""
    n = yt.shape[1]
    y0, y1 = yt[0], yt[1]

    def work(starts: list[int]) -> tuple[np.ndarray, float]:
        rep = np.zeros((2, n), np.float32)
        z = 0.0
        for s in starts:
            e = min(n, s + TSNE_BLOCK)
            b = e - s
            dx = np.subtract.outer(y0[s:e], y0[s:])
            dy = np.subtract.outer(y1[s:e], y1[s:])
            q = dx * dx
            q += dy * dy
            q += 1.0
            np.reciprocal(q, out=q)
            q[np.arange(b), np.arange(b)] = 0.0
            z += float(q[:, :b].sum()) + 2.0 * float(q[:, b:].sum())
            q *= q
            dx *= q
            dy *= q
            rep[0, s:e] += dx.sum(axis=1)
            rep[1, s:e] += dy.sum(axis=1)
            rep[0, e:] -= dx[:, b:].sum(axis=0)
            rep[1, e:] -= dy[:, b:].sum(axis=0)
        return rep, z

    blocks = list(range(0, n, TSNE_BLOCK))
    parts = list(pool.map(work, [blocks[w::workers] for w in range(workers)]))
    return sum(r for r, _ in parts[1:]) + parts[0][0], sum(z for _, z in parts)


# --- SVG -------------------------------------------------------------------------------------

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#e6550d", "#31a354", "#a50f15", "#6b6ecf", "#8c6d31",
           "#ce6dbd", "#3182bd", "#637939", "#d6616b")  # fmt: skip
LEGEND_LABELS = 12
NAMED_CLUSTERS = 15


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """A colour per label: the palette for the most frequent, golden-angle hues after that."""
    ranked = [lab for lab, _ in Counter(labels).most_common()]
    out = {}
    for r, lab in enumerate(ranked):
        out[lab] = PALETTE[r] if r < len(PALETTE) else f"hsl({(r * 137.508) % 360:.1f},62%,42%)"
    return out


def map_svg(report: GalleryReport, *, width: int = 760, height: int = 520, lang: str = "en") -> str:
    """The 2-D map as inline SVG: one ``<circle>`` per mapped entry coloured by label (an outlier
    is a ring), with a ``<title>`` tooltip ``label #id``, the largest labels named at their
    centre, and a legend. Empty (a note) when there is nothing to map."""
    t = TEXT.get(lang, TEXT["en"])
    pts = report.map_points
    if not pts:
        return f'<p class="muted">{html.escape(t["map_empty"])}</p>'
    colours = label_colours([p.label for p in pts])
    legend_h = 22 * math.ceil(min(LEGEND_LABELS + 1, len(colours) + 1) / 3) + 8
    pad = 16
    plot_w, plot_h = width - 2 * pad, height - 2 * pad
    r = 3.5 if len(pts) <= 1000 else 2.6
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height + legend_h}" width="100%" '
        f'style="max-width:{width}px;height:auto" role="img" aria-label="{html.escape(t["map_title"])}" '
        'font-family="inherit" font-size="12">',
        f'<rect x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="#fff" stroke="#ddd"/>',
    ]

    def xy(p: MapPoint) -> tuple[float, float]:
        return pad + p.x * plot_w, pad + (1.0 - p.y) * plot_h

    for p in sorted(pts, key=lambda p: p.outlier):  # rings on top
        cx, cy = xy(p)
        tip = f"{p.label} #{p.id}" + (f" ({t['outlier']})" if p.outlier else "")
        colour = colours[p.label]
        paint = (f'fill="#fff" fill-opacity="0.6" stroke="{colour}" stroke-width="2" r="{r + 2:.1f}"' if p.outlier
                 else f'fill="{colour}" fill-opacity="0.85" r="{r}"')  # fmt: skip
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" {paint}><title>{html.escape(tip)}</title></circle>')
    # name the largest labels where their points are
    groups: dict[str, list[MapPoint]] = {}
    for p in pts:
        groups.setdefault(p.label, []).append(p)
    placed: list[tuple[float, float, float, float]] = []
    for lab, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(members) < 3 or len(placed) == NAMED_CLUSTERS:
            break
        cx = float(np.median([xy(p)[0] for p in members]))
        cy = float(np.median([xy(p)[1] for p in members])) - 6
        name = _short(lab)
        half = sum(12 if ord(ch) >= 0x2E80 else 7 for ch in name) / 2  # CJK glyphs are about twice as wide
        cx = min(max(cx, half + 2), width - half - 2)  # keep the name inside the frame
        cy = max(cy, 14.0)
        box = (cx - half, cy - 12, cx + half, cy + 3)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            continue  # never print one name over another
        placed.append(box)
        parts.append(
            f'<text x="{cx:.1f}" y="{cy:.1f}" text-anchor="middle" font-weight="600" fill="#222" '
            f'stroke="#fff" stroke-width="3" paint-order="stroke">{html.escape(name)}</text>'
        )
    # legend: squares (not circles, so circles count the mapped points)
    items = [(lab, colours[lab]) for lab in list(colours)[:LEGEND_LABELS]]
    more = len(colours) - len(items)
    y0 = height + 8
    for j, (lab, colour) in enumerate(items):
        lx, ly = 8 + (j % 3) * (width // 3), y0 + 22 * (j // 3)
        parts.append(f'<rect x="{lx}" y="{ly}" width="11" height="11" fill="{colour}"/>'
                     f'<text x="{lx + 16}" y="{ly + 10}">{html.escape(_short(lab, 28))}</text>')  # fmt: skip
    j = len(items)
    lx, ly = 8 + (j % 3) * (width // 3), y0 + 22 * (j // 3)
    extra = t["legend_more"].format(n=more) if more > 0 else ""
    parts.append(
        f'<rect x="{lx}" y="{ly}" width="11" height="11" fill="#fff" stroke="#444" stroke-width="2"/>'
        f'<text x="{lx + 16}" y="{ly + 10}">{html.escape(t["legend_ring"] + extra)}</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def curve_svg(
    calibration: Calibration | None, highlight: float | None = None, *, width: int = 760, height: int = 340,
    lang: str = "en",
) -> str:  # fmt: skip
    """The threshold curve as inline SVG: right answers accepted, unknowns rejected and wrong
    answers accepted against the similarity threshold, the calibrated threshold marked (and
    ``highlight``, e.g. the threshold in use, when given)."""
    t = TEXT.get(lang, TEXT["en"])
    if calibration is None or not calibration.points:
        return f'<p class="muted">{html.escape(t["curve_empty"])}</p>'
    pts = calibration.points
    x_lo, x_hi = min(p.threshold for p in pts), max(p.threshold for p in pts)
    marks = [calibration.threshold] + ([highlight] if highlight is not None else [])
    x_lo, x_hi = min([x_lo, *marks]), max([x_hi, *marks])
    if x_hi - x_lo < 1e-6:
        x_lo, x_hi = x_lo - 0.05, x_hi + 0.05
    left, right, top, bottom = 48, 16, 14, 58
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def sy(v: float) -> float:
        return top + (1.0 - v) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
        f'style="max-width:{width}px;height:auto" role="img" aria-label="{html.escape(t["curve_title"])}" '
        'font-family="inherit" font-size="12">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>',
    ]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.0%}</text>')  # fmt: skip
    step = _nice_step(x_hi - x_lo)
    tick = math.ceil(x_lo / step) * step
    while tick <= x_hi + 1e-9:
        parts.append(f'<line x1="{sx(tick):.1f}" x2="{sx(tick):.1f}" y1="{top + ph}" y2="{top + ph + 4}" '
                     f'stroke="#888"/><text x="{sx(tick):.1f}" y="{top + ph + 16}" '
                     f'text-anchor="middle">{tick:.2f}</text>')  # fmt: skip
        tick += step
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 26}" text-anchor="middle">'
                 f'{html.escape(t["curve_x"])}</text>')  # fmt: skip
    series = (
        ("correct_accepted", "#2ca02c", "", t["curve_correct"]),
        ("unknown_rejected", "#ff7f0e", "", t["curve_unknown"]),
        ("wrong_accepted", "#d62728", ' stroke-dasharray="5 4"', t["curve_wrong"]),
    )
    for attr, colour, dash, _ in series:
        line = " ".join(f"{sx(p.threshold):.1f},{sy(getattr(p, attr)):.1f}" for p in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
    chosen = calibration.chosen
    parts.append(
        f'<line x1="{sx(calibration.threshold):.1f}" x2="{sx(calibration.threshold):.1f}" y1="{top}" '
        f'y2="{top + ph}" stroke="#222" stroke-width="1.5"><title>{html.escape(t["curve_chosen"])} '
        f"{calibration.threshold:.3f}: {chosen.correct_accepted:.0%} / {chosen.unknown_rejected:.0%}</title></line>"
        f'<text x="{sx(calibration.threshold) + 4:.1f}" y="{top + 12}">'
        f"{html.escape(t['curve_chosen'])} {calibration.threshold:.3f}</text>"
    )
    if highlight is not None:
        parts.append(
            f'<line x1="{sx(highlight):.1f}" x2="{sx(highlight):.1f}" y1="{top}" y2="{top + ph}" stroke="#1f77b4" '
            f'stroke-width="1.5" stroke-dasharray="3 3"/><text x="{sx(highlight) + 4:.1f}" y="{top + 26}" '
            f'fill="#1f77b4">{html.escape(t["curve_current"])} {highlight:.3f}</text>'
        )
    lx = left
    for _, colour, dash, name in series:
        parts.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{height - 8}" y2="{height - 8}" stroke="{colour}" '
            f'stroke-width="2"{dash}/><text x="{lx + 27}" y="{height - 4}">{html.escape(name)}</text>'
        )
        lx += 30 + 7 * len(name) + 24
    parts.append("</svg>")
    return "".join(parts)


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


# --- HTML ------------------------------------------------------------------------------------

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Gallery report",
        "entries": "entries",
        "labels": "labels",
        "recall1": "recall@1",
        "recall5": "recall@5",
        "evaluated": "Leave-one-out: each entry searched against all the others; {q:,} of {e:,} evaluable entries "
        "measured{s}. recall@k: an entry of the right label among the k nearest.",
        "sampled": " (a seeded random sample)",
        "seconds": "computed in {s:.2f} s",
        "summary": "Summary",
        "flag_mislabelled": "suspected mislabelled",
        "flag_conflicting": "conflicting duplicate pairs",
        "flag_redundant": "redundant duplicate pairs",
        "flag_few": "labels with too few images",
        "flag_outliers": "outliers (wrong nearest neighbour)",
        "curve_title": "Threshold curve",
        "curve_x": "similarity threshold (cosine)",
        "curve_correct": "right answer accepted",
        "curve_unknown": "unknown object rejected",
        "curve_wrong": "wrong answer accepted",
        "curve_chosen": "chosen",
        "curve_current": "in use",
        "curve_empty": "No threshold curve: it needs at least 3 labels and 10 entries whose label has another image.",
        "curve_from_index": "The index's own calibration ({p}; {k:,} known and {u:,} unknown queries).",
        "curve_computed": "Computed now from the gallery ({p}; {k:,} known and {u:,} unknown queries).",
        "curve_point": "At {t:.3f}: {c:.0%} of objects in the gallery get the right answer, {u:.0%} of objects that "
        "are not in the gallery are rejected, {w:.0%} get a wrong answer.",
        "map_title": "Map of the gallery",
        "map_help": "Each dot is a gallery image, placed so that similar images sit together (t-SNE of the "
        "feature vectors) and coloured by label. A ring is an outlier: its nearest image has another label, "
        "or it looks mislabelled. Hover a dot for its label and id.",
        "map_empty": "Nothing to map.",
        "outlier": "outlier",
        "legend_ring": "ring = outlier",
        "legend_more": " · {n} more labels (hover)",
        "labels_title": "Labels, worst first",
        "labels_more": "Showing the {n} worst of {t} labels; the labels CSV has all of them.",
        "col_label": "label",
        "col_images": "images",
        "col_queries": "queries",
        "col_confused": "most often confused with",
        "pairs_title": "Most confused label pairs",
        "pairs_help": "Leave-one-out top-1 errors between two labels, both directions. Each example: an image and "
        "the image of the other label it matched.",
        "col_errors": "errors",
        "col_examples": "examples",
        "mislabelled_title": "Suspected mislabelled entries",
        "mislabelled_help": "At least {v} of the {k} nearest images agree on one other label, and no image of its "
        "own label is as close.",
        "col_entry": "entry",
        "col_suggested": "suggested label",
        "col_nearest": "closest of that label",
        "col_agree": "neighbours agree",
        "col_similarity": "similarity",
        "col_own": "best of own label",
        "duplicates_title": "Near duplicates",
        "duplicates_help": "Pairs with cosine similarity ≥ {c} (in the index's stored space). Conflicting: the same "
        "picture under two labels, so one is wrong. Redundant: the same label twice.",
        "conflicting": "conflicting",
        "redundant": "redundant",
        "neighbourhood_says": "neighbours say",
        "few_title": "Labels with too few images",
        "few_help": "1 image: cannot be evaluated (leave-one-out leaves no other image of the label) and a new photo "
        "must match that one image; up to {f} images: fragile, one poor photo decides. Add photos from other angles.",
        "cannot": "cannot be evaluated",
        "fragile": "fragile",
        "none": "None found.",
        "notes": "Notes",
        "timings": "Time per stage",
        "more_rows": "Showing {n} of {t}; the entries CSV has all of them.",
    },
    "zh": {
        "title": "图库评估报告",
        "entries": "条目",
        "labels": "标签",
        "recall1": "recall@1",
        "recall5": "recall@5",
        "evaluated": "留一法：每个条目与其余所有条目检索；共评估 {q:,} / {e:,} 个可评估条目{s}。"
        "recall@k：前 k 个最近邻中有同标签条目。",
        "sampled": "（固定种子的随机抽样）",
        "seconds": "用时 {s:.2f} 秒",
        "summary": "概览",
        "flag_mislabelled": "疑似标错",
        "flag_conflicting": "冲突的近重复对",
        "flag_redundant": "冗余的近重复对",
        "flag_few": "图片过少的标签",
        "flag_outliers": "离群条目（最近邻标签不同）",
        "curve_title": "阈值曲线",
        "curve_x": "相似度阈值（余弦）",
        "curve_correct": "正确且被接受",
        "curve_unknown": "未知物体被拒绝",
        "curve_wrong": "错误但被接受",
        "curve_chosen": "推荐",
        "curve_current": "当前",
        "curve_empty": "无阈值曲线：至少需要 3 个标签和 10 个有同标签图片的条目。",
        "curve_from_index": "索引自带的校准（{p}；已知查询 {k:,} 个，未知查询 {u:,} 个）。",
        "curve_computed": "根据图库即时计算（{p}；已知查询 {k:,} 个，未知查询 {u:,} 个）。",
        "curve_point": "阈值 {t:.3f} 时：图库中已有的物体 {c:.0%} 得到正确答案，"
        "图库外的物体 {u:.0%} 被拒绝，{w:.0%} 得到错误答案。",
        "map_title": "图库分布图",
        "map_help": "每个点是一张图库图片，相似的图片靠在一起（特征向量的 t-SNE），颜色表示标签。"
        "空心圆为离群：最近的图片标签不同，或疑似标错。将鼠标悬停在点上可查看标签和 id。",
        "map_empty": "没有可绘制的条目。",
        "outlier": "离群",
        "legend_ring": "空心圆 = 离群",
        "legend_more": " · 另有 {n} 个标签（悬停查看）",
        "labels_title": "各标签（最差在前）",
        "labels_more": "显示最差的 {n} 个标签（共 {t} 个）；标签 CSV 包含全部。",
        "col_label": "标签",
        "col_images": "图片数",
        "col_queries": "查询数",
        "col_confused": "最常混淆为",
        "pairs_title": "最易混淆的标签对",
        "pairs_help": "两个标签之间的留一法 top-1 错误（双向合计）。每个示例：一张图片及其匹配到的另一标签图片。",
        "col_errors": "错误数",
        "col_examples": "示例",
        "mislabelled_title": "疑似标错的条目",
        "mislabelled_help": "最近的 {k} 张图片中至少 {v} 张属于同一个其他标签，且本标签没有同样接近的图片。",
        "col_entry": "条目",
        "col_suggested": "建议标签",
        "col_nearest": "该标签最近的图片",
        "col_agree": "近邻一致数",
        "col_similarity": "相似度",
        "col_own": "本标签最高相似度",
        "duplicates_title": "近重复条目",
        "duplicates_help": "余弦相似度 ≥ {c} 的条目对（索引存储空间）。"
        "冲突：同一图片有两个标签，其中一个是错的。冗余：同一标签重复。",
        "conflicting": "冲突",
        "redundant": "冗余",
        "neighbourhood_says": "近邻支持",
        "few_title": "图片过少的标签",
        "few_help": "1 张图片：无法评估（留一法后该标签没有其他图片），新照片只能匹配这一张；{f} 张及以下：不稳定，"
        "一张差的照片就会决定结果。请补充不同角度的照片。",
        "cannot": "无法评估",
        "fragile": "不稳定",
        "none": "未发现。",
        "notes": "说明",
        "timings": "各阶段用时",
        "more_rows": "显示 {n} / {t} 条；条目 CSV 包含全部。",
    },
}

FONT_STACK = fonts.FONT_STACK  # the same CJK font as the drawn results, embedded (see _render_html)

CSS = f"""
body{{font-family:{FONT_STACK};margin:0;padding:16px;color:#1d1d1f;background:#fafafa;line-height:1.45}}
main{{max-width:1100px;margin:0 auto}}
h1{{font-size:1.5em;margin:.2em 0}} h2{{font-size:1.2em;margin:1.6em 0 .4em;border-bottom:1px solid #ddd}}
.cards{{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}}
.card{{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:8px 14px;min-width:110px}}
.card b{{display:block;font-size:1.5em}} .muted{{color:#666;font-size:.92em}}
.scroll{{overflow-x:auto}} table{{border-collapse:collapse;background:#fff;font-size:.92em}}
th,td{{border:1px solid #e3e3e3;padding:4px 8px;text-align:left;vertical-align:middle}}
th{{background:#f3f3f3}} td.n{{text-align:right;font-variant-numeric:tabular-nums}}
.thumb{{display:inline-block;text-align:center;margin:2px 4px;font-size:.8em;color:#555}}
.thumb img{{display:block;width:64px;height:64px;object-fit:contain;background:#f3f3f3;border-radius:4px}}
.bad{{color:#b3261e;font-weight:600}} .warn{{color:#9a6700}}
.arrow{{display:inline-block;margin:0 2px;color:#888}}
.ex{{display:inline-block;white-space:nowrap;margin:0 14px 6px 0;vertical-align:top}}
"""


def _render_html(report: GalleryReport, lang: str) -> str:
    t = TEXT.get(lang, TEXT["en"])
    e = html.escape
    title = f"{t['title']}{' — ' + report.name if report.name else ''}"
    out: list[str] = [
        f'<!DOCTYPE html><html lang="{"zh-CN" if lang == "zh" else "en"}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{e(title)}</title>'
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        f'<p class="muted">{report.entries:,} {e(t["entries"])} · {report.labels:,} {e(t["labels"])} · '
        f"{e(report.index_type)}/{e(report.metric_type)} · {e(t['seconds'].format(s=report.seconds))}</p>",
    ]
    few_count = len(report.few_images)
    cards = [
        (t["recall1"], _pct(report.recall_at_1), ""),
        (t["recall5"], _pct(report.recall_at_5), ""),
        (t["flag_mislabelled"], f"{report.mislabelled_count:,}", "bad" if report.mislabelled_count else ""),
        (t["flag_conflicting"], f"{report.duplicate_counts.get('conflicting', 0):,}",
         "bad" if report.duplicate_counts.get("conflicting") else ""),
        (t["flag_redundant"], f"{report.duplicate_counts.get('redundant', 0):,}", ""),
        (t["flag_few"], f"{few_count:,}", "warn" if few_count else ""),
        (t["flag_outliers"], f"{report.outlier_count:,}", ""),
    ]  # fmt: skip
    out.append('<div class="cards">' + "".join(
        f'<div class="card"><b class="{cls}">{e(value)}</b><span class="muted">{e(name)}</span></div>'
        for name, value, cls in cards
    ) + "</div>")  # fmt: skip
    how = t["evaluated"].format(q=report.evaluated, e=report.evaluable, s=t["sampled"] if report.sampled else "")
    out.append(f'<p class="muted">{e(how)}</p>')
    for note in report.notes:
        out.append(f'<p class="muted">{e(note)}</p>')

    # the curve
    out.append(f"<h2>{e(t['curve_title'])}</h2>")
    cal = report.calibration
    if cal is not None:
        which = "curve_from_index" if report.calibration_source == "index" else "curve_computed"
        at = cal.chosen
        point = t["curve_point"].format(
            t=cal.threshold, c=at.correct_accepted, u=at.unknown_rejected, w=at.wrong_accepted
        )
        out.append(f'<p class="muted">{e(t[which].format(p=cal.protocol, k=cal.known, u=cal.unknown))} {e(point)}</p>')
    out.append(curve_svg(cal, lang=lang))

    # the map
    out.append(f'<h2>{e(t["map_title"])}</h2><p class="muted">{e(t["map_help"])}</p>')
    out.append(map_svg(report, lang=lang))

    # confused pairs
    out.append(f'<h2>{e(t["pairs_title"])}</h2><p class="muted">{e(t["pairs_help"])}</p>')
    if report.confused_pairs:
        rows = []
        for p in report.confused_pairs[:HTML_ROWS]:
            examples = "".join(_pair_thumbs(report, ex, p.label_a, p.label_b) for ex in p.examples_a)
            examples += "".join(_pair_thumbs(report, ex, p.label_b, p.label_a) for ex in p.examples_b)
            rows.append(f"<tr><td>{e(p.label_a)}</td><td>{e(p.label_b)}</td><td class=n>{p.errors}</td>"
                        f"<td class=n>{p.a_to_b} / {p.b_to_a}</td><td>{examples}</td></tr>")  # fmt: skip
        out.append(_table([t["col_label"] + " A", t["col_label"] + " B", t["col_errors"], "A→B / B→A",
                           t["col_examples"]], rows))  # fmt: skip
        out.append(_more(t, min(HTML_ROWS, len(report.confused_pairs)), len(report.confused_pairs)))
    else:
        out.append(f"<p>{e(t['none'])}</p>")

    # suspected mislabels
    out.append(f'<h2>{e(t["mislabelled_title"])}</h2><p class="muted">'
               f'{e(t["mislabelled_help"].format(v=MISLABEL_MIN_VOTES, k=NEIGHBOURS))}</p>')  # fmt: skip
    if report.mislabelled:
        rows = [
            f"<tr><td>{_thumb(report, s.id, s.label)}</td><td>{e(s.label)}</td>"
            f"<td>{_thumb(report, s.nearest_id, s.suggested_label)}</td><td>{e(s.suggested_label)}</td>"
            f"<td class=n>{s.agree}/{s.neighbours}</td><td class=n>{s.similarity:.3f}</td>"
            f"<td class=n>{'' if s.own_similarity is None else f'{s.own_similarity:.3f}'}</td></tr>"
            for s in report.mislabelled[:HTML_ROWS]
        ]
        out.append(_table([t["col_entry"], t["col_label"], t["col_nearest"], t["col_suggested"], t["col_agree"],
                           t["col_similarity"], t["col_own"]], rows))  # fmt: skip
        out.append(_more(t, min(HTML_ROWS, len(report.mislabelled)), report.mislabelled_count))
    else:
        out.append(f"<p>{e(t['none'])}</p>")

    # near duplicates
    out.append(f'<h2>{e(t["duplicates_title"])}</h2><p class="muted">'
               f'{e(t["duplicates_help"].format(c=DUPLICATE_SIMILARITY))}</p>')  # fmt: skip
    if report.duplicates:
        rows = []
        for d in report.duplicates[:HTML_ROWS]:
            kind = (f'<span class="bad">{e(t["conflicting"])}</span>' if d.conflicting
                    else f'<span class="muted">{e(t["redundant"])}</span>')  # fmt: skip
            hint = (f'<br><span class="muted">{e(t["neighbourhood_says"])}: {e(d.suggested_label)}</span>'
                    if d.suggested_label else "")  # fmt: skip
            rows.append(
                f"<tr><td>{kind}{hint}</td><td>{_thumb(report, d.id_a, d.label_a, show_label=True)}</td>"
                f"<td>{_thumb(report, d.id_b, d.label_b, show_label=True)}</td><td class=n>{d.similarity:.4f}</td></tr>"
            )
        out.append(_table(["", "A", "B", t["col_similarity"]], rows))
        total = sum(report.duplicate_counts.values())
        out.append(_more(t, min(HTML_ROWS, len(report.duplicates)), total))
    else:
        out.append(f"<p>{e(t['none'])}</p>")

    # few images
    out.append(f'<h2>{e(t["few_title"])}</h2><p class="muted">{e(t["few_help"].format(f=FRAGILE_IMAGES))}</p>')
    if report.few_images:
        rows = [
            f"<tr><td>{e(f.label)}</td><td class=n>{f.images}</td>"
            f"<td class='{'bad' if f.images < 2 else 'warn'}'>{e(t['cannot'] if f.images < 2 else t['fragile'])}</td>"
            f"<td>{' '.join('#' + str(i) for i in f.ids)}</td></tr>"
            for f in report.few_images[:HTML_LABEL_ROWS]
        ]
        out.append(_table([t["col_label"], t["col_images"], "", "ids"], rows))
        out.append(_more(t, min(HTML_LABEL_ROWS, len(report.few_images)), len(report.few_images)))
    else:
        out.append(f"<p>{e(t['none'])}</p>")

    # per label
    out.append(f"<h2>{e(t['labels_title'])}</h2>")
    rows = [
        f"<tr><td>{e(r.label)}</td><td class=n>{r.images}</td><td class=n>{r.queries}</td>"
        f"<td class=n>{_pct(r.recall_at_1)}</td><td class=n>{_pct(r.recall_at_5)}</td>"
        f"<td>{e(r.confused_with or '')}{f' ({r.confused_count})' if r.confused_count else ''}</td></tr>"
        for r in report.per_label[:HTML_LABEL_ROWS]
    ]
    out.append(_table([t["col_label"], t["col_images"], t["col_queries"], t["recall1"], t["recall5"],
                       t["col_confused"]], rows))  # fmt: skip
    if len(report.per_label) > HTML_LABEL_ROWS:
        out.append(f'<p class="muted">{e(t["labels_more"].format(n=HTML_LABEL_ROWS, t=len(report.per_label)))}</p>')

    out.append(f'<h2>{e(t["timings"])}</h2><p class="muted">'
               + " · ".join(f"{e(k)} {v:.2f} s" for k, v in report.timings.items()) + "</p>")  # fmt: skip
    out.append("</main></body></html>")
    page = "\n".join(out)
    return page.replace("</style>", fonts.embedded_css(page) + "</style>", 1)  # the glyphs it shows, nothing more


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _more(t: dict[str, str], shown: int, total: int) -> str:
    return f'<p class="muted">{html.escape(t["more_rows"].format(n=shown, t=total))}</p>' if total > shown else ""


def _thumb(report: GalleryReport, id_: int, label: str, *, show_label: bool = False) -> str:
    """An entry's thumbnail (a data: URI) captioned with its id, and its label when asked."""
    data = report.thumbnails.get(id_)
    caption = f"#{id_}" + (f"<br>{html.escape(_short(label, 14))}" if show_label else "")
    tip = html.escape(f"{label} #{id_}")
    if not data:
        return f'<span class="thumb" title="{tip}">{caption}</span>'
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<span class="thumb" title="{tip}"><img src="{uri}" alt="{html.escape(label)}">{caption}</span>'


def _pair_thumbs(report: GalleryReport, ex: Example, label: str, other: str) -> str:
    """One confusion example: the query entry, an arrow, the entry of the other label it matched."""
    return (f'<span class="ex">{_thumb(report, ex.id, label)}<span class="arrow">→</span>'
            f"{_thumb(report, ex.matched_id, other)}</span>")  # fmt: skip


def _summary_lines(report: GalleryReport, worst: int = 5, pairs: int = 5) -> list[str]:
    name = f"index {report.name!r}: " if report.name else ""
    lines = [
        f"{name}{report.entries:,} entries, {report.labels:,} labels ({report.index_type}/{report.metric_type})",
        f"leave-one-out: {report.evaluated:,} of {report.evaluable:,} evaluable entries"
        + (" (seeded random sample)" if report.sampled else ""),
        f"recall@1 {_pct(report.recall_at_1)}   recall@5 {_pct(report.recall_at_5)}",
    ]
    lines += [f"note: {note}" for note in report.notes]  # e.g. why leave-one-out is optimistic for this index
    cal = report.calibration
    if cal is not None:
        p = cal.chosen
        source = "the index's own" if report.calibration_source == "index" else "computed"
        lines.append(f"threshold {cal.threshold:.3f} ({source}): right answer accepted {p.correct_accepted:.0%}, "
                     f"unknown rejected {p.unknown_rejected:.0%}")  # fmt: skip
    else:
        lines.append("threshold curve: not enough labels or entries")
    measured = [r for r in report.per_label if r.recall_at_1 is not None and r.recall_at_1 < 1.0][:worst]
    if measured:
        lines.append("worst labels:")
        for r in measured:
            conf = f"  -> {r.confused_with} ({r.confused_count})" if r.confused_with else ""
            lines.append(f"  {r.label}: {r.images} images, recall@1 {_pct(r.recall_at_1)}, "
                         f"recall@5 {_pct(r.recall_at_5)}{conf}")  # fmt: skip
    if report.confused_pairs:
        lines.append("most confused pairs:")
        for p in report.confused_pairs[:pairs]:
            lines.append(f"  {p.label_a} <-> {p.label_b}: {p.errors} errors")
    counts = report.duplicate_counts
    lines.append(
        f"flagged: {report.mislabelled_count} suspected mislabelled, {counts.get('conflicting', 0)} conflicting and "
        f"{counts.get('redundant', 0)} redundant near-duplicate pairs, "
        f"{sum(f.images < 2 for f in report.few_images)} labels with 1 image, "
        f"{sum(f.images >= 2 for f in report.few_images)} with {FRAGILE_IMAGES}, {report.outlier_count} outliers"
    )
    for s in report.mislabelled[:worst]:
        lines.append(f"  #{s.id} {s.label} -> {s.suggested_label}? ({s.agree}/{s.neighbours} neighbours)")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items())
    lines.append(f"time: {report.seconds:.2f} s ({stages})")
    return lines
