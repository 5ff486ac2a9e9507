"""How long the gallery report takes, and whether it still finds planted problems, at 1k-100k entries.

Synthetic 512-d galleries built through ``GalleryIndex.build`` (Flat and HNSW32): products in
families of 5 similar ones (a shared family direction, so neighbouring labels get confused), 10
photos per product (unit vectors around the product's centre). Planted: 1% of photos relabelled
to another product (mislabels), 0.5% copied exactly under their own label (redundant
duplicates) and 0.2% copied exactly under another label (conflicting duplicates). For each size
the table gives the report's wall time and its stages, recall, and how many planted problems it
flagged (found / planted, and how many flags were not planted). The report's threshold-curve
stage is ~0 because a built index carries its calibration; "curve" times calibrate_gallery, what
the report spends on an index without one (e.g. made by PaddleX).

    python bench/report_scale.py [--sizes 1000 10000 100000] [--types Flat HNSW32]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.calibrate import calibrate_gallery  # noqa: E402
from shitu.index import GalleryIndex  # noqa: E402
from shitu.report import gallery_report  # noqa: E402

DIM = 512
VIEWS = 10
FAMILY = 5


def gallery(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], dict[str, set]]:
    """Vectors, labels and the planted problems (row numbers)."""
    rng = np.random.default_rng(seed)
    products = max(FAMILY, n // VIEWS)
    family = rng.normal(size=(products // FAMILY + 1, DIM)).astype(np.float32)
    centres = family[np.arange(products) // FAMILY] + 0.8 * rng.normal(size=(products, DIM)).astype(np.float32)
    base = n - int(0.007 * n)
    product = np.arange(base) % products
    x = centres[product] + 0.9 * rng.normal(size=(base, DIM)).astype(np.float32)
    labels = [f"product-{p}" for p in product]
    mislabelled = rng.choice(base, size=int(0.01 * n), replace=False)
    for r in mislabelled:
        labels[r] = f"product-{(product[r] + 1 + rng.integers(products - 1)) % products}"
    redundant = rng.choice(np.setdiff1d(np.arange(base), mislabelled), size=int(0.005 * n), replace=False)
    conflicting = rng.choice(np.setdiff1d(np.arange(base), np.union1d(mislabelled, redundant)),
                             size=n - base - len(redundant), replace=False)  # fmt: skip
    copies = np.concatenate([redundant, conflicting])
    x = np.concatenate([x, x[copies]])
    labels += [labels[r] for r in redundant]
    labels += [f"product-{(product[r] + 1) % products}" for r in conflicting]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted = {
        "mislabelled": set(mislabelled.tolist()),
        "redundant": {(int(r), base + k) for k, r in enumerate(redundant)},
        "conflicting": {(int(r), base + len(redundant) + k) for k, r in enumerate(conflicting)},
    }
    return x.astype(np.float32), labels, planted


def run(n: int, index_type: str) -> dict:
    x, labels, planted = gallery(n)
    t = time.perf_counter()
    index = GalleryIndex.build(x, labels, index_type=index_type)
    build = time.perf_counter() - t
    t = time.perf_counter()
    report = gallery_report(index)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    page = report.to_html()
    html_s = time.perf_counter() - t
    found_mis = {s.id for s in report.mislabelled}
    pairs = {(d.id_a, d.id_b): d.conflicting for d in report.duplicates}
    curve = None
    if index_type == "Flat":
        codes = np.unique(np.asarray(labels), return_inverse=True)[1]
        t = time.perf_counter()
        calibrate_gallery(index.vectors()[1], codes)
        curve = time.perf_counter() - t
    return {
        "n": n, "type": index_type, "build": build, "report": seconds, "timings": report.timings,
        "curve": curve, "html": html_s, "html_kb": len(page.encode()) // 1024,
        "r1": report.recall_at_1, "r5": report.recall_at_5, "evaluated": report.evaluated, "sampled": report.sampled,
        "map_points": len(report.map_points),
        "mis": (len(found_mis & planted["mislabelled"]), len(planted["mislabelled"]),
                len(found_mis - planted["mislabelled"])),
        "conf": (sum(1 for p in planted["conflicting"] if pairs.get(p) is True), len(planted["conflicting"]),
                 sum(1 for p, c in pairs.items() if c and p not in planted["conflicting"])),
        "red": (sum(1 for p in planted["redundant"] if pairs.get(p) is False), len(planted["redundant"]),
                report.duplicate_counts["redundant"]),
    }  # fmt: skip


def found(hit: int, planted: int, extra: int | None = None) -> str:
    return f"{hit}/{planted}" + (f" +{extra}" if extra is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--types", nargs="+", default=["Flat", "HNSW32"])
    args = parser.parse_args()
    print(f"gallery_report on synthetic {DIM}-d galleries; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"numpy {np.__version__}")  # fmt: skip
    try:
        print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    except OSError:
        pass
    header = (f"{'entries':>8} {'index':>6} {'build s':>8} {'report s':>9} {'neighbours':>10} {'mislabel':>8} "
              f"{'curve':>6} {'map s':>6} {'map pts':>7} {'html s':>6} {'queries':>8} {'r@1':>6} {'r@5':>6} "
              f"{'mislabels':>13} {'conflicting':>13} {'redundant':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for index_type in args.types:
            r = run(n, index_type)
            t = r["timings"]
            neighbours = t.get("neighbours", 0.0) + t.get("neighbours (all entries)", 0.0)
            curve = f"{r['curve']:.1f}" if r["curve"] is not None else "-"
            queries = f"{r['evaluated']:,}" + ("*" if r["sampled"] else "")
            print(f"{r['n']:>8,} {r['type']:>6} {r['build']:>8.1f} {r['report']:>9.2f} {neighbours:>10.2f} "
                  f"{t.get('mislabelled', 0.0):>8.2f} {curve:>6} {t.get('map', 0.0):>6.2f} {r['map_points']:>7,} "
                  f"{r['html']:>6.2f} {queries:>8} {r['r1']:>6.3f} {r['r5']:>6.3f} "
                  f"{found(*r['mis']):>13} {found(*r['conf']):>13} {found(*r['red'][:2]):>11}", flush=True)  # fmt: skip
    print("\nreport s: gallery_report wall time (all stages); curve: calibrate_gallery on the same vectors, which the "
          "report runs only for an index without its own calibration; * = seeded sample of queries (above 20,000 "
          "entries), searched exactly against the full gallery. mislabels / conflicting: planted ones flagged / "
          "planted, +flags that were not planted; redundant: planted pairs found / planted.")  # fmt: skip


if __name__ == "__main__":
    main()
