"""Recognition thresholds derived from a gallery itself, for the queries it will really get.

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

**Real queries are not gallery photos** (the capture gap). A crop of a shelf photo is framed,
lit and compressed differently; on a gallery whose photos resemble each other more than real
photos resemble them (clean logos on white), gallery-against-gallery scores put the threshold
far too high. So the unknowns that set the threshold are *query-like* (:class:`QueryStats`):

* **views**: query-like views of the gallery's photos (:mod:`shitu.augment`: re-framed, warped,
  relit, blurred, compressed, on another background), made and embedded at build time and kept
  with the index (``shitu_views.npz``), scored against the gallery without their own photo
  (known) and without their whole label (unknown). Views are harsher than most real photos: on
  a reference gallery with real query photos (:data:`PRIORS`, measured by
  ``bench/calibration_small.py --fit-prior``) the real queries' 80 % point lies ``offset`` above
  the views' one, in the model's raw space and in an adapted one alike. A gallery's views, moved
  up by that offset, stand for its real queries;
* **confirmed answers**: crops a user taught (:meth:`shitu.engine.Engine.teach`): real queries,
  each weighing :data:`REAL_QUERY_WEIGHT` views;
* the gallery's photos themselves: the known side of the curve, and the whole estimate for a
  model without a measured offset (as before views existed).

**Plain backgrounds.** How far real queries sit from the views depends on how the gallery was
photographed. Where its photos are real photos (the drink reference: products on shelves and
tables), real queries score ~0.04 above the views and level with the photos. Where they are cut
out on a plain background (studio shots, logos on white), real queries score ~0.005 *below* the
views and ~0.06 below the photos: the photos share a background the queries do not have. The
build reads each photo's border off its thumbnail (:func:`shitu.gallery.plain_background`), and
the prior is the model's ``plain`` one (measured on the reference's products cut out onto plain
canvases, queried with the real photos) mixed in by the share of such photos (``plain_share``,
kept in the calibration record so later recalibrations use the same).

That point (with a bootstrap standard error over the gallery's photos, a photo's views going
with it) is then shrunk towards the **prior** level for this model and gallery size
(``a + b ln(entries)``, give or take ``tau``, from the same reference galleries): a gallery of
18 photos leans on it a little, one of 800 not at all. The result says how sure it is:
``threshold ± uncertainty`` (the bootstrap and the offset's own spread) in the summary, the
report and the API.

**The floor** (applied by :func:`shitu.threshold.accepts`, the one place where a score and a
calibration become an answer or "unknown"): a score at or above the threshold is an answer — unless the index's
features were fitted to its gallery (:mod:`shitu.adapt`) and the query is less similar to the
entry it matched, in the model's own space, than :data:`FLOOR_SHARE` of the gallery's genuine
matches are (``floor``). A projection fitted to a small gallery keeps only the directions its
photos vary in, so a wooden table or a glass of milk can land near a product there while in the
model's own space it is no nearer to it than to anything else: relative to the gallery's own
spread of genuine matches it matches nothing, and is unknown.
"""

from __future__ import annotations

import dataclasses
import math
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
REAL_QUERY_WEIGHT = 4.0  # a confirmed answer weighs as much as a photo's four views
MIN_VIEWS = 10  # fewer query-like unknowns: the photos' own point (as before views)
BOOTSTRAP = 200  # resamples of the gallery's photos for the standard error of its point
MAX_TAUGHT = 2000  # confirmed answers remembered (the most recent)
# The floor: the share of the gallery's own genuine matches (held-out photos, views, confirmed
# answers; raw space) an answer may fall below. 2 %: on the drink gallery's adapted sub-galleries
# it costs ~1-2 % of correct answers and turns away nearly every non-product crop (whose raw
# similarity to the entry they land on is ~0.64, genuine matches' 2 % point ~0.76).
FLOOR_SHARE = 0.02
# The level prior's spread is at least this (similarity units): one reference gallery shows how
# much the 80 % point varies between its own sub-galleries (~0.003-0.02 on the drinks), not
# between domains. The three held-out sets put their best points at 0.721, 0.765 and
# 0.873 (starter model): ~0.06 apart. A prior claiming more certainty than that would drag a
# logo gallery towards drink thresholds.
MIN_PRIOR_SPREAD = 0.06
# How far a gallery's views can be from its real queries beyond the reference's offset: on the drink
# gallery real photos score 0.04 above the views when the gallery's photos are like real photos,
# and level with them when the gallery is studio photos of the same products (bench: the
# studio-photo variant). The plain-background prior accounts for that case, but other capture
# conditions may differ as much: a build-time threshold is this unsure; confirmed answers narrow it.
MIN_OFFSET_SPREAD = 0.04
MIN_REAL = 3  # confirmed answers before they count
MIN_REAL_SE = 0.01  # ... and the least a handful of them is unsure by


