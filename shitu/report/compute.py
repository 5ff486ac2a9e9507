"""The report's statistics, from an index's stored vectors and labels alone (numpy and faiss;
no model runs, nothing is drawn here). See :func:`gallery_report` for what is measured."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from shitu.calibrate import calibrate_gallery
from shitu.index import GalleryIndex
from shitu.report.layout import map_rows, tsne_2d
from shitu.report.model import (
    ConfusedPair,
    DuplicatePair,
    Example,
    FewImages,
    GalleryReport,
    LabelRow,
    MapPoint,
    Outlier,
    Suspect,
)
from shitu.report.neighbours import approximate_knn, exact_knn
from shitu.report.params import (
    CONFUSION_EXAMPLES,
    DUPLICATE_SIMILARITY,
    FRAGILE_IMAGES,
    HTML_ROWS,
    IVF_NPROBE,
    MISLABEL_MIN_VOTES,
    NEIGHBOURS,
    SEED,
    Limits,
    Progress,
)


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


@dataclass
class _Gallery:
    """The index as the statistics see it: row-aligned ids, unit vectors and integer label codes
    (``names[code]`` is the label; codes compare like labels, much faster)."""

    ids: np.ndarray
    vectors: np.ndarray
    names: np.ndarray
    codes: np.ndarray
    counts: np.ndarray  # images per label code

    def rows_by_label(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows sorted by label code, and where each code's run starts (``starts[c]:starts[c+1]``)."""
        order = np.argsort(self.codes, kind="stable")
        return order, np.searchsorted(self.codes[order], np.arange(len(self.names) + 1))


@dataclass
class _Neighbours:
    queries: np.ndarray  # the rows measured by leave-one-out
    q_sims: np.ndarray  # their k nearest others, exact
    q_nbrs: np.ndarray
    all_sims: np.ndarray  # every row's k nearest others (approximate above the full limit)
    all_nbrs: np.ndarray


