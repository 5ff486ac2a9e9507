"""Where `Engine.build_index` spends its time, and what the build changes bought (bench only).

Used by ``bench/run.py`` (section 2). The profile times each step of a build separately on the
same images: file read + decode (``load_image``), the thumbnail pass (``make_thumbnail``), the
predictor (``Runtime.embed`` on decoded arrays, with a cProfile breakdown of PaddleX's predict)
and the worker-process IPC. The ablation then embeds the same gallery four ways, interleaved:

* the path before this change: decode + thumbnail every image first, then embed in batches,
  with PaddleX's default 10 Paddle Inference CPU threads;
* each of the two changes alone, and both (what ``Engine.embed_gallery`` does now): decoding
  pipelined on a thread a bounded window ahead of the models, and Paddle's math threads capped
  at the cores this process may use (``SHITU_CPU_THREADS``).
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
    host = ModelHost(ModelSpec(None, ("PP-ShiTuV2_rec", str(thread_rt.recognition.model_dir)), None, bs))
    host.embed(rgbs[:bs], bs)
    sub = rgbs[: min(n, 256)]
    prof = cProfile.Profile()
    t0 = _now()
    prof.enable()
    host.embed(sub, bs)
    prof.disable()
    t_prof = _now() - t0
    top = _top_functions(prof)
    del host
    # IPC: the same embed through the worker process (images are pickled through the pipe)
    sub_ipc = rgbs[: min(n, 128)]
    proc_rt = Runtime(PipelineConfig(), settings, isolate=True)
    try:
        proc_rt.embed(sub_ipc[:bs], bs)
        thread_rt.embed(sub_ipc[:bs], bs)
        ipc_thread, ipc_proc = [], []
        for r in range(2):
            for which in ("t", "p") if r % 2 == 0 else ("p", "t"):
                t0 = _now()
                (thread_rt if which == "t" else proc_rt).embed(sub_ipc, bs)
                (ipc_thread if which == "t" else ipc_proc).append(_now() - t0)
    finally:
        proc_rt.close()
    ipc_per_img = (min(ipc_proc) - min(ipc_thread)) / len(sub_ipc)
    build_s = float(np.median(build["ours_s"]))
    total_ours = t_decode + t_thumb + t_pred  # shares of the measured steps (the build ran at another moment)
    profile_text = "\n".join(
        [
            f"Measured step by step on the same {n} images, in this process, models on a thread (seconds; the "
            f"timed build took {build_s:.1f} s, the faiss Flat build and threshold suggestion on top are ~0.1 s):",
            "",
            "| step | seconds | share of the three steps |",
            "|---|---:|---:|",
            f"| read + decode (`load_image`, PIL) | {t_decode:.1f} | {100 * t_decode / total_ours:.0f}% |",
            f"| thumbnails (`make_thumbnail`, ≤ 224 px JPEG) | {t_thumb:.1f} | {100 * t_thumb / total_ours:.0f}% |",
            f"| predictor: PaddleX preprocess + inference (`Runtime.embed`, batch {bs}) | {t_pred:.1f} | "
            f"{100 * t_pred / total_ours:.0f}% |",
            f"| IPC if the models run in the worker process (`isolate=True`, the server's default) | "
            f"{ipc_per_img * n:+.1f} (est.) | {100 * ipc_per_img * n / total_ours:+.0f}% |",
            "",
            f"Timed one step after another here: decode and thumbnails ({t_decode + t_thumb:.1f} s), the "
            f"predictor ({t_pred:.1f} s). The predictor's features equal the build's (max abs diff "
            f"{pred_diff:.1e}). IPC: {1000 * ipc_per_img:.2f} ms per image (embed of {len(sub_ipc)} decoded images, "
            "worker − thread, best of 2 interleaved) — the list of images is pickled through the pipe; only a "
            "query's single image uses shared memory.",
            "",
            f"Inside the predictor (cProfile of `ModelHost.embed` on {len(sub)} decoded images, {t_prof:.1f} s under "
            "the profiler), functions by own time:",
            "",
            "| function | own s | cumulative s |",
            "|---|---:|---:|",
            *[f"| `{name}` | {tt:.2f} | {ct:.2f} |" for name, tt, ct in top],
        ]
    )

    # --- ablation: the path before this change vs each change alone vs both, interleaved ----------
    rows = []
    del rgbs
    from shitu.engine import Engine
    from shitu.gallery import GalleryBatch
    from shitu.runtime import PADDLEX_CPU_THREADS, usable_cores

    def sequential_embed(rt: Any) -> np.ndarray:
        """The build path before this change: decode + thumbnail every image, then embed in batches."""
        decoded = []
        for item in items:
            rgb = load_image(item.image, max_pixels=maxpx)
            make_thumbnail(rgb)
            decoded.append(rgb)
        return np.concatenate([rt.embed(decoded[s : s + bs], bs) for s in range(0, len(decoded), bs)])

    ours_threads = min(usable_cores(), PADDLEX_CPU_THREADS)
    runtimes: dict[int, Any] = {}
    variants = []
    try:
        for threads in dict.fromkeys((PADDLEX_CPU_THREADS, ours_threads)):
            rt = Runtime(PipelineConfig(), settings.model_copy(update={"cpu_threads": threads}), isolate=False)
            rt.embed([load_image(items[0].image)], bs)  # load and warm up
            runtimes[threads] = rt
        engine = {t: Engine(settings.model_copy(update={"cpu_threads": t}), runtime=rt) for t, rt in runtimes.items()}
        for name, threads, pipelined in (
            (f"before: decode all, then embed; {PADDLEX_CPU_THREADS} Paddle threads (PaddleX's default)",
             PADDLEX_CPU_THREADS, False),
            (f"pipelined decode; {PADDLEX_CPU_THREADS} Paddle threads", PADDLEX_CPU_THREADS, True),
            (f"decode all, then embed; {ours_threads} Paddle threads", ours_threads, False),
            (f"now: pipelined decode; {ours_threads} Paddle threads (`Engine.embed_gallery`)", ours_threads, True),
        ):  # fmt: skip
            if (threads, pipelined) not in [(v[1], v[2]) for v in variants]:
                variants.append((name, threads, pipelined))
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        feats_of: dict[str, np.ndarray] = {}
        for r in range(max(2, plan.build_rounds)):
            for name, threads, pipelined in variants if r % 2 == 0 else variants[::-1]:
                t0 = _now()
                if pipelined:
                    f = engine[threads].embed_gallery(GalleryBatch(items=list(items)))[0]
                else:
                    f = sequential_embed(runtimes[threads])
                times[name].append(_now() - t0)
                feats_of[name] = f
    finally:
        for rt in runtimes.values():
            rt.close()
    before = float(np.median(times[variants[0][0]]))
    now = float(np.median(times[variants[-1][0]]))
    for name, _, _ in variants:
        t = float(np.median(times[name]))
        rows.append(
            {
                "name": name,
                "seconds": t,
                "ips": n / t,
                "base_s": before,
                "speedup": before / t,
                "vs_pdx": build["ratio"] * now / t,  # the measured build ratio is the engine as it is now
                "diff": float(np.abs(feats_of[name] - ref).max()),
            }
        )
    prototype_text = (
        f"Decode + thumbnails + features of the same {n} images (the faiss build on top is ~0.1 s), "
        f"{max(2, plan.build_rounds)} interleaved rounds, median seconds. `speed-up` is relative to the path "
        "before this change (first row); `× PaddleX` scales the measured ours/PaddleX build ratio above (the "
        "engine as it is now, last row) by each variant's time. The decoded window of the pipelined path is at most "
        f"{3 * bs} images, where the old path held every decoded image of the gallery at once."
    )
    return {
        "rows": rows,
        "profile_text": profile_text,
        "prototype_text": prototype_text,
        "steps": {"decode": t_decode, "thumbs": t_thumb, "predictor": t_pred, "ipc_per_img": ipc_per_img},
    }