@dataclass(frozen=True)
class Prior:
    """What a reference gallery says about one feature model in one space (``raw`` or
    ``adapted``): real queries' 80 % point lies ``offset`` (± ``offset_sd``) above the views'
    one and ``photos_offset`` (± ``photos_sd``) above the photos' one, and near
    ``a + b ln(entries)`` (± ``tau``) for a gallery of that size."""

    offset: float | None
    offset_sd: float
    a: float
    b: float
    tau: float
    source: str
    photos_offset: float = 0.0
    photos_sd: float = 0.0
    max_entries: int = 0  # the largest reference gallery: no pull towards the level beyond it (0: no limit)

    def level(self, entries: int) -> float:
        return self.a + self.b * math.log(max(2, entries))

    def mix(self, other: "Prior", share: float) -> "Prior":
        """This prior for a ``1 - share`` part of a gallery and ``other`` for the rest, field by
        field (a field one of them lacks: the other's)."""
        if share <= 0:
            return self
        if share >= 1:
            return other

        def blend(a, b):
            if a is None or b is None:
                return b if a is None else a
            if math.isinf(a) or math.isinf(b):
                return math.inf
            return (1 - share) * a + share * b

        fields = ("offset", "offset_sd", "a", "b", "tau", "photos_offset", "photos_sd")
        mixed = {f: blend(getattr(self, f), getattr(other, f)) for f in fields}
        return dataclasses.replace(self, **mixed, max_entries=max(self.max_entries, other.max_entries),
                                   source=f"{self.source}; {share:.0%} {other.source}")  # fmt: skip


# Per feature model fingerprint (:attr:`shitu.runtime.Runtime.feature_model`) and space. Measured by
# ``python bench/calibration_small.py --fit-prior`` on the drink gallery (987 photos, 196 labels):
# random sub-galleries of 15-400 photos built as the studio builds them, queried with the photos
# left out of them through the detector. The official model's offset cannot be measured here
# (it does not run offline, so it has no views): it is None, and its galleries use their photos'
# own point as before; its level comes from its reference embeddings (whole photos).
PRIORS: dict[str, Prior] = {
    "starter:PP-ShiTuV2_rec:PP-ShiTuV2_rec-mobilenetv2-imagenet|raw": Prior(
        offset=0.0383, offset_sd=0.0079, a=0.7646, b=0.0162, tau=0.0085, photos_offset=0.0019, photos_sd=0.0072,
        max_entries=98, source="drink gallery, 52 raw sub-galleries of 15-98 photos"),
    "starter:PP-ShiTuV2_rec:PP-ShiTuV2_rec-mobilenetv2-imagenet|adapted": Prior(
        offset=0.007, offset_sd=0.0259, a=0.8885, b=-0.0923, tau=0.0241, photos_offset=-0.0138, photos_sd=0.0272,
        max_entries=324, source="drink gallery, 132 adapted sub-galleries of 41-323 photos"),
    "official:PP-ShiTuV2_rec|raw": Prior(
        offset=None, offset_sd=0.0, a=0.1042, b=0.0485, tau=0.0283, photos_offset=0.0014, photos_sd=0.0217,
        max_entries=324, source="drink gallery (reference embeddings), 110 raw sub-galleries of 15-323 photos"),
    "official:PP-ShiTuV2_rec|adapted": Prior(
        offset=None, offset_sd=0.0, a=0.4195, b=-0.0178, tau=0.0313, photos_offset=-0.0482, photos_sd=0.0554,
        max_entries=275, source="drink gallery (reference embeddings), 74 adapted sub-galleries of 41-275 photos"),
    # the same products cut out onto plain canvases (white, gray, black; 20 % and 60 % margins), queried with
    # the real photos: galleries cleaner than their real queries (prior_for mixes it in by plain_share)
    "starter:PP-ShiTuV2_rec:PP-ShiTuV2_rec-mobilenetv2-imagenet|raw|plain": Prior(
        offset=-0.0051, offset_sd=0.0102, a=0.7217, b=0.0157, tau=0.011, photos_offset=-0.06, photos_sd=0.0172,
        max_entries=112, source="drink products on plain canvases, 51 raw sub-galleries of 15-111 photos"),
    "starter:PP-ShiTuV2_rec:PP-ShiTuV2_rec-mobilenetv2-imagenet|adapted|plain": Prior(
        offset=0.0064, offset_sd=0.0336, a=1.076, b=-0.1269, tau=0.0301, photos_offset=-0.0095, photos_sd=0.0507,
        max_entries=324, source="drink products on plain canvases, 133 adapted sub-galleries of 41-323 photos"),
}  # fmt: skip
FALLBACK_PRIOR = Prior(offset=None, offset_sd=0.0, a=0.0, b=0.0, tau=math.inf,
                       source="no reference measured for this model: the gallery's photos alone")  # fmt: skip


