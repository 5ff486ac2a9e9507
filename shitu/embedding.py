"""A gallery's images → their features, in one pass where the models run.

Chunks of a few images go to the runtime's host or, for a large gallery, to worker processes of
their own, one per core (``SHITU_BUILD_WORKERS``; the host works until the first of them is up),
each decoding, thumbnailing and embedding its chunk while the others do theirs. Memory holds a few
chunks, not the whole decoded gallery; features come back in line order. The query-like views the
calibration measures the capture gap with (:mod:`shitu.augment`) are made and embedded in the same
chunks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from shitu.augment import view_plan
from shitu.errors import ShiTuError
from shitu.gallery import GalleryBatch, GalleryItem, SkippedLine, in_line_order
from shitu.runtime import Runtime

Progress = Callable[[int, int, str], None]  # (done, total, what)


def embed_gallery(
    runtime: Runtime, batch: GalleryBatch, *, batch_size: int, max_pixels: int, skip_invalid: bool = False,
    progress: Progress | None = None, views: bool = False,
) -> tuple[Any, ...]:  # fmt: skip
    """Decode and embed every item of ``batch``: ``(features, items kept, skipped lines)``, the items
    with their thumbnails. Unusable images raise (listing every bad line) unless ``skip_invalid``;
    never silently dropped. ``views``: also embed the photos' query-like views
    (:func:`shitu.augment.view_plan`: up to 4 a photo, 128 in all, in the same chunks); a fourth item
    comes back, ``(row of each view's photo among the items kept, features)``. Progress counts images."""
    items = list(batch.items)
    total = len(items)
    bs = batch_size
    chunks = [items[i : i + bs] for i in range(0, total, bs)]
    plan = view_plan(total).tolist() if views else None
    results: list[tuple[np.ndarray | None, list[bytes | None], list[str | None]] | None] = [None] * len(chunks)
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "bad": False, "lanes_up": False}
    failure: list[BaseException] = []

    def drive(call: Callable[..., Any], lane: int) -> None:
        while True:
            with lock:
                if failure or state["next"] >= len(chunks) or (lane == 0 and state["lanes_up"]):
                    return
                n = state["next"]
                state["next"] += 1
                embed = skip_invalid or not state["bad"]  # a bad image stops the work, not the scan
            try:
                extra = () if plan is None else ([(p, plan[p]) for p in range(n * bs, n * bs + len(chunks[n]))],)
                result = call([i.image for i in chunks[n]], max_pixels, bs, embed, *extra)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                with lock:
                    failure.append(exc)
                return
            with lock:
                results[n] = result
                state["done"] += len(chunks[n])
                state["bad"] = state["bad"] or any(result[2])
                state["lanes_up"] = state["lanes_up"] or lane > 0
                done = state["done"]
            if progress:
                progress(done, total, "embedding")

    if progress:
        progress(0, total, "embedding")
    with runtime.gallery_lanes(total) as lanes:
        threads = [
            threading.Thread(target=drive, args=(call, k), name=f"shitu-lane-{k}", daemon=True)
            for k, call in enumerate(lanes[1:], 1)
        ]
        for t in threads:
            t.start()
        drive(lanes[0], 0)  # the models' own host works until a lane is up
        for t in threads:
            t.join()
    if failure:
        raise failure[0]
    skipped = list(batch.skipped)
    kept: list[GalleryItem] = []
    feats: list[np.ndarray] = []
    row_of: dict[int, int] = {}  # position in the batch -> row among the kept items
    view_at: list[int] = []
    view_feats: list[np.ndarray] = []
    for n, (chunk, result) in enumerate(zip(chunks, results)):
        assert result is not None
        chunk_feats, thumbnails, errors = result[:3]
        for k, (item, thumbnail, error) in enumerate(zip(chunk, thumbnails, errors)):
            if error is not None:
                skipped.append(SkippedLine(item.line_no, item.source, error))
            else:
                item.thumbnail = thumbnail
                row_of[n * bs + k] = len(kept)
                kept.append(item)
        if chunk_feats is not None:
            feats.append(chunk_feats)
        if plan is not None and result[3][1] is not None:
            view_at += result[3][0]
            view_feats.append(result[3][1])
    GalleryBatch(items=kept, skipped=[] if skip_invalid else skipped).require_clean()
    if not feats:
        raise ShiTuError(f"none of the {total} image(s) could be used")
    if plan is None:
        return np.concatenate(feats), kept, in_line_order(skipped)
    rows = np.array([row_of[p] for p in view_at], dtype=np.int64)
    made = np.concatenate(view_feats) if view_feats else np.zeros((0, feats[0].shape[1]), np.float32)
    return np.concatenate(feats), kept, in_line_order(skipped), (rows, made)

