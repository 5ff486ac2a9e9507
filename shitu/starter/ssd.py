"""SSD anchors, box decoding and class-agnostic NMS in numpy: the reference for the exported graph.

:func:`ssd_anchors` reproduces MediaPipe's ``SsdAnchorsCalculator``; :func:`postprocess_numpy`
decodes one image's raw SSD outputs and applies the same greedy NMS as Paddle's
``multiclass_nms3``, which the exported model runs in-graph
(:class:`shitu.starter.tflite_to_paddle.SsdPostprocess`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shitu.geometry import box_iou

__all__ = [
    "SSD_BOX_SCALES",
    "SsdAnchorOptions",
    "decode_ssd_boxes",
    "nms_numpy",
    "postprocess_numpy",
    "ssd_anchors",
]

# TF object-detection box coder scales for (ty, tx, th, tw).
SSD_BOX_SCALES = (10.0, 10.0, 5.0, 5.0)


@dataclass(frozen=True)
class SsdAnchorOptions:
    """MediaPipe ``SsdAnchorsCalculator`` settings; defaults are the objectron OIDv4 SSD's."""

    input_height: int = 300
    input_width: int = 300
    min_scale: float = 0.2
    max_scale: float = 0.95
    strides: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (1.0, 2.0, 0.5, 3.0, 0.3333)
    interpolated_scale_aspect_ratio: float = 1.0
    reduce_boxes_in_lowest_layer: bool = True
    anchor_offset: float = 0.5


def _layer_scale(options: SsdAnchorOptions, index: int) -> float:
    count = len(options.strides)
    if count == 1:
        return (options.min_scale + options.max_scale) / 2
    return options.min_scale + (options.max_scale - options.min_scale) * index / (count - 1)


def ssd_anchors(options: SsdAnchorOptions = SsdAnchorOptions()) -> np.ndarray:
    """Anchors as float32 [K, 4] = (y_center, x_center, height, width), normalised to [0, 1].

    Order matches the TF SSD heads: layer by layer, then row, column, and box within a cell.
    """
    anchors: list[tuple[float, float, float, float]] = []
    layer = 0
    strides = options.strides
    while layer < len(strides):
        scales: list[float] = []
        ratios: list[float] = []
        # Consecutive layers with the same stride share one feature map.
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = _layer_scale(options, last)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(options.aspect_ratios)
                scales += [scale] * len(options.aspect_ratios)
                if options.interpolated_scale_aspect_ratio > 0:
                    nxt = 1.0 if last == len(strides) - 1 else _layer_scale(options, last + 1)
                    scales.append(math.sqrt(scale * nxt))
                    ratios.append(options.interpolated_scale_aspect_ratio)
            last += 1
        sizes = [(s / math.sqrt(r), s * math.sqrt(r)) for s, r in zip(scales, ratios)]
        rows = math.ceil(options.input_height / strides[layer])
        cols = math.ceil(options.input_width / strides[layer])
        for y in range(rows):
            for x in range(cols):
                yc = (y + options.anchor_offset) / rows
                xc = (x + options.anchor_offset) / cols
                anchors += [(yc, xc, h, w) for h, w in sizes]
        layer = last
    return np.asarray(anchors, dtype=np.float32)


def decode_ssd_boxes(
    raw_boxes: np.ndarray, anchors: np.ndarray, scales: Sequence[float] = SSD_BOX_SCALES
) -> np.ndarray:
    """Decode (ty, tx, th, tw) regressions [..., K, 4] to normalised (x1, y1, x2, y2)."""
    raw = raw_boxes.astype(np.float32)
    yc = raw[..., 0] / scales[0] * anchors[:, 2] + anchors[:, 0]
    xc = raw[..., 1] / scales[1] * anchors[:, 3] + anchors[:, 1]
    h = np.exp(raw[..., 2] / scales[2]) * anchors[:, 2]
    w = np.exp(raw[..., 3] / scales[3]) * anchors[:, 3]
    return np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=-1)


def nms_numpy(
    boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float, top_k: int
) -> np.ndarray:
    """Greedy NMS as Paddle's ``multiclass_nms3`` does it for one class; returns kept indices.

    Candidates need ``score > score_threshold``; a box is dropped when its IoU with a kept box
    exceeds ``iou_threshold``; at most ``top_k`` boxes are kept, best first.
    """
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    kept: list[int] = []
    for idx in order:
        if kept and np.any(box_iou(boxes[idx], boxes[kept]) > iou_threshold):
            continue
        kept.append(int(idx))
        if len(kept) == top_k:
            break
    return np.asarray(kept, dtype=np.int64)


def postprocess_numpy(
    raw_boxes: np.ndarray,
    raw_scores: np.ndarray,
    anchors: np.ndarray,
    image_hw: tuple[int, int],
    *,
    scores_are_logits: bool = True,
    score_threshold: float = 0.05,
    nms_iou: float = 0.45,
    keep_top_k: int = 100,
) -> np.ndarray:
    """Reference decode + class-agnostic NMS for one image: [M, 6] = (class, score, x1, y1, x2, y2).

    ``raw_boxes`` is [K, 4], ``raw_scores`` [K, C] with class 0 = background; the class id in the
    result is the best non-background class minus one; boxes are in ``image_hw`` pixels.
    """
    height, width = image_hw
    boxes = decode_ssd_boxes(raw_boxes, anchors) * np.float32([width, height, width, height])
    boxes = np.clip(boxes, 0, np.float32([width, height, width, height]))
    fg = raw_scores[:, 1:].astype(np.float32)
    if scores_are_logits:
        fg = 1.0 / (1.0 + np.exp(-fg))
    class_ids = fg.argmax(axis=1)
    scores = fg.max(axis=1)
    keep = nms_numpy(boxes, scores, score_threshold, nms_iou, keep_top_k)
    return np.concatenate(
        [class_ids[keep, None].astype(np.float32), scores[keep, None], boxes[keep]], axis=1
    ).astype(np.float32)
