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
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import yaml

from shitu import changelog
from shitu.adapt import ADAPT_MODES, Adaptation, Projection, adapt
from shitu.calibrate import Calibration, calibrate_gallery
from shitu.changelog import LOG_FILE
from shitu.config import INDEX_TYPES, METRIC_TYPES
from shitu.entrymeta import ENTRIES_FILE, EntryMeta
from shitu.errors import NotFound, ShiTuError
from shitu.fsutil import replace_dir

log = logging.getLogger(__name__)

VECTOR_FILE = "vector.index"
ID_MAP_FILE = "id_map.yaml"
ALT_ID_MAP_FILE = "index_info.yaml"  # the name PaddleX's docs use
META_FILE = "shitu_meta.json"
WHITENING_FILE = "shitu_whitening.npz"
LABELS_FILE = "shitu_labels.npz"  # the id map as arrays, checked against id_map.yaml's hash
RAW_FILE = "shitu_raw.npz"  # the unprojected features of an adapted index, so it can be refitted
VIEWS_FILE = "shitu_views.npz"  # query-like views of the photos (raw features), so it can be recalibrated
VERSION_FILE = "shitu_version.json"  # written by shitu.store (which version this is); a plain save drops it
# what makes up an index dir (a full save writes all but the log; the version file is the store's)
OUR_FILES = (VECTOR_FILE, ID_MAP_FILE, META_FILE, WHITENING_FILE, RAW_FILE, VERSION_FILE, ENTRIES_FILE, LOG_FILE,
             LABELS_FILE, VIEWS_FILE)  # fmt: skip
EXPORTED_FILES = (VECTOR_FILE, ID_MAP_FILE, LABELS_FILE, META_FILE, WHITENING_FILE, RAW_FILE, ENTRIES_FILE,
                  VIEWS_FILE)  # fmt: skip
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_LINEAGE = 16  # changes remembered between two commits (more: the next commit is a full save)

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# faiss's default efSearch is 16. Past 8192 a search visits as many vectors as an exact scan of a
# 1M gallery and takes longer (1M clustered 512-d vectors: efSearch 8192 agrees 96.8% in 125 ms,
# 16384 agrees 99.2% in 249 ms on one core, where the exact search takes ~180 ms)
HNSW_EF_CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
IVF_TRAIN_POINTS_PER_LIST = 64
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