def prior_for(feature_model: str | None, space: str, plain: float | None = None) -> Prior:
    """The prior of ``feature_model`` in ``space`` (``raw``/``adapted``), or :data:`FALLBACK_PRIOR`;
    ``plain``: the share of the gallery's photos on a plain background (:func:`shitu.gallery.plain_background`),
    for which the model's ``plain`` prior is mixed in where one was measured."""
    prior = _lookup(feature_model, space)
    if plain and prior is not FALLBACK_PRIOR:
        studio = _lookup(feature_model, f"{space}|plain")
        if studio is not FALLBACK_PRIOR:
            return prior.mix(studio, plain)
    return prior


def _lookup(feature_model: str | None, space: str) -> Prior:
    key = f"{feature_model}|{space}"
    if key in PRIORS:
        return PRIORS[key]
    if feature_model and feature_model.startswith("official:"):  # the same weights wherever they are cached
        for k, prior in PRIORS.items():
            if k.split("|")[0].split(":")[:2] == feature_model.split(":")[:2] and k.split("|", 1)[1] == space:
                return prior
    return FALLBACK_PRIOR


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    correct_accepted: float  # known queries: right label and score >= threshold
    wrong_accepted: float  # known queries: wrong label but score >= threshold
    unknown_rejected: float  # queries whose label is absent: best score < threshold


@dataclass
class QueryStats:
    """Per calibration query: its best score with the gallery as it is (``known``; NaN where its
    label has no other entry) and whether that match is right, its best score with its whole
    label removed (``unknown``), its similarity in the model's raw space to the entry it
    matched (``raw_match``, for the floor), ``weight``, ``group`` (the photo it comes from, for
    the bootstrap) and ``kind``: 0 gallery photo, 1 view, 2 confirmed answer."""

    known: np.ndarray
    correct: np.ndarray
    unknown: np.ndarray
    raw_match: np.ndarray
    raw_unknown: np.ndarray  # the same for the match of the label-removed query
    weight: np.ndarray
    group: np.ndarray
    kind: np.ndarray

    @classmethod
    def empty(cls) -> "QueryStats":
        z = np.zeros(0)
        return cls(z, np.zeros(0, bool), z, z, z, z, np.zeros(0, np.int64), np.zeros(0, np.int8))

    @classmethod
    def concat(cls, parts: Sequence["QueryStats"]) -> "QueryStats":
        parts = [p for p in parts if len(p.weight)] or [cls.empty()]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))

    def count(self, kind: int) -> int:
        return int(np.sum(self.kind == kind))


