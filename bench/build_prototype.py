"""Where `Engine.build_index` spends its time, and what the build changes bought (bench only).

Used by ``bench/run.py`` (section 2). The profile times each step of a build separately on the
same images: file read + decode (``load_image``), the thumbnail pass (``make_thumbnail``) and the
predictor (``Runtime.embed`` on decoded arrays, with a cProfile breakdown of PaddleX's predict).
The ablation then embeds the same gallery four ways, interleaved:

* the path before this change (re-enacted here): one decode thread a bounded window ahead of
  the models' one host, batches of 8;
* each of the two changes alone, and both (what ``Engine.embed_gallery`` does now): batches of
  4 (the batch-size sweep's best on this CPU), and gallery worker processes, one per core with
  that core's share of threads, each decoding, thumbnailing and embedding its own chunks.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from typing import Any

import numpy as np


def _now() -> float:
    return time.perf_counter()


def _top_functions(prof: cProfile.Profile, n: int = 8) -> list[tuple[str, float, float]]:
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, _line, func), (_cc, _nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        short = f"{os.path.basename(file)}:{func}" if file != "~" else func
        rows.append((short, tt, ct))
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def prototype(plan: Any, thread_rt: Any, settings: Any, data: Any, build: dict, bs: int) -> dict:
    from shitu.config import PipelineConfig
    from shitu.gallery import load_image, make_thumbnail, read_label_file
    from shitu.runtime import ModelHost, ModelSpec, Runtime

    items = read_label_file(data.label_file, data.root).require_clean().items
    if plan.gallery_limit:
        items = items[: plan.gallery_limit]
    n = len(items)
    ref = build["ours_index"].vectors()[1]
    maxpx = settings.max_image_pixels

    # --- profile: each step on its own -------------------------------------------------------------
    t0 = _now()
    rgbs = [load_image(i.image, max_pixels=maxpx) for i in items]
    t_decode = _now() - t0
    t0 = _now()
    for im in rgbs:
        make_thumbnail(im)
    t_thumb = _now() - t0
    t0 = _now()
    feats = thread_rt.embed(rgbs, bs)
    t_pred = _now() - t0
    pred_diff = float(np.abs(feats - ref).max())
    # the predictor's inside, on this thread (a host of our own; same model dir, same batch)
    # one core's share: the model as a gallery worker runs it (1 thread), on decoded arrays
    host = ModelHost(
        ModelSpec(None, ("PP-ShiTuV2_rec", str(thread_rt.recognition.model_dir)), None, bs, cpu_threads=1)
    )
    host.embed(rgbs[:bs], bs)
    sub = rgbs[: min(n, 256)]
    t0 = _now()
    host.embed(sub, bs)
    t_pred1 = (_now() - t0) / len(sub)  # seconds per image on one thread
    prof = cProfile.Profile()
    t0 = _now()
    prof.enable()
    host.embed(sub, bs)
    prof.disable()
    t_prof = _now() - t0
    top = _top_functions(prof)
    del host
    # the sweep behind the defaults: Paddle threads x batch size, the predictor alone, interleaved
    sweep_imgs = rgbs[: min(n, 128)]
    hosts = {
        t: ModelHost(ModelSpec(None, ("PP-ShiTuV2_rec", str(thread_rt.recognition.model_dir)), None, bs, cpu_threads=t))
        for t in (1, 2)
    }
    cells = [(t, b) for t in hosts for b in (1, 4, 8)]
    sweep: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    for t, b in cells:
        hosts[t].embed(sweep_imgs[:8], b)  # load and warm up
    for r in range(2):
        for t, b in cells if r % 2 == 0 else cells[::-1]:
            t0 = _now()
            hosts[t].embed(sweep_imgs, b)
            sweep[(t, b)].append(len(sweep_imgs) / (_now() - t0))
    del hosts
    sweep_ips = {c: float(np.median(v)) for c, v in sweep.items()}
    build_s = float(np.median(build["seconds"]["ours, workers up"]))
    embed_s = build["embed_s"]["ours, workers up"]
    total_ours = t_decode + t_thumb + t_pred  # shares of the measured steps (the build ran at another moment)
    profile_text = "\n".join(
        [
            f"Measured step by step on the same {n} images, in this process, models on a thread (seconds; the "
            f"timed build with the gallery workers up took {build_s:.1f} s, {embed_s:.1f} s of it embedding, the "
            "rest the adaptation check, calibration and the faiss build):",
            "",
            "| step | seconds | share of the three steps |",
            "|---|---:|---:|",
            f"| read + decode (`load_image`, PIL) | {t_decode:.1f} | {100 * t_decode / total_ours:.0f}% |",
            f"| thumbnails (`make_thumbnail`, ≤ 224 px JPEG) | {t_thumb:.1f} | {100 * t_thumb / total_ours:.0f}% |",
            f"| predictor: PaddleX preprocess + inference (`Runtime.embed`, batch {bs}) | {t_pred:.1f} | "
            f"{100 * t_pred / total_ours:.0f}% |",
            f"| predictor on one thread (a gallery worker's share of the cores), {len(sub)} images | "
            f"{t_pred1 * n:.1f} (est. for {n}) | – |",
            "",
            f"Timed one step after another here: decode and thumbnails ({t_decode + t_thumb:.1f} s), the "
            f"predictor ({t_pred:.1f} s). The predictor's features equal the build's (max abs diff "
            f"{pred_diff:.1e}). A gallery worker is sent each image's path (or its uploaded bytes), never a "
            "decoded array.",
            "",
            f"Inside the predictor (cProfile of `ModelHost.embed` on {len(sub)} decoded images, {t_prof:.1f} s under "
            "the profiler), functions by own time:",
            "",
            "| function | own s | cumulative s |",
            "|---|---:|---:|",
            *[f"| `{name}` | {tt:.2f} | {ct:.2f} |" for name, tt, ct in top],
            "",
            f"The defaults come from this sweep: the predictor alone on {len(sweep_imgs)} decoded images, images/s "
            "(median of 2 interleaved rounds) by Paddle CPU threads and batch size. Two threads buy far less "
            "than two cores, so one single-threaded gallery worker per core beats one process with all the "
            "threads:",
            "",
            "| Paddle threads | batch 1 | batch 4 | batch 8 |",
            "|---:|---:|---:|---:|",
            *[
                f"| {t} | " + " | ".join(f"{sweep_ips[(t, b)]:.1f}" for b in (1, 4, 8)) + " |"
                for t in (1, 2)
            ],
        ]
    )

    # --- ablation: the path before this change vs each change alone vs both, interleaved ----------
    rows = []
    del rgbs
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from shitu.engine import Engine
    from shitu.gallery import GalleryBatch

    def before_embed(rt: Any) -> np.ndarray:
        """The build path before this change: one decode thread reads, decodes and thumbnails a
        window of 3 batches ahead while the models' one host embeds batches of 8."""
        feats, chunk, window = [], [], deque()
        todo = iter(items)

        def prepare(item: Any) -> np.ndarray:
            rgb = load_image(item.image, max_pixels=maxpx)
            make_thumbnail(rgb)
            return rgb

        with ThreadPoolExecutor(1) as pool:
            while True:
                while len(window) < 24 and (item := next(todo, None)) is not None:
                    window.append(pool.submit(prepare, item))
                if not window:
                    break
                chunk.append(window.popleft().result())
                if len(chunk) == 8:
                    feats.append(rt.embed(chunk, 8))
                    chunk = []
            if chunk:
                feats.append(rt.embed(chunk, 8))
        return np.concatenate(feats)

    variants = [  # (name, batch size, gallery workers, re-enact the old path)
        ("before: a decode thread ahead of one host, batch 8", 8, 1, True),
        (f"batch {bs}, one host", bs, 1, False),
        ("gallery workers (up), batch 8", 8, 0, False),
        (f"now: gallery workers (up), batch {bs} (`Engine.embed_gallery`)", bs, 0, False),
    ]
    runtimes: dict[str, Any] = {}
    engines: dict[str, Any] = {}
    times: dict[str, list[float]] = {v[0]: [] for v in variants}
    feats_of: dict[str, np.ndarray] = {}
    workers = 0
    try:
        for name, batch_size, n_workers, _ in variants:
            config = PipelineConfig()
            config.recognition.batch_size = batch_size
            rt = Runtime(config, settings.model_copy(update={"build_workers": n_workers or None}), isolate=False)
            rt.embed([load_image(items[0].image)], batch_size)  # load and warm up
            if not n_workers:
                rt.start_gallery_lanes(wait=True)
                workers = rt._lanes.count
            runtimes[name] = rt
            engines[name] = Engine(settings, config=config, runtime=rt)
        for r in range(max(2, plan.build_rounds)):
            for name, _, _, old in variants if r % 2 == 0 else variants[::-1]:
                t0 = _now()
                if old:
                    f = before_embed(runtimes[name])
                else:
                    f = engines[name].embed_gallery(GalleryBatch(items=list(items)))[0]
                times[name].append(_now() - t0)
                feats_of[name] = f
    finally:
        for rt in runtimes.values():
            rt.close()
    before = float(np.median(times[variants[0][0]]))
    now = float(np.median(times[variants[-1][0]]))
    for name, *_ in variants:
        t = float(np.median(times[name]))
        rows.append(
            {
                "name": name,
                "seconds": t,
                "ips": n / t,
                "base_s": before,
                "speedup": before / t,
                "vs_pdx": build["ratio_up"] * now / t,  # the measured build ratio is the engine as it is now
                "diff": float(np.abs(feats_of[name] - ref).max()),
            }
        )
    prototype_text = (
        f"Decode + thumbnails + features of the same {n} images (no index build, no calibration), "
        f"{max(2, plan.build_rounds)} interleaved rounds, median seconds; gallery workers: {workers}, started "
        "and loaded before the rounds. `speed-up` is relative to the path before this change (first row); "
        "`× PaddleX` scales the measured ours (workers up) / PaddleX build ratio above by each variant's time."
    )
    return {
        "rows": rows,
        "profile_text": profile_text,
        "prototype_text": prototype_text,
        "steps": {"decode": t_decode, "thumbs": t_thumb, "predictor": t_pred, "predictor_1thread_per_img": t_pred1},
    }
