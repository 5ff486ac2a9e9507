"""Starter recognition model quality on the shared drink gallery.

Measures, through the real pipeline (PaddleX image-feature predictor with the converted
MobileNetV2):
- leave-one-out recall@1 over gallery.txt, next to the same measure computed in this run
  from the official PP-ShiTuV2 embeddings shipped in ../shared (the bar to approach);
- for rec_threshold candidates: how many known items are accepted *and* correct, and how
  many unknown items are rejected (leave-one-label-out: the query's whole label is removed
  from the gallery, so any match is wrong and should fall below the threshold);
- the same with database-side whitening (what an index built from starter features of 200+
  images uses), leave-one-out and, fitting the whitening on 80% of the gallery only, 5-fold;
- embedding throughput.

    python bench/starter_recall.py [--data ../shared/data/drink_dataset]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import (
    PipelineConfig,  # noqa: E402
    Settings,  # noqa: E402
)
from shitu.gallery import load_image, read_label_file  # noqa: E402
from shitu.index import GalleryIndex, Whitening  # noqa: E402
from shitu.runtime import Runtime  # noqa: E402


def loo_recall(features: np.ndarray, labels: np.ndarray) -> float:
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    return float((labels[sims.argmax(1)] == labels).mean())


def threshold_table(features: np.ndarray, labels: np.ndarray, thresholds) -> list[tuple[float, float, float]]:
    sims = features @ features.T
    np.fill_diagonal(sims, -np.inf)
    best = sims.argmax(1)
    known_score, known_ok = sims[np.arange(len(labels)), best], labels[best] == labels
    same = labels[:, None] == labels[None, :]
    unknown_score = np.where(same, -np.inf, sims).max(1)  # best match once the label is gone
    rows = []
    for t in thresholds:
        rows.append((t, float(((known_score >= t) & known_ok).mean()), float((unknown_score < t).mean())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "drink_dataset"
    parser.add_argument("--data", type=Path, default=default)
    args = parser.parse_args()
    settings = Settings.from_env(offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR"))
    runtime = Runtime(PipelineConfig(), settings, isolate=False)
    print("recognition:", runtime.recognition.describe())
    batch = read_label_file(args.data / "gallery.txt", args.data).require_clean()
    labels = np.array([i.label for i in batch.items])
    images = [load_image(i.image) for i in batch.items]
    runtime.embed(images[:8])  # warm-up
    start = time.perf_counter()
    feats = runtime.embed(images, batch_size=16)
    elapsed = time.perf_counter() - start
    print(f"images: {len(images)}, labels: {len(set(labels))}, dim: {feats.shape[1]}")
    print(f"embedding: {len(images) / elapsed:.1f} images/s (batch 16, {os.cpu_count()} cores)")
    ours = loo_recall(feats, labels)
    print(f"leave-one-out recall@1, starter model: {ours:.4f}")
    ref = args.data / "ppshituv2_reference"
    if (ref / "embeddings.npy").exists():
        rows = [ln.split("\t") for ln in (ref / "rows.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
        official = loo_recall(np.load(ref / "embeddings.npy"), np.array([r[1] for r in rows]))
        print(f"leave-one-out recall@1, official PP-ShiTuV2 embeddings: {official:.4f} (ratio {ours / official:.3f})")
    print("\nrec_threshold | known: accepted and correct | unknown: rejected")
    for t, known, unknown in threshold_table(
        feats, labels, [0.6, 0.7, 0.75, 0.78, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.86, 0.88, 0.9]
    ):
        print(f"{t:13.2f} | {known:27.3f} | {unknown:.3f}")

    index = GalleryIndex.build(feats, list(labels), index_type="Flat", whiten=True)
    _, ids = index.search(feats, topk=2)  # through the index: the first hit is the image itself
    loo = float((labels[ids[:, 1]] == labels).mean())
    print(f"\nwhitened index ({index.dim}-d in, {index.index.d}-d stored): leave-one-out recall@1 {loo:.4f}")
    folds = np.random.default_rng(0).permutation(len(labels)) % 5
    raw_acc, white_acc = [], []
    for f in range(5):
        q, g = folds == f, folds != f
        raw_acc.append(float((labels[g][(feats[q] @ feats[g].T).argmax(1)] == labels[q]).mean()))
        w = Whitening.fit(feats[g])
        white_acc.append(float((labels[g][(w.apply(feats[q]) @ w.apply(feats[g]).T).argmax(1)] == labels[q]).mean()))
    print(f"5-fold recall@1 of held-out images (whitening fitted without them): raw {np.mean(raw_acc):.4f}, "
          f"whitened {np.mean(white_acc):.4f}")  # fmt: skip
    t = index.suggested_rec_threshold
    print(f"suggested rec_threshold for the whitened index: {t}")
    print("rec_threshold | known: accepted and correct | unknown: rejected")
    for row in threshold_table(index.vectors()[1], labels, [t - 0.05, t, t + 0.05]):
        print(f"{row[0]:13.3f} | {row[1]:27.3f} | {row[2]:.3f}")


if __name__ == "__main__":
    main()