def query_stats(
    queries: np.ndarray,
    query_labels: Sequence[str],
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    *,
    exclude: np.ndarray | None = None,
    kind: int = 0,
    weight: float = 1.0,
    group: np.ndarray | None = None,
    raw: tuple[np.ndarray, np.ndarray] | None = None,
) -> QueryStats:
    """:class:`QueryStats` of ``queries`` against ``gallery`` (unit vectors, cosine);
    ``exclude[i]`` is a gallery row query ``i`` must not see (itself, or the photo a view was
    made from; -1 for none); ``raw``: the queries' and the gallery's raw features when the
    vectors are projected (else the vectors are the raw space)."""
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    known, correct, unknown, raw_match, raw_unknown = [], [], [], [], []
    for start in range(0, len(queries), 512):
        sims = np.asarray(queries[start : start + 512] @ gallery.T, dtype=np.float64)
        rows = np.arange(len(sims))
        if exclude is not None:
            ex = exclude[start : start + len(sims)]
            sims[rows[ex >= 0], ex[ex >= 0]] = -np.inf
        labels = query_labels[start : start + len(sims)]
        same = labels[:, None] == gallery_labels[None, :]
        has_known = np.isfinite(np.where(same, sims, -np.inf).max(axis=1))
        best = sims.argmax(axis=1)
        known.append(np.where(has_known, sims[rows, best], np.nan))
        correct.append((gallery_labels[best] == labels) & has_known)
        without = np.where(same, -np.inf, sims)
        best_u = without.argmax(axis=1)
        unknown.append(without[rows, best_u])
        if raw is not None:
            q = raw[0][start : start + len(sims)]
            raw_match.append(np.einsum("ij,ij->i", q, raw[1][best]))
            raw_unknown.append(np.einsum("ij,ij->i", q, raw[1][best_u]))
        else:
            raw_match.append(sims[rows, best])
            raw_unknown.append(without[rows, best_u])
    n = len(queries)
    cat = (lambda parts: np.concatenate(parts)) if n else (lambda parts: np.zeros(0))
    return QueryStats(
        known=cat(known), correct=cat(correct).astype(bool), unknown=cat(unknown), raw_match=cat(raw_match),
        raw_unknown=cat(raw_unknown), weight=np.full(n, float(weight)),
        group=np.asarray(group if group is not None else np.arange(n), np.int64), kind=np.full(n, kind, dtype=np.int8),
    )  # fmt: skip