def gallery_report(
    index: GalleryIndex, *, name: str | None = None, progress: Progress | None = None, limits: Limits | None = None
) -> GalleryReport:
    """The quality report on ``index``, from :meth:`GalleryIndex.vectors` (unit vectors in the
    stored space, so cosine = inner product for IP and L2 indices, whitened or not) and its labels.

    * **recall@1 / recall@5, leave-one-out**: each entry is a query against every *other* entry;
      recall@k is the share of queries with an entry of their own label among their k nearest
      (PaddleClas's retrieval recall@k). Labels with a single image cannot be right and are left
      out (listed under "too few images"). Up to ``limits.full_limit`` entries every entry is a
      query; above it a seeded sample of ``limits.sample_queries`` is searched exactly against the
      *full* gallery, and the report says so.
    * **per label** recall, and where its wrong answers land most; **confused label pairs**
      (leave-one-out top-1 errors, both directions) with examples; **outliers** (wrong top-1).
    * **suspected mislabels**: at least MISLABEL_MIN_VOTES of an entry's NEIGHBOURS nearest agree
      on *one* other label, and no other image of its own label is as close as the best of those.
    * **near duplicates**: pairs with cosine >= DUPLICATE_SIMILARITY among nearest neighbours —
      conflicting (different labels; listed first, carrying the mislabel suggestion) or redundant.
      Above the full limit mislabels and duplicates come from an approximate all-entry pass, and
      every suspected mislabel is confirmed exactly.
    * **labels with too few images** (up to FRAGILE_IMAGES), **the threshold curve** (the index's
      own calibration, else :func:`~shitu.calibrate.calibrate_gallery`), and **a 2-D map**
      (:mod:`shitu.report.layout`) with outliers and suspects marked.

    ``progress(done, total, what)`` is called as stages advance. Deterministic: every sample is
    seeded, and equal similarities rank in storage order."""
    limits = limits or Limits()
    clock = _Clock(progress)
    clock.step(0, 1, "reading vectors")
    g = _read(index)
    n = len(g.ids)
    clock.lap("vectors")

    evaluable = np.flatnonzero(g.counts[g.codes] >= 2)
    sampled = n > limits.full_limit and len(evaluable) > limits.sample_queries
    rng = np.random.default_rng(SEED)
    notes: list[str] = []
    nb = _neighbours(g, evaluable, sampled, rng, limits, clock)
    if sampled:
        notes.append(
            f"Recall, confusions and outliers were measured on a seeded random sample of {len(nb.queries):,} of "
            f"{len(evaluable):,} evaluable entries, each searched exactly against all {n:,}. Suspected mislabels "
            f"and near duplicates come from an approximate neighbour pass over every entry (IVF, {IVF_NPROBE} "
            "lists probed); every suspected mislabel is confirmed by an exact search."
        )

    # -- leave-one-out recall, per label, confusions ------------------------------------------
    q_codes = g.codes[nb.queries]
    if len(nb.queries):
        hit1 = g.codes[nb.q_nbrs[:, 0]] == q_codes
        hit5 = (g.codes[nb.q_nbrs[:, :NEIGHBOURS]] == q_codes[:, None]).any(axis=1)
        recall1, recall5 = round(float(hit1.mean()), 4), round(float(hit5.mean()), 4)
    else:
        hit1 = hit5 = np.zeros(0, bool)
        recall1 = recall5 = None
    wrong = np.flatnonzero(~hit1)
    err_a = q_codes[wrong]
    err_b = g.codes[nb.q_nbrs[wrong, 0]] if len(wrong) else np.zeros(0, np.int64)
    per_label = _label_rows(g, q_codes, hit1, hit5, err_a, err_b)
    confused = _confused_pairs(g, nb, wrong, err_a, err_b, limits.max_listed)
    order = np.argsort(-nb.q_sims[wrong, 0], kind="stable") if len(wrong) else np.zeros(0, np.int64)
    outliers = []
    for j in order[: limits.max_listed].tolist():
        w = int(wrong[j])
        outliers.append(Outlier(int(g.ids[nb.queries[w]]), str(g.names[err_a[j]]), int(g.ids[nb.q_nbrs[w, 0]]),
                                str(g.names[err_b[j]]), round(float(nb.q_sims[w, 0]), 4)))  # fmt: skip
    clock.lap("recall")

    suspects = _suspects(g, nb.all_sims, nb.all_nbrs, exact=not sampled, clock=clock)
    clock.lap("mislabelled")

    duplicates, dup_counts = _duplicates(g, nb.all_sims, nb.all_nbrs, limits.max_listed)
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

    by_label, starts = g.rows_by_label()
    few = [
        FewImages(str(g.names[c]), int(g.counts[c]), sorted(int(i) for i in g.ids[by_label[starts[c] : starts[c + 1]]]))
        for c in np.flatnonzero(g.counts <= FRAGILE_IMAGES)
    ]
    few.sort(key=lambda f: (f.images, f.label))

    clock.step(0, 1, "threshold curve")
    calibration = getattr(index, "calibration", None)
    source = "index"
    if calibration is None:
        calibration = calibrate_gallery(g.vectors, g.codes) if n >= 2 else None
        source = "computed" if calibration is not None else "none"
    clock.lap("calibration")

    map_points = _map(g, evaluable, nb.all_nbrs, set(by_id), rng, limits, clock)
    if len(map_points) < n:
        notes.append(
            f"The map shows {len(map_points):,} of {n:,} entries: whole labels, first those of outliers and the "
            "labels they are confused with, then a seeded random choice of the others."
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
        labels=len(g.names),
        index_type=index.index_type,
        metric_type=index.metric_type,
        evaluable=len(evaluable),
        evaluated=len(nb.queries),
        sampled=bool(sampled),
        recall_at_1=recall1,
        recall_at_5=recall5,
        per_label=per_label,
        confused_pairs=confused,
        mislabelled=suspects[: limits.max_listed],
        mislabelled_count=len(suspects),
        duplicates=duplicates[: limits.max_listed],
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


def _read(index: GalleryIndex) -> _Gallery:
    ids, vectors = index.vectors()
    labels = np.asarray(index.labels_of(ids), dtype=object).astype(str)
    names, codes = np.unique(labels, return_inverse=True)
    codes = codes.astype(np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return _Gallery(np.asarray(ids), vectors, names, codes, np.bincount(codes, minlength=len(names)))


def _neighbours(g: _Gallery, evaluable: np.ndarray, sampled: bool, rng: np.random.Generator, limits: Limits,
                clock: _Clock) -> _Neighbours:  # fmt: skip
    """Exact neighbours of the leave-one-out queries; every entry's for mislabels and duplicates
    (the same search up to the full limit, an approximate pass above it)."""
    n = len(g.ids)
    k = min(NEIGHBOURS, n - 1)
    if k < 1:
        empty = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
        nb = _Neighbours(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), *empty)
    elif not sampled:
        all_sims, all_nbrs = exact_knn(g.vectors, np.arange(n), k, clock.step)
        nb = _Neighbours(evaluable, all_sims[evaluable], all_nbrs[evaluable], all_sims, all_nbrs)
    else:
        queries = np.sort(rng.choice(evaluable, size=limits.sample_queries, replace=False))
        q_sims, q_nbrs = exact_knn(g.vectors, queries, k, clock.step)
        clock.lap("neighbours")
        all_sims, all_nbrs = approximate_knn(g.vectors, k, clock.step)
        all_sims[queries], all_nbrs[queries] = q_sims, q_nbrs
        clock.lap("neighbours (all entries)")
        nb = _Neighbours(queries, q_sims, q_nbrs, all_sims, all_nbrs)
    clock.lap("neighbours")
    return nb


def _label_rows(g: _Gallery, q_codes, hit1, hit5, err_a, err_b) -> list[LabelRow]:
    """One row per label, worst recall first (labels that could not be measured last)."""
    nl = len(g.names)
    queries = np.bincount(q_codes, minlength=nl)
    ok1 = np.bincount(q_codes, weights=hit1, minlength=nl)
    ok5 = np.bincount(q_codes, weights=hit5, minlength=nl)
    worst: dict[int, tuple[int, int]] = {}  # label code -> (errors, the code they land on most)
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
                label=str(g.names[c]),
                images=int(g.counts[c]),
                queries=q,
                recall_at_1=round(float(ok1[c] / q), 4) if q else None,
                recall_at_5=round(float(ok5[c] / q), 4) if q else None,
                confused_with=str(g.names[conf[1]]) if conf else None,
                confused_count=int(conf[0]) if conf else 0,
            )
        )
    rows.sort(key=lambda r: (r.recall_at_1 is None, r.recall_at_1 or 0.0, r.recall_at_5 or 0.0, -r.images, r.label))
    return rows


