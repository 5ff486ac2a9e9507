"""The gallery index in memory: vectors, id → label map, per-entry rows, and what the gallery's
labels taught it (projection, calibration).

An index is a *base* (the vectors of its last full save, in faiss or in another vector store:
:class:`~shitu.vectors.VectorBase`) plus the changes since: vectors added (searched exactly,
beside the base), base ids removed (skipped) and relabels (in the label table). Every change
returns a *new* :class:`GalleryIndex` that shares the base, so it costs O(change), never a copy
of a million vectors, and a failed change never leaves a half-changed index. Each new index
remembers the typed change (:mod:`shitu.changes`) that made it from its parent, which is what a
store writes down. :meth:`GalleryIndex.compacted` folds the changes into a new faiss base.

Where an index is kept — PaddleX's directory layout (:mod:`shitu.stores.layout`), a named
store with versions (:mod:`shitu.stores`) — is not this module's business.

Fixes relative to PaddleX 3.7.2's ``FaissBuilder``: remove works on HNSW32, IVF is sized so
tiny galleries work, L2 scores are turned into similarities before thresholding, ids are never
reused, and HNSW/IVF search parameters keep approximate search in agreement with exact search.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from shitu import changes as ch
from shitu.adapt import ADAPT_MODES, Adaptation, Projection, adapt
from shitu.calibrate import Calibration, calibrate_gallery
from shitu.config import INDEX_TYPES, METRIC_TYPES
from shitu.entrymeta import EntryMeta
from shitu.errors import NotFound, ShiTuError
from shitu.labels import LabelTable, clean_label
from shitu.vectors import FaissBase, Live, VectorBase, normalize, one_thread_if_small, search_shortfall

MAX_LINEAGE = 16  # changes remembered between two commits (more: the next commit is a full save)
WHITEN_MIN_IMAGES = 200  # fewer images cannot estimate the feature covariance
WHITEN_DIMS = 512
WHITEN_POWER = 0.5  # divide each principal direction by sqrt(its singular value)
RECALIBRATE_MAX_ENTRIES = 5000  # a change recalibrates a raw-feature index up to this size (~0.1 s; 20k: 1 s)
RawChunks = tuple[tuple[np.ndarray, np.ndarray], ...]  # (ids, float16 unit features): the base's, then added since


@dataclass
class Entry:
    """Metadata kept for each gallery vector."""

    id: int
    label: str
    source: str = ""
    thumbnail: bytes | None = None  # small JPEG


@dataclass(frozen=True)
class Fit:
    """What an index learnt from its gallery's labels: the projection applied to features before
    they are stored (supervised adaptation or PCA whitening), the threshold curve, the record of
    the adaptation decision, and how many entries changed since the calibration."""

    projection: Projection | None = None
    calibration: Calibration | None = None
    adaptation: Adaptation | None = None
    legacy_threshold: float | None = None  # indices from before calibrations kept only a suggested threshold
    changes_since_calibration: int = 0
    # (entry id of the photo, float16 raw unit features) of the photos' query-like views
    # (:mod:`shitu.augment`), so a refit or a recalibration without the images still has them
    views: tuple[np.ndarray, np.ndarray] | None = None


class Whitening(Projection):
    """Database-side PCA whitening (``whiten=True``): unsupervised, fitted on the gallery's features.

    Generic features such as the starter model's share a few dominant directions, which
    whitening evens out: on the drink gallery it lifts recall@1 of held-out images (5-fold)
    from 0.731 to 0.784 and leave-one-out recall@1 from 0.801 to 0.862. The supervised
    projection of :mod:`shitu.adapt` (``adapt``) does better where the gallery has labels
    with several photos, and is the default.
    """

    @classmethod
    def fit(cls, features: np.ndarray) -> "Whitening":
        mean = features.mean(axis=0)
        _, singular, vt = np.linalg.svd(features - mean, full_matrices=False)
        keep = int(min(WHITEN_DIMS, np.sum(singular > 1e-6 * singular[0])))
        projection = vt[:keep].T / singular[:keep] ** WHITEN_POWER
        return cls(mean.astype(np.float32), projection.astype(np.float32), "pca-whitening")


class GalleryIndex:
    """A searchable gallery. Attribute names follow PaddleX's ``IndexData``.

    >>> idx = GalleryIndex.build(np.eye(3, dtype="float32"), ["a", "b", "c"], index_type="Flat")
    >>> idx.search(np.eye(3, dtype="float32")[:1], topk=1)[1].tolist()
    [[0]]
    """

    def __init__(
        self,
        base: VectorBase,
        labels: LabelTable,
        *,
        index_type: str,
        metric_type: str,
        next_id: int,
        feature_model: str | None = None,
        fit: Fit = Fit(),
        raw: RawChunks | None = None,
        rows: EntryMeta | None = None,
        delta: tuple[np.ndarray, np.ndarray] | None = None,
        dead: np.ndarray | None = None,
        relabelled: int = 0,
    ):
        self._base = base
        self._labels = labels
        self._index_type = index_type
        self._metric_type = metric_type
        self._next_id = next_id
        self.feature_model = feature_model
        self.fit = fit
        self._raw = raw  # chunks of (ids, float16 unit features) when the projection can be refitted
        self.rows = rows or EntryMeta()  # sources and thumbnails
        self._delta = delta if delta is not None else (np.zeros(0, np.int64), np.zeros((0, base.dim), np.float32))
        self._dead = dead if dead is not None else np.zeros(0, np.int64)  # base ids removed since, sorted
        self._relabelled = relabelled  # entries relabelled since the base (a replay applies each)
        self.skipped: list = []  # gallery lines left out by the build that made this index
        self._parent: GalleryIndex | None = None  # the index this one was derived from by _change
        self._change: ch.Change | None = None
        self._search_cache: dict = {}  # per version: e.g. faiss parameters that skip the removed ids
        self._raw_lookup: list | None = None  # raw_similarity's sorted ids, made on first use

    # --- PaddleX IndexData-compatible surface -------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The faiss index holding every current vector (folded into one, if there are changes)."""
        return self.compacted().faiss_base.index

    @property
    def id_map(self) -> dict[int, str]:
        """``id → label`` of every entry (a new dict: O(entries); use :meth:`label` for one)."""
        return self._labels.to_dict()

    @property
    def metric_type(self) -> str:
        return self._metric_type

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def index_info(self) -> dict:
        return {"index_type": self.index_type, "metric_type": self.metric_type, "id_map": self.id_map}

    # --- what the labels taught it --------------------------------------------------------
    @property
    def whitening(self) -> Projection | None:
        """The projection applied to features before they are stored (``None``: raw features)."""
        return self.fit.projection

    @property
    def calibration(self) -> Calibration | None:
        return self.fit.calibration

    @property
    def adaptation(self) -> Adaptation | None:
        return self.fit.adaptation

    @property
    def changes_since_calibration(self) -> int:
        return self.fit.changes_since_calibration

    @property
    def search_params(self) -> dict[str, float]:
        """The base's measured search parameters (efSearch / nprobe and the ``agreement`` they reach)."""
        return self._base.search_params

    @property
    def base(self) -> VectorBase:
        """Where the vectors of the last full save are kept."""
        return self._base

    @property
    def faiss_base(self) -> FaissBase:
        """The base as a faiss index (only for an index whose base is one: see :meth:`compacted`)."""
        if not isinstance(self._base, FaissBase):
            raise ShiTuError("this index is not held in faiss")
        return self._base

    @property
    def raw_chunks(self) -> RawChunks | None:
        """The unprojected features kept for a refit: ``(ids, float16 features)`` chunks."""
        return self._raw

    # --- introspection ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, (int, np.integer)) and int(id_) in self._labels

    @property
    def labels(self) -> LabelTable:
        return self._labels

    @property
    def dim(self) -> int:
        """Dimension of the features this index takes (before any whitening)."""
        return self.whitening.input_dim if self.whitening else self._base.dim

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def ids(self) -> np.ndarray:
        """Every entry's id, ascending (a read-only view)."""
        view = self._labels.ids.view()
        view.flags.writeable = False
        return view

    def label(self, id_: int) -> str:
        found = self._labels.get(int(id_))
        if found is None:
            raise NotFound(f"no entry with id {id_}")
        return found

    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """The label of each id (``None`` for ids not in the index)."""
        return self._labels.labels_of(ids)

    @property
    def entries(self) -> list[Entry]:
        """Every entry with its source, in id order (no thumbnails: see :meth:`page`)."""
        return self.page(0, len(self), thumbnails=False)[1]

    def page(
        self, offset: int = 0, limit: int = 100, *, labels: Iterable[str] | None = None, thumbnails: bool = True
    ) -> tuple[int, list[Entry]]:
        """``(matching, entries)``: entries ``offset`` to ``offset + limit`` in id order,
        only those under ``labels`` if given, with sources (and thumbnails) read for the page
        alone. ``matching`` counts every entry that matches."""
        table = self._labels
        if labels is not None:
            codes = [table.code_of[lb] for lb in set(labels) if lb in table.code_of]
            where = np.flatnonzero(np.isin(table.codes, codes))
        else:
            where = np.arange(len(table))
        offset, limit = max(0, int(offset)), max(0, int(limit))
        pos = where[offset : offset + limit]
        ids = table.ids[pos].tolist()
        rows = self.rows.get(ids, thumbnails=thumbnails)
        codes = table.codes[pos].tolist()
        return len(where), [Entry(i, table.names[c], *rows.get(i, ("", None))) for i, c in zip(ids, codes, strict=True)]

    def entry(self, id_: int) -> Entry:
        label = self.label(id_)
        source, thumbnail = self.rows.get([int(id_)]).get(int(id_), ("", None))
        return Entry(int(id_), label, source, thumbnail)

    def one_per_label(self) -> np.ndarray:
        """The lowest id of each label, ascending."""
        _, first = np.unique(self._labels.codes, return_index=True)
        return np.sort(self._labels.ids[first])

    def sources(self, ids: Iterable[int], *, thumbnails: bool = False) -> dict[int, tuple[str, bytes | None]]:
        """``id → (source, thumbnail)`` for the ids that have them, in one read (thumbnails
        ``None`` unless asked for)."""
        return self.rows.get(ids, thumbnails=thumbnails)

    def thumbnails(self, ids: Iterable[int]) -> dict[int, bytes]:
        """``id → thumbnail JPEG`` for the ids that have one."""
        return {i: t for i, (_, t) in self.rows.get(ids).items() if t}

    def label_counts(self) -> Counter:
        return self._labels.counts()

    @property
    def label_count(self) -> int:
        """How many distinct labels the entries have."""
        return self._labels.distinct()

    @property
    def suggested_rec_threshold(self) -> float | None:
        """The index's own recognition threshold: its calibration's operating point."""
        return self.calibration.threshold if self.calibration is not None else self.fit.legacy_threshold

    @property
    def pending_changes(self) -> int:
        """Entries added, removed and relabelled since the base was written (what replaying a
        store's log repeats, and compaction folds in)."""
        return len(self._delta[0]) + len(self._dead) + self._relabelled

    def summary(self) -> dict:
        return {
            "entries": len(self),
            "labels": self.label_count,
            "index_type": self.index_type,
            "metric_type": self.metric_type,
            "dim": self.dim,
            "feature_model": self.feature_model,
            "next_id": self.next_id,
            "search_params": self.search_params,
            "whitened": self.whitening is not None,
            "projection": self.whitening.kind if self.whitening is not None else None,
            "suggested_rec_threshold": self.suggested_rec_threshold,
            "calibration": self.calibration_summary(),
            "adaptation": self.adaptation.to_dict() if self.adaptation is not None else None,
            "search_shortfall": self.search_shortfall,
        }

    @property
    def search_shortfall(self) -> str | None:
        """Why this approximate index cannot be trusted to find the nearest entry (see
        :func:`shitu.vectors.search_shortfall`), or ``None``."""
        return search_shortfall(self.index_type, self.search_params)

    def calibration_summary(self) -> dict | None:
        """The operating point in use and what it promises (``None`` for an uncalibrated index)."""
        c = self.calibration
        return c.summary(self.changes_since_calibration) if c is not None else None

    # --- construction and mutation (each returns a new index) -------------------------
    @classmethod
    def build(
        cls,
        features: np.ndarray,
        labels: Sequence[str],
        *,
        index_type: str = "HNSW32",
        metric_type: str = "IP",
        sources: Sequence[str] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        feature_model: str | None = None,
        first_id: int = 0,
        ids: Sequence[int] | None = None,
        whiten: bool = False,
        adapt: str = "off",
        progress=None,
        views: tuple[np.ndarray, np.ndarray] | None = None,
        plain: float | None = None,
    ) -> GalleryIndex:
        """``adapt`` (``auto``/``on``/``off``): fit a supervised projection to the gallery's labels
        (:mod:`shitu.adapt`; ``auto`` keeps it only where held-out recall says it helps).
        ``whiten``: unsupervised PCA whitening instead (needs >= 200 images; ignored below).
        Either way the index is calibrated (:mod:`shitu.calibrate`) when its labels allow.
        Ids run from ``first_id`` on, unless ``ids`` gives each entry's (distinct, >= 0).
        ``views``: ``(row of the photo each was made from, raw features)`` of the photos'
        query-like views (:meth:`shitu.engine.Engine.embed_gallery`), kept for the calibration;
        ``plain``: the share of the photos on a plain background (:func:`shitu.gallery.plain_share`),
        which picks the calibration's prior and is kept in its record."""
        if index_type not in INDEX_TYPES:
            raise ShiTuError(f"index_type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}")
        if metric_type not in METRIC_TYPES:
            raise ShiTuError(f"metric_type must be one of {', '.join(METRIC_TYPES)}, not {metric_type!r}")
        if adapt not in ADAPT_MODES:
            raise ShiTuError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {adapt!r}")
        features = normalize(features)
        if len(features) != len(labels):
            raise ShiTuError(f"{len(features)} feature vectors but {len(labels)} labels")
        if len(features) == 0:
            raise ShiTuError("cannot build an index from an empty gallery")
        if ids is None:
            ids = np.arange(first_id, first_id + len(features), dtype=np.int64)
        else:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if len(ids) != len(features) or len(np.unique(ids)) != len(ids) or (ids < 0).any():
                raise ShiTuError(f"ids must be {len(features)} distinct whole numbers of at least 0, one per vector")
        clean_labels = _clean_labels(labels)
        if views is not None and len(views[0]):
            views = (ids[np.asarray(views[0], dtype=np.int64)], normalize(views[1]).astype(np.float16))
        else:
            views = None
        projection, calibration, adaptation, raw = _fit(features, ids, clean_labels, whiten, adapt, progress,
                                                        views=views, feature_model=feature_model,
                                                        plain=plain)  # fmt: skip
        stored = projection.apply(features) if projection is not None else features
        return cls(
            FaissBase.build(stored, ids, index_type, metric_type),
            LabelTable.of(ids, clean_labels),
            index_type=index_type,
            metric_type=metric_type,
            next_id=int(ids.max()) + 1,
            feature_model=feature_model,
            fit=Fit(projection, calibration, adaptation, views=views),
            raw=raw,
            rows=EntryMeta(pending=_rows(ids, sources, thumbnails)),
        )

    def recalibrated(self, adapt: str | None = None, *, progress=None) -> GalleryIndex:
        """A copy refitted and recalibrated on the current entries. ``adapt``: ``auto``/``on``/
        ``off`` (default: the mode the index was built with). Needs the unprojected features,
        which every index has except PCA-whitened ones (those are only recalibrated)."""
        if adapt is not None and adapt not in ADAPT_MODES:
            raise ShiTuError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {adapt!r}")
        ids, stored = self.vectors()
        labels = self.labels_of(ids)
        if self.whitening is not None and self._raw is None:
            calibration = calibrate_gallery(stored, labels, **self._calibration_inputs(ids, self.whitening))
            fit = dataclasses.replace(self.fit, calibration=calibration, changes_since_calibration=0)
            return self._derive(fit=fit)
        raw = self.raw_features(ids) if self.whitening is not None else stored
        mode = adapt or (self.adaptation.mode if self.adaptation is not None else "auto")
        projection, calibration, adaptation, kept_raw = _fit(
            raw, ids, labels, False, mode, progress, views=self.fit.views, feature_model=self.feature_model,
            taught=self.calibration.taught if self.calibration is not None else (), plain=self._plain_share(),
        )  # fmt: skip
        fit = Fit(projection, calibration, adaptation, self.fit.legacy_threshold, views=self.fit.views)
        # same ids, sources and thumbnails; only vectors, projection and calibration are new
        if projection is None and self.whitening is None:  # raw before and after: the vectors stay
            return self._derive(fit=fit)
        base = FaissBase.build(projection.apply(raw) if projection else raw, ids, self.index_type, self.metric_type)
        return GalleryIndex(
            base, self._labels, index_type=self.index_type, metric_type=self.metric_type, next_id=self._next_id,
            feature_model=self.feature_model, fit=fit, raw=kept_raw, rows=self.rows,
        )  # fmt: skip

    def _calibration_inputs(self, ids: np.ndarray, projection: Projection | None = None) -> dict[str, Any]:
        """What :func:`~shitu.calibrate.calibrate_gallery` needs besides the vectors: entry ids,
        the views (in the vectors' space), the confirmed answers so far and the feature model."""
        views = None
        if self.fit.views is not None:
            src, feats = self.fit.views
            feats = feats.astype(np.float32)
            views = (src, projection.apply(feats) if projection is not None else feats)
        taught = self.calibration.taught if self.calibration is not None else []
        space = "raw" if projection is None else "whitened"  # PCA-whitened: no reference measured for it
        return {"ids": ids, "views": views, "taught": taught, "feature_model": self.feature_model, "space": space,
                "plain": self._plain_share()}  # fmt: skip

    def _plain_share(self) -> float | None:
        """The share of plain-background photos the build measured (kept in the calibration record)."""
        share = self.calibration.evidence.get("plain_share") if self.calibration is not None else None
        return float(share) if share is not None else None

    def with_threshold(self, threshold: float) -> GalleryIndex:
        """A copy whose own recognition threshold is ``threshold`` (a point the user picked on
        the calibration curve; the curve itself is kept)."""
        threshold = float(threshold)
        if not -1.0 <= threshold <= 1.0:
            raise ShiTuError(f"a similarity threshold lies between -1 and 1, not {threshold}")
        if self.calibration is None:
            raise ShiTuError("this index has no calibration curve to pick a point on (it needs 3+ labels)")
        calibration = dataclasses.replace(self.calibration, threshold=round(threshold, 4), chosen_by="user")
        result = self._derive(fit=dataclasses.replace(self.fit, calibration=calibration))
        return result._derived_by(self, ch.SetThreshold())

    def with_state(
        self, *, calibration: Calibration | None, changes_since_calibration: int, next_id: int, **fitted: Any
    ) -> GalleryIndex:
        """The same index with the state a store recorded beside its changes: the calibration,
        the changes counted since, ids handed out up to ``next_id`` (never reused), and any other
        field of :class:`Fit` given (``adaptation=...``)."""
        fit = dataclasses.replace(
            self.fit, calibration=calibration, changes_since_calibration=changes_since_calibration, **fitted
        )
        return self._derive(fit=fit, next_id=max(self._next_id, int(next_id)))

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        *,
        sources: Sequence[str] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        calibrate: bool = True,
        taught: bool = False,
    ) -> GalleryIndex:
        """A new index with these vectors appended; ids continue from :attr:`next_id`.
        ``taught``: they are confirmed answers (crops of real queries, :meth:`Engine.teach
        <shitu.engine.Engine.teach>`), which the calibration keeps using as real queries."""
        features = normalize(features)
        if len(features) != len(labels):
            raise ShiTuError(f"{len(features)} feature vectors but {len(labels)} labels")
        if len(features) == 0:
            raise ShiTuError("nothing to add: no image/label pairs were given")
        if features.shape[1] != self.dim:
            raise ShiTuError(
                f"these features have {features.shape[1]} dimensions but the index has {self.dim}: "
                "it was built with a different recognition model"
            )
        ids = np.arange(self._next_id, self._next_id + len(features), dtype=np.int64)
        clean = _clean_labels(labels)
        raw = raw_added(self._raw, ids, features.astype(np.float16)) if self._raw is not None else None
        stored = self.whitening.apply(features) if self.whitening is not None else features
        fit = None
        if taught and self.calibration is not None:  # carried by the calibration: the change log records it
            calibration = dataclasses.replace(self.calibration, taught=[*self.calibration.taught, *ids.tolist()])
            fit = dataclasses.replace(self.fit, calibration=calibration)
        result = self._derive(
            labels=self._labels.added(ids, clean),
            delta=(np.concatenate([self._delta[0], ids]), np.concatenate([self._delta[1], stored])),
            next_id=int(ids[-1]) + 1, raw=raw, changed=len(ids), calibrate=calibrate,
            rows=self.rows.with_rows(_rows(ids, sources, thumbnails)), fit=fit,
        )  # fmt: skip
        # the raw chunk holds every add since the base: this add's are its last rows
        change = ch.Add(ids, tuple(clean), stored, raw[-1][1][-len(ids) :] if raw is not None else None)
        return result._derived_by(self, change)

    def with_added(
        self, ids: np.ndarray, labels: Sequence[str], stored: np.ndarray, *, raw: np.ndarray | None = None
    ) -> GalleryIndex:
        """This index with entries appended under the ids they were given (a logged add, replayed:
        ``stored`` are the vectors as searched, ``raw`` their unprojected features); nothing is
        recalibrated — the calibration that came with the change is set by whoever replays it."""
        ids = np.asarray(ids, dtype=np.int64)
        raw_chunks = raw_added(self._raw, ids, raw) if self._raw is not None and raw is not None else None
        return self._derive(
            labels=self._labels.added(ids, list(labels)),
            delta=(np.concatenate([self._delta[0], ids]), np.concatenate([self._delta[1], stored])),
            next_id=max(self._next_id, int(ids[-1]) + 1), raw=raw_chunks, calibrate=False, changed=len(ids),
        )  # fmt: skip

    def remove(self, ids: Iterable[int], *, calibrate: bool = True) -> GalleryIndex:
        """A new index without these ids. Unknown ids raise :class:`NotFound`, changing nothing."""
        wanted = np.asarray(sorted({int(i) for i in ids}), dtype=np.int64)
        if not len(wanted):
            raise ShiTuError("no ids to remove were given")
        missing = wanted[self._labels.positions(wanted) < 0].tolist()
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise NotFound(f"{len(missing)} id(s) are not in the index: {shown}")
        if len(wanted) == len(self):
            raise ShiTuError("cannot remove every entry: an index needs at least one; delete the index instead")
        in_delta = np.isin(self._delta[0], wanted)
        from_base = wanted[~np.isin(wanted, self._delta[0])]
        raw = None
        if self._raw is not None and len(self._raw) > 1:  # removed base rows are skipped when written
            delta_ids, delta_raw = self._raw[1]
            keep = ~np.isin(delta_ids, wanted)
            raw = (self._raw[0], (delta_ids[keep], delta_raw[keep]))
        result = self._derive(
            labels=self._labels.removed(wanted),
            delta=(self._delta[0][~in_delta], self._delta[1][~in_delta]),
            dead=np.union1d(self._dead, from_base), raw=raw, changed=len(wanted), calibrate=calibrate,
        )  # fmt: skip
        return result._derived_by(self, ch.Remove(wanted, tuple(self._labels.labels_of(wanted))))

    def relabel(
        self, ids: int | Sequence[int], label: str, *, calibrate: bool = True, replayed: bool = False
    ) -> GalleryIndex:
        """A copy with entries ``ids`` (one or many) under ``label``; vectors and ids unchanged.
        ``replayed``: a committed relabel read back (its label is taken as it was stored)."""
        label = label if replayed else clean_label(label)
        wanted = np.asarray([ids] if isinstance(ids, (int, np.integer)) else list(ids), dtype=np.int64)
        pos = self._labels.positions(wanted)
        if (pos < 0).any():
            raise NotFound(f"no entry with id {int(wanted[pos < 0][0])}")
        code = self._labels.code_of.get(label)
        changed = int(np.sum(self._labels.codes[pos] != code)) if code is not None else len(set(pos.tolist()))
        result = self._derive(labels=self._labels.relabelled(wanted, label), changed=changed, calibrate=calibrate,
                              relabelled=self._relabelled + len(wanted))  # fmt: skip
        return result._derived_by(self, ch.Relabel(wanted, label, tuple(self._labels.labels_of(wanted))))

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)``: the base's in storage order, then those added since."""
        ids, vecs = self._base.rows(self._live())
        if len(self._delta[0]):
            ids, vecs = np.concatenate([ids, self._delta[0]]), np.concatenate([vecs, self._delta[1]])
        return ids, vecs

    def raw_features(self, ids: np.ndarray) -> np.ndarray:
        """The unprojected features of ``ids`` (an adapted index keeps them, for a refit)."""
        merged = merged_raw(self._raw_sources(), np.asarray(ids, np.int64))
        if merged is None:
            raise ShiTuError("the unprojected features of some entries are missing: rebuild the index")
        return merged[0][1].astype(np.float32)

    def _raw_sources(self) -> RawChunks | None:
        from_base = self._base.raw_rows()
        if from_base is None:
            return self._raw
        return (from_base, *(self._raw or ())[1:])

    def compacted(self) -> GalleryIndex:
        """The same index with every change folded into one faiss base (what a full save writes;
        an index whose base is kept elsewhere, in Milvus say, is copied into faiss)."""
        if not self.pending_changes and self._base.local:
            return self
        base = self._base.folded(self._live(), self._delta[1], self.index_type, self.metric_type)
        raw = merged_raw(self._raw_sources(), self._labels.ids) if self.whitening is not None else None
        return GalleryIndex(
            base, self._labels, index_type=self.index_type, metric_type=self.metric_type, next_id=self._next_id,
            feature_model=self.feature_model, fit=self.fit, raw=raw, rows=self.rows,
        )  # fmt: skip

    def _live(self) -> Live:
        return Live(self._labels, self._dead, self._delta[0])

    # --- lineage: the changes a store writes down ---------------------------------------
    def _derived_by(self, parent: GalleryIndex, change: ch.Change) -> GalleryIndex:
        """Remember that this index is ``parent`` plus ``change`` (what the change log writes)."""
        self._parent, self._change = parent, change
        if parent._depth() >= MAX_LINEAGE:  # an index mutated many times in memory keeps no long chain
            parent._parent = None
        return self

    def _depth(self) -> int:
        depth, node = 0, self
        while node._parent is not None and depth <= MAX_LINEAGE:
            depth, node = depth + 1, node._parent
        return depth

    def changes_since(self, ancestor: GalleryIndex) -> list[ch.Change] | None:
        """The changes that made this index from ``ancestor``, oldest first, or ``None`` when it
        was not made from it by :meth:`add` / :meth:`remove` / :meth:`relabel` /
        :meth:`with_threshold` alone (then only a full save can record it)."""
        chain, node = [], self
        while node is not ancestor:
            if node._parent is None or node._change is None or len(chain) > MAX_LINEAGE:
                return None
            chain.append(node._change)
            node = node._parent
        return chain[::-1]

    def retire_ids_below(self, next_id: int) -> None:
        """Hand out ids from ``next_id`` on (a restored version keeps ids given out since retired)."""
        self._next_id = max(self._next_id, int(next_id))

    def forget_lineage(self) -> None:
        self._parent = self._change = None

    def rebased(
        self, base: VectorBase, *, labels: LabelTable | None = None, rows: EntryMeta | None = None
    ) -> GalleryIndex:
        """The same gallery on another base that holds every entry (a store wrote them there, or
        another process did: then ``labels`` lists what it holds now): no changes pending, no
        lineage; the unprojected features of an adapted index are then the base's."""
        return GalleryIndex(
            base, labels if labels is not None else self._labels, index_type=self.index_type,
            metric_type=self.metric_type, next_id=self._next_id, feature_model=self.feature_model, fit=self.fit,
            raw=_empty_raw(self) if self.whitening is not None else None, rows=rows or self.rows,
        )  # fmt: skip

    def _derive(
        self,
        *,
        labels: LabelTable | None = None,
        delta: tuple[np.ndarray, np.ndarray] | None = None,
        dead: np.ndarray | None = None,
        next_id: int | None = None,
        raw: RawChunks | None = None,
        fit: Fit | None = None,
        rows: EntryMeta | None = None,
        relabelled: int | None = None,
        changed: int = 0,
        calibrate: bool = True,
    ) -> GalleryIndex:
        """A sibling sharing this one's base. ``changed`` entries (added, removed or relabelled)
        make its calibration out of date: a raw-feature index of up to
        :data:`RECALIBRATE_MAX_ENTRIES` entries is recalibrated at once (leave-one-out costs
        ~0.1 s there); others count the changes until :meth:`recalibrated` is asked for."""
        fit = fit or self.fit
        if changed:
            fit = dataclasses.replace(fit, changes_since_calibration=fit.changes_since_calibration + changed)
        result = GalleryIndex(
            self._base, labels if labels is not None else self._labels, index_type=self.index_type,
            metric_type=self.metric_type, next_id=next_id if next_id is not None else self._next_id,
            feature_model=self.feature_model, fit=fit, raw=raw if raw is not None else self._raw,
            rows=rows or self.rows, delta=delta if delta is not None else self._delta,
            dead=dead if dead is not None else self._dead,
            relabelled=relabelled if relabelled is not None else self._relabelled,
        )  # fmt: skip
        if calibrate and changed and self.whitening is None and len(result) <= RECALIBRATE_MAX_ENTRIES:
            ids, vecs = result.vectors()
            fresh = calibrate_gallery(vecs, result.labels_of(ids), **result._calibration_inputs(ids))
            if fresh is not None and fit.calibration is not None and fit.calibration.chosen_by == "user":
                fresh = dataclasses.replace(fresh, threshold=fit.calibration.threshold, chosen_by="user")
            result.fit = dataclasses.replace(fit, calibration=fresh, changes_since_calibration=0)
        return result

    # --- search --------------------------------------------------------------------------
    def search(self, features: np.ndarray, topk: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries for each query row: ``(similarities, ids)``, both (N, k).

        Similarities are cosine similarities for both metrics (L2 distances between unit
        vectors are converted: cos = 1 - d²/2), so one threshold means the same thing
        whatever the metric (in the whitened space for whitened indices, where
        :attr:`suggested_rec_threshold` applies). Missing neighbours have id -1.
        """
        features = normalize(features)
        if features.shape[1] != self.dim:
            raise ShiTuError(
                f"query features have {features.shape[1]} dimensions but the index has {self.dim}: "
                "it was built with a different recognition model"
            )
        if self.whitening is not None:
            features = self.whitening.apply(features)
        k = max(1, min(int(topk), len(self)))
        with one_thread_if_small(len(features) * (len(self) + len(self._dead)) * self.dim):
            return self._search(features, k)

    def _search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._search_base(features, k)
        delta_ids, delta_vecs = self._delta
        if len(delta_ids):
            # searched by faiss as well: a numpy product here would start numpy's BLAS threads, which
            # then spin against faiss's OpenMP threads on the same cores (2.3x slower base search at 100k)
            kd = min(k, len(delta_ids))
            if self.metric_type == "IP":
                d_scores, rows = faiss.knn(features, delta_vecs, kd, metric=faiss.METRIC_INNER_PRODUCT)
            else:
                d_scores, rows = faiss.knn(features, delta_vecs, kd, metric=faiss.METRIC_L2)
                d_scores = 1.0 - d_scores / 2.0
            d_ids = np.where(rows >= 0, delta_ids[np.maximum(rows, 0)], -1)
            d_scores = np.where(rows >= 0, d_scores, -np.inf)
            scores = np.concatenate([scores, d_scores.astype(np.float32)], axis=1)
            ids = np.concatenate([ids, d_ids], axis=1)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.concatenate([scores, np.full((len(scores), pad), -np.inf, np.float32)], axis=1)
            ids = np.concatenate([ids, np.full((len(ids), pad), -1, np.int64)], axis=1)
        ids = np.where(np.isfinite(scores), ids, -1)
        return scores, ids

    def _search_base(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._base.search(features, k, self._live(), self._search_cache)

    def raw_similarity(self, features: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        """Cosine similarity in the model's own space of each query row with the entries
        ``ids`` of its row ((N, k); NaN for a missing id), for the calibration's floor
        (:func:`shitu.threshold.accepts`); ``None`` when the index keeps no unprojected features."""
        chunks = self._raw_sources() if self.whitening is not None else None
        if not chunks:
            return None
        if self._raw_lookup is None:  # per chunk: its ids sorted, once per index object
            self._raw_lookup = [(np.argsort(chunk_ids), chunk_ids, feats) for chunk_ids, feats in chunks]
        queries = normalize(features)
        out = np.full(ids.shape, np.nan, dtype=np.float32)
        for order, chunk_ids, feats in self._raw_lookup:
            if not len(chunk_ids):
                continue
            pos = np.clip(np.searchsorted(chunk_ids, ids, sorter=order), 0, len(chunk_ids) - 1)
            rows = order[pos]
            found = (chunk_ids[rows] == ids) & (ids >= 0)
            sims = np.einsum("nd,nkd->nk", queries, feats[rows].astype(np.float32))
            out = np.where(found, sims, out)
        return out


def merged_raw(raw: tuple | None, ids: np.ndarray) -> tuple | None:
    """The raw features of ``ids`` (in that order) as one chunk ``((ids, features),)``, from
    the chunks ``(base, added since)``; ``None`` if some id has none."""
    if not raw:
        return None
    all_ids = np.concatenate([i for i, _ in raw])
    order = np.argsort(all_ids, kind="stable")
    pos = np.searchsorted(all_ids[order], ids)
    if len(ids) and (pos.max() >= len(all_ids) or not np.array_equal(all_ids[order][pos], ids)):
        return None
    rows = order[pos]
    features = np.concatenate([f for _, f in raw]) if len(raw) > 1 else raw[0][1]
    return ((np.asarray(ids, dtype=np.int64).copy(), features[rows]),)


def raw_added(raw: tuple, ids: np.ndarray, features: np.ndarray) -> tuple:
    """Raw-feature chunks ``(base, added since)`` with ``ids`` appended to the second."""
    if len(raw) == 1:
        return (raw[0], (ids, features))
    return (raw[0], (np.concatenate([raw[1][0], ids]), np.concatenate([raw[1][1], features])))


def _empty_raw(index: GalleryIndex) -> RawChunks:
    return ((np.zeros(0, np.int64), np.zeros((0, index.dim), np.float16)),)


def _clean_labels(labels: Sequence[str]) -> list[str]:
    return [clean_label(label) for label in labels]


def _rows(ids: np.ndarray, sources, thumbnails) -> dict[int, tuple[str, bytes | None]]:
    return {
        int(id_): (str(sources[k]) if sources is not None else "", thumbnails[k] if thumbnails is not None else None)
        for k, id_ in enumerate(ids)
    }


def _fit(features, ids, labels, whiten: bool, adapt_mode: str, progress, *, views=None, feature_model=None,
         taught=(), plain=None):  # fmt: skip
    """The projection (if any), calibration, record of the decision and kept raw features.
    ``views``: ``(entry ids, raw features)`` of query-like views; ``taught``: entry ids of
    confirmed answers (both for the calibration, :mod:`shitu.calibrate`); ``plain``: the share of
    photos on a plain background (picks the calibration's prior)."""
    if whiten:
        unit_views = (views[0], views[1].astype(np.float32)) if views is not None else None
        inputs = {"ids": ids, "taught": taught, "feature_model": feature_model, "plain": plain}
        if len(features) < WHITEN_MIN_IMAGES:
            return None, calibrate_gallery(features, labels, views=unit_views, **inputs), None, None
        inputs["space"] = "whitened"  # no reference measured for it: the photos' own point
        whitening = Whitening.fit(features)
        note = Adaptation("off", True, "PCA whitening (whiten=True)", kind="pca-whitening")
        if unit_views is not None:
            unit_views = (unit_views[0], whitening.apply(unit_views[1]))
        return whitening, calibrate_gallery(whitening.apply(features), labels, views=unit_views, **inputs), note, None
    projection, calibration, adaptation = adapt(features, labels, mode=adapt_mode, progress=progress, ids=ids,
                                                views=views, taught=taught, feature_model=feature_model,
                                                plain=plain)  # fmt: skip
    raw = ((ids.copy(), features.astype(np.float16)),) if projection is not None else None
    return projection, calibration, adaptation, raw
