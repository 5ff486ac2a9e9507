"""Loading a stored index whose change log holds many commits: O(change), not O(history).

For each gallery size, a Flat index of synthetic 512-d vectors is saved in full, then N commits of
one kind are logged after it (adds of one entry, removes of one entry, relabels of one entry),
background compaction off, and a *fresh process* loads it (the server's first read after a
restart or a kill -9). Reported: the median of ``--rounds`` loads and their spread (IQR), per kind
and size, beside the load of the same index with no log; the load average at start and end.

    python bench/replay.py                      # 1k and 100k entries, 1,000 commits of each kind
    python bench/replay.py --sizes 231 --commits 600 --kinds relabel --repo /path/to/an/older/checkout

``--repo`` runs the same measurement against another checkout (e.g. the code before a change):
the script imports whichever store API that checkout has.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIM = 512

SETUP = r"""
import sys, numpy as np
sys.path.insert(0, REPO)
try:
    from shitu.stores.files import FileStore as Store
except ImportError:  # a checkout from before shitu.stores
    from shitu.store import IndexStore as Store
from shitu.index import GalleryIndex
rng = np.random.default_rng(0)
x = rng.normal(size=(N, DIM)).astype("float32")
labels = [f"label{i % 200}" for i in range(N)]
store = Store(ROOT, compact_in_background=False)
store.put("g", GalleryIndex.build(x, labels, index_type="Flat", adapt="off"))
for k in range(COMMITS):
    if KIND == "add":
        store.mutate("g", lambda i: i.add(rng.normal(size=(1, DIM)).astype("float32"), ["new"]))
    elif KIND == "remove":
        store.mutate("g", lambda i, k=k: i.remove([k]))
    elif KIND == "relabel":
        store.mutate("g", lambda i, k=k: i.relabel([k % N], f"renamed{k}"))  # a few entries more than once
"""

LOAD = r"""
import sys, time
sys.path.insert(0, REPO)
try:
    from shitu.stores.files import FileStore as Store
except ImportError:
    from shitu.store import IndexStore as Store
t = time.perf_counter()
index = Store(ROOT, compact_in_background=False).get("g")
print(time.perf_counter() - t, len(index))
"""


def run(code: str, repo: Path, **values) -> str:
    header = "".join(f"{k} = {v!r}\n" for k, v in {"REPO": str(repo), "DIM": DIM, **values}.items())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", header + code], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout.strip()


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--kinds", nargs="+", default=["none", "add", "remove", "relabel"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repo", type=Path, default=REPO)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "replay.json")
    args = ap.parse_args()
    rows = []
    load_start = os.getloadavg()
    for n in args.sizes:
        for kind in args.kinds:
            with tempfile.TemporaryDirectory() as tmp:
                # removes leave one entry: an index cannot be emptied
                commits = 0 if kind == "none" else min(args.commits, n - 1) if kind == "remove" else args.commits
                t = time.perf_counter()
                run(SETUP, args.repo, ROOT=tmp, N=n, KIND=kind, COMMITS=commits)
                setup_s = time.perf_counter() - t
                loads = [float(run(LOAD, args.repo, ROOT=tmp).split()[0]) for _ in range(args.rounds)]
            row = {"entries": n, "kind": kind, "commits": commits, "load_s_median": statistics.median(loads),
                   "load_s_iqr": iqr(loads) if len(loads) > 1 else 0.0, "setup_s": setup_s}  # fmt: skip
            rows.append(row)
            print(f"{n:>7} entries, {commits:>5} x {kind:<8} load {row['load_s_median']:.3f} s "
                  f"(IQR {row['load_s_iqr']:.3f})", flush=True)  # fmt: skip
    load_end = os.getloadavg()
    report = {"repo": str(args.repo), "rounds": args.rounds, "load_average_start": load_start,
              "load_average_end": load_end, "cores": os.cpu_count(), "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"load average {load_start[0]:.2f} -> {load_end[0]:.2f} on {os.cpu_count()} cores; wrote {args.out}")


if __name__ == "__main__":
    main()
