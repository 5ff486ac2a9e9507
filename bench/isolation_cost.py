"""What running PaddleX in a supervised worker process costs per query (issue: crash containment).

The same engine code, the same index and the same photos, once with the models on an inference
thread in this process and once in the worker process; repetitions are interleaved (A, B, A, B,
...) so the machine's noise hits both alike. Reports the median of the paired per-photo ratios.

    python bench/isolation_cost.py                 # drink test photos from ../shared if present
    python bench/isolation_cost.py --quick          # the generated sample photos, fewer rounds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import PipelineConfig, Settings  # noqa: E402
from shitu.engine import Engine  # noqa: E402
from shitu.gallery import list_image_files, load_image, read_label_file  # noqa: E402
from shitu.runtime import Runtime  # noqa: E402

DRINKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "drink_dataset"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "isolation_cost.txt")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    data = Path(tempfile.mkdtemp(prefix="shitu-iso-"))
    settings = Settings.from_env(data_dir=data, offline=True, model_dir=os.environ.get("SHITU_MODEL_DIR"))
    runtimes = {
        "thread": Runtime(PipelineConfig(), settings, isolate=False),
        "process": Runtime(PipelineConfig(), settings, isolate=True),
    }
    engines = {name: Engine(settings, runtime=rt) for name, rt in runtimes.items()}
    if DRINKS.is_dir() and not args.quick:
        batch = read_label_file(DRINKS / "gallery.txt", DRINKS).require_clean()
        photos = [load_image(p) for p in list_image_files(DRINKS / "test_images")]
        what = f"drink gallery ({len(batch.items)} images), {len(photos)} drink test photos"
    else:
        from shitu.sample import ensure_sample_files

        root, label_file, queries = ensure_sample_files(settings)
        batch = read_label_file(label_file, root)
        photos = [load_image(p) for p in queries]
        what = f"sample gallery ({len(batch.items)} images), {len(photos)} sample query photos"
    index = engines["thread"].build_index(batch, index_type="Flat")
    for engine in engines.values():  # warm-up: load the models, first-call allocations
        engine.recognize(photos[0], index)
    times: dict[str, list[list[float]]] = {name: [[] for _ in photos] for name in engines}
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for k, photo in enumerate(photos):
            for name in order:
                start = time.perf_counter()
                engines[name].recognize(photo, index)
                times[name][k].append(time.perf_counter() - start)
    med = {name: [statistics.median(t) for t in per] for name, per in times.items()}
    ratios = [p / t for p, t in zip(med["process"], med["thread"])]
    lines = [
        f"isolation cost per query: {what}, {rounds} interleaved rounds, {os.cpu_count()} cores",
        f"median query time, models on a thread in-process:   {1000 * statistics.median(med['thread']):.1f} ms",
        f"median query time, models in the worker process:    {1000 * statistics.median(med['process']):.1f} ms",
        f"median of paired per-photo ratios (process/thread): {statistics.median(ratios):.3f}",
        f"per photo: {', '.join(f'{x:.3f}' for x in ratios)}",
    ]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for rt in runtimes.values():
        rt.close()


if __name__ == "__main__":
    main()
