"""What the engine tells its front ends about stored galleries: frozen read models.

The web UI, the HTTP API and the CLI read an index through these, never through the
:class:`~shitu.index.GalleryIndex` itself: what a gallery *is* (its counts, its calibration, its
versions, a page of its entries) is stated once here, in the engine's words, and each front end
only says it in its own (the API with pydantic aliases, the UI in Markdown, the CLI as text).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # read here, never imported: the views sit below the index
    from shitu.gallery import SkippedLine
    from shitu.index import GalleryIndex


@dataclass(frozen=True)
class OperatingPoint:
    """One threshold of a calibration curve and what it promises (shares of the measured queries)."""

    threshold: float
    correct_accepted: float  # known objects answered correctly and accepted
    wrong_accepted: float  # known objects answered wrongly but accepted
    unknown_rejected: float  # objects not in the gallery that are rejected


@dataclass(frozen=True)
class CalibrationView:
    """An index's own threshold and the curve it was picked from."""

    threshold: float
    chosen_by: str  # "default" (calibrated) or "user" (picked on the curve)
    expected: OperatingPoint
    top1: float | None  # known objects whose best match is right, whatever the score
    protocol: str  # how the curve was measured (leave-one-out, or held-out folds)
    known_queries: int
    unknown_queries: int
    changes_since: int  # entries changed since the curve was measured
    curve: tuple[OperatingPoint, ...] = ()
    uncertainty: float | None = None  # the threshold's standard error (± this)
    confirmed_answers: int = 0  # answers users confirmed or corrected (Teach): real queries it uses
    summary: str | None = None  # "threshold 0.72 ± 0.04 from 18 photos, 72 query-like views, 3 confirmed answers"
    evidence: dict[str, Any] | None = None  # what the threshold was measured on and how it was combined
    details: dict[str, Any] = field(default_factory=dict)  # what else the calibration measured

    @property
    def points(self) -> tuple[OperatingPoint, ...]:
        return self.curve

    @property
    def chosen(self) -> OperatingPoint:
        return self.expected

    def at(self, threshold: float) -> OperatingPoint:
        """The curve's point nearest to ``threshold`` (what trying that threshold would do)."""
        return min(self.curve, key=lambda p: abs(p.threshold - threshold)) if self.curve else self.expected


@dataclass(frozen=True)
class IndexInfo:
    """A stored index at a glance (:meth:`shitu.engine.Engine.info`)."""

    name: str
    entries: int
    labels: int
    index_type: str
    metric_type: str
    dim: int
    feature_model: str | None
    next_id: int
    threshold: float | None  # the threshold a query gets when it names none
    calibration: CalibrationView | None
    adaptation: dict[str, Any] | None  # whether a projection was fitted to the gallery, and why
    search_params: dict[str, float]
    search_shortfall: str | None  # why an approximate index cannot be trusted to find the nearest entry
    projection: str | None  # "supervised", "pca-whitening" or None (raw features)
    changes_since_calibration: int  # entries added, removed or relabelled since the curve was measured
    compatible: bool  # built with the recognition model that runs now (else it must be rebuilt)
    summary: dict[str, Any] = field(default_factory=dict)  # the same, as the index's summary dict

    def to_dict(self) -> dict[str, Any]:
        return dict(self.summary)


@dataclass(frozen=True)
class EntryView:
    """One gallery entry: its id, label, where it came from and (when asked for) its thumbnail."""

    id: int
    label: str
    source: str = ""
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class EntryPage:
    """A page of an index's entries in id order (``matching`` counts every entry the filter keeps)."""

    index: str
    matching: int
    offset: int
    limit: int
    entries: tuple[EntryView, ...]


