"""The gallery index: faiss vectors + id → label map + per-entry metadata, persisted atomically.

On disk it uses PaddleX's layout (``vector.index`` + ``id_map.yaml``; ``index_info.yaml``
is read too), so indices move freely between PaddleX and this project, plus
``shitu_meta.json`` with what PaddleX does not keep (source file, thumbnail, next id,
which feature model made the vectors).

Every mutation returns a *new* :class:`GalleryIndex` and leaves the original untouched:
a failed append or remove can never leave a half-changed index in memory.

Fixes relative to PaddleX 3.7.2's ``FaissBuilder``: remove works on HNSW32 (rebuilt from the
stored vectors), IVF is sized so tiny galleries work, L2 scores are turned into
similarities before thresholding, ids are never reused, and HNSW/IVF search parameters are
set so approximate search agrees with exact search.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import yaml

from shitu.adapt import ADAPT_MODES, Adaptation, Projection, adapt
from shitu.calibrate import Calibration, calibrate_gallery
from shitu.config import INDEX_TYPES, METRIC_TYPES
from shitu.errors import NotFound, ShiTuError
from shitu.fsutil import replace_dir

VECTOR_FILE = "vector.index"
ID_MAP_FILE = "id_map.yaml"
ALT_ID_MAP_FILE = "index_info.yaml"  # the name PaddleX's docs use
META_FILE = "shitu_meta.json"
WHITENING_FILE = "shitu_whitening.npz"
RAW_FILE = "shitu_raw.npz"  # the unprojected features of an adapted index, so it can be refitted
VERSION_FILE = "shitu_version.json"  # written by shitu.store (which version this is); a plain save drops it
OUR_FILES = (VECTOR_FILE, ID_MAP_FILE, META_FILE, WHITENING_FILE, RAW_FILE, VERSION_FILE)

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_CANDIDATES = (64, 128, 256, 512, 1024, 2048)  # faiss's default efSearch is 16
IVF_REGROW_FACTOR = 4  # retrain IVF once the index holds this many times its training set
WHITEN_MIN_IMAGES = 200  # fewer images cannot estimate the feature covariance
WHITEN_DIMS = 512
WHITEN_POWER = 0.5  # divide each principal direction by sqrt(its singular value)
RECALIBRATE_MAX_ENTRIES = 5000  # a change recalibrates a raw-feature index up to this size (~0.1 s; 20k: 1 s)
CALIBRATION_QUERIES = 512
TARGET_AGREEMENT = 0.995  # calibration target, with margin over the 0.99 promised on new queries


@dataclass
class Entry:
    """Metadata kept for each gallery vector."""

    id: int
    label: str
    source: str = ""
    thumbnail: bytes | None = None  # small JPEG


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


def ivf_nlist(n: int) -> int:
    """Number of IVF lists: ~4·sqrt(n), but at least 39 training points per list (faiss's
    k-means minimum) and at least one list — PaddleX uses n // 8, which is 0 below 8 images."""
    return max(1, min(65536, int(round(4 * math.sqrt(n))), n // 39))


def calibrate_search(index: faiss.Index, vectors: np.ndarray, metric_type: str) -> dict[str, int]:
    """Pick the smallest HNSW ``efSearch`` / IVF ``nprobe`` whose nearest neighbours agree with
    exact search for >= 99.5% of calibration queries made from the gallery's own vectors.

    Fixed values cannot do this: how hard a gallery is depends on its data. On the drink
    gallery (987 images, 25 lists) IVF needs nprobe 12 for 99% leave-one-out agreement, while
    faiss's default of 1 gives 66%. Calibrating costs a few hundred searches.

    Two kinds of query: each sampled vector itself, where the *second* result must be its
    true nearest other vector (leave-one-out, as a gallery image queried against the rest),
    and the midpoint of the vector and one of its ten nearest neighbours (like a new photo of
    a product that is already in the gallery), where the first result must be exact.
    """
    inner = _inner(index)
    n = len(vectors)
    if isinstance(inner, faiss.IndexFlat) or n < 3:
        return {}
    rng = np.random.default_rng(0)
    pick = rng.choice(n, size=min(CALIBRATION_QUERIES, n), replace=False)
    sample = vectors[pick]
    rows = np.arange(len(pick))

    def exact_scores(queries: np.ndarray) -> np.ndarray:
        """Higher is better for both metrics: inner product, or minus the squared L2 distance."""
        if metric_type == "IP":
            return queries @ vectors.T
        return -((queries**2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors**2).sum(1)[None, :])

    own = exact_scores(sample)
    own[rows, pick] = -np.inf
    loo_exact = own.max(axis=1)
    k = min(10, n - 1)
    near = np.argpartition(-own, kth=k - 1, axis=1)[:, :k]
    midpoints = sample + vectors[near[rows, rng.integers(0, k, size=len(pick))]]
    midpoints = (midpoints / np.maximum(np.linalg.norm(midpoints, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    mid_exact = exact_scores(midpoints).max(axis=1)

    if isinstance(inner, faiss.IndexHNSW):
        name, candidates = "efSearch", list(HNSW_EF_CANDIDATES)
    else:
        # nlist, nlist/√2, nlist/2, ... : steps fine enough not to overshoot by much
        name, candidates = "nprobe", sorted({max(1, round(inner.nlist / 2 ** (s / 2))) for s in range(15)})

    def agreement(queries: np.ndarray, exact: np.ndarray, rank: int) -> float:
        scores, _ = inner.search(queries, rank + 1)
        got = scores[:, rank] if metric_type == "IP" else -scores[:, rank]
        return float(np.mean(got >= exact - 1e-4 * np.maximum(1.0, np.abs(exact))))

    chosen = candidates[-1]
    for value in candidates:
        _apply(inner, {name: value})
        if min(agreement(sample, loo_exact, 1), agreement(midpoints, mid_exact, 0)) >= TARGET_AGREEMENT:
            chosen = value
            break
    _apply(inner, {name: chosen})
    return {name: int(chosen)}


def _apply(inner: faiss.Index, params: dict[str, int]) -> None:
    if "efSearch" in params and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params and isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(int(params["nprobe"]), inner.nlist)


def _normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ShiTuError(f"features must be a (N, D) matrix, got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _new_inner(dim: int, index_type: str, metric_type: str, n_train: int) -> faiss.Index:
    metric = faiss.METRIC_INNER_PRODUCT if metric_type == "IP" else faiss.METRIC_L2
    if index_type == "Flat":
        return faiss.IndexFlat(dim, metric)
    if index_type == "HNSW32":
        inner = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return inner
    return faiss.index_factory(dim, f"IVF{ivf_nlist(n_train)},Flat", metric)


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


class GalleryIndex:
    """A searchable gallery. Attribute names follow PaddleX's ``IndexData``.

    >>> idx = GalleryIndex.build(np.eye(3, dtype="float32"), ["a", "b", "c"], index_type="Flat")
    >>> idx.search(np.eye(3, dtype="float32")[:1], topk=1)[1].tolist()
    [[0]]
    """

    def __init__(
        self,
        index: faiss.Index,
        entries: dict[int, Entry],
        *,
        metric_type: str,
        index_type: str,
        next_id: int,
        feature_model: str | None = None,
        trained_size: int | None = None,
        search_params: dict[str, int] | None = None,
        calibrated_size: int | None = None,
        whitening: Projection | None = None,
        suggested_rec_threshold: float | None = None,
        calibration: Calibration | None = None,
        adaptation: Adaptation | None = None,
        raw: tuple[np.ndarray, np.ndarray] | None = None,
        changes_since_calibration: int = 0,
    ):
        self._index = index
        self.whitening = whitening  # the projection applied to features before they are stored
        self._suggested = suggested_rec_threshold  # pre-calibration indices kept only this
        self.calibration = calibration
        self.adaptation = adaptation
        self._raw = raw  # (ids, float16 unit features) when the projection can be refitted
        self.changes_since_calibration = changes_since_calibration
        self._entries = entries
        self._metric_type = metric_type
        self._index_type = index_type
        self._next_id = next_id
        self.feature_model = feature_model
        self.trained_size = trained_size or index.ntotal
        self.skipped: list = []  # gallery lines left out by the build that made this index
        if search_params is None:
            # new or foreign index: measure which search parameters keep it exact enough
            # (exact Flat indices have nothing to tune: skip copying their vectors out)
            approximate = len(entries) > 0 and not isinstance(_inner(index), faiss.IndexFlat)
            self.search_params = calibrate_search(index, self.vectors()[1], metric_type) if approximate else {}
            self.calibrated_size = index.ntotal
        else:
            self.search_params = dict(search_params)
            self.calibrated_size = calibrated_size or index.ntotal
            _apply(_inner(index), self.search_params)

    # --- PaddleX IndexData-compatible surface -------------------------------------
    @property
    def index(self) -> faiss.Index:
        return self._index

    @property
    def id_map(self) -> dict[int, str]:
        return {i: e.label for i, e in self._entries.items()}

    @property
    def metric_type(self) -> str:
        return self._metric_type

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def index_info(self) -> dict:
        return {"index_type": self.index_type, "metric_type": self.metric_type, "id_map": self.id_map}

    # --- introspection ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def dim(self) -> int:
        """Dimension of the features this index takes (before any whitening)."""
        return self.whitening.input_dim if self.whitening else self._index.d

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def entries(self) -> list[Entry]:
        return [self._entries[i] for i in sorted(self._entries)]

    def entry(self, id_: int) -> Entry:
        try:
            return self._entries[int(id_)]
        except KeyError as exc:
            raise NotFound(f"no entry with id {id_}") from exc

    def label_counts(self) -> Counter:
        return Counter(e.label for e in self._entries.values())

    @property
    def suggested_rec_threshold(self) -> float | None:
        """The index's own recognition threshold: its calibration's operating point."""
        return self.calibration.threshold if self.calibration is not None else self._suggested

    def summary(self) -> dict:
        return {
            "entries": len(self),
            "labels": len(self.label_counts()),
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
        }

    def calibration_summary(self) -> dict | None:
        """The operating point in use and what it promises (``None`` for an uncalibrated index)."""
        c = self.calibration
        if c is None:
            return None
        point = c.chosen
        return {
            "threshold": c.threshold,
            "chosen_by": c.chosen_by,
            "correct_accepted": point.correct_accepted,
            "wrong_accepted": point.wrong_accepted,
            "unknown_rejected": point.unknown_rejected,
            "top1": c.top1,
            "protocol": c.protocol,
            "known_queries": c.known,
            "unknown_queries": c.unknown,
            "changes_since": self.changes_since_calibration,
        }

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
        whiten: bool = False,
        adapt: str = "off",
        progress=None,
    ) -> "GalleryIndex":
        """``adapt`` (``auto``/``on``/``off``): fit a supervised projection to the gallery's labels
        (:mod:`shitu.adapt`; ``auto`` keeps it only where held-out recall says it helps).
        ``whiten``: unsupervised PCA whitening instead (needs >= 200 images; ignored below).
        Either way the index is calibrated (:mod:`shitu.calibrate`) when its labels allow."""
        if index_type not in INDEX_TYPES:
            raise ShiTuError(f"index_type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}")
        if metric_type not in METRIC_TYPES:
            raise ShiTuError(f"metric_type must be one of {', '.join(METRIC_TYPES)}, not {metric_type!r}")
        if adapt not in ADAPT_MODES:
            raise ShiTuError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {adapt!r}")
        features = _normalize(features)
        if len(features) != len(labels):
            raise ShiTuError(f"{len(features)} feature vectors but {len(labels)} labels")
        if len(features) == 0:
            raise ShiTuError("cannot build an index from an empty gallery")
        ids = np.arange(first_id, first_id + len(features), dtype=np.int64)
        entries = _make_entries(ids, labels, sources, thumbnails)
        clean_labels = [entries[int(i)].label for i in ids]
        projection, calibration, adaptation, raw = _fit(features, ids, clean_labels, whiten, adapt, progress)
        stored = projection.apply(features) if projection is not None else features
        index, inner = _faiss_index(stored, ids, index_type, metric_type)
        result = cls(
            index,
            entries,
            metric_type=metric_type,
            index_type=index_type,
            next_id=int(ids[-1]) + 1,
            feature_model=feature_model,
            trained_size=len(stored),
            whitening=projection,
            calibration=calibration,
            adaptation=adaptation,
            raw=raw,
        )
        result._keep = inner  # keep the inner index alive as long as the wrapper
        return result

    def recalibrated(self, adapt: str | None = None, *, progress=None) -> "GalleryIndex":
        """A copy refitted and recalibrated on the current entries. ``adapt``: ``auto``/``on``/
        ``off`` (default: the mode the index was built with). Needs the unprojected features,
        which every index has except PCA-whitened ones (those are only recalibrated)."""
        if adapt is not None and adapt not in ADAPT_MODES:
            raise ShiTuError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {adapt!r}")
        ids, stored = self.vectors()
        labels = [self._entries[int(i)].label for i in ids]
        if self.whitening is not None and self._raw is None:
            calibration = calibrate_gallery(stored, labels)
            return self._same_vectors(calibration=calibration, reset_changes=True)
        raw = self._raw_features(ids) if self.whitening is not None else stored
        mode = adapt or (self.adaptation.mode if self.adaptation is not None else "auto")
        projection, calibration, adaptation, kept_raw = _fit(raw, ids, labels, False, mode, progress)
        # same ids, sources and thumbnails; only vectors, projection and calibration are new
        if projection is None and self.whitening is None:  # raw before and after: the vectors stay
            result = self._same_vectors(reset_changes=True, adaptation=adaptation)
            result.calibration = calibration  # None too: a gallery too small now has no curve
            return result
        index, inner = _faiss_index(projection.apply(raw) if projection else raw, ids, self.index_type,
                                    self.metric_type)  # fmt: skip
        result = GalleryIndex(
            index, dict(self._entries), metric_type=self.metric_type, index_type=self.index_type,
            next_id=self._next_id, feature_model=self.feature_model, trained_size=len(ids),
            whitening=projection, calibration=calibration, adaptation=adaptation, raw=kept_raw,
        )  # fmt: skip
        result._keep = inner
        return result

    def with_threshold(self, threshold: float) -> "GalleryIndex":
        """A copy whose own recognition threshold is ``threshold`` (a point the user picked on
        the calibration curve; the curve itself is kept)."""
        threshold = float(threshold)
        if not -1.0 <= threshold <= 1.0:
            raise ShiTuError(f"a similarity threshold lies between -1 and 1, not {threshold}")
        if self.calibration is None:
            raise ShiTuError("this index has no calibration curve to pick a point on (it needs 3+ labels)")
        calibration = dataclasses.replace(self.calibration, threshold=round(threshold, 4), chosen_by="user")
        return self._same_vectors(calibration=calibration)

    def _same_vectors(self, **change) -> "GalleryIndex":
        """A sibling with other metadata (threshold, calibration) and the very same faiss index:
        no copy of the vectors (2 GB at 1M x 512-d). Safe because no index is ever changed in
        place: every mutation works on a clone."""
        result = self._derive(self._index, dict(self._entries), next_id=self._next_id, **change)
        result._keep = getattr(self, "_keep", None)  # the inner index must outlive both wrappers
        return result

    def _raw_features(self, ids: np.ndarray) -> np.ndarray:
        raw_ids, raw = self._raw
        where = dict(zip(raw_ids.tolist(), range(len(raw_ids)), strict=True))
        return raw[[where[int(i)] for i in ids]].astype(np.float32)

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        *,
        sources: Sequence[str] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
    ) -> "GalleryIndex":
        """A new index with these vectors appended; ids continue from :attr:`next_id`."""
        features = _normalize(features)
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
        raw = None
        if self._raw is not None:
            raw = (np.concatenate([self._raw[0], ids]), np.concatenate([self._raw[1], features.astype(np.float16)]))
        if self.whitening is not None:
            features = self.whitening.apply(features)
        new_entries = dict(self._entries)
        new_entries.update(_make_entries(ids, labels, sources, thumbnails))
        total = len(new_entries)
        if (
            self.index_type == "IVF"
            and total >= IVF_REGROW_FACTOR * self.trained_size
            and ivf_nlist(total) > _inner(self._index).nlist
        ):
            old_ids, old_vecs = self.vectors()
            return self._rebuilt(
                np.concatenate([old_ids, ids]), np.concatenate([old_vecs, features]), new_entries,
                next_id=int(ids[-1]) + 1, raw=raw, changed=len(ids),
            )  # fmt: skip
        index = faiss.clone_index(self._index)
        index.add_with_ids(features, ids)
        # a gallery that has doubled since the last calibration may need wider search
        recalibrate = total >= 2 * self.calibrated_size
        return self._derive(
            index, new_entries, next_id=int(ids[-1]) + 1, recalibrate=recalibrate, raw=raw, changed=len(ids)
        )

    def remove(self, ids: Iterable[int]) -> "GalleryIndex":
        """A new index without these ids. Unknown ids raise :class:`NotFound`, changing nothing."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            raise ShiTuError("no ids to remove were given")
        missing = [i for i in wanted if i not in self._entries]
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise NotFound(f"{len(missing)} id(s) are not in the index: {shown}")
        if len(wanted) == len(self._entries):
            raise ShiTuError("cannot remove every entry: an index needs at least one; delete the index instead")
        new_entries = {i: e for i, e in self._entries.items() if i not in set(wanted)}
        raw = None
        if self._raw is not None:
            kept = ~np.isin(self._raw[0], wanted)
            raw = (self._raw[0][kept], self._raw[1][kept])
        if not isinstance(_inner(self._index), faiss.IndexFlat):
            # HNSW graphs cannot drop nodes, and IVF's remove reorders its lists behind the
            # id map's back (PaddleX's IndexIDMap2 + IVF returns wrong ids after a remove):
            # rebuild from the remaining vectors instead.
            all_ids, vecs = self.vectors()
            keep = ~np.isin(all_ids, wanted)
            return self._rebuilt(
                all_ids[keep], vecs[keep], new_entries, next_id=self._next_id, raw=raw, changed=len(wanted)
            )
        index = faiss.clone_index(self._index)
        removed = index.remove_ids(np.asarray(wanted, dtype=np.int64))
        if removed != len(wanted):
            raise ShiTuError(f"faiss removed {removed} of {len(wanted)} vectors; the index is unchanged")
        return self._derive(index, new_entries, next_id=self._next_id, raw=raw, changed=len(wanted))

    def relabel(self, ids: int | Sequence[int], label: str) -> "GalleryIndex":
        """A copy with entries ``ids`` (one or many) under ``label``; vectors and ids unchanged.
        One copy of the faiss index however many ids change."""
        label = label.strip()
        if not label:
            raise ShiTuError("a label cannot be empty")
        entries = dict(self._entries)
        changed = 0
        for id_ in [ids] if isinstance(ids, (int, np.integer)) else ids:
            entry = self.entry(int(id_))
            changed += entry.label != label
            entries[entry.id] = Entry(entry.id, label, entry.source, entry.thumbnail)
        return self._derive(faiss.clone_index(self._index), entries, next_id=self._next_id, changed=changed)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)`` in storage order."""
        index = faiss.clone_index(self._index)
        inner = _inner(index)
        if isinstance(inner, faiss.IndexIVF):
            inner.make_direct_map()
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vecs = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), "float32")
        return ids, np.asarray(vecs, dtype=np.float32)

    def _rebuilt(
        self, ids: np.ndarray, vecs: np.ndarray, entries: dict[int, Entry], *, next_id: int, **change
    ) -> "GalleryIndex":
        index, inner = _faiss_index(vecs, ids, self.index_type, self.metric_type)
        result = self._derive(index, entries, next_id=next_id, trained_size=len(vecs), recalibrate=True, **change)
        result._keep = inner
        return result

    def _derive(
        self,
        index: faiss.Index,
        entries: dict[int, Entry],
        *,
        next_id: int,
        trained_size: int | None = None,
        recalibrate: bool = False,
        raw: tuple[np.ndarray, np.ndarray] | None = None,
        calibration: Calibration | None = None,
        adaptation: Adaptation | None = None,
        changed: int = 0,
        reset_changes: bool = False,
    ) -> "GalleryIndex":
        """A sibling index. ``changed`` entries (added, removed or relabelled) make its
        calibration out of date: a raw-feature index of up to :data:`RECALIBRATE_MAX_ENTRIES`
        entries is recalibrated at once (leave-one-out costs ~0.1 s there); others count the
        changes until :meth:`recalibrated` is asked for."""
        result = GalleryIndex(
            index,
            entries,
            metric_type=self.metric_type,
            index_type=self.index_type,
            next_id=next_id,
            feature_model=self.feature_model,
            trained_size=trained_size or self.trained_size,
            search_params=None if recalibrate else self.search_params,
            calibrated_size=self.calibrated_size,
            whitening=self.whitening,
            suggested_rec_threshold=self._suggested,
            calibration=calibration or self.calibration,
            adaptation=adaptation or self.adaptation,
            raw=raw if raw is not None else self._raw,
            changes_since_calibration=0 if reset_changes else self.changes_since_calibration + changed,
        )
        if changed and self.whitening is None and len(entries) <= RECALIBRATE_MAX_ENTRIES:
            ids, vecs = result.vectors()
            fresh = calibrate_gallery(vecs, [entries[int(i)].label for i in ids])
            if fresh is not None and result.calibration is not None and result.calibration.chosen_by == "user":
                fresh = dataclasses.replace(fresh, threshold=result.calibration.threshold, chosen_by="user")
            result.calibration = fresh
            result.changes_since_calibration = 0
        return result

    # --- search --------------------------------------------------------------------------
    def search(self, features: np.ndarray, topk: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries for each query row: ``(similarities, ids)``, both (N, k).

        Similarities are cosine similarities for both metrics (L2 distances between unit
        vectors are converted: cos = 1 - d²/2), so one threshold means the same thing
        whatever the metric (in the whitened space for whitened indices, where
        :attr:`suggested_rec_threshold` applies). Missing neighbours have id -1.
        """
        features = _normalize(features)
        if features.shape[1] != self.dim:
            raise ShiTuError(
                f"query features have {features.shape[1]} dimensions but the index has {self.dim}: "
                "it was built with a different recognition model"
            )
        if self.whitening is not None:
            features = self.whitening.apply(features)
        k = max(1, min(int(topk), len(self)))
        scores, ids = self._index.search(features, k)
        if self.metric_type == "L2":
            scores = 1.0 - scores / 2.0
        return scores, ids

    # --- persistence ---------------------------------------------------------------------
    def save(self, save_dir: str | Path) -> Path:
        """Write atomically: a complete copy in a temporary dir, then a rename."""
        save_dir = Path(save_dir)
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_dir.parent / f".{save_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            faiss.write_index(self._index, str(tmp / VECTOR_FILE))
            info = {"index_type": self.index_type, "metric_type": self.metric_type, "id_map": self.id_map}
            (tmp / ID_MAP_FILE).write_text(
                yaml.safe_dump(info, allow_unicode=True, default_flow_style=False), encoding="utf-8"
            )
            meta = {
                "format": 1,
                "next_id": self._next_id,
                "feature_model": self.feature_model,
                "trained_size": self.trained_size,
                "search_params": self.search_params,
                "calibrated_size": self.calibrated_size,
                "suggested_rec_threshold": self.suggested_rec_threshold,
                "calibration": self.calibration.to_dict() if self.calibration is not None else None,
                "adaptation": self.adaptation.to_dict() if self.adaptation is not None else None,
                "changes_since_calibration": self.changes_since_calibration,
                "entries": {
                    str(e.id): {
                        "source": e.source,
                        "thumbnail": base64.b64encode(e.thumbnail).decode() if e.thumbnail else None,
                    }
                    for e in self._entries.values()
                },
            }
            (tmp / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            if self.whitening is not None:
                with open(tmp / WHITENING_FILE, "wb") as fh:
                    np.savez(fh, mean=self.whitening.mean, projection=self.whitening.matrix, kind=self.whitening.kind)
            if self._raw is not None:
                with open(tmp / RAW_FILE, "wb") as fh:
                    np.savez(fh, ids=self._raw[0], features=self._raw[1])
            replace_index_dir(tmp, save_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return save_dir

    @classmethod
    def load(cls, index_dir: str | Path) -> "GalleryIndex":
        """Load ours or PaddleX's (``IndexData.save``) layout."""
        index_dir = Path(index_dir)
        vector_path = index_dir / VECTOR_FILE
        info_path = next((index_dir / n for n in (ID_MAP_FILE, ALT_ID_MAP_FILE) if (index_dir / n).exists()), None)
        if not vector_path.exists() or info_path is None:
            raise NotFound(f"{index_dir} is not an index directory (needs {VECTOR_FILE} and {ID_MAP_FILE})")
        try:
            info = yaml.safe_load(info_path.read_text(encoding="utf-8")) or {}
            index = faiss.read_index(str(vector_path))
        except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError, yaml its own
            # faiss's message quotes its C++ source and our paths: keep only what it is
            raise ShiTuError(
                f"{vector_path.name if 'index' in str(exc).lower() else info_path.name} "
                f"cannot be read ({type(exc).__name__})"
            ) from None
        metric_type = info.get("metric_type")
        index_type = info.get("index_type")
        if metric_type not in METRIC_TYPES:
            raise ShiTuError(f"{index_dir}: metric {metric_type!r} is not supported (only IP and L2)")
        if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            raise ShiTuError(f"{index_dir}: expected an id-mapped faiss index, got {type(index).__name__}")
        id_map = {int(k): str(v) for k, v in (info.get("id_map") or {}).items()}
        if index.ntotal != len(id_map):
            raise ShiTuError(f"{index_dir}: {index.ntotal} vectors but {len(id_map)} labels in {info_path.name}")
        meta_path = index_dir / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
            if not isinstance(meta, dict) or not isinstance(meta.get("entries", {}), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ShiTuError(f"{META_FILE} is damaged ({type(exc).__name__})") from None
        saved = meta.get("entries", {})
        entries = {}
        for i, label in id_map.items():
            m = saved.get(str(i), {})
            thumb = m.get("thumbnail")
            entries[i] = Entry(i, label, m.get("source", ""), base64.b64decode(thumb) if thumb else None)
        next_id = max(int(meta.get("next_id", 0)), max(id_map, default=-1) + 1)
        whitening = raw = None
        try:
            if (index_dir / WHITENING_FILE).exists():
                with np.load(index_dir / WHITENING_FILE) as w:
                    kind = str(w["kind"]) if "kind" in w.files else "pca-whitening"
                    whitening = (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)
            if whitening is not None and (index_dir / RAW_FILE).exists():
                with np.load(index_dir / RAW_FILE) as r:
                    raw = (r["ids"].astype(np.int64), r["features"])
                if len(raw[0]) != index.ntotal or raw[1].shape[1] != whitening.input_dim:
                    raw = None  # out of step with the vectors: the index works, it just cannot be refitted
        except (OSError, ValueError, KeyError) as exc:
            raise ShiTuError(f"{WHITENING_FILE} or {RAW_FILE} is damaged ({type(exc).__name__})") from None
        return cls(
            index,
            entries,
            metric_type=metric_type,
            index_type=index_type if index_type in INDEX_TYPES else "Flat",
            next_id=next_id,
            feature_model=meta.get("feature_model"),
            trained_size=meta.get("trained_size"),
            search_params=meta.get("search_params"),
            calibrated_size=meta.get("calibrated_size"),
            whitening=whitening,
            suggested_rec_threshold=meta.get("suggested_rec_threshold"),
            calibration=Calibration.from_dict(meta.get("calibration")),
            adaptation=Adaptation.from_dict(meta.get("adaptation")),
            raw=raw,
            changes_since_calibration=int(meta.get("changes_since_calibration") or 0),
        )


def _faiss_index(vectors: np.ndarray, ids: np.ndarray, index_type: str, metric_type: str):
    """``(IndexIDMap2, its inner index)`` holding ``vectors`` under ``ids`` (the inner index must
    be kept alive beside the wrapper)."""
    inner = _new_inner(vectors.shape[1], index_type, metric_type, len(vectors))
    if not inner.is_trained:
        inner.train(vectors)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    return index, inner


def _fit(features, ids, labels, whiten: bool, adapt_mode: str, progress):
    """The projection (if any), calibration, record of the decision and kept raw features."""
    if whiten:
        if len(features) < WHITEN_MIN_IMAGES:
            return None, calibrate_gallery(features, labels), None, None
        whitening = Whitening.fit(features)
        note = Adaptation("off", True, "PCA whitening (whiten=True)", kind="pca-whitening")
        return whitening, calibrate_gallery(whitening.apply(features), labels), note, None
    projection, calibration, adaptation = adapt(features, labels, mode=adapt_mode, progress=progress)
    raw = (ids.copy(), features.astype(np.float16)) if projection is not None else None
    return projection, calibration, adaptation, raw


def _make_entries(ids: np.ndarray, labels: Sequence[str], sources, thumbnails) -> dict[int, Entry]:
    entries = {}
    for k, id_ in enumerate(ids):
        label = str(labels[k]).strip()
        if not label:
            raise ShiTuError("a gallery label cannot be empty")
        entries[int(id_)] = Entry(
            int(id_),
            label,
            sources[k] if sources is not None else "",
            thumbnails[k] if thumbnails is not None else None,
        )
    return entries


def replace_index_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``'s place, keeping files in ``target`` that are not ours."""
    if target.exists():
        for f in target.iterdir():
            if f.name not in OUR_FILES and not (new / f.name).exists():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)
    replace_dir(new, target)
