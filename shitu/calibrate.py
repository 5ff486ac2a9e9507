"""Recognition thresholds derived from a gallery itself.

A similarity threshold means nothing on its own: the same 0.85 keeps most correct answers on one
gallery and throws most of them away on another. So each index measures its own trade-off from
its labelled entries:

* **known** queries — an entry searched against the rest of the gallery (leave-one-out, or a
  held-out fold when the features were fitted to the gallery): its best score, and whether the
  best match has the right label;
* **unknown** queries — the same entry with its whole label removed (leave-label-out): whatever it
  matches is wrong, so a good threshold rejects it.

The curve lists, for each threshold, the share of known queries answered correctly *and*
accepted, the share answered wrongly but accepted, and the share of unknowns rejected. The
default operating point is the lowest threshold that rejects :data:`TARGET_REJECTION` of the
unknowns: "unknown" then means the same on every gallery (four in five objects that are not in
it are turned away), and among thresholds that keep that promise it is the one that accepts
the most correct answers. Any other point of the curve can be chosen per index or per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

MAX_QUERIES = 4000  # entries sampled as queries for leave-one-out scores (enough for a 0.01-wide curve)
MIN_QUERIES = 500  # ... but fewer on huge galleries, where each query costs a pass over every vector
QUERY_BUDGET = 2e10  # multiply-adds spent on the queries (~0.5 s on two cores)
CURVE_POINTS = 61
MIN_LABELS = 3  # leave-label-out needs other labels to confuse a query with
MIN_KNOWN = 10  # known queries needed (entries whose label has a second entry)
TARGET_REJECTION = 0.8  # the default threshold turns away this share of objects missing from the gallery


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    correct_accepted: float  # known queries: right label and score >= threshold
    wrong_accepted: float  # known queries: wrong label but score >= threshold
    unknown_rejected: float  # queries whose label is absent: best score < threshold


@dataclass
class Calibration:
    """A gallery's threshold curve and its chosen default."""

    threshold: float
    points: list[OperatingPoint]
    top1: float  # share of known queries whose best match is right (no threshold)
    known: int  # how many known / unknown queries the curve was measured on
    unknown: int
    protocol: str = "leave-one-out"  # or "held-out folds" when the features were fitted to the gallery
    chosen_by: str = "default"  # or "user": a point picked on the curve
    per_label: dict[str, float] = field(default_factory=dict)

    def at(self, threshold: float) -> OperatingPoint:
        """The curve's point nearest to ``threshold``."""
        return min(self.points, key=lambda p: abs(p.threshold - threshold))

    @property
    def chosen(self) -> OperatingPoint:
        return self.at(self.threshold)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out

    @classmethod
    def from_dict(cls, data: dict | None) -> "Calibration | None":
        if not data:
            return None
        try:
            points = [OperatingPoint(**{k: float(v) for k, v in p.items()}) for p in data["points"]]
            return cls(
                threshold=float(data["threshold"]),
                points=points,
                top1=float(data["top1"]),
                known=int(data["known"]),
                unknown=int(data["unknown"]),
                protocol=str(data.get("protocol", "leave-one-out")),
                chosen_by="user" if data.get("chosen_by") == "user" else "default",
                per_label={str(k): float(v) for k, v in (data.get("per_label") or {}).items()},
            )
        except (KeyError, TypeError, ValueError):
            return None  # an older or damaged record: the index works without one


