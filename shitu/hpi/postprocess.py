"""The detector steps that stay outside the ONNX graph, in NumPy: the exact outputs of the Paddle graph.

A detector converted without its in-graph NMS (:mod:`shitu.hpi.export`) returns raw tensors; the
functions here turn them into what the Paddle program returns and PaddleX's detection predictor
reads — boxes ``[M, 6] = (class_id, score, x1, y1, x2, y2)`` in original-image pixels and an int32
``[N]`` count per image — with the NMS settings read from the graph's own ``multiclass_nms3`` op.
The arithmetic follows the graph's (float32, same operation order) and Paddle's NMS kernel
(candidates above the score threshold, stable sort by score, greedy suppression by IoU, at most
``keep_top_k`` per image, rows grouped by class), so the boxes are Paddle's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _overlap_row(box: np.ndarray, boxes: np.ndarray, normalized: bool) -> np.ndarray:
    """IoU of one box with each of ``boxes`` (the row of :func:`shitu.geometry.box_iou`, without its
    matrix set-up: this runs once per kept box), as Paddle's ``JaccardOverlap``: pixel boxes
    (``normalized=False``) count their edges, +1."""
    edge = 0.0 if normalized else 1.0
    x1, y1, x2, y2 = (float(v) for v in box)
    w = np.clip(np.minimum(x2, boxes[:, 2]) - np.maximum(x1, boxes[:, 0]) + edge, 0, None)
    h = np.clip(np.minimum(y2, boxes[:, 3]) - np.maximum(y1, boxes[:, 1]) + edge, 0, None)
    inter = w * h
    area = max(x2 - x1 + edge, 0.0) * max(y2 - y1 + edge, 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0] + edge, 0, None) * np.clip(boxes[:, 3] - boxes[:, 1] + edge, 0, None)
    return inter / np.maximum(area + areas - inter, 1e-9)


def greedy_nms(
    boxes: np.ndarray, scores: np.ndarray, *, score_threshold: float, nms_threshold: float, nms_top_k: int = -1,
    normalized: bool = True, nms_eta: float = 1.0,
) -> np.ndarray:  # fmt: skip
    """Kept indices for one class, best first (Paddle's ``NMSFast``: a candidate is kept when its IoU
    with every box kept before it is at most the threshold)."""
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if nms_top_k > -1:
        order = order[:nms_top_k]
    ranked = boxes[order].astype(np.float64)
    kept: list[int] = []
    if nms_eta >= 1:  # each kept box marks the later candidates it suppresses: one IoU row per kept box
        suppressed = np.zeros(len(order), dtype=bool)
        for pos in range(len(order)):
            if suppressed[pos]:
                continue
            kept.append(pos)
            suppressed[pos + 1 :] |= _overlap_row(ranked[pos], ranked[pos + 1 :], normalized) > nms_threshold
        return order[kept].astype(np.int64)
    threshold = nms_threshold  # adaptive: it shrinks after each kept box, so compare with it as it is now
    for pos in range(len(order)):
        if kept and np.any(_overlap_row(ranked[pos], ranked[kept], normalized) > threshold):
            continue
        kept.append(pos)
        if threshold > 0.5:
            threshold *= nms_eta
    return order[kept].astype(np.int64)


def multiclass_nms(
    boxes: np.ndarray, scores: np.ndarray, nms: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """One image's ``multiclass_nms3``: boxes ``[M, 4]``, scores ``[C, M]`` → rows ``[k, 6]`` =
    (class, score, box) grouped by class, and the kept box indices."""
    background = int(nms.get("background_label", -1))
    keep_top_k = int(nms.get("keep_top_k", -1))
    picked: list[tuple[int, np.ndarray]] = []
    for c in range(scores.shape[0]):
        if c == background:
            continue
        kept = greedy_nms(
            boxes, scores[c], score_threshold=float(nms["score_threshold"]),
            nms_threshold=float(nms["nms_threshold"]), nms_top_k=int(nms.get("nms_top_k", -1)),
            normalized=bool(nms.get("normalized", True)), nms_eta=float(nms.get("nms_eta", 1.0)),
        )  # fmt: skip
        if len(kept):
            picked.append((c, kept))
    total = sum(len(k) for _, k in picked)
    if keep_top_k > -1 and total > keep_top_k:
        flat = [(float(scores[c, i]), c, int(i)) for c, kept in picked for i in kept]
        order = np.argsort([-s for s, _, _ in flat], kind="stable")[:keep_top_k]
        chosen = [flat[k] for k in order]
        picked = [(c, np.asarray([i for _, cc, i in chosen if cc == c], np.int64)) for c, _ in picked]
        picked = [(c, k) for c, k in picked if len(k)]
    rows = [
        np.concatenate([np.full((len(k), 1), c, np.float32), scores[c, k][:, None], boxes[k]], axis=1)
        for c, k in picked
    ]
    indices = np.concatenate([k for _, k in picked]) if picked else np.zeros(0, np.int64)
    out = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 6), np.float32)
    return out, indices


def _batch(per_image: Sequence[np.ndarray]) -> list[np.ndarray]:
    counts = np.asarray([len(r) for r in per_image], dtype=np.int32)
    boxes = np.concatenate(per_image).astype(np.float32) if len(per_image) else np.zeros((0, 6), np.float32)
    return [boxes.reshape(-1, 6), counts]


def nms_cut(bboxes: np.ndarray, scores: np.ndarray, nms: dict[str, Any]) -> list[np.ndarray]:
    """A PaddleDetection detector cut before NMS: ``bboxes [N, M, 4]``, ``scores [N, C, M]`` →
    ``[boxes [sum k, 6], counts [N]]``."""
    return _batch([multiclass_nms(bboxes[n], scores[n], nms)[0] for n in range(len(bboxes))])


def ssd_raw(
    raw_boxes: np.ndarray, raw_scores: np.ndarray, scale_factor: np.ndarray, meta: dict[str, Any],
    anchors: np.ndarray,
) -> list[np.ndarray]:  # fmt: skip
    """The starter SSD's ``SsdPostprocess`` (:mod:`shitu.starter.tflite_to_paddle`): decode the
    anchors' regressions into original pixels, score each box by its best non-background class,
    class-agnostic NMS; ``[boxes [sum k, 6], counts [N]]``."""
    f32 = np.float32
    a = anchors.astype(f32)
    sy, sx, sh, sw = (f32(s) for s in meta["box_scales"])
    in_h, in_w = (f32(v) for v in meta["input_hw"])
    raw = raw_boxes.astype(f32)
    yc = raw[:, :, 0] / sy * a[:, 2] + a[:, 0]
    xc = raw[:, :, 1] / sx * a[:, 3] + a[:, 1]
    h = np.exp(raw[:, :, 2] / sh) * a[:, 2]
    w = np.exp(raw[:, :, 3] / sw) * a[:, 3]
    sf = scale_factor.astype(f32)
    orig_h, orig_w = in_h / sf[:, 0:1], in_w / sf[:, 1:2]
    half = f32(0.5)
    x1 = np.minimum(np.maximum((xc - w * half) * orig_w, 0), orig_w)
    y1 = np.minimum(np.maximum((yc - h * half) * orig_h, 0), orig_h)
    x2 = np.minimum(np.maximum((xc + w * half) * orig_w, 0), orig_w)
    y2 = np.minimum(np.maximum((yc + h * half) * orig_h, 0), orig_h)
    boxes = np.stack([x1, y1, x2, y2], axis=-1)
    foreground = raw_scores[:, :, 1:].astype(f32)
    if meta.get("scores_are_logits", True):
        foreground = f32(1) / (f32(1) + np.exp(-foreground))
    best = foreground.max(axis=-1)
    class_ids = foreground.argmax(axis=-1).astype(f32)
    rows = np.stack([class_ids, best, x1, y1, x2, y2], axis=-1)
    per_image = []
    for n in range(len(raw)):
        _, kept = multiclass_nms(boxes[n], best[n][None, :], meta["nms"])
        per_image.append(rows[n, kept])
    return _batch(per_image)
