"""What a gallery report holds: plain dataclasses, and :class:`GalleryReport` with its exports
(JSON-able dict, CSV tables, the HTML page, a plain-text summary). Nothing here computes."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any

from shitu.calibrate import Calibration
from shitu.errors import ShiTuError
from shitu.report.page import render_page
from shitu.report.params import DUPLICATE_SIMILARITY, FRAGILE_IMAGES, NEIGHBOURS, SEED
from shitu.report.templating import percent

MAP_METHOD = "t-SNE (openTSNE, Barnes-Hut, PCA start) of the stored vectors"


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
                "method": MAP_METHOD,
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
        tables = {"labels": self._label_table, "entries": self._entry_table, "pairs": self._pair_table}
        if kind not in tables:
            raise ShiTuError(f"unknown CSV table {kind!r}: use labels, entries or pairs")
        buf = io.StringIO()
        csv.writer(buf).writerows(tables[kind]())
        return buf.getvalue()

    def _label_table(self) -> list[list[Any]]:
        few = {f.label: f.status for f in self.few_images}
        rows: list[list[Any]] = [["label", "images", "queries", "recall_at_1", "recall_at_5", "confused_with",
                                  "confused_count", "too_few_images"]]  # fmt: skip
        for r in self.per_label:
            rows.append([safe_cell(r.label), r.images, r.queries, fixed4(r.recall_at_1), fixed4(r.recall_at_5),
                         safe_cell(r.confused_with or ""), r.confused_count or "", few.get(r.label, "")])  # fmt: skip
        return rows

    def _entry_table(self) -> list[list[Any]]:
        def source(id_: int) -> str:
            return safe_cell(self.sources.get(id_, ""))

        rows: list[list[Any]] = [["id", "label", "source", "issue", "suggested_label", "agree", "similarity",
                                  "related_id"]]  # fmt: skip
        for s in self.mislabelled:
            rows.append([s.id, safe_cell(s.label), source(s.id), "suspected mislabelled", safe_cell(s.suggested_label),
                         f"{s.agree}/{s.neighbours}", fixed4(s.similarity), s.nearest_id])  # fmt: skip
        for d in self.duplicates:
            issue = "conflicting duplicate" if d.conflicting else "redundant duplicate"
            for me, other, label in ((d.id_a, d.id_b, d.label_a), (d.id_b, d.id_a, d.label_b)):
                rows.append([me, safe_cell(label), source(me), issue, safe_cell(d.suggested_label or ""), "",
                             fixed4(d.similarity), other])  # fmt: skip
        for o in self.outliers:
            rows.append([o.id, safe_cell(o.label), source(o.id), "outlier", safe_cell(o.nearest_label), "",
                         fixed4(o.similarity), o.nearest_id])  # fmt: skip
        return rows

    def _pair_table(self) -> list[list[Any]]:
        rows: list[list[Any]] = [["label_a", "label_b", "errors", "a_to_b", "b_to_a", "examples_a", "examples_b"]]
        for p in self.confused_pairs:
            rows.append([safe_cell(p.label_a), safe_cell(p.label_b), p.errors, p.a_to_b, p.b_to_a,
                         " ".join(str(e.id) for e in p.examples_a),
                         " ".join(str(e.id) for e in p.examples_b)])  # fmt: skip
        return rows

    def to_html(self, lang: str = "en") -> str:
        """One self-contained HTML page (UTF-8, inline CSS and SVG, thumbnails as data URIs, no
        script), in English or Chinese."""
        return render_page(self, lang)

    def summary_lines(self, worst: int = 5, pairs: int = 5) -> list[str]:
        """A short plain-text summary (the CLI prints it)."""
        name = f"index {self.name!r}: " if self.name else ""
        lines = [
            f"{name}{self.entries:,} entries, {self.labels:,} labels ({self.index_type}/{self.metric_type})",
            f"leave-one-out: {self.evaluated:,} of {self.evaluable:,} evaluable entries"
            + (" (seeded random sample)" if self.sampled else ""),
            f"recall@1 {percent(self.recall_at_1)}   recall@5 {percent(self.recall_at_5)}",
        ]
        lines += [f"note: {note}" for note in self.notes]  # e.g. why leave-one-out is optimistic for this index
        cal = self.calibration
        if cal is not None:
            p = cal.chosen
            source = "the index's own" if self.calibration_source == "index" else "computed"
            lines.append(f"threshold {cal.threshold:.3f} ({source}): right answer accepted {p.correct_accepted:.0%}, "
                         f"unknown rejected {p.unknown_rejected:.0%}")  # fmt: skip
            if self.calibration_source == "index" and cal.evidence:
                lines.append(f"  {cal.describe()}")
        else:
            lines.append("threshold curve: not enough labels or entries")
        measured = [r for r in self.per_label if r.recall_at_1 is not None and r.recall_at_1 < 1.0][:worst]
        if measured:
            lines.append("worst labels:")
            for r in measured:
                conf = f"  -> {r.confused_with} ({r.confused_count})" if r.confused_with else ""
                lines.append(f"  {r.label}: {r.images} images, recall@1 {percent(r.recall_at_1)}, "
                             f"recall@5 {percent(r.recall_at_5)}{conf}")  # fmt: skip
        if self.confused_pairs:
            lines.append("most confused pairs:")
            lines += [f"  {p.label_a} <-> {p.label_b}: {p.errors} errors" for p in self.confused_pairs[:pairs]]
        counts = self.duplicate_counts
        lines.append(
            f"flagged: {self.mislabelled_count} suspected mislabelled, {counts.get('conflicting', 0)} conflicting and "
            f"{counts.get('redundant', 0)} redundant near-duplicate pairs, "
            f"{sum(f.images < 2 for f in self.few_images)} labels with 1 image, "
            f"{sum(f.images >= 2 for f in self.few_images)} with {FRAGILE_IMAGES}, {self.outlier_count} outliers"
        )
        lines += [f"  #{s.id} {s.label} -> {s.suggested_label}? ({s.agree}/{s.neighbours} neighbours)"
                  for s in self.mislabelled[:worst]]  # fmt: skip
        stages = ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items())
        lines.append(f"time: {self.seconds:.2f} s ({stages})")
        return lines


def safe_cell(text: str) -> str:
    """Defuse spreadsheet formulas in a CSV text cell (labels and file names come from strangers)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def fixed4(value: float | None) -> str:
    """A CSV number cell: four decimals, empty for a missing value."""
    return "" if value is None else f"{value:.4f}"
