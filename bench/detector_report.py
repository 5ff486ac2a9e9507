"""Detections and CPU latency of the offline starter detector through PaddleX's own predictor.

Runs the exported objectron SSD model dir with ``paddlex.create_model("PP-ShiTuV2_det", ...)``
on every test photo and prints, per photo, the boxes (Open Images class, score, bbox in
original pixels) that pass each candidate threshold, a summary per threshold, and the CPU
latency per image (PaddleX ``predict`` on the file: read, resize, normalise, network, decode,
NMS; mean over a few runs after a warm-up). The summary is what the default threshold
(``DEFAULT_DET_THRESHOLD``) was chosen from: ``100.jpeg`` must give >= 2 separate bottle boxes
while the other photos gain few extra boxes.

Run::

    python bench/detector_report.py --images ../shared/data/drink_dataset/test_images \\
        --starter-dir data/models/starter [--draw /tmp/det_vis]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import Settings
from shitu.starter.detector import DEFAULT_DET_THRESHOLD, ensure_starter_detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def draw(path: Path, boxes: list[dict], threshold: float, out_dir: Path) -> None:
    """Save the photo with its boxes (for a human look; not part of the report)."""
    image = cv2.imread(str(path))
    for box in boxes:
        if box["score"] <= threshold:
            continue
        x1, y1, x2, y2 = np.rint(box["coordinate"]).astype(int).tolist()
        cv2.rectangle(image, (x1, y1), (x2, y2), (0, 0, 255), 3)
        cv2.putText(image, f"{box['label']} {box['score']:.2f}", (x1 + 4, y1 + 28),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 0, 255), 2)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_dir / f"{path.stem}.jpg"), image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path,
                        default=Path("../shared/data/drink_dataset/test_images"))  # fmt: skip
    parser.add_argument("--starter-dir", type=Path, default=Settings.from_env().models_dir / "starter",
                        help="the starter pack folder (default: <SHITU_DATA_DIR>/models/starter)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per photo")
    parser.add_argument("--draw", type=Path, help="save annotated photos here")
    args = parser.parse_args()

    import paddlex

    model_dir = ensure_starter_detector(args.starter_dir)
    predictor = paddlex.create_model(
        model_name="PP-ShiTuV2_det", model_dir=str(model_dir), device="cpu"
    )
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    floor = min(THRESHOLDS)
    print(f"model dir: {model_dir.name}  photos: {len(photos)}  CPU cores: {os.cpu_count()}  "
          f"load average at start: {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"thresholds: {', '.join(map(str, THRESHOLDS))}; default {DEFAULT_DET_THRESHOLD}\n")

    per_photo: dict[str, list[dict]] = {}
    latencies: dict[str, float] = {}
    array_latencies: dict[str, float] = {}
    for photo in photos:
        result = next(iter(predictor.predict(str(photo), threshold=floor)))
        boxes = sorted(result["boxes"], key=lambda b: -b["score"])
        per_photo[photo.name] = boxes
        bgr = cv2.imread(str(photo))
        latencies[photo.name] = timed(predictor, str(photo), args.runs)
        array_latencies[photo.name] = timed(predictor, bgr, args.runs)
        h, w = bgr.shape[:2]
        print(f"== {photo.name}  ({w}x{h})  {latencies[photo.name] * 1000:.1f} ms/image from file, "
              f"{array_latencies[photo.name] * 1000:.1f} ms from a decoded array")  # fmt: skip
        for box in boxes:
            passes = max(t for t in THRESHOLDS if box["score"] > t)
            x1, y1, x2, y2 = box["coordinate"]
            print(f"   {box['label']:<18} {box['score']:.3f}  [{x1:7.1f} {y1:7.1f} {x2:7.1f} "
                  f"{y2:7.1f}]  passes <= {passes}")  # fmt: skip
        if args.draw:
            draw(photo, boxes, DEFAULT_DET_THRESHOLD, args.draw)

    print("\nSummary: boxes per photo at each threshold (bottles on 100.jpeg in brackets)")
    print(f"{'photo':<20}" + "".join(f"{t:>7}" for t in THRESHOLDS))
    for name, boxes in per_photo.items():
        counts = []
        for t in THRESHOLDS:
            kept = [b for b in boxes if b["score"] > t]
            cell = str(len(kept))
            if name == "100.jpeg":
                cell += f"[{sum(b['label'] == 'Bottle' for b in kept)}]"
            counts.append(cell)
        print(f"{name:<20}" + "".join(f"{c:>7}" for c in counts))
    totals = [sum(sum(b["score"] > t for b in bs) for bs in per_photo.values()) for t in THRESHOLDS]
    empty = [sum(not any(b["score"] > t for b in bs) for bs in per_photo.values()) for t in THRESHOLDS]
    print(f"{'total boxes':<20}" + "".join(f"{c:>7}" for c in totals))
    print(f"{'photos with none':<20}" + "".join(f"{c:>7}" for c in empty))

    if "100.jpeg" in per_photo:
        kept = [b for b in per_photo["100.jpeg"] if b["score"] > DEFAULT_DET_THRESHOLD]
        overlaps = [iou(a["coordinate"], b["coordinate"]) for i, a in enumerate(kept)
                    for b in kept[i + 1 :]]  # fmt: skip
        print(f"\n100.jpeg at {DEFAULT_DET_THRESHOLD}: {len(kept)} boxes "
              f"({', '.join(b['label'] for b in kept)}), max pairwise IoU "
              f"{max(overlaps, default=0.0):.2f}")  # fmt: skip

    print(f"\nload average at end: {os.getloadavg()[0]:.2f} (other processes on the cores inflate latency)")
    for what, values in (("from the JPEG file", list(latencies.values())),
                         ("from a decoded BGR array", list(array_latencies.values()))):  # fmt: skip
        print(f"CPU latency per image via PaddleX predict {what} (mean of {args.runs} runs after "
              f"warm-up): mean {statistics.mean(values) * 1000:.1f} ms, median "
              f"{statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms")  # fmt: skip


def timed(predictor, image, runs: int) -> float:
    """Mean seconds of ``predict`` at the default threshold, after one warm-up call."""
    next(iter(predictor.predict(image, threshold=DEFAULT_DET_THRESHOLD)))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        next(iter(predictor.predict(image, threshold=DEFAULT_DET_THRESHOLD)))
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


if __name__ == "__main__":
    main()
