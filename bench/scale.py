"""Million-entry galleries: what one change, a load and a query cost as a stored index grows.

For each size and index type it builds a stored index of clustered synthetic 512-d vectors
(the shape of real galleries: several views of each product) in a fresh data dir, then
measures through :class:`shitu.store.IndexStore`, the layer every surface commits through:

- ``add 1`` / ``remove 1``: one committed change (saved, durable, visible to other
  processes), p50 and p90 over ``--changes`` changes;
- ``load``: opening the stored index in a fresh process, and that process's resident memory
  against the raw vector bytes (``n x 512 x 4``);
- ``query``: one single-vector search, p50, and recall@1 against exact search.

    python bench/scale.py --sizes 100000 1000000 --types Flat HNSW32 --out bench/results/scale.json

Timings are medians on a shared machine: read them as ratios between rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shitu.index import GalleryIndex  # noqa: E402
from shitu.store import IndexStore  # noqa: E402

DIM = 512


def clustered(n: int, queries: int, views: int = 10, spread: float = 1.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // views), DIM)).astype(np.float32)

    def photos(count: int) -> tuple[np.ndarray, np.ndarray]:
        which = rng.integers(0, len(centres), size=count)
        x = centres[which] + spread * rng.standard_normal(size=(count, DIM), dtype=np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), which

    return photos(n), photos(queries)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


LOAD_PROBE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import numpy as np, faiss
from shitu.store import IndexStore
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))
before = rss()
t = time.perf_counter()
index = IndexStore({data!r}).get("scale")
took = time.perf_counter() - t
print(json.dumps({{"load_s": took, "rss_mb": rss(), "rss_before_mb": before, "entries": len(index)}}))
"""


def probe_load(data: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE.format(root=str(ROOT), data=str(data))],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(n: int, index_type: str, changes: int, queries: int, work: Path) -> dict:
    (x, groups), (q, _) = clustered(n, queries)
    labels = [f"product-{g}" for g in groups]
    data = work / f"{index_type}-{n}"
    store = IndexStore(data, keep_versions=2)
    t = time.perf_counter()
    index = GalleryIndex.build(x, labels, index_type=index_type, adapt="off")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    store.put("scale", index)
    put_s = time.perf_counter() - t
    del index
    row: dict = {"n": n, "index_type": index_type, "build_s": build_s, "first_save_s": put_s}

    rng = np.random.default_rng(1)
    adds, removes = [], []
    for k in range(changes):
        v = rng.standard_normal((1, DIM)).astype(np.float32)
        t = time.perf_counter()
        store.mutate("scale", lambda idx, v=v, k=k: idx.add(v, [f"new-{k}"]))
        adds.append(time.perf_counter() - t)
        victim = int(rng.integers(0, n))
        t = time.perf_counter()
        store.mutate("scale", lambda idx, victim=victim: idx.remove([victim]) if victim in idx.id_map else idx)
        removes.append(time.perf_counter() - t)
    row.update(add_p50_ms=1000 * pct(adds, 50), add_p90_ms=1000 * pct(adds, 90),
               remove_p50_ms=1000 * pct(removes, 50), remove_p90_ms=1000 * pct(removes, 90))  # fmt: skip

    index = store.get("scale")
    lat, hits = [], []
    for i in range(len(q)):
        t = time.perf_counter()
        _, got = index.search(q[i : i + 1], topk=1)
        lat.append(time.perf_counter() - t)
        hits.append(int(got[0, 0]))
    ids_all, vecs_all = index.vectors()
    best = ids_all[np.argmax(q @ vecs_all.T, axis=1)]
    row.update(query_p50_ms=1000 * pct(lat, 50), recall_at_1=float(np.mean(np.asarray(hits) == best)),
               search_params=index.search_params)  # fmt: skip
    del index, ids_all, vecs_all
    store._cache.clear()
    load = probe_load(data)
    raw_mb = n * DIM * 4 / 2**20
    row.update(load_s=load["load_s"], rss_mb=load["rss_mb"], rss_before_mb=load["rss_before_mb"], raw_mb=raw_mb,
               rss_ratio=(load["rss_mb"] - load["rss_before_mb"]) / raw_mb)  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--types", nargs="+", default=["Flat", "HNSW32"])
    ap.add_argument("--changes", type=int, default=9)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--work", default=None, help="where the indices are written (default: a temp dir)")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for n in args.sizes:
            for kind in args.types:
                row = run_one(n, kind, args.changes, args.queries, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
