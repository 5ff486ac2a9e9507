"""Which 2-D map for the gallery report: wall time and quality of t-SNE implementations.

Each method maps the same unit vectors with the same perplexity (the report's, 15) and a fixed
seed, twice (the second run checks that the map is deterministic). Quality, all at k = 10:

* ``label kNN``: the share of each point's 10 nearest points *on the map* that carry its label
  (the report colours the map by label, so this is what a reader sees); ``space`` gives the
  same number in the embedding space (cosine) as the ceiling;
* ``trust``: trustworthiness (scikit-learn; 1 = no false neighbours on the map);
* ``kNN kept``: the mean share of each point's 10 nearest in the embedding space that are
  among its 10 nearest on the map.

Data: a gallery's embeddings and labels (``--embeddings FILE.npy --rows rows.txt``, one
``path<TAB>label`` per row, e.g. PP-ShiTuV2's reference embeddings of the drink gallery), those
grown to ``--grow`` rows with seeded noisy copies (a larger gallery of the same structure), and
synthetic 512-d clustered galleries from ``report_scale.gallery`` (``--synthetic 2500``).

    python bench/map_methods.py --embeddings E.npy --rows rows.txt [--grow 2500] [--synthetic 2500]
        [--legacy old_report.py] [--methods openTSNE ...]

``--legacy FILE`` adds the hand-written numpy t-SNE the report used before (a copy of the old
``shitu/report.py``; it is no longer in the package).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report_scale import gallery  # noqa: E402

PERPLEXITY = 15.0
SEED = 0
K = 10

Mapper = Callable[[np.ndarray], np.ndarray]


def knn(x: np.ndarray, k: int, metric: int) -> np.ndarray:
    """Each row's k nearest other rows (exact)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    _, i = faiss.knn(x, x, k + 1, metric)
    return np.array([[j for j in row if j != r][:k] for r, row in enumerate(i)])