def _confused_pairs(g: _Gallery, nb: _Neighbours, wrong, err_a, err_b, max_listed: int) -> list[ConfusedPair]:
    """Label pairs by top-1 errors between them (both directions), most first, with the most
    similar examples of each direction."""
    if not len(wrong):
        return []
    nl = len(g.names)
    lo, hi = np.minimum(err_a, err_b), np.maximum(err_a, err_b)
    keys, inverse, totals = np.unique(lo * nl + hi, return_inverse=True, return_counts=True)
    ranked = np.lexsort((keys, -totals))[:max_listed]
    pairs: dict[int, ConfusedPair] = {}
    for r in ranked.tolist():
        a, b = divmod(int(keys[r]), nl)
        pairs[r] = ConfusedPair(str(g.names[a]), str(g.names[b]), int(totals[r]), 0, 0)
    for j in np.argsort(-nb.q_sims[wrong, 0], kind="stable").tolist():  # most similar examples first
        p = pairs.get(int(inverse[j]))
        if p is None:
            continue
        w = int(wrong[j])
        ex = Example(int(g.ids[nb.queries[w]]), int(g.ids[nb.q_nbrs[w, 0]]), round(float(nb.q_sims[w, 0]), 4))
        if str(g.names[err_a[j]]) == p.label_a:
            p.a_to_b += 1
            if len(p.examples_a) < CONFUSION_EXAMPLES:
                p.examples_a.append(ex)
        else:
            p.b_to_a += 1
            if len(p.examples_b) < CONFUSION_EXAMPLES:
                p.examples_b.append(ex)
    return [pairs[r] for r in ranked.tolist()]


def _suspects(g: _Gallery, sims: np.ndarray, nbrs: np.ndarray, *, exact: bool, clock: _Clock) -> list[Suspect]:
    """Entries whose neighbours vote for one other label by a clear majority and which match
    no other image of their own label better than they match that label."""
    k = nbrs.shape[1]
    need = min(MISLABEL_MIN_VOTES, k)
    if k < 3:
        return []
    candidates = _vote(g, nbrs)
    if not exact and len(candidates):
        # neighbours of the all-entry pass were approximate: confirm with an exact search
        d, i = exact_knn(g.vectors, candidates, k, clock.step)
        sims, nbrs = sims.copy(), nbrs.copy()
        sims[candidates], nbrs[candidates] = d, i
        candidates = candidates[np.isin(candidates, _vote(g, nbrs, rows=candidates))]
    order, starts = g.rows_by_label()
    out = []
    for row in candidates.tolist():
        near_codes = g.codes[nbrs[row]]
        votes = Counter(c for c in near_codes.tolist() if c != g.codes[row])
        suggested, agree = votes.most_common(1)[0]
        if agree < need:
            continue
        own = order[starts[g.codes[row]] : starts[g.codes[row] + 1]]
        own = own[own != row]
        own_best = float((g.vectors[own] @ g.vectors[row]).max())
        pick = np.flatnonzero(near_codes == suggested)
        best = int(pick[np.argmax(sims[row, pick])])
        if own_best >= float(sims[row, best]):
            continue  # an image of its own label is at least as close: not clearly mislabelled
        out.append(
            Suspect(
                id=int(g.ids[row]),
                label=str(g.names[g.codes[row]]),
                suggested_label=str(g.names[suggested]),
                agree=int(agree),
                neighbours=k,
                similarity=round(float(sims[row, best]), 4),
                nearest_id=int(g.ids[nbrs[row, best]]),
                own_similarity=round(own_best, 4),
            )
        )
    out.sort(key=lambda s: (-s.agree, -(s.similarity - (s.own_similarity or 0.0)), s.id))
    return out


