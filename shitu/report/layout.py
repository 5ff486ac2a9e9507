"""The report's 2-D map: which entries to draw (whole labels, flagged ones first) and where
(t-SNE by openTSNE, Barnes-Hut, on exact cosine neighbours from faiss, from a PCA start).

bench/map_methods.py compared it with the numpy t-SNE it replaced and with scikit-learn's on the
drink gallery's official embeddings: as fast or faster, with more of each point's neighbours
kept on the map (bench/results/map_methods.txt)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shitu.report.neighbours import exact_knn
from shitu.report.params import SEED, TSNE_EARLY_ITERATIONS, TSNE_LATE_ITERATIONS, TSNE_PERPLEXITY, Limits

MIN_TSNE_POINTS = 5  # below this the map is the PCA projection (t-SNE needs a few neighbours)
PROGRESS_EVERY = 50  # iterations between progress calls (each also measures the KL divergence)
# openTSNE's learning rate is n / exaggeration; for a few dozen points that is so small that early
# exaggeration shrinks the map to one spot Barnes-Hut cannot pull apart again. scikit-learn's floor:
MIN_LEARNING_RATE = 50.0


def tsne_2d(
    x: np.ndarray, *, perplexity: float = TSNE_PERPLEXITY, early_iterations: int = TSNE_EARLY_ITERATIONS,
    late_iterations: int = TSNE_LATE_ITERATIONS, progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:  # fmt: skip
    """2-D t-SNE of unit vectors ``x`` (up to a few thousand rows), scaled into [0, 1]².

    Deterministic: the neighbours are exact, the start is PCA with seeded jitter, and the
    gradient runs on one thread (a parallel sum need not add in the same order twice).
    ``progress(done, total)`` counts iterations. Fewer than five rows get their PCA projection;
    a single row sits in the middle."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < MIN_TSNE_POINTS:
        return unit_square(principal_plane(x))
    # openTSNE pulls in scikit-learn, SciPy and pandas (~1.3 s): imported when a map is drawn, not
    # by every process that imports the engine (the CLI, the model worker, each gallery worker)
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.initialization import jitter, rescale
    from openTSNE.initialization import random as random_start
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    k = min(n - 1, int(3 * perplexity))
    perplexity = min(perplexity, k / 3.0)  # what openTSNE would settle on, without its warning
    sims, nbrs = exact_knn(x, np.arange(n), k)
    # cosine distance, as openTSNE's metric="cosine" (on these maps it kept more true neighbours than
    # the euclidean distance of unit vectors: bench/results/map_methods.txt)
    distances = np.maximum(1.0 - sims.astype(np.float64), 0.0)
    affinities = PerplexityBasedNN(
        knn_index=PrecomputedNeighbors(nbrs, distances), perplexity=perplexity, n_jobs=1, random_state=SEED
    )
    start = principal_plane(x)
    if start[:, 0].std() > 1e-12:
        # openTSNE's recipe for a PCA start: tiny spread, and jitter so that copies do not coincide
        start = jitter(rescale(start), random_state=SEED)
    else:  # every vector the same: PCA has no direction to offer
        start = random_start(n, random_state=SEED)
    total = early_iterations + late_iterations
    embedding = TSNEEmbedding(start, affinities, negative_gradient_method="bh", n_jobs=1, random_state=SEED)
    for done, iterations, exaggeration in ((0, early_iterations, 12.0), (early_iterations, late_iterations, 1.0)):
        if iterations:
            embedding = embedding.optimize(
                n_iter=iterations, exaggeration=exaggeration, momentum=0.8,
                learning_rate=max(n / exaggeration, MIN_LEARNING_RATE),
                callbacks=_progress_callback(progress, done, total), callbacks_every_iters=PROGRESS_EVERY,
            )  # fmt: skip
    return unit_square(np.asarray(embedding, dtype=np.float64))


def _progress_callback(progress: Callable[[int, int], None] | None, offset: int, total: int):
    if progress is None:
        return None

    def call(iteration: int, error: float, embedding: np.ndarray) -> bool:
        progress(offset + iteration, total)
        return False  # never stop early

    return [call]


def principal_plane(x: np.ndarray) -> np.ndarray:
    """Projection of ``x`` on its two main directions, with fixed signs (the largest coordinate
    on each axis is positive), padded with zeros where there are fewer directions."""
    n = len(x)
    out = np.zeros((n, 2))
    if n < 2:
        return out
    centred = x.astype(np.float64) - x.mean(axis=0)
    # eigenvectors of the smaller of the two scatter matrices: a full SVD of 2,500 x 512 takes seconds
    if n < centred.shape[1]:
        values, vectors = np.linalg.eigh(centred @ centred.T)
        y = vectors[:, ::-1][:, :2] * np.sqrt(np.maximum(values[::-1][:2], 0.0))
    else:
        _, vectors = np.linalg.eigh(centred.T @ centred)
        y = centred @ vectors[:, ::-1][:, :2]
    flip = np.sign(y[np.argmax(np.abs(y), axis=0), np.arange(y.shape[1])])
    out[:, : y.shape[1]] = y * np.where(flip == 0, 1, flip)
    return out


def unit_square(y: np.ndarray) -> np.ndarray:
    """``y`` scaled into [0, 1] on each axis; an axis without spread is centred at 0.5."""
    lo, hi = y.min(axis=0), y.max(axis=0)
    span = hi - lo
    flat = span <= 1e-12
    out = (y - lo) / np.where(flat, 1.0, span)
    out[:, flat] = 0.5
    return out


def map_rows(codes: np.ndarray, flagged: np.ndarray, partner: np.ndarray, rng: np.random.Generator,
             limits: Limits) -> np.ndarray:  # fmt: skip
    """The rows to draw: all of them up to ``limits.map_points``; beyond that whole labels (at
    most ``limits.map_per_label`` images each, so clusters stay whole), first the labels of
    ``flagged`` rows and the label each is confused with (``partner``) up to half the budget,
    then a seeded random choice of the others."""
    n = len(codes)
    if n <= limits.map_points:
        return np.arange(n)
    labels = int(codes.max()) + 1
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(labels + 1))
    priority = list(dict.fromkeys(c for r in rng.permutation(flagged).tolist()
                                  for c in (int(codes[r]), int(partner[r]))))  # fmt: skip
    taken = set(priority)
    rest = [int(c) for c in rng.permutation(labels) if c not in taken]
    chosen: list[np.ndarray] = []
    used = 0
    for budget, candidates in ((limits.map_points // 2, priority), (limits.map_points, rest)):
        for c in candidates:
            rows = order[starts[c] : starts[c + 1]]
            if len(rows) > limits.map_per_label:
                rows = np.sort(rng.choice(rows, limits.map_per_label, replace=False))
            if used + len(rows) > budget:
                if used >= budget - 1:
                    break
                continue
            chosen.append(rows)
            used += len(rows)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