@dataclass
class Calibration:
    """A gallery's threshold curve and its chosen default.

    ``uncertainty``: the default threshold's standard error (bootstrap over the gallery's
    photos, with the prior's spread). ``floor``: see :func:`shitu.threshold.accepts` (adapted indices).
    ``evidence``: what it was measured on (photos, views, confirmed answers), the estimates it
    combined and how much the prior weighed. ``taught``: entry ids of confirmed answers
    (:meth:`~shitu.engine.Engine.teach`), real queries every later calibration uses again.
    """

    threshold: float
    points: list[OperatingPoint]
    top1: float  # share of known queries whose best match is right (no threshold)
    known: int  # how many known / unknown queries the curve was measured on
    unknown: int
    protocol: str = "leave-one-out"  # or "held-out folds" when the features were fitted to the gallery
    chosen_by: str = "default"  # or "user": a point picked on the curve
    per_label: dict[str, float] = field(default_factory=dict)
    uncertainty: float | None = None
    floor: float | None = None
    evidence: dict = field(default_factory=dict)
    taught: list[int] = field(default_factory=list)

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
            optional = {k: float(data[k]) if data.get(k) is not None else None for k in ("uncertainty", "floor")}
            return cls(
                threshold=float(data["threshold"]),
                points=points,
                top1=float(data["top1"]),
                known=int(data["known"]),
                unknown=int(data["unknown"]),
                protocol=str(data.get("protocol", "leave-one-out")),
                chosen_by="user" if data.get("chosen_by") == "user" else "default",
                per_label={str(k): float(v) for k, v in (data.get("per_label") or {}).items()},
                evidence=dict(data.get("evidence") or {}),
                taught=[int(i) for i in data.get("taught") or []],
                **optional,
            )
        except (KeyError, TypeError, ValueError):
            return None  # an older or damaged record: the index works without one

    def describe(self) -> str:
        """One line for people, e.g. ``threshold 0.72 ± 0.04 from 18 photos (18 on a plain
        background), 72 query-like views, 3 confirmed answers``."""
        e = self.evidence
        sure = f" ± {self.uncertainty:.2f}" if self.uncertainty is not None else ""
        photos = e.get("photos", self.known)
        plain = e.get("plain_share")
        on_plain = f" ({round(plain * photos)} on a plain background)" if plain else ""
        parts = [f"{photos} photos{on_plain}"]
        if e.get("views"):
            parts.append(f"{e['views']} query-like views")
        parts.append(f"{len(self.taught)} confirmed answers")
        by = " (picked by you)" if self.chosen_by == "user" else ""
        return f"threshold {self.threshold:.2f}{sure}{by} from {', '.join(parts)}"

    def summary(self, changes_since: int = 0) -> dict:
        """The operating point in use and what it promises, as an index's summary shows it
        (``changes_since``: gallery changes made after this calibration)."""
        point = self.chosen
        return {
            "threshold": self.threshold,
            "chosen_by": self.chosen_by,
            "correct_accepted": point.correct_accepted,
            "wrong_accepted": point.wrong_accepted,
            "unknown_rejected": point.unknown_rejected,
            "top1": self.top1,
            "protocol": self.protocol,
            "known_queries": self.known,
            "unknown_queries": self.unknown,
            "changes_since": changes_since,
            # how sure: "threshold 0.72 ± 0.04 from 18 photos, 72 query-like views, 3 confirmed answers"
            "uncertainty": self.uncertainty,
            "confirmed_answers": len(self.taught),
            "evidence": self.evidence,
            "text": self.describe(),
        }


def _target_point(unknown_scores: np.ndarray, weights: np.ndarray) -> float:
    """The lowest threshold rejecting :data:`TARGET_REJECTION` of the (weighted) unknowns."""
    order = np.argsort(unknown_scores, kind="stable")
    s, w = unknown_scores[order], weights[order]
    cum = np.cumsum(w) / w.sum()  # share rejected by a threshold just above s[i]
    i = int(np.searchsorted(cum, TARGET_REJECTION - 1e-9))
    # similarities lie in [-1, 1]; -inf (turned away by the floor) rejects at any threshold
    return float(np.clip(np.nextafter(s[min(i, len(s) - 1)], np.inf), -1.0, 1.0))


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][min(int(np.searchsorted(cum, q)), len(values) - 1)])


def _curve(known, correct, unknown, known_w, unknown_w, extra: Sequence[float]) -> list[OperatingPoint]:
    everything = np.concatenate([known, unknown])
    lo, hi = np.quantile(everything[np.isfinite(everything)], [0.005, 0.995])
    grid = np.unique(np.round(np.linspace(lo, hi, CURVE_POINTS), 4))
    kw, uw = known_w / known_w.sum(), unknown_w / unknown_w.sum()

    def point(t: float) -> OperatingPoint:
        accepted = known >= t
        return OperatingPoint(
            threshold=round(float(t), 4),
            correct_accepted=round(float(np.sum(kw * (accepted & correct))), 4),
            wrong_accepted=round(float(np.sum(kw * (accepted & ~correct))), 4),
            unknown_rejected=round(float(np.sum(uw * (unknown < t))), 4),
        )

    unique = {p.threshold: p for p in (point(t) for t in [*grid, *extra])}
    return sorted(unique.values(), key=lambda p: p.threshold)