def _vote(g: _Gallery, nbrs: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows (of ``rows``, default all) with >= MISLABEL_MIN_VOTES neighbours on one other label
    and another image of their own label."""
    rows = np.arange(len(nbrs)) if rows is None else rows
    k = nbrs.shape[1]
    need = min(MISLABEL_MIN_VOTES, k)
    near_codes = g.codes[nbrs[rows]]
    other = near_codes != g.codes[rows][:, None]
    votes = np.zeros(near_codes.shape, np.int64)
    for c in range(k):
        votes[:, c] = ((near_codes == near_codes[:, c : c + 1]) & other).sum(axis=1) * other[:, c]
    keep = (votes.max(axis=1) >= need) & (g.counts[g.codes[rows]] >= 2)
    return rows[keep]


def _duplicates(g: _Gallery, sims: np.ndarray, nbrs: np.ndarray,
                max_listed: int) -> tuple[list[DuplicatePair], dict[str, int]]:  # fmt: skip
    """Neighbour pairs at or above DUPLICATE_SIMILARITY, each once: conflicting first, then by
    similarity; and how many of each kind there are."""
    n, k = nbrs.shape
    if k == 0:
        return [], {"conflicting": 0, "redundant": 0}
    r, c = np.nonzero(sims >= DUPLICATE_SIMILARITY)
    a, b = np.arange(n)[r], nbrs[r, c]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key, first = np.unique(lo * n + hi, return_index=True)
    lo, hi, s = key // n, key % n, sims[r[first], c[first]]
    conflicting = g.codes[lo] != g.codes[hi]
    order = np.lexsort((hi, lo, -s, ~conflicting))
    pairs = [
        DuplicatePair(
            int(g.ids[lo[j]]),
            int(g.ids[hi[j]]),
            str(g.names[g.codes[lo[j]]]),
            str(g.names[g.codes[hi[j]]]),
            round(float(min(1.0, s[j])), 4),
            bool(conflicting[j]),
        )
        for j in order[:max_listed].tolist()
    ]
    return pairs, {"conflicting": int(conflicting.sum()), "redundant": int((~conflicting).sum())}


def _map(g: _Gallery, evaluable: np.ndarray, all_nbrs: np.ndarray, suspect_ids: set[int], rng: np.random.Generator,
         limits: Limits, clock: _Clock) -> list[MapPoint]:  # fmt: skip
    """The map's points; outliers are a wrong nearest other entry (exact up to the full limit;
    above it exact for the sampled queries, from the all-entry pass for the rest) or a suspect."""
    n = len(g.ids)
    has_neighbours = all_nbrs.shape[1] > 0
    outlier = np.zeros(n, bool)
    if has_neighbours:
        outlier[evaluable] = g.codes[all_nbrs[evaluable, 0]] != g.codes[evaluable]
    outlier[np.isin(g.ids, list(suspect_ids))] = True
    partner = g.codes[all_nbrs[:, 0]] if has_neighbours else g.codes
    rows = map_rows(g.codes, np.flatnonzero(outlier), partner, rng, limits)
    if not len(rows):
        return []
    xy = tsne_2d(g.vectors[rows], progress=lambda done, total: clock.step(done, total, "map"))
    return [
        MapPoint(
            int(g.ids[r]),
            str(g.names[g.codes[r]]),
            round(float(xy[j, 0]), 4),
            round(float(xy[j, 1]), 4),
            bool(outlier[r]),
        )
        for j, r in enumerate(rows.tolist())
    ]


def _attach_media(report: GalleryReport, index: GalleryIndex) -> None:
    """Thumbnails and file names of the entries the report lists (the HTML page shows them)."""
    wanted: set[int] = set()
    for p in report.confused_pairs[:HTML_ROWS]:
        for e in p.examples_a + p.examples_b:
            wanted |= {e.id, e.matched_id}
    for s in report.mislabelled[:HTML_ROWS]:
        wanted |= {s.id, s.nearest_id}
    for d in report.duplicates[:HTML_ROWS]:
        wanted |= {d.id_a, d.id_b}
    listed = {s.id for s in report.mislabelled} | {o.id for o in report.outliers}
    listed |= {d.id_a for d in report.duplicates} | {d.id_b for d in report.duplicates}
    rows = index.sources(wanted | listed, thumbnails=True)  # ids without a row are left out
    for i, (source, thumbnail) in rows.items():
        report.sources[i] = source
        if i in wanted and thumbnail:
            report.thumbnails[i] = thumbnail
