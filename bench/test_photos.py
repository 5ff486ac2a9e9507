"""Detections and labels for the shared drink test photos, under several option settings.

There is no ground truth for these photos, so this prints what a person needs to judge
the defaults (detector threshold, whole-image policy, cross-box NMS): every box with its
detector class, top-1 label and similarity, per setting, and the per-stage CPU time.

    python bench/test_photos.py --index /tmp/drink_idx   # an index built from gallery.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import Settings  # noqa: E402
from shitu.engine import Engine  # noqa: E402
from shitu.gallery import list_image_files, load_image  # noqa: E402
from shitu.stores.layout import load_index  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "drink_dataset"
    parser.add_argument("--data", type=Path, default=default)
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--det", type=float, nargs="+", default=[0.25, 0.3, 0.4])
    parser.add_argument("--out", type=Path, help="save rendered images of the default setting here")
    args = parser.parse_args()
    engine = Engine(Settings.from_env(offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR")), isolate=False)
    index = load_index(args.index)
    for stage, info in engine.models().items():
        if isinstance(info, dict):
            print(f"{stage}:", info["description"])
    photos = [(p, load_image(p)) for p in list_image_files(args.data / "test_images")]
    totals: dict[str, list[float]] = {"detect": [], "embed": [], "search": []}
    engine.recognize(photos[0][1], index, det_threshold=0.25, rec_threshold=0.0, rec_topk=1)  # warm-up
    for det in args.det:
        for whole in ("auto", "always"):
            print(f"\n=== det_threshold {det}, whole_image {whole}, rec_threshold 0 (top-1 shown with score)")
            for path, rgb in photos:
                res = engine.recognize(
                    rgb, index, det_threshold=det, rec_threshold=0.0, rec_topk=1, whole_image=whole, nms_iou=None
                )
                for k, v in res.timings.items():
                    totals[k].append(v)
                boxes = "; ".join(
                    f"{'WHOLE' if o.whole_image else o.det_label}:{o.label} {o.score:.3f}" for o in res.objects
                )
                print(f"{path.name:20s} {boxes}")
                if args.out and det == engine.default_det_threshold and whole == "auto":
                    args.out.mkdir(parents=True, exist_ok=True)
                    final = engine.recognize(rgb, index, det_threshold=det)
                    final.render().save(args.out / f"{path.stem}.png")
    print(
        "\nmean CPU time per photo (ms): " + ", ".join(f"{k} {1000 * sum(v) / len(v):.1f}" for k, v in totals.items())
    )


if __name__ == "__main__":
    main()
