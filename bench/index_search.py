"""Approximate search vs exact search at gallery scale: agreement and speed.

Synthetic 512-d embeddings of N products photographed several times each (unit vectors around
product centres); queries are new photos of the same products. For each index the bench prints
build time, query latency relative to exact (Flat) search measured in the same run, and how often
the approximate nearest neighbour equals the exact one — with faiss's default search parameters
(what PaddleX 3.7.2 leaves in place) and with this project's calibrated ones.

    python bench/index_search.py [--n 100000] [--dim 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.index import GalleryIndex  # noqa: E402
from shitu.vectors import apply_search_params, inner_of  # noqa: E402


def data(n: int, dim: int, views: int, spread: float, queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // views, dim)).astype(np.float32)

    def photos(count: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), size=count)] + spread * rng.normal(size=(count, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return photos(n), photos(queries)


def timed_search(index: GalleryIndex, q: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    ids = index.search(q, topk=1)[1][:, 0]
    return ids, (time.perf_counter() - start) / len(q)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--spread", type=float, default=1.5)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    x, q = data(args.n, args.dim, args.views, args.spread, args.queries)
    labels = [str(i // args.views) for i in range(args.n)]
    print(f"{args.n} vectors x {args.dim}-d, {args.queries} queries, faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads")  # fmt: skip
    start = time.perf_counter()
    flat = GalleryIndex.build(x, labels, index_type="Flat")
    print(f"Flat: built in {time.perf_counter() - start:.1f}s")
    exact, base = timed_search(flat, q)
    print(f"Flat (baseline): {base * 1e3:.3f} ms/query")
    for kind, default in (("HNSW32", {"efSearch": 16}), ("IVF", {"nprobe": 1})):
        start = time.perf_counter()
        index = GalleryIndex.build(x, labels, index_type=kind)
        build = time.perf_counter() - start
        ids, t = timed_search(index, q)
        tuned = dict(index.search_params)
        apply_search_params(inner_of(index.index), default)
        ids_default, t_default = timed_search(index, q)
        apply_search_params(inner_of(index.index), tuned)
        print(
            f"{kind}: built + calibrated in {build:.1f}s | faiss default {default}: agreement "
            f"{(ids_default == exact).mean():.3f}, {t_default / base:.2f}x Flat time | calibrated {tuned}: "
            f"agreement {(ids == exact).mean():.3f}, {t / base:.2f}x Flat time"
        )


if __name__ == "__main__":
    main()
