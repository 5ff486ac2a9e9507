"""Each entry's nearest other entries among unit vectors (inner product = cosine): exact, in
chunks, or approximate through a temporary IVF index for the all-entry pass of large galleries.
Ties (an exact duplicate's copies) rank in storage order, never by the search code's whim."""

from __future__ import annotations

import math

import faiss
import numpy as np

from shitu.report.params import IVF_NPROBE, KNN_CHUNK, SEED, TIE_DECIMALS, Progress


def exact_knn(
    vectors: np.ndarray, rows: np.ndarray, k: int, progress: Progress | None = None, what: str = "neighbours"
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities and row numbers of the ``k`` nearest *other* rows of each of ``rows``,
    best first; ``progress(done, total, what)`` after each chunk of queries."""
    sims = np.empty((len(rows), k), np.float32)
    nbrs = np.empty((len(rows), k), np.int64)
    for start in range(0, len(rows), KNN_CHUNK):
        part = rows[start : start + KNN_CHUNK]
        d, i = faiss.knn(vectors[part], vectors, k + 1, faiss.METRIC_INNER_PRODUCT)
        sims[start : start + len(part)], nbrs[start : start + len(part)] = without_self(d, i, part, k)
        if progress is not None:
            progress(min(start + KNN_CHUNK, len(rows)), len(rows), what)
    return sims, nbrs


def without_self(d: np.ndarray, i: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k+1 results less its own row (wherever exact ties put it; the last result
    when it is absent), k kept, best first. Similarities equal to TIE_DECIMALS decimals are
    ordered by storage row."""
    tie_order = np.lexsort((i, -np.round(d, TIE_DECIMALS), i == rows[:, None]), axis=-1)[:, :k]
    return np.take_along_axis(d, tie_order, axis=1), np.take_along_axis(i, tie_order, axis=1)


def approximate_knn(vectors: np.ndarray, k: int, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest others through a temporary IVF index (seeded k-means on a sample):
    the all-entry pass of a gallery too large to search exactly in a request. The similarities
    of what is found are exact; a row whose probed lists hold fewer than k others gets itself
    at -inf in the missing places."""
    n, dim = vectors.shape
    nlist = max(1, min(4096, int(round(4 * math.sqrt(n)))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # a rough k-means is enough to bucket neighbours: few points and iterations keep it ~1 s at 100k
    ivf.cp.niter = 4
    ivf.cp.seed = SEED
    ivf.cp.max_points_per_centroid = 24
    ivf.cp.min_points_per_centroid = 1
    rng = np.random.default_rng(SEED + 1)
    ivf.train(vectors[np.sort(rng.choice(n, size=min(n, nlist * 24), replace=False))])
    ivf.add(vectors)
    ivf.nprobe = min(IVF_NPROBE, nlist)
    sims = np.empty((n, k), np.float32)
    nbrs = np.empty((n, k), np.int64)
    step = KNN_CHUNK * 8
    for start in range(0, n, step):
        rows = np.arange(start, min(n, start + step))
        d, i = ivf.search(vectors[rows], k + 1)
        d, i = without_self(d, i, rows, k)
        missing = i < 0
        i[missing], d[missing] = rows[np.nonzero(missing)[0]], -np.inf
        sims[rows], nbrs[rows] = d, i
        if progress is not None:
            progress(int(rows[-1]) + 1, n, "neighbours (all entries)")
    return sims, nbrs