def quality(x: np.ndarray, y: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.manifold import trustworthiness

    high = knn(x, K, faiss.METRIC_INNER_PRODUCT)
    low = knn(y, K, faiss.METRIC_L2)
    return {
        "label_knn": float((labels[low] == labels[:, None]).mean()),
        "space_knn": float((labels[high] == labels[:, None]).mean()),
        "trust": float(trustworthiness(x, y, n_neighbors=K, metric="cosine")),
        "kept": float(np.mean([len(set(a) & set(b)) / K for a, b in zip(high, low)])),
    }


def opentsne(method: str, early: int, later: int, jobs: int) -> Mapper:
    def run(x: np.ndarray) -> np.ndarray:
        from openTSNE import TSNE

        return np.asarray(
            TSNE(
                perplexity=PERPLEXITY,
                metric="cosine",
                negative_gradient_method=method,
                n_jobs=jobs,
                early_exaggeration_iter=early,
                n_iter=later,
                random_state=SEED,
                initialization="pca",
                neighbors="exact",
            ).fit(x)  # fmt: skip
        )

    return run


def sklearn_tsne(method: str, iterations: int) -> Mapper:
    def run(x: np.ndarray) -> np.ndarray:
        from sklearn.manifold import TSNE

        return TSNE(perplexity=PERPLEXITY, metric="cosine", method=method, init="pca", random_state=SEED,
                    max_iter=iterations, learning_rate="auto").fit_transform(x)  # fmt: skip

    return run


def shitu_map() -> Mapper:
    from shitu.report import tsne_2d

    return lambda x: tsne_2d(x)


def legacy(path: Path) -> Mapper:
    spec = importlib.util.spec_from_file_location("old_report", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return lambda x: module.tsne_2d(x)


def grown(x: np.ndarray, labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and seeded noisy copies of its rows up to ``n`` rows. A copy's cosine with its original
    is about 0.8 (same-label pairs of the official drink embeddings average 0.58, other pairs 0.06):
    clusters grow and stay apart as they were, without exact duplicates."""
    rng = np.random.default_rng(SEED)
    rows = rng.choice(len(x), size=n - len(x), replace=True)
    noise = rng.normal(size=(len(rows), x.shape[1])).astype(np.float32)
    noise *= 0.75 / np.linalg.norm(noise, axis=1, keepdims=True)
    return np.concatenate([x, x[rows] + noise]), np.concatenate([labels, labels[rows]])


def datasets(args: argparse.Namespace) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    if args.embeddings:
        x = np.load(args.embeddings).astype(np.float32)
        labels = np.array([line.split("\t")[1].strip() for line in Path(args.rows).read_text("utf-8").splitlines()])
        out.append((args.name, x, labels))
    if args.embeddings and args.grow:
        out.append((f"{out[0][0]}+jitter", *grown(out[0][1], out[0][2], args.grow)))
    for n in args.synthetic:
        x, labels, _ = gallery(n)
        out.append((f"synthetic-{n}", x, np.array(labels)))
    return [(name, x / np.linalg.norm(x, axis=1, keepdims=True), labels) for name, x, labels in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", type=Path)
    parser.add_argument("--rows", type=Path)
    parser.add_argument("--name", default="gallery", help="what to call the embeddings in the table")
    parser.add_argument("--grow", type=int, default=2_500, help="also map the embeddings grown to this many rows")
    parser.add_argument("--synthetic", type=int, nargs="*", default=[2_500])
    parser.add_argument("--legacy", type=Path, help="a copy of the old shitu/report.py")
    parser.add_argument("--methods", nargs="*", help="names to run (default: all)")
    args = parser.parse_args()
    methods: dict[str, Mapper] = {}
    if args.legacy:
        methods["numpy exact (old, 100+200 it)"] = legacy(args.legacy)
    methods.update({
        "shitu.report.tsne_2d (now)": shitu_map(),
        "openTSNE BH 1 job (100+200 it)": opentsne("bh", 100, 200, 1),
        "openTSNE BH 2 jobs (100+200 it)": opentsne("bh", 100, 200, 2),
        "openTSNE BH 1 job (250+500 it)": opentsne("bh", 250, 500, 1),
        "openTSNE FFT 1 job (100+200 it)": opentsne("fft", 100, 200, 1),
        "sklearn BH (300 it)": sklearn_tsne("barnes_hut", 300),
        "sklearn BH (1000 it)": sklearn_tsne("barnes_hut", 1000),
        "sklearn exact (300 it)": sklearn_tsne("exact", 300),
    })  # fmt: skip
    if args.methods:
        methods = {k: v for k, v in methods.items() if any(m in k for m in args.methods)}
    print(f"2-D maps, perplexity {PERPLEXITY:g}, seed {SEED}, quality at k={K}; {platform.machine()}, "
          f"{os.cpu_count()} cores, numpy {np.__version__}")  # fmt: skip
    header = (f"{'data':>22} {'method':>34} {'s':>6} {'again':>6} {'label kNN':>9} {'space':>6} {'trust':>6} "
              f"{'kNN kept':>8} {'load':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, x, labels in datasets(args):
        for method, mapper in methods.items():
            load = os.getloadavg()[0]
            times, maps = [], []
            for _ in range(2):  # the faster of two runs (the machine is shared); equal maps: deterministic
                t = time.perf_counter()
                maps.append(mapper(x))
                times.append(time.perf_counter() - t)
            y, seconds, same = maps[0], min(times), np.array_equal(maps[0], maps[1])
            q = quality(x, np.asarray(y, np.float32), labels)
            print(f"{name + f' ({len(x)})':>22} {method:>34} {seconds:>6.2f} {'same' if same else 'DIFF':>6} "
                  f"{q['label_knn']:>9.3f} {q['space_knn']:>6.3f} {q['trust']:>6.3f} {q['kept']:>8.3f} "
                  f"{load:>5.1f}", flush=True)  # fmt: skip
    print("\ns: wall time of one map (the faster of two runs); again: a second run gives the same coordinates; "
          "load: 1-minute load average before the run (the machine is shared); it: iterations with early "
          "exaggeration + without.")  # fmt: skip


if __name__ == "__main__":
    main()