@dataclass(frozen=True)
class VersionInfo:
    """One kept version of an index."""

    version: int
    current: bool
    time: str | None  # UTC, ISO 8601
    action: str | None  # build, import, add 3, remove 2, relabel 1, restore v4, ...
    entries: int | None
    labels: int | None
    feature_model: str | None
    index_type: str | None
    metric_type: str | None

    @classmethod
    def of(cls, record: dict[str, Any]) -> VersionInfo:
        return cls(**{name: record.get(name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LabelledId:
    id: int
    label: str


@dataclass(frozen=True)
class Relabelled:
    id: int
    old_label: str
    new_label: str


@dataclass(frozen=True)
class VersionDiff:
    """What changed from version ``against`` (0: an empty index) to ``version``, read from their id
    maps: each kind's count and its first ``limit`` entries in id order."""

    index: str
    version: int
    against: int
    action: str | None
    time: str | None
    entries_before: int
    entries_after: int
    added_count: int
    removed_count: int
    relabelled_count: int
    added: tuple[LabelledId, ...]
    removed: tuple[LabelledId, ...]
    relabelled: tuple[Relabelled, ...]
    limit: int

    @classmethod
    def of(cls, index: str, diff: dict[str, Any]) -> VersionDiff:
        return cls(
            index=index, version=diff["version"], against=diff["against"], action=diff.get("action"),
            time=diff.get("time"), entries_before=diff["entries_before"], entries_after=diff["entries_after"],
            added_count=diff["added_count"], removed_count=diff["removed_count"],
            relabelled_count=diff["relabelled_count"], added=tuple(LabelledId(**e) for e in diff["added"]),
            removed=tuple(LabelledId(**e) for e in diff["removed"]),
            relabelled=tuple(Relabelled(e["id"], e["from"], e["to"]) for e in diff["relabelled"]), limit=diff["limit"],
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The store's spelling (the CLI's ``--json``): a relabel as ``{"id", "from", "to"}``."""
        out = asdict(self)
        out["relabelled"] = [{"id": e.id, "from": e.old_label, "to": e.new_label} for e in self.relabelled]
        return out


@dataclass
class ChangeReport:
    """What a change did, for summaries in the UI, API and CLI: the ids it gave new entries (none
    for a remove, relabel, calibration or import), the lines it skipped, the index's summary after
    it. The index itself stays with the engine (``gallery``: for the engine and the Python API's
    ``IndexData``); front ends read ``id_map`` and ``image_count``, or ask the engine."""

    index: str
    added_ids: list[int]
    skipped: list[SkippedLine] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    gallery: GalleryIndex | None = field(default=None, repr=False)  # the index after the change

    @property
    def id_map(self) -> dict[int, str]:
        """``id → label`` of the whole index after the change (built on demand: O(entries))."""
        return self.gallery.id_map if self.gallery is not None else {}

    @property
    def image_count(self) -> int:
        return len(self.gallery) if self.gallery is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "added": len(self.added_ids),
            "skipped": [{"line": s.line_no, "source": s.source, "reason": s.reason} for s in self.skipped],
            **self.summary,
        }


# --- read off an index (the engine's side) ---------------------------------------------------------
def index_info(name: str, index: GalleryIndex, threshold: float, compatible: bool) -> IndexInfo:
    """``index`` at a glance, stored as ``name``; ``threshold``: what a query of it gets when it
    names none; ``compatible``: whether its vectors come from the active recognition model."""
    summary = index.summary()
    return IndexInfo(
        name=name, entries=len(index), labels=index.label_count, index_type=index.index_type,
        metric_type=index.metric_type, dim=index.dim, feature_model=index.feature_model, next_id=index.next_id,
        threshold=threshold, calibration=calibration_view(index), adaptation=summary["adaptation"],
        search_params=dict(index.search_params), search_shortfall=index.search_shortfall,
        projection=summary["projection"], changes_since_calibration=index.changes_since_calibration,
        compatible=compatible, summary=summary,
    )  # fmt: skip


def calibration_view(index: GalleryIndex) -> CalibrationView | None:
    """The calibration of ``index`` as front ends read it (``None``: too few labels to measure one)."""
    c = index.calibration
    if c is None:
        return None
    points = tuple(OperatingPoint(p.threshold, p.correct_accepted, p.wrong_accepted, p.unknown_rejected)
                   for p in c.points)  # fmt: skip
    chosen = c.chosen
    extra = {k: v for k, v in (index.calibration_summary() or {}).items() if k not in _CALIBRATION_FIELDS}
    return CalibrationView(
        threshold=c.threshold, chosen_by=c.chosen_by,
        expected=OperatingPoint(chosen.threshold, chosen.correct_accepted, chosen.wrong_accepted,
                                chosen.unknown_rejected),
        top1=c.top1, protocol=c.protocol, known_queries=c.known, unknown_queries=c.unknown,
        changes_since=index.changes_since_calibration, curve=points, uncertainty=c.uncertainty,
        confirmed_answers=len(c.taught), summary=c.describe(), evidence=c.evidence, details=extra,
    )  # fmt: skip


_CALIBRATION_FIELDS = {"threshold", "chosen_by", "correct_accepted", "wrong_accepted", "unknown_rejected", "top1",
                       "protocol", "known_queries", "unknown_queries", "changes_since", "uncertainty",
                       "confirmed_answers", "evidence", "text"}  # fmt: skip


def entry_page(
    name: str, index: GalleryIndex, offset: int, limit: int, *, labels: Any = None, thumbnails: bool = False
) -> EntryPage:
    """Entries ``offset`` to ``offset + limit`` of ``index`` in id order (only those under
    ``labels`` if given), their sources (and thumbnails if asked for) read for the page alone."""
    matching, rows = index.page(offset, limit, labels=labels, thumbnails=thumbnails)
    views = tuple(EntryView(e.id, e.label, e.source, e.thumbnail) for e in rows)
    return EntryPage(name, matching, max(0, int(offset)), max(0, int(limit)), views)


def entry_views(index: GalleryIndex, ids: Any, *, thumbnails: bool = False) -> tuple[EntryView, ...]:
    """The entries of ``ids`` that ``index`` holds, in the order asked; others are left out."""
    wanted = [i for i in dict.fromkeys(int(i) for i in ids) if i in index]
    found = index.sources(wanted, thumbnails=thumbnails)
    return tuple(EntryView(i, index.label(i), *found.get(i, ("", None))) for i in wanted)