def calibrate(
    known_scores: np.ndarray,
    known_correct: np.ndarray,
    unknown_scores: np.ndarray,
    *,
    protocol: str = "leave-one-out",
) -> Calibration | None:
    """The curve and default threshold from measured scores alone; ``None`` with too little data."""
    known_scores = np.asarray(known_scores, dtype=np.float64)
    known_correct = np.asarray(known_correct, dtype=bool)
    unknown_scores = np.asarray(unknown_scores, dtype=np.float64)
    unknown_scores = unknown_scores[np.isfinite(unknown_scores)]
    if len(known_scores) < MIN_KNOWN or len(unknown_scores) < MIN_KNOWN:
        return None
    everything = np.concatenate([known_scores, unknown_scores])
    lo, hi = np.quantile(everything, [0.005, 0.995])
    grid = np.unique(np.round(np.linspace(lo, hi, CURVE_POINTS), 4))
    candidates = np.unique(np.concatenate([grid, np.round(everything, 4)]))
    rejected = np.searchsorted(np.sort(unknown_scores), candidates, side="left") / len(unknown_scores)
    best = float(candidates[int(np.argmax(rejected >= TARGET_REJECTION))])
    points = _curve(known_scores, known_correct, unknown_scores, np.ones(len(known_scores)),
                    np.ones(len(unknown_scores)), [best])  # fmt: skip
    return Calibration(
        threshold=round(best, 4),
        points=points,
        top1=round(float(known_correct.mean()), 4),
        known=len(known_scores),
        unknown=len(unknown_scores),
        protocol=protocol,
    )


