"""Vectors in faiss: building, calibrating and searching the index of a gallery's last full
save (its *base*), and the seam where another vector store plugs in.

:class:`GalleryIndex <shitu.index.GalleryIndex>` keeps the changes since its base in memory
(vectors added, base ids removed) and asks its base for the rest through :class:`VectorBase`:
:class:`FaissBase` here, a Milvus collection in :mod:`shitu.stores.milvus`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import faiss
import numpy as np

from shitu.errors import ShiTuError
from shitu.labels import LabelTable

log = logging.getLogger(__name__)

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
# faiss's default efSearch is 16. Past 8192 a search visits as many vectors as an exact scan of a
# 1M gallery and takes longer (1M clustered 512-d vectors: efSearch 8192 agrees 96.8% in 125 ms,
# 16384 agrees 99.2% in 249 ms on one core, where the exact search takes ~180 ms)
HNSW_EF_CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_REGROW_FACTOR = 4  # retrain IVF once the index holds this many times its training set
CALIBRATION_QUERIES = 512
TARGET_AGREEMENT = 0.995  # calibration target, with margin over the 0.99 promised on new queries


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
    efSearch tried, and then the index says so (:attr:`shitu.index.GalleryIndex.search_shortfall`).
    """
    inner = inner_of(index)
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
        apply_search_params(inner, {name: value})
        reached = min(agreement(sample, loo_exact, 1), agreement(midpoints, mid_exact, 0))
        if reached >= TARGET_AGREEMENT:
            chosen = value
            break
    apply_search_params(inner, {name: chosen})
    return {name: int(chosen), "agreement": round(reached, 4)}


def apply_search_params(inner: faiss.Index, params: dict[str, float]) -> None:
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