def calibrate_search(index: faiss.Index, vectors: np.ndarray, metric_type: str) -> dict[str, float]:
    """Pick the smallest HNSW ``efSearch`` / IVF ``nprobe`` whose nearest neighbours agree with
    exact search for >= 99.5% of calibration queries made from the gallery's own vectors.

    Fixed values cannot do this: how hard a gallery is depends on its data. On the drink
    gallery (987 images, 25 lists) IVF needs nprobe 12 for 99% leave-one-out agreement, while
    faiss's default of 1 gives 66%. Calibrating costs a few hundred searches.

    Two kinds of query: each sampled vector itself, where the *second* result must be its
    true nearest other vector (leave-one-out, as a gallery image queried against the rest),
    and the midpoint of the vector and one of its ten nearest neighbours (like a new photo of
    a product that is already in the gallery), where the first result must be exact.

    The result also holds ``agreement``, the lower of the two rates at the chosen value. IVF
    always gets there (nprobe = nlist is exact); an HNSW graph may not even at the largest
    efSearch tried, and then the index says so (:attr:`GalleryIndex.search_shortfall`).
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

    chosen, reached = candidates[-1], 0.0
    for value in candidates:
        _apply(inner, {name: value})
        reached = min(agreement(sample, loo_exact, 1), agreement(midpoints, mid_exact, 0))
        if reached >= TARGET_AGREEMENT:
            chosen = value
            break
    _apply(inner, {name: chosen})
    return {name: int(chosen), "agreement": round(reached, 4)}


def _apply(inner: faiss.Index, params: dict[str, float]) -> None:
    if "efSearch" in params and isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = int(params["efSearch"])
    if "nprobe" in params and isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(int(params["nprobe"]), inner.nlist)


SMALL_SEARCH = 50_000_000  # multiply-adds (~5 ms on one core) below which one faiss thread is faster


@contextlib.contextmanager
def one_thread_if_small(work: int) -> Iterator[None]:
    """Run faiss on this thread alone for a search of ``work`` multiply-adds under SMALL_SEARCH.

    A query's few crops against a gallery of thousands take ~0.5 ms on one thread; handing them
    to faiss's OpenMP team costs more than that in wake-ups, and 2-15 ms while the models' own
    threads (another OpenMP runtime) hold the cores. OpenMP keeps the thread count per calling
    thread, so this changes nothing for other threads, and it is restored afterwards."""
    if work >= SMALL_SEARCH:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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
    inner = faiss.index_factory(dim, f"IVF{ivf_nlist(n_train)},Flat", metric)
    # k-means on at most 64 points a list (faiss's default, 256, makes training a 1M gallery take ~4x longer)
    faiss.extract_index_ivf(inner).cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    return inner


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


class _Labels:
    """Every entry's id and label as arrays (immutable): ``ids`` sorted, ``codes`` indexing
    ``names``. ~12 bytes an entry, where a dict of objects took ~250; a change makes a new
    table with one array copy (a few ms at 1M entries)."""

    __slots__ = ("ids", "codes", "names", "code_of")

    def __init__(self, ids: np.ndarray, codes: np.ndarray, names: list[str], code_of: dict[str, int]):
        self.ids, self.codes, self.names, self.code_of = ids, codes, names, code_of

    @classmethod
    def of(cls, ids: Sequence[int] | np.ndarray, labels: Sequence[str]) -> "_Labels":
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        code_of: dict[str, int] = {}
        codes = np.fromiter((code_of.setdefault(str(lb), len(code_of)) for lb in labels), np.int32, len(ids))
        names = list(code_of)
        return cls(ids[order], codes[order], names, code_of)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, id_: int) -> bool:
        pos = int(np.searchsorted(self.ids, id_))
        return pos < len(self.ids) and int(self.ids[pos]) == int(id_)

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Where ``ids`` sit (``-1`` for ids not here)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == ids[found]
        return np.where(found, pos, -1)

    def get(self, id_: int) -> str | None:
        pos = self.positions([id_])[0]
        return self.names[self.codes[pos]] if pos >= 0 else None

    def labels_of(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        return [self.names[self.codes[p]] if p >= 0 else None for p in self.positions(ids)]

    def _codes_for(self, labels: Sequence[str]) -> tuple[np.ndarray, list[str], dict[str, int]]:
        names, code_of = self.names, self.code_of
        if any(lb not in code_of for lb in labels):
            names, code_of = list(names), dict(code_of)
            for lb in labels:
                if lb not in code_of:
                    code_of[lb] = len(names)
                    names.append(lb)
        return np.asarray([code_of[lb] for lb in labels], dtype=np.int32), names, code_of

    def added(self, ids: np.ndarray, labels: Sequence[str]) -> "_Labels":
        """With new ids (all above the current ones: ids only grow)."""
        codes, names, code_of = self._codes_for(list(labels))
        return _Labels(np.concatenate([self.ids, ids]), np.concatenate([self.codes, codes]), names, code_of)

    def removed(self, ids: Sequence[int]) -> "_Labels":
        pos = self.positions(ids)
        return _Labels(np.delete(self.ids, pos), np.delete(self.codes, pos), self.names, self.code_of)

    def relabelled(self, ids: Sequence[int], label: str) -> "_Labels":
        codes, names, code_of = self._codes_for([label])
        new = self.codes.copy()
        new[self.positions(ids)] = codes[0]
        return _Labels(self.ids, new, names, code_of)

    def counts(self) -> Counter:
        counts = np.bincount(self.codes, minlength=len(self.names))
        return Counter({self.names[c]: int(n) for c, n in enumerate(counts.tolist()) if n})

    def distinct(self) -> int:
        """How many labels have an entry (O(entries) in numpy: no per-label objects)."""
        return int(np.count_nonzero(np.bincount(self.codes, minlength=len(self.names))))

    def to_dict(self) -> dict[int, str]:
        names = self.names
        return dict(zip(self.ids.tolist(), [names[c] for c in self.codes.tolist()], strict=True))


class GalleryIndex:
    """A searchable gallery. Attribute names follow PaddleX's ``IndexData``.

    Inside, an index is a *base* faiss index (what the last full save wrote) plus the changes
    since: vectors added (searched exactly, beside the base), base ids removed (skipped by a
    faiss ID selector) and relabels (in the label table). A change copies only those, so it
    costs O(change), never a copy of a million vectors; :meth:`compacted` folds them into a
    new base, which is what :meth:`save` writes in PaddleX's layout.

    >>> idx = GalleryIndex.build(np.eye(3, dtype="float32"), ["a", "b", "c"], index_type="Flat")
    >>> idx.search(np.eye(3, dtype="float32")[:1], topk=1)[1].tolist()
    [[0]]
    """

    def __init__(
        self,
        index: faiss.Index,
        labels: "_Labels",
        *,
        metric_type: str,
        index_type: str,
        next_id: int,
        feature_model: str | None = None,
        trained_size: int | None = None,
        search_params: dict[str, float] | None = None,
        calibrated_size: int | None = None,
        whitening: Projection | None = None,
        suggested_rec_threshold: float | None = None,
        calibration: Calibration | None = None,
        adaptation: Adaptation | None = None,
        raw: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None,
        changes_since_calibration: int = 0,
        meta: EntryMeta | None = None,
        views: tuple[np.ndarray, np.ndarray] | None = None,
        delta: tuple[np.ndarray, np.ndarray] | None = None,
        dead: np.ndarray | None = None,
        keep: faiss.Index | None = None,
    ):
        self._index = index
        self._keep = keep  # the inner index must live as long as the wrapper
        self._labels = labels
        self._delta = delta if delta is not None else (np.zeros(0, np.int64), np.zeros((0, index.d), np.float32))
        self._dead = dead if dead is not None else np.zeros(0, np.int64)  # base ids removed since, sorted
        self._meta = meta or EntryMeta()
        self.whitening = whitening  # the projection applied to features before they are stored
        self._suggested = suggested_rec_threshold  # pre-calibration indices kept only this
        self.calibration = calibration
        self.adaptation = adaptation
        self._raw = raw  # chunks of (ids, float16 unit features) when the projection can be refitted
        self._views = views  # (entry id of the photo, float16 raw unit features) of its query-like views
        self._raw_lookup: list | None = None  # raw_similarity's sorted ids, made on first use
        self.changes_since_calibration = changes_since_calibration
        self._metric_type = metric_type
        self._index_type = index_type
        self._next_id = next_id
        self.feature_model = feature_model
        self.trained_size = trained_size or index.ntotal
        self.skipped: list = []  # gallery lines left out by the build that made this index
        self._parent: GalleryIndex | None = None  # the index this one was derived from by _change
        self._change: dict[str, Any] | None = None
        self._search_with: Any = None  # cached faiss search parameters skipping removed ids
        if search_params is None:
            # new or foreign index: measure which search parameters keep it exact enough
            # (exact Flat indices have nothing to tune: skip copying their vectors out)
            approximate = index.ntotal > 0 and not isinstance(_inner(index), faiss.IndexFlat)
            self.search_params = calibrate_search(index, _base_vectors(index)[1], metric_type) if approximate else {}
            self.calibrated_size = index.ntotal
            if self.search_shortfall:
                log.warning("%s", self.search_shortfall)
        else:
            self.search_params = dict(search_params)
            self.calibrated_size = calibrated_size or index.ntotal
            _apply(_inner(index), self.search_params)

    # --- PaddleX IndexData-compatible surface -------------------------------------
    @property
    def index(self) -> faiss.Index:
        """The faiss index holding every current vector (folded into one, if there are changes)."""
        return self.compacted()._index

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

    # --- introspection ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, (int, np.integer)) and int(id_) in self._labels

    @property
    def dim(self) -> int:
        """Dimension of the features this index takes (before any whitening)."""
        return self.whitening.input_dim if self.whitening else self._index.d

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
        rows = self._meta.get(ids, thumbnails=thumbnails)
        codes = table.codes[pos].tolist()
        return len(where), [Entry(i, table.names[c], *rows.get(i, ("", None))) for i, c in zip(ids, codes, strict=True)]

    def entry(self, id_: int) -> Entry:
        label = self.label(id_)
        source, thumbnail = self._meta.get([int(id_)]).get(int(id_), ("", None))
        return Entry(int(id_), label, source, thumbnail)

    def one_per_label(self) -> np.ndarray:
        """The lowest id of each label, ascending."""
        _, first = np.unique(self._labels.codes, return_index=True)
        return np.sort(self._labels.ids[first])

    def sources(self, ids: Iterable[int], *, thumbnails: bool = False) -> dict[int, tuple[str, bytes | None]]:
        """``id → (source, thumbnail)`` for the ids that have them, in one read (thumbnails
        ``None`` unless asked for)."""
        return self._meta.get(ids, thumbnails=thumbnails)

    def thumbnails(self, ids: Iterable[int]) -> dict[int, bytes]:
        """``id → thumbnail JPEG`` for the ids that have one."""
        return {i: t for i, (_, t) in self._meta.get(ids).items() if t}

    def label_counts(self) -> Counter:
        return self._labels.counts()

    @property
    def label_count(self) -> int:
        """How many distinct labels the entries have."""
        return self._labels.distinct()

    @property
    def suggested_rec_threshold(self) -> float | None:
        """The index's own recognition threshold: its calibration's operating point."""
        return self.calibration.threshold if self.calibration is not None else self._suggested

    @property
    def pending_changes(self) -> int:
        """Vectors added and removed since the base was written (what compaction folds in)."""
        return len(self._delta[0]) + len(self._dead)

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
        """Why this approximate index cannot be trusted to find the nearest entry, or ``None``:
        its calibration found no search parameter (up to efSearch 8192) at which it agrees with
        exact search for 99.5% of calibration queries. Vectors with little structure (high
        intrinsic dimension) defeat a graph index; IVF and Flat do not have this limit."""
        reached = self.search_params.get("agreement")
        if reached is None or reached >= TARGET_AGREEMENT:
            return None
        setting = ", ".join(f"{k} {int(v)}" for k, v in self.search_params.items() if k != "agreement")
        return (
            f"this {self.index_type} index finds the exact nearest entry for only {reached:.1%} of calibration "
            f"queries, even at {setting}: rebuild it as IVF or Flat for answers that match exact search"
        )

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
            # how sure: "threshold 0.72 ± 0.04 from 18 photos, 72 query-like views, 3 confirmed answers"
            "uncertainty": c.uncertainty,
            "confirmed_answers": len(c.taught),
            "evidence": c.evidence,
            "text": c.describe(),
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
        ids: Sequence[int] | None = None,
        whiten: bool = False,
        adapt: str = "off",
        progress=None,
        views: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> "GalleryIndex":
        """``adapt`` (``auto``/``on``/``off``): fit a supervised projection to the gallery's labels
        (:mod:`shitu.adapt`; ``auto`` keeps it only where held-out recall says it helps).
        ``whiten``: unsupervised PCA whitening instead (needs >= 200 images; ignored below).
        Either way the index is calibrated (:mod:`shitu.calibrate`) when its labels allow.
        Ids run from ``first_id`` on, unless ``ids`` gives each entry's (distinct, >= 0).
        ``views``: ``(row of the photo each was made from, raw features)`` of the photos'
        query-like views (:meth:`shitu.engine.Engine.embed_gallery`), kept for the calibration."""
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
        if ids is None:
            ids = np.arange(first_id, first_id + len(features), dtype=np.int64)
        else:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if len(ids) != len(features) or len(np.unique(ids)) != len(ids) or (ids < 0).any():
                raise ShiTuError(f"ids must be {len(features)} distinct whole numbers of at least 0, one per vector")
        clean_labels = _clean_labels(labels)
        if views is not None and len(views[0]):
            views = (ids[np.asarray(views[0], dtype=np.int64)], _normalize(views[1]).astype(np.float16))
        else:
            views = None
        projection, calibration, adaptation, raw = _fit(features, ids, clean_labels, whiten, adapt, progress,
                                                        views=views, feature_model=feature_model)  # fmt: skip
        stored = projection.apply(features) if projection is not None else features
        index, inner = _faiss_index(stored, ids, index_type, metric_type)
        return cls(
            index,
            _Labels.of(ids, clean_labels),
            metric_type=metric_type,
            index_type=index_type,
            next_id=int(ids.max()) + 1,
            feature_model=feature_model,
            trained_size=len(stored),
            whitening=projection,
            calibration=calibration,
            adaptation=adaptation,
            raw=raw,
            meta=EntryMeta(pending=_rows(ids, sources, thumbnails)),
            keep=inner,
            views=views,
        )

    def recalibrated(self, adapt: str | None = None, *, progress=None) -> "GalleryIndex":
        """A copy refitted and recalibrated on the current entries. ``adapt``: ``auto``/``on``/
        ``off`` (default: the mode the index was built with). Needs the unprojected features,
        which every index has except PCA-whitened ones (those are only recalibrated)."""
        if adapt is not None and adapt not in ADAPT_MODES:
            raise ShiTuError(f"adapt must be one of {', '.join(ADAPT_MODES)}, not {adapt!r}")
        ids, stored = self.vectors()
        labels = self.labels_of(ids)
        if self.whitening is not None and self._raw is None:
            calibration = calibrate_gallery(stored, labels, **self._calibration_inputs(ids, self.whitening))
            return self._same_vectors(calibration=calibration, reset_changes=True)
        raw = self._raw_features(ids) if self.whitening is not None else stored
        mode = adapt or (self.adaptation.mode if self.adaptation is not None else "auto")
        projection, calibration, adaptation, kept_raw = _fit(
            raw, ids, labels, False, mode, progress, views=self._views, feature_model=self.feature_model,
            taught=self.calibration.taught if self.calibration is not None else (),
        )  # fmt: skip
        # same ids, sources and thumbnails; only vectors, projection and calibration are new
        if projection is None and self.whitening is None:  # raw before and after: the vectors stay
            result = self._same_vectors(reset_changes=True, adaptation=adaptation)
            result.calibration = calibration  # None too: a gallery too small now has no curve
            return result
        index, inner = _faiss_index(projection.apply(raw) if projection else raw, ids, self.index_type,
                                    self.metric_type)  # fmt: skip
        return GalleryIndex(
            index, self._labels, metric_type=self.metric_type, index_type=self.index_type,
            next_id=self._next_id, feature_model=self.feature_model, trained_size=len(ids),
            whitening=projection, calibration=calibration, adaptation=adaptation, raw=kept_raw,
            meta=self._meta, keep=inner, views=self._views,
        )  # fmt: skip

    def _calibration_inputs(self, ids: np.ndarray, projection: Projection | None = None) -> dict[str, Any]:
        """What :func:`~shitu.calibrate.calibrate_gallery` needs besides the vectors: entry ids,
        the views (in the vectors' space), the confirmed answers so far and the feature model."""
        views = None
        if self._views is not None:
            src, feats = self._views
            feats = feats.astype(np.float32)
            views = (src, projection.apply(feats) if projection is not None else feats)
        taught = self.calibration.taught if self.calibration is not None else []
        space = "raw" if projection is None else "whitened"  # PCA-whitened: no reference measured for it
        return {"ids": ids, "views": views, "taught": taught, "feature_model": self.feature_model, "space": space}

    def with_threshold(self, threshold: float) -> "GalleryIndex":
        """A copy whose own recognition threshold is ``threshold`` (a point the user picked on
        the calibration curve; the curve itself is kept)."""
        threshold = float(threshold)
        if not -1.0 <= threshold <= 1.0:
            raise ShiTuError(f"a similarity threshold lies between -1 and 1, not {threshold}")
        if self.calibration is None:
            raise ShiTuError("this index has no calibration curve to pick a point on (it needs 3+ labels)")
        calibration = dataclasses.replace(self.calibration, threshold=round(threshold, 4), chosen_by="user")
        result = self._same_vectors(calibration=calibration)
        return result._derived_by(self, {"op": "threshold"})

    def _same_vectors(self, **change) -> "GalleryIndex":
        """A sibling with other metadata (threshold, calibration) and the very same vectors:
        no copy (2 GB at 1M x 512-d). Safe because no faiss index is ever changed in place."""
        return self._derive(**change)

    def add(
        self,
        features: np.ndarray,
        labels: Sequence[str],
        *,
        sources: Sequence[str] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        calibrate: bool = True,
        taught: bool = False,
    ) -> "GalleryIndex":
        """A new index with these vectors appended; ids continue from :attr:`next_id`.
        ``taught``: they are confirmed answers (crops of real queries, :meth:`Engine.teach
        <shitu.engine.Engine.teach>`), which the calibration keeps using as real queries."""
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
        clean = _clean_labels(labels)
        raw = _raw_added(self._raw, ids, features.astype(np.float16)) if self._raw is not None else None
        stored = self.whitening.apply(features) if self.whitening is not None else features
        calibration = None
        if taught and self.calibration is not None:  # carried by the calibration: the change log records it
            calibration = dataclasses.replace(self.calibration, taught=[*self.calibration.taught, *ids.tolist()])
        result = self._derive(
            labels=self._labels.added(ids, clean),
            delta=(np.concatenate([self._delta[0], ids]), np.concatenate([self._delta[1], stored])),
            next_id=int(ids[-1]) + 1, raw=raw, changed=len(ids), calibrate=calibrate,
            meta=self._meta.with_rows(_rows(ids, sources, thumbnails)), calibration=calibration,
        )  # fmt: skip
        change = {"op": "add", "ids": ids, "labels": clean, "vectors": stored}
        if raw is not None:
            change["raw"] = raw[-1][1][-len(ids) :]  # this add's alone: the chunk holds every add since the base
        return result._derived_by(self, change)

    def remove(self, ids: Iterable[int], *, calibrate: bool = True) -> "GalleryIndex":
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
        return result._derived_by(self, {"op": "remove", "ids": wanted})

    def relabel(self, ids: int | Sequence[int], label: str) -> "GalleryIndex":
        """A copy with entries ``ids`` (one or many) under ``label``; vectors and ids unchanged."""
        label = label.strip()
        if not label:
            raise ShiTuError("a label cannot be empty")
        wanted = np.asarray([ids] if isinstance(ids, (int, np.integer)) else list(ids), dtype=np.int64)
        pos = self._labels.positions(wanted)
        if (pos < 0).any():
            raise NotFound(f"no entry with id {int(wanted[pos < 0][0])}")
        code = self._labels.code_of.get(label)
        changed = int(np.sum(self._labels.codes[pos] != code)) if code is not None else len(set(pos.tolist()))
        result = self._derive(labels=self._labels.relabelled(wanted, label), changed=changed)
        return result._derived_by(self, {"op": "relabel", "ids": wanted, "label": label})

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``(ids, vectors)``: the base's in storage order, then those added since."""
        ids, vecs = self._base_rows()
        if len(self._dead):
            keep = ~np.isin(ids, self._dead)
            ids, vecs = ids[keep], vecs[keep]
        if len(self._delta[0]):
            ids, vecs = np.concatenate([ids, self._delta[0]]), np.concatenate([vecs, self._delta[1]])
        return ids, vecs

    def compacted(self) -> "GalleryIndex":
        """The same index with every change folded into one faiss index (what :meth:`save`
        writes). HNSW and IVF take added vectors into a copy of their base; removals rebuild
        (IVF keeps its trained lists unless the gallery grew past :data:`IVF_REGROW_FACTOR`
        times its training set); search parameters are remeasured once the gallery doubled."""
        if not self.pending_changes:
            return self
        ids, vecs = self.vectors()
        inner_base = _inner(self._index)
        regrow = (
            self.index_type == "IVF"
            and len(ids) >= IVF_REGROW_FACTOR * self.trained_size
            and ivf_nlist(len(ids)) > inner_base.nlist
        )
        trained = self.trained_size
        if self.index_type == "Flat" or regrow or (self.index_type == "HNSW32" and len(self._dead)):
            index, inner = _faiss_index(vecs, ids, self.index_type, self.metric_type)
            trained = len(ids) if self.index_type != "IVF" or regrow else trained
        elif len(self._dead):  # IVF with removals: the same trained lists, refilled
            inner = faiss.clone_index(inner_base)
            inner.reset()
            index = faiss.IndexIDMap2(inner)
            index.add_with_ids(vecs, ids)
        else:  # HNSW or IVF with additions only: a copy of the base takes them
            index, inner = faiss.clone_index(self._index), None
            index.add_with_ids(self._delta[1], self._delta[0])
        recalibrate = len(ids) >= 2 * self.calibrated_size or regrow
        result = GalleryIndex(
            index, self._labels, metric_type=self.metric_type, index_type=self.index_type,
            next_id=self._next_id, feature_model=self.feature_model, trained_size=trained,
            search_params=None if recalibrate else self.search_params, calibrated_size=self.calibrated_size,
            whitening=self.whitening, suggested_rec_threshold=self._suggested, calibration=self.calibration,
            adaptation=self.adaptation, raw=_merged_raw(self._raw, ids), meta=self._meta, keep=inner,
            changes_since_calibration=self.changes_since_calibration, views=self._views,
        )  # fmt: skip
        return result

    def _derived_by(self, parent: "GalleryIndex", change: dict[str, Any]) -> "GalleryIndex":
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

    def changes_since(self, ancestor: "GalleryIndex") -> list[dict[str, Any]] | None:
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

    def _derive(
        self,
        *,
        labels: "_Labels | None" = None,
        delta: tuple[np.ndarray, np.ndarray] | None = None,
        dead: np.ndarray | None = None,
        next_id: int | None = None,
        raw: tuple | None = None,
        calibration: Calibration | None = None,
        adaptation: Adaptation | None = None,
        meta: EntryMeta | None = None,
        changed: int = 0,
        reset_changes: bool = False,
        calibrate: bool = True,
    ) -> "GalleryIndex":
        """A sibling sharing this one's base faiss index. ``changed`` entries (added, removed
        or relabelled) make its calibration out of date: a raw-feature index of up to
        :data:`RECALIBRATE_MAX_ENTRIES` entries is recalibrated at once (leave-one-out costs
        ~0.1 s there); others count the changes until :meth:`recalibrated` is asked for."""
        result = self._sibling(
            self._index,
            labels if labels is not None else self._labels,
            metric_type=self.metric_type,
            index_type=self.index_type,
            next_id=next_id if next_id is not None else self._next_id,
            feature_model=self.feature_model,
            trained_size=self.trained_size,
            search_params=self.search_params,
            calibrated_size=self.calibrated_size,
            whitening=self.whitening,
            suggested_rec_threshold=self._suggested,
            calibration=calibration or self.calibration,
            adaptation=adaptation or self.adaptation,
            raw=raw if raw is not None else self._raw,
            changes_since_calibration=0 if reset_changes else self.changes_since_calibration + changed,
            meta=meta or self._meta,
            delta=delta if delta is not None else self._delta,
            dead=dead if dead is not None else self._dead,
            keep=self._keep,
            views=self._views,
        )
        if calibrate and changed and self.whitening is None and len(result) <= RECALIBRATE_MAX_ENTRIES:
            ids, vecs = result.vectors()
            fresh = calibrate_gallery(vecs, result.labels_of(ids), **result._calibration_inputs(ids))
            if fresh is not None and result.calibration is not None and result.calibration.chosen_by == "user":
                fresh = dataclasses.replace(fresh, threshold=result.calibration.threshold, chosen_by="user")
            result.calibration = fresh
            result.changes_since_calibration = 0
        return result

    def _sibling(self, *args: Any, **kwargs: Any) -> "GalleryIndex":
        """A new index of this one's kind (one kept elsewhere keeps its connection)."""
        result = type(self).__new__(type(self))
        result._adopt(self)
        GalleryIndex.__init__(result, *args, **kwargs)
        return result

    def _adopt(self, other: "GalleryIndex") -> None:
        """Take over what is not a constructor argument from ``other`` (nothing, here)."""

    def replay(self, change: dict[str, Any], arrays: dict[str, np.ndarray]) -> "GalleryIndex":
        """This index with one logged change applied (as :meth:`add` etc. made it; the
        calibration that came with it is set by the caller, nothing is recomputed)."""
        op = change["op"]
        if op == "add":
            ids = arrays["ids"]
            labels = list(change["labels"])
            raw = _raw_added(self._raw, ids, arrays["raw"]) if self._raw is not None and "raw" in arrays else None
            return self._derive(
                labels=self._labels.added(ids, labels),
                delta=(np.concatenate([self._delta[0], ids]), np.concatenate([self._delta[1], arrays["vectors"]])),
                next_id=max(self._next_id, int(ids[-1]) + 1), raw=raw, calibrate=False, changed=len(ids),
            )  # fmt: skip
        if op == "remove":
            return self.remove(arrays["ids"], calibrate=False)
        if op == "relabel":
            return self.relabel(arrays["ids"].tolist(), change["label"])
        if op == "threshold":
            return self._derive()
        raise ShiTuError(f"unknown change {op!r} in the change log")

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
        with one_thread_if_small(len(features) * (self._index.ntotal + len(self._delta[0])) * self.dim):
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
        """The base's nearest live entries: ``(cosine similarities, ids)``, (N, <= k), ``-inf``
        / ``-1`` where there are fewer."""
        scores = np.full((len(features), 0), -np.inf, np.float32)
        ids = np.zeros((len(features), 0), np.int64)
        base_live = self._index.ntotal - len(self._dead)
        if base_live > 0:
            kb = min(k, base_live)
            if len(self._dead):
                scores, ids = self._index.search(features, kb, params=self._skip_dead())
            else:
                scores, ids = self._index.search(features, kb)
            if self.metric_type == "L2":
                scores = 1.0 - scores / 2.0
            scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _base_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, stored vectors)`` of the base, removed entries included."""
        return _base_vectors(self._index)

    def _skip_dead(self) -> Any:
        """faiss search parameters that skip the removed base ids (made once per index)."""
        if self._search_with is None:
            selector = faiss.IDSelectorBatch(self._dead)
            skip = faiss.IDSelectorNot(selector)
            inner = _inner(self._index)
            if isinstance(inner, faiss.IndexHNSW):
                params = faiss.SearchParametersHNSW()
                params.efSearch = int(self.search_params.get("efSearch", inner.hnsw.efSearch))
            elif isinstance(inner, faiss.IndexIVF):
                params = faiss.SearchParametersIVF()
                params.nprobe = int(inner.nprobe)
            else:
                params = faiss.SearchParameters()
            params.sel = skip
            self._search_with = (params, skip, selector)  # the selectors must outlive the params
        return self._search_with[0]

    def raw_similarity(self, features: np.ndarray, ids: np.ndarray) -> np.ndarray | None:
        """Cosine similarity in the model's own space of each query row with the entries
        ``ids`` of its row ((N, k); NaN for a missing id), for the calibration's floor
        (:func:`shitu.calibrate.accepts`); ``None`` when the index keeps no unprojected features."""
        if self.whitening is None or not self._raw:
            return None
        if self._raw_lookup is None:  # per chunk: its ids sorted, once per index object
            self._raw_lookup = [(np.argsort(chunk_ids), chunk_ids, feats) for chunk_ids, feats in self._raw]
        queries = _normalize(features)
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

    def _raw_features(self, ids: np.ndarray) -> np.ndarray:
        raw_ids, raw = _merged_raw(self._raw, ids)[0]
        return raw.astype(np.float32)

    # --- persistence ---------------------------------------------------------------------
    def save(self, save_dir: str | Path, *, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write atomically, every change folded in (PaddleX's layout): a complete copy in a
        temporary dir, then a rename."""
        save_dir = Path(save_dir)
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_dir.parent / f".{save_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self.write_files(tmp)
            for fname, data in (extra_files or {}).items():
                (tmp / fname).write_bytes(data)
            replace_index_dir(tmp, save_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._meta = EntryMeta(save_dir / ENTRIES_FILE)
        return save_dir

    def write_files(self, target: Path) -> None:
        """Write the complete index into the (new, empty) directory ``target``."""
        full = self.compacted()
        faiss.write_index(full._index, str(target / VECTOR_FILE))
        text = id_map_yaml(self._labels, self.index_type, self.metric_type)
        (target / ID_MAP_FILE).write_bytes(text)
        names = json.dumps(self._labels.names, ensure_ascii=False).encode("utf-8")
        with open(target / LABELS_FILE, "wb") as fh:  # the same id map as arrays, for a fast load
            np.savez(fh, ids=self._labels.ids, codes=self._labels.codes, names=np.frombuffer(names, np.uint8),
                     id_map_sha256=np.frombuffer(hashlib.sha256(text).digest(), np.uint8))  # fmt: skip
        meta = {
            "format": 2,
            "next_id": self._next_id,
            "feature_model": self.feature_model,
            "trained_size": full.trained_size,
            "search_params": full.search_params,
            "calibrated_size": full.calibrated_size,
            "suggested_rec_threshold": self.suggested_rec_threshold,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "adaptation": self.adaptation.to_dict() if self.adaptation is not None else None,
            "changes_since_calibration": self.changes_since_calibration,
            "entries_file": ENTRIES_FILE,
        }
        (target / META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        self._meta.save_to(target / ENTRIES_FILE, self._labels.ids)
        if self.whitening is not None:
            with open(target / WHITENING_FILE, "wb") as fh:
                np.savez(fh, mean=self.whitening.mean, projection=self.whitening.matrix, kind=self.whitening.kind)
        merged = _merged_raw(self._raw, self._labels.ids)
        if merged:
            (raw_ids, raw), = merged
            with open(target / RAW_FILE, "wb") as fh:
                np.savez(fh, ids=raw_ids, features=raw)
        if self._views is not None:
            live = np.isin(self._views[0], self._labels.ids)  # views of removed photos go with them
            with open(target / VIEWS_FILE, "wb") as fh:
                np.savez(fh, ids=self._views[0][live], features=self._views[1][live])

    @classmethod
    def load(cls, index_dir: str | Path, *, until_version: int | None = None) -> "GalleryIndex":
        """Load ours or PaddleX's (``IndexData.save``) layout, with the changes logged since
        the last full save (up to version ``until_version``, if given)."""
        index = cls.load_base(index_dir)
        return index.replay_log(Path(index_dir) / LOG_FILE, until_version=until_version)

    def replay_log(self, log_path: Path, start: int = 0, *, until_version: int | None = None) -> "GalleryIndex":
        """This index with the log's records from byte ``start`` applied; the result's
        :attr:`log_end` and :attr:`log_version` say how far it got."""
        index = self
        for record in changelog.read(log_path, start):
            head = record.header
            if until_version is not None and int(head.get("version", 0)) > until_version:
                break
            for change in head.get("changes", []):
                arrays = {name: record.arrays[k] for name, k in change.get("arrays", {}).items()}
                index = index.replay(change, arrays)
            state = head.get("state", {})
            if "calibration" in state:
                index.calibration = Calibration.from_dict(state["calibration"])
            index.changes_since_calibration = int(state.get("changes_since_calibration", 0))
            index._next_id = max(index._next_id, int(state.get("next_id", 0)))
            index.log_end, index.log_version = record.end, int(head.get("version", 0))
        if index is not self:
            index.forget_lineage()
        return index

    log_end: int = 0  # bytes of the change log applied to this index
    log_version: int | None = None  # the version of the last log record applied

    def log_record(self, changes: list[dict[str, Any]], parent: "GalleryIndex", header: dict[str, Any]) -> bytes:
        """One change-log record for ``changes`` (from :meth:`changes_since`), with this index's
        resulting state, plus ``header`` (version number, time, action, ...)."""
        arrays: list[np.ndarray] = []
        encoded = []
        for change in changes:
            item = {k: v for k, v in change.items() if not isinstance(v, np.ndarray)}
            item["arrays"] = {}
            for name, value in change.items():
                if isinstance(value, np.ndarray):
                    item["arrays"][name] = len(arrays)
                    arrays.append(value)
            encoded.append(item)
        state: dict[str, Any] = {"next_id": self._next_id, "changes_since_calibration": self.changes_since_calibration}
        if self.calibration is not parent.calibration:
            state["calibration"] = self.calibration.to_dict() if self.calibration is not None else None
        return changelog.encode({**header, "changes": encoded, "state": state}, arrays)

    @classmethod
    def load_base(cls, index_dir: str | Path) -> "GalleryIndex":
        """The last full save alone (no logged changes)."""
        index_dir = Path(index_dir)
        vector_path = index_dir / VECTOR_FILE
        info_path = next((index_dir / n for n in (ID_MAP_FILE, ALT_ID_MAP_FILE) if (index_dir / n).exists()), None)
        if not vector_path.exists() or info_path is None:
            raise NotFound(f"{index_dir} is not an index directory (needs {VECTOR_FILE} and {ID_MAP_FILE})")
        try:
            info, labels = _read_id_map(info_path)
            index = faiss.read_index(str(vector_path))
        except ShiTuError:
            raise
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
        if index.ntotal != len(labels):
            raise ShiTuError(f"{index_dir}: {index.ntotal} vectors but {len(labels)} labels in {info_path.name}")
        meta_path = index_dir / META_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
            if not isinstance(meta, dict) or not isinstance(meta.get("entries", {}), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ShiTuError(f"{META_FILE} is damaged ({type(exc).__name__})") from None
        db = index_dir / ENTRIES_FILE
        pending: dict[int, tuple[str, bytes | None]] = {}
        if not db.exists():  # metadata of format 1: one JSON document
            for key, m in meta.get("entries", {}).items():
                thumb = m.get("thumbnail")
                pending[int(key)] = (m.get("source", ""), base64.b64decode(thumb) if thumb else None)
        next_id = max(int(meta.get("next_id", 0)), int(labels.ids[-1]) + 1 if len(labels) else 0)
        whitening = raw = None
        try:
            if (index_dir / WHITENING_FILE).exists():
                with np.load(index_dir / WHITENING_FILE) as w:
                    kind = str(w["kind"]) if "kind" in w.files else "pca-whitening"
                    whitening = (Whitening if kind == "pca-whitening" else Projection)(w["mean"], w["projection"], kind)
            if whitening is not None and (index_dir / RAW_FILE).exists():
                with np.load(index_dir / RAW_FILE) as r:
                    raw = ((r["ids"].astype(np.int64), r["features"]),)
                if len(raw[0][0]) != index.ntotal or raw[0][1].shape[1] != whitening.input_dim:
                    raw = None  # out of step with the vectors: the index works, it just cannot be refitted
        except (OSError, ValueError, KeyError) as exc:
            raise ShiTuError(f"{WHITENING_FILE} or {RAW_FILE} is damaged ({type(exc).__name__})") from None
        views = None
        with contextlib.suppress(OSError, ValueError, KeyError):  # unreadable views: calibrated without them
            if (index_dir / VIEWS_FILE).exists():
                with np.load(index_dir / VIEWS_FILE) as v:
                    views = (v["ids"].astype(np.int64), v["features"])
                dim = whitening.input_dim if whitening is not None else index.d
                if views[1].ndim != 2 or views[1].shape[1] != dim or len(views[0]) != len(views[1]):
                    views = None
        return cls(
            index,
            labels,
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
            meta=EntryMeta(db if db.exists() else None, pending),
            views=views,
        )


_PLAIN_LABEL = re.compile(r"[^\W\d_][\w\-.()/+]*(?: [\w\-.()/+]+)*")  # a letter first, no ": ", " #", edge spaces
_YAML_UNSAFE = {0x2028, 0x2029, 0xFEFF}  # line and paragraph separators, byte order mark
_YAML_WORDS = {"yes", "no", "true", "false", "on", "off", "null", "y", "n"}  # plain scalars YAML reads as non-text


def id_map_yaml(labels: "_Labels", index_type: str, metric_type: str) -> bytes:
    """PaddleX's ``id_map.yaml`` (what ``yaml.safe_dump`` of ``{id_map, index_type,
    metric_type}`` means), written directly: ~10x faster than PyYAML at 1M entries. A label is
    written plain when it is certainly read back as the same text, else as an escaped
    double-quoted scalar."""
    names = [
        name if _PLAIN_LABEL.fullmatch(name) and name.lower() not in _YAML_WORDS else _yaml_quoted(name)
        for name in labels.names
    ]
    lines = [f"  {i}: {names[c]}\n" for i, c in zip(labels.ids.tolist(), labels.codes.tolist(), strict=True)]
    head = "id_map:\n" if lines else "id_map: {}\n"
    return (head + "".join(lines) + f"index_type: {index_type}\nmetric_type: {metric_type}\n").encode("utf-8")


def _yaml_quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar: printable characters as they are, the rest
    (line breaks included, which YAML would fold) as escapes."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o <= 0x7E or (0xA0 <= o <= 0xFFFD and o not in _YAML_UNSAFE and not 0xD800 <= o <= 0xDFFF) \
                or o >= 0x10000:  # fmt: skip
            out.append(ch)
        else:
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def _read_id_map(info_path: Path) -> tuple[dict[str, Any], _Labels]:
    """``(info, labels)`` of an id map file: from the arrays beside it when they were written
    with exactly this file (milliseconds where YAML takes ~15 s at 1M entries), else from the
    YAML itself (PaddleX's own saves, or a file edited since)."""
    text = info_path.read_bytes()
    cached = info_path.parent / LABELS_FILE
    if cached.exists():
        try:
            with np.load(cached) as z:
                if z["id_map_sha256"].tobytes() == hashlib.sha256(text).digest():
                    names = json.loads(z["names"].tobytes().decode("utf-8"))
                    head = text[: text.find(b"id_map:")] + text[text.rfind(b"\nindex_type:") :]
                    info = yaml.load(head, Loader=_YAML_LOADER) or {}  # noqa: S506 - a safe loader
                    labels = _Labels(z["ids"], z["codes"], names, {n: c for c, n in enumerate(names)})
                    if isinstance(info, dict) and "metric_type" in info:
                        return info, labels
        except (OSError, ValueError, KeyError, yaml.YAMLError):
            pass  # damaged or foreign: the YAML decides
    info = yaml.load(text, Loader=_YAML_LOADER) or {}  # noqa: S506 - a safe loader
    if not isinstance(info, dict):
        raise ShiTuError(f"{info_path.name} cannot be read (not a mapping)")
    try:
        id_map = {int(k): str(v) for k, v in (info.get("id_map") or {}).items()}
    except (AttributeError, TypeError, ValueError):
        raise ShiTuError(f"{info_path.name} cannot be read (its id map is not id: label pairs)") from None
    return info, _Labels.of(list(id_map), list(id_map.values()))


def _base_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of an id-mapped faiss index, in storage order."""
    inner = _inner(index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.clone_index(inner)
        inner.make_direct_map()
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vecs = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), "float32")
    return ids, np.asarray(vecs, dtype=np.float32)


def _merged_raw(raw: tuple | None, ids: np.ndarray) -> tuple | None:
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


def _raw_added(raw: tuple, ids: np.ndarray, features: np.ndarray) -> tuple:
    """Raw-feature chunks ``(base, added since)`` with ``ids`` appended to the second."""
    if len(raw) == 1:
        return (raw[0], (ids, features))
    return (raw[0], (np.concatenate([raw[1][0], ids]), np.concatenate([raw[1][1], features])))


def _clean_labels(labels: Sequence[str]) -> list[str]:
    out = []
    for label in labels:
        label = str(label).strip()
        if not label:
            raise ShiTuError("a gallery label cannot be empty")
        out.append(label)
    return out


def _rows(ids: np.ndarray, sources, thumbnails) -> dict[int, tuple[str, bytes | None]]:
    return {
        int(id_): (str(sources[k]) if sources is not None else "", thumbnails[k] if thumbnails is not None else None)
        for k, id_ in enumerate(ids)
    }


def _faiss_index(vectors: np.ndarray, ids: np.ndarray, index_type: str, metric_type: str):
    """``(IndexIDMap2, its inner index)`` holding ``vectors`` under ``ids`` (the inner index must
    be kept alive beside the wrapper)."""
    inner = _new_inner(vectors.shape[1], index_type, metric_type, len(vectors))
    if not inner.is_trained:
        inner.train(vectors)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    return index, inner


def _fit(features, ids, labels, whiten: bool, adapt_mode: str, progress, *, views=None, feature_model=None,
         taught=()):  # fmt: skip
    """The projection (if any), calibration, record of the decision and kept raw features.
    ``views``: ``(entry ids, raw features)`` of query-like views; ``taught``: entry ids of
    confirmed answers (both for the calibration, :mod:`shitu.calibrate`)."""
    if whiten:
        unit_views = (views[0], views[1].astype(np.float32)) if views is not None else None
        inputs = {"ids": ids, "taught": taught, "feature_model": feature_model}
        if len(features) < WHITEN_MIN_IMAGES:
            return None, calibrate_gallery(features, labels, views=unit_views, **inputs), None, None
        inputs["space"] = "whitened"  # no reference measured for it: the photos' own point
        whitening = Whitening.fit(features)
        note = Adaptation("off", True, "PCA whitening (whiten=True)", kind="pca-whitening")
        if unit_views is not None:
            unit_views = (unit_views[0], whitening.apply(unit_views[1]))
        return whitening, calibrate_gallery(whitening.apply(features), labels, views=unit_views, **inputs), note, None
    projection, calibration, adaptation = adapt(features, labels, mode=adapt_mode, progress=progress, ids=ids,
                                                views=views, taught=taught, feature_model=feature_model)  # fmt: skip
    raw = ((ids.copy(), features.astype(np.float16)),) if projection is not None else None
    return projection, calibration, adaptation, raw


def replace_index_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``'s place, keeping files in ``target`` that are not ours."""
    if target.exists():
        for f in target.iterdir():
            if f.name not in OUR_FILES and not f.name.startswith(ENTRIES_FILE) and not (new / f.name).exists():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, new / f.name)
    replace_dir(new, target)