def calibrate_stats(
    stats: QueryStats,
    *,
    entries: int,
    prior: Prior = FALLBACK_PRIOR,
    protocol: str = "leave-one-out",
    taught: Sequence[int] = (),
    floor: bool = False,
    views: bool = True,
    plain: float | None = None,
    seed: int = 0,
) -> Calibration | None:
    """The curve and default threshold of a gallery of ``entries`` from its :class:`QueryStats`
    (see the module docstring); ``floor``: measure the raw-space floor (adapted indices).
    ``views=False``: the photos' own point alone, as calibrations were made before views (what
    the benchmarks compare with). ``None`` with too little data."""
    photo, view, real = stats.kind == 0, stats.kind == 1, stats.kind == 2
    known_side = (photo | real) & np.isfinite(stats.known)
    finite_u = np.isfinite(stats.unknown)
    if known_side.sum() < MIN_KNOWN or (finite_u & (photo | real)).sum() < MIN_KNOWN:
        return None
    genuine = stats.correct & np.isfinite(stats.known)
    floor_value = None
    if floor and views and genuine.sum() >= MIN_KNOWN:
        floor_value = round(_weighted_quantile(stats.raw_match[genuine], stats.weight[genuine], FLOOR_SHARE), 4)
    use_views = views and prior.offset is not None and (finite_u & view).sum() >= MIN_VIEWS
    v_point = None
    rng = np.random.default_rng(seed)

    def point(pool: np.ndarray, shift: float) -> tuple[float, float, np.ndarray, np.ndarray]:
        """The 80 % point of these unknowns (moved up by ``shift``) and its bootstrap standard
        error over the photos they come from. The threshold keeps the promise on its own; the
        floor turns away more (where the model's own space tells products apart well, it alone
        would reject most unknowns, and a threshold counting on it would drop to nothing)."""
        u, w = stats.unknown[pool] + shift, stats.weight[pool]
        ug, inverse = np.unique(stats.group[pool], return_inverse=True)
        boot = []
        for _ in range(BOOTSTRAP):
            counts = np.bincount(rng.integers(0, len(ug), len(ug)), minlength=len(ug))
            if (w * counts[inverse]).sum() > 0:
                boot.append(_target_point(u, w * counts[inverse]))
        return _target_point(u, w), float(np.std(boot)), u, w

    # at build time two estimates of real queries' point, each moved by its offset on the reference
    # and weighed by how far it strayed there: the photos', and the views'; both uncertain by at
    # least the spread between capture conditions (MIN_OFFSET_SPREAD)
    own, boot_se, u, uw = point(finite_u & photo, prior.photos_offset if views else 0.0)
    var = boot_se**2 + prior.photos_sd**2
    if use_views:
        v_point, v_se, vu, vw = point(finite_u & view, prior.offset)
        v_var = v_se**2 + prior.offset_sd**2
        w_views = (1 / max(v_var, 1e-8)) / (1 / max(v_var, 1e-8) + 1 / max(var, 1e-8))
        own = w_views * v_point + (1 - w_views) * own
        var = 1 / (1 / max(v_var, 1e-8) + 1 / max(var, 1e-8))
        u, uw = np.concatenate([u, vu]), np.concatenate([uw / uw.sum() * (1 - w_views), vw / vw.sum() * w_views])
    se = math.sqrt(var + (MIN_OFFSET_SPREAD**2 if views else 0.0))
    real_pool = finite_u & real
    real_point = None
    if views and real_pool.sum() >= MIN_REAL:  # confirmed answers: how real queries score, measured
        real_point, real_se, ru, rw = point(real_pool, 0.0)
        # a bootstrap of a handful says little: at least a sample quantile's standard error,
        # sqrt(p (1 - p) / m) / pdf(z_p) standard deviations (1.43 sd / sqrt(m) at p = 0.8)
        finite = ru[np.isfinite(ru)]
        spread = float(np.std(finite)) if len(finite) > 1 else 0.0
        real_se = max(real_se, MIN_REAL_SE, 1.43 * spread / math.sqrt(len(ru)))
        w_real = (1 / real_se**2) / (1 / real_se**2 + 1 / se**2)
        own = w_real * real_point + (1 - w_real) * own
        se = math.sqrt(1 / (1 / real_se**2 + 1 / se**2))
        u, uw = np.concatenate([u, ru]), np.concatenate([uw / uw.sum() * (1 - w_real), rw / rw.sum() * w_real])
    se = max(se, 1e-4)
    level = prior.level(entries)
    tau = max(prior.tau, MIN_PRIOR_SPREAD)
    measured = math.isfinite(tau) and (not prior.max_entries or entries <= prior.max_entries)
    prior_weight = 0.0 if not (views and measured) else (1 / tau**2) / (1 / tau**2 + 1 / se**2)
    threshold = round(prior_weight * level + (1 - prior_weight) * own, 4)
    uncertainty = math.sqrt(1 / (1 / tau**2 + 1 / se**2)) if prior_weight > 0 else se

    k, kw = stats.known[known_side], stats.weight[known_side]
    photo_point = _target_point(stats.unknown[finite_u & photo], stats.weight[finite_u & photo]) if (
        finite_u & photo).any() else None  # fmt: skip
    points = _curve(k, stats.correct[known_side], u, kw, uw, [threshold])
    evidence = {
        "photos": int(len(np.unique(stats.group[photo]))),
        "views": stats.count(1),
        "confirmed": stats.count(2),
        "confirmed_threshold": round(real_point, 4) if real_point is not None else None,
        "entries": int(entries),
        "estimate": "gallery photos and query-like views" if use_views else "gallery photos",
        "own_threshold": round(own, 4),
        "views_threshold": round(v_point, 4) if use_views else None,
        "photos_threshold": round(photo_point, 4) if photo_point is not None else None,
        "views_offset": prior.offset if use_views else None,
        "plain_share": round(float(plain), 3) if plain is not None else None,
        "prior_threshold": round(level, 4) if math.isfinite(prior.tau) else None,
        "floor": floor_value,
        "prior_weight": round(float(prior_weight), 3),
        "prior": prior.source,
    }
    return Calibration(
        threshold=threshold,
        points=points,
        top1=round(float(np.average(stats.correct[known_side], weights=kw)), 4),
        known=int(known_side.sum()),
        unknown=int(len(u)),
        protocol=protocol,
        uncertainty=round(uncertainty, 4) if views else None,
        floor=floor_value,
        evidence=evidence,
        taught=[int(i) for i in list(taught)[-MAX_TAUGHT:]],
    )