def normalize(features: np.ndarray) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2:
        raise ShiTuError(f"features must be a (N, D) matrix, got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def new_inner(dim: int, index_type: str, metric_type: str, n_train: int) -> faiss.Index:
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


def inner_of(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index)


def index_type_of(index: faiss.Index) -> str:
    inner = inner_of(index)
    return "HNSW32" if isinstance(inner, faiss.IndexHNSW) else "IVF" if isinstance(inner, faiss.IndexIVF) else "Flat"


def search_shortfall(index_type: str, search_params: dict[str, float]) -> str | None:
    """Why an approximate index cannot be trusted to find the nearest entry, or ``None``: its
    calibration found no search parameter (up to efSearch 8192) at which it agrees with exact
    search for 99.5% of calibration queries. Vectors with little structure (high intrinsic
    dimension) defeat a graph index; IVF and Flat do not have this limit."""
    reached = search_params.get("agreement")
    if reached is None or reached >= TARGET_AGREEMENT:
        return None
    setting = ", ".join(f"{k} {int(v)}" for k, v in search_params.items() if k != "agreement")
    return (
        f"this {index_type} index finds the exact nearest entry for only {reached:.1%} of calibration "
        f"queries, even at {setting}: rebuild it as IVF or Flat for answers that match exact search"
    )


def base_vectors(index: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of an id-mapped faiss index, in storage order."""
    inner = inner_of(index)
    if isinstance(inner, faiss.IndexIVF):
        inner = faiss.clone_index(inner)
        inner.make_direct_map()
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    vecs = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, inner.d), "float32")
    return ids, np.asarray(vecs, dtype=np.float32)


def faiss_index(vectors: np.ndarray, ids: np.ndarray, index_type: str, metric_type: str):
    """``(IndexIDMap2, its inner index)`` holding ``vectors`` under ``ids`` (the inner index must
    be kept alive beside the wrapper)."""
    inner = new_inner(vectors.shape[1], index_type, metric_type, len(vectors))
    if not inner.is_trained:
        inner.train(vectors)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, ids)
    return index, inner


@dataclass(frozen=True)
class Live:
    """Which base entries one version of an index lists: its labels, the base ids removed since
    the base was written (sorted) and the ids added since (searched beside the base)."""

    labels: LabelTable
    dead: np.ndarray
    added: np.ndarray


class VectorBase(Protocol):
    """The vectors of a gallery's last full save, wherever they are kept."""

    dim: int
    search_params: dict[str, float]

    @property
    def local(self) -> bool:
        """Whether this is an in-memory faiss index (else a remote store: an export folds it into one)."""
        ...

    def search(self, features: np.ndarray, k: int, live: Live, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        """The nearest live base entries: ``(cosine similarities, ids)``, (N, <= k), ``-inf`` / ``-1``
        where there are fewer. ``cache``: a dict owned by the caller's index version."""
        ...

    def rows(self, live: Live) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, stored vectors)`` of the live base entries."""
        ...

    def raw_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, unprojected features)`` of every base entry, if this store keeps them."""
        ...

    def folded(self, live: Live, added: np.ndarray, index_type: str, metric_type: str) -> FaissBase:
        """A faiss base holding every live entry plus ``added`` vectors (ids in ``live.added``)."""
        ...


class FaissBase:
    """A faiss ``IndexIDMap2`` over Flat, HNSW32 or IVF, with the search parameters measured for it.

    A new or foreign index (``search_params=None``) is measured at once: which efSearch /
    nprobe keeps it in agreement with exact search (:func:`calibrate_search`)."""

    local = True

    def __init__(
        self,
        index: faiss.Index,
        metric_type: str,
        *,
        keep: faiss.Index | None = None,
        trained_size: int | None = None,
        search_params: dict[str, float] | None = None,
        calibrated_size: int | None = None,
    ):
        self.index = index
        self.metric_type = metric_type
        self._keep = keep  # the inner index must live as long as the wrapper
        self.dim = index.d
        self.trained_size = trained_size or index.ntotal
        if search_params is None:
            # exact Flat indices have nothing to tune: skip copying their vectors out
            approximate = index.ntotal > 0 and not isinstance(inner_of(index), faiss.IndexFlat)
            self.search_params = calibrate_search(index, base_vectors(index)[1], metric_type) if approximate else {}
            self.calibrated_size = index.ntotal
            warning = search_shortfall(index_type_of(index), self.search_params)
            if warning:
                log.warning("%s", warning)
        else:
            self.search_params = dict(search_params)
            self.calibrated_size = calibrated_size or index.ntotal
            apply_search_params(inner_of(index), self.search_params)

    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, index_type: str, metric_type: str) -> FaissBase:
        index, inner = faiss_index(vectors, ids, index_type, metric_type)
        return cls(index, metric_type, keep=inner, trained_size=len(vectors))

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, features: np.ndarray, k: int, live: Live, cache: dict) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(features), 0), -np.inf, np.float32)
        ids = np.zeros((len(features), 0), np.int64)
        base_live = self.index.ntotal - len(live.dead)
        if base_live > 0:
            kb = min(k, base_live)
            if len(live.dead):
                scores, ids = self.index.search(features, kb, params=self._skipping(live.dead, cache))
            else:
                scores, ids = self.index.search(features, kb)
            if self.metric_type == "L2":
                scores = 1.0 - scores / 2.0
            scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def _skipping(self, dead: np.ndarray, cache: dict) -> Any:
        """faiss search parameters that skip the removed ids (made once per index version)."""
        if "skip" not in cache:
            selector = faiss.IDSelectorBatch(dead)
            skip = faiss.IDSelectorNot(selector)
            inner = inner_of(self.index)
            if isinstance(inner, faiss.IndexHNSW):
                params = faiss.SearchParametersHNSW()
                params.efSearch = int(self.search_params.get("efSearch", inner.hnsw.efSearch))
            elif isinstance(inner, faiss.IndexIVF):
                params = faiss.SearchParametersIVF()
                params.nprobe = int(inner.nprobe)
            else:
                params = faiss.SearchParameters()
            params.sel = skip
            cache["skip"] = (params, skip, selector)  # the selectors must outlive the params
        return cache["skip"][0]

    def rows(self, live: Live) -> tuple[np.ndarray, np.ndarray]:
        ids, vecs = base_vectors(self.index)
        if len(live.dead):
            keep = ~np.isin(ids, live.dead)
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs

    def raw_rows(self) -> None:
        return None

    def folded(self, live: Live, added: np.ndarray, index_type: str, metric_type: str) -> FaissBase:
        """HNSW and IVF take added vectors into a copy of the base; removals rebuild (IVF keeps its
        trained lists unless the gallery grew past :data:`IVF_REGROW_FACTOR` times its training set);
        search parameters are remeasured once the gallery doubled."""
        base_ids, base_vecs = self.rows(live)
        ids, vecs = np.concatenate([base_ids, live.added]), np.concatenate([base_vecs, added])
        inner_base = inner_of(self.index)
        regrow = (
            index_type == "IVF" and len(ids) >= IVF_REGROW_FACTOR * self.trained_size
            and ivf_nlist(len(ids)) > inner_base.nlist
        )  # fmt: skip
        trained = self.trained_size
        if index_type == "Flat" or regrow or (index_type == "HNSW32" and len(live.dead)):
            index, inner = faiss_index(vecs, ids, index_type, metric_type)
            trained = len(ids) if index_type != "IVF" or regrow else trained
        elif len(live.dead):  # IVF with removals: the same trained lists, refilled
            inner = faiss.clone_index(inner_base)
            inner.reset()
            index = faiss.IndexIDMap2(inner)
            index.add_with_ids(vecs, ids)
        else:  # HNSW or IVF with additions only: a copy of the base takes them
            index, inner = faiss.clone_index(self.index), None
            index.add_with_ids(added, live.added)
        recalibrate = len(ids) >= 2 * self.calibrated_size or regrow
        return FaissBase(
            index, metric_type, keep=inner, trained_size=trained,
            search_params=None if recalibrate else self.search_params, calibrated_size=self.calibrated_size,
        )  # fmt: skip