def calibrate(
    known_scores: np.ndarray,
    known_correct: np.ndarray,
    unknown_scores: np.ndarray,
    *,
    protocol: str = "leave-one-out",
) -> Calibration | None:
    """The curve and default threshold from measured scores; ``None`` with too little data."""
    known_scores = np.asarray(known_scores, dtype=np.float64)
    known_correct = np.asarray(known_correct, dtype=bool)
    unknown_scores = np.asarray(unknown_scores, dtype=np.float64)
    unknown_scores = unknown_scores[np.isfinite(unknown_scores)]
    if len(known_scores) < MIN_KNOWN or len(unknown_scores) < MIN_KNOWN:
        return None
    everything = np.concatenate([known_scores, unknown_scores])
    lo, hi = np.quantile(everything, [0.005, 0.995])
    grid = np.unique(np.round(np.linspace(lo, hi, CURVE_POINTS), 4))
    # the J-optimal threshold is searched on every distinct score, not only on the plotted grid
    candidates = np.unique(np.concatenate([grid, np.round(everything, 4)]))

    def point(t: float) -> OperatingPoint:
        accepted = known_scores >= t
        return OperatingPoint(
            threshold=round(float(t), 4),
            correct_accepted=round(float(np.mean(accepted & known_correct)), 4),
            wrong_accepted=round(float(np.mean(accepted & ~known_correct)), 4),
            unknown_rejected=round(float(np.mean(unknown_scores < t)), 4),
        )

    rejected = np.searchsorted(np.sort(unknown_scores), candidates, side="left") / len(unknown_scores)
    best = float(candidates[int(np.argmax(rejected >= TARGET_REJECTION))])
    points = sorted({p.threshold: p for p in (point(t) for t in [*grid, best])}.values(), key=lambda p: p.threshold)
    return Calibration(
        threshold=round(best, 4),
        points=points,
        top1=round(float(known_correct.mean()), 4),
        known=len(known_scores),
        unknown=len(unknown_scores),
        protocol=protocol,
    )


def open_set_scores(
    queries: np.ndarray,
    query_labels: Sequence[str],
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Known and unknown scores of ``queries`` against ``gallery`` (unit vectors, cosine).

    Known: best score over the gallery (without the query itself when ``exclude_self``, i.e.
    query ``i`` is gallery row ``i``), for queries whose label has an entry left. Unknown: best
    score once every entry of the query's label is removed.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    known_s, known_ok, unknown_s = [], [], []
    for start in range(0, len(queries), 512):
        sims = queries[start : start + 512] @ gallery.T
        rows = np.arange(start, start + len(sims))
        if exclude_self:
            sims[np.arange(len(sims)), rows] = -np.inf
        same = query_labels[rows][:, None] == gallery_labels[None, :]
        has_known = np.isfinite(np.where(same, sims, -np.inf).max(axis=1))
        best = sims.argmax(axis=1)
        known_s.append(sims[np.arange(len(sims)), best][has_known])
        known_ok.append((gallery_labels[best] == query_labels[rows])[has_known])
        unknown_s.append(np.where(same, -np.inf, sims).max(axis=1))
    return np.concatenate(known_s), np.concatenate(known_ok), np.concatenate(unknown_s)


def calibrate_gallery(vectors: np.ndarray, labels: Sequence[str], *, seed: int = 0) -> Calibration | None:
    """Leave-one-out / leave-label-out calibration of stored (unit) vectors; at most
    :data:`MAX_QUERIES` entries are used as queries (down to :data:`MIN_QUERIES` on galleries so
    big that more would cost over :data:`QUERY_BUDGET`). ``None`` below :data:`MIN_LABELS` labels."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < MIN_LABELS:
        return None
    rows = np.arange(len(vectors))
    queries = int(min(MAX_QUERIES, max(MIN_QUERIES, QUERY_BUDGET / max(1, vectors.size))))
    if len(rows) > queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, queries, replace=False))
    # queries are gallery rows: put them first so exclude_self can knock out the diagonal
    order = np.concatenate([rows, np.setdiff1d(np.arange(len(vectors)), rows)])
    gallery, gallery_labels = vectors[order], labels[order]
    known_s, known_ok, unknown_s = open_set_scores(
        gallery[: len(rows)], gallery_labels[: len(rows)], gallery, gallery_labels, exclude_self=True
    )
    return calibrate(known_s, known_ok, unknown_s, protocol="leave-one-out")