def gallery_stats(
    vectors: np.ndarray,
    labels: Sequence[str],
    *,
    views: tuple[np.ndarray, np.ndarray] | None = None,
    taught_rows: np.ndarray | None = None,
    seed: int = 0,
) -> QueryStats:
    """Leave-one-out :class:`QueryStats` of stored (unit) vectors: at most :data:`MAX_QUERIES`
    entries as queries (down to :data:`MIN_QUERIES` on galleries so big that more would cost
    over :data:`QUERY_BUDGET`), every confirmed answer (``taught_rows``) among them; ``views``:
    ``(row of the photo each was made from, view vectors)`` in the same space."""
    labels = np.asarray(labels)
    n = len(vectors)
    taught_rows = np.asarray(taught_rows if taught_rows is not None else [], dtype=np.int64)
    queries = int(min(MAX_QUERIES, max(MIN_QUERIES, QUERY_BUDGET / max(1, vectors.size))))
    rows = np.arange(n)
    if n > queries:
        rows = np.sort(np.random.default_rng(seed).choice(rows, queries, replace=False))
    photos = rows[~np.isin(rows, taught_rows)]
    parts = [
        query_stats(vectors[photos], labels[photos], vectors, labels, exclude=photos, group=photos),
        query_stats(vectors[taught_rows], labels[taught_rows], vectors, labels, exclude=taught_rows, kind=2,
                    weight=REAL_QUERY_WEIGHT, group=taught_rows),
    ]  # fmt: skip
    if views is not None and len(views[0]):
        source, feats = np.asarray(views[0], dtype=np.int64), views[1]
        if len(source) > queries:  # views share the query budget on huge galleries
            pick = np.sort(np.random.default_rng(seed + 1).choice(len(source), queries, replace=False))
            source, feats = source[pick], feats[pick]
        parts.append(query_stats(feats, labels[source], vectors, labels, exclude=source, kind=1, group=source))
    return QueryStats.concat(parts)


def calibrate_gallery(
    vectors: np.ndarray,
    labels: Sequence[str],
    *,
    ids: np.ndarray | None = None,
    views: tuple[np.ndarray, np.ndarray] | None = None,
    taught: Sequence[int] = (),
    feature_model: str | None = None,
    space: str = "raw",
    use_views: bool = True,
    plain: float | None = None,
    seed: int = 0,
) -> Calibration | None:
    """Leave-one-out / leave-label-out calibration of stored (unit) vectors, with the gallery's
    query-like ``views`` (``(entry id of the photo each was made from, vectors)``, in the same
    space) and the confirmed answers among its entries (``taught``: entry ids; ``ids``: each
    row's id). ``space``: ``raw`` (the model's features) or ``adapted`` (anything fitted, for
    which prior to use). ``None`` below :data:`MIN_LABELS` labels."""
    labels = np.asarray(labels)
    if len(set(labels.tolist())) < MIN_LABELS:
        return None
    ids = np.arange(len(vectors)) if ids is None else np.asarray(ids, dtype=np.int64)
    rows_of = row_lookup(ids)
    taught_rows = rows_of(np.asarray(list(taught), dtype=np.int64))
    taught_rows = taught_rows[taught_rows >= 0]
    view_rows = None
    if views is not None and len(views[0]):
        source = rows_of(np.asarray(views[0], dtype=np.int64))
        keep = source >= 0  # views of photos removed since go with them
        view_rows = (source[keep], np.asarray(views[1], dtype=np.float32)[keep])
    stats = gallery_stats(vectors, labels, views=view_rows, taught_rows=taught_rows, seed=seed)
    return calibrate_stats(stats, entries=len(vectors), prior=prior_for(feature_model, space, plain), plain=plain,
                           taught=ids[taught_rows].tolist(), views=use_views, seed=seed)  # fmt: skip


def row_lookup(ids: np.ndarray):
    """``rows_of(wanted)``: each wanted id's row in ``ids`` (-1 where absent)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def rows_of(wanted: np.ndarray) -> np.ndarray:
        if not len(wanted) or not len(ids):
            return np.full(len(wanted), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, len(ids) - 1)
        return np.where(sorted_ids[pos] == wanted, order[pos], -1).astype(np.int64)

    return rows_of
