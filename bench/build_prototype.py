"""Where `Engine.build_index` spends its time, and a prototype of a faster build (bench only).

Used by ``bench/run.py`` (section 2); nothing here changes ``shitu/``. The profile times each
step of our build separately on the same images: file read + decode (``load_image``), the
thumbnail pass (``make_thumbnail``), the predictor (``Runtime.embed`` on decoded arrays, with a
cProfile breakdown of PaddleX's predict), and the worker-process IPC (the same ``embed`` through
``isolate=True``). The prototype then builds the same features three ways:

* ``pipelined``: decode + thumbnail in a 2-thread pool, a bounded window ahead of the predictor,
  which runs on the runtime's inference thread meanwhile (one pass over each image);
* ``pipelined + cpu_threads=2``: the same with Paddle Inference's CPU math threads set to the
  machine's cores (PaddleX's default is 10, ``PADDLE_PDX_CPU_NUM_THREADS``);
* ``... + batch 32``: the same with a larger batch.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def _now() -> float:
    return time.perf_counter()


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def pipelined_embed(rt: Any, items: list, bs: int, max_pixels: int, workers: int = 2) -> tuple[np.ndarray, list[bytes]]:
    """Decode and thumbnail in a thread pool while the runtime embeds the previous batches."""
    from shitu.gallery import load_image, make_thumbnail

    def prep(item: Any) -> tuple[np.ndarray, bytes]:
        rgb = load_image(item.image, max_pixels=max_pixels)
        return rgb, make_thumbnail(rgb)

    feats, thumbs = [], []
    with ThreadPoolExecutor(workers, thread_name_prefix="bench-decode") as pool:
        window: deque = deque()
        nxt = 0
        for start in range(0, len(items), bs):
            while nxt < min(len(items), start + 3 * bs):  # keep up to 3 batches in flight
                window.append(pool.submit(prep, items[nxt]))
                nxt += 1
            chunk = [window.popleft().result() for _ in range(min(bs, len(items) - start))]
            thumbs += [c[1] for c in chunk]
            feats.append(rt.embed([c[0] for c in chunk], bs))
    return np.concatenate(feats), thumbs


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
            f"| thumbnails (`make_thumbnail`, 96 px JPEG) | {t_thumb:.1f} | {100 * t_thumb / total_ours:.0f}% |",
            f"| predictor: PaddleX preprocess + inference (`Runtime.embed`, batch {bs}) | {t_pred:.1f} | "
            f"{100 * t_pred / total_ours:.0f}% |",
            f"| IPC if the models run in the worker process (`isolate=True`, the server's default) | "
            f"{ipc_per_img * n:+.1f} (est.) | {100 * ipc_per_img * n / total_ours:+.0f}% |",
            "",
            f"Everything runs one step after another: decode and thumbnails ({t_decode + t_thumb:.1f} s) are "
            f"serial with the predictor ({t_pred:.1f} s). The predictor's features equal the build's (max abs diff "
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

    # --- prototype variants: each paired with our sequential path run right before or after it
    # (alternating order), so each speed-up is a paired ratio measured under the same load -----------
    rows = []
    del rgbs

    def sequential_embed(rt: Any, batch: int) -> np.ndarray:
        """What ``Engine.embed_gallery`` does: decode + thumbnail every image, then embed in batches."""
        decoded = []
        for item in items:
            rgb = load_image(item.image, max_pixels=maxpx)
            make_thumbnail(rgb)
            decoded.append(rgb)
        return np.concatenate([rt.embed(decoded[s : s + batch], batch) for s in range(0, len(decoded), batch)])

    for k, (name, threads, pipelined) in enumerate(
        (
            ("pipelined decode + thumbnails (2 threads) beside the predictor", None, True),
            ("sequential (as ours) with Paddle cpu_threads=2", "2", False),
            ("pipelined + Paddle cpu_threads=2", "2", True),
        )
    ):
        if threads is None:
            rt, own = thread_rt, False
        else:
            with _env("PADDLE_PDX_CPU_NUM_THREADS", threads):
                rt, own = Runtime(PipelineConfig(), settings, isolate=False), True
                rt.load()  # the predictor reads the option when it is created
                rt.embed([load_image(items[0].image)], bs)
        try:
            times = {}
            for which in ("base", "variant") if k % 2 == 0 else ("variant", "base"):
                t0 = _now()
                if which == "base":
                    sequential_embed(thread_rt, bs)
                elif pipelined:
                    f, _ = pipelined_embed(rt, items, bs, maxpx)
                else:
                    f = sequential_embed(rt, bs)
                times[which] = _now() - t0
        finally:
            if own:
                rt.close()
        speedup = times["base"] / times["variant"]
        rows.append(
            {
                "name": name,
                "seconds": times["variant"],
                "ips": n / times["variant"],
                "base_s": times["base"],
                "speedup": speedup,
                "vs_pdx": speedup * build["ratio"],
                "diff": float(np.abs(f - ref).max()),
            }
        )
    prototype_text = (
        "Decode + thumbnails + features (the faiss build on top is ~0.1 s). Each variant is paired with our "
        "sequential path (decode + thumbnail every image, then embed in batches of 8, as `Engine.embed_gallery`) run "
        "just before or after it; `speed-up` is sequential time / variant time, and `× PaddleX` multiplies it by the "
        "measured ours/PaddleX build ratio above. `pipelined` overlaps decode/thumbnails with the predictor "
        "(bounded window of 3 batches); `cpu_threads=2` gives Paddle Inference as many math threads as the "
        "machine has cores (PaddleX creates predictors with `cpu_threads=10`, `PADDLE_PDX_CPU_NUM_THREADS`)."
    )
    return {
        "rows": rows,
        "profile_text": profile_text,
        "prototype_text": prototype_text,
        "steps": {"decode": t_decode, "thumbs": t_thumb, "predictor": t_pred, "ipc_per_img": ipc_per_img},
    }
