"""The pure recognise step: boxes + their features + a gallery index → recognised objects.

No models and no I/O here: :class:`~shitu.runtime.Runtime` produced the boxes and features,
this module searches the index, keeps the top-k distinct labels the threshold policy accepts
(:func:`shitu.calibrate.accepts`: at or above the threshold, and for an index fitted to its
gallery also above its calibration's floor in the model's own space), remembering the best
candidate of an unknown box, and merges boxes that found the same product twice (cross-box NMS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shitu.calibrate import accepts
from shitu.geometry import box_iou
from shitu.index import GalleryIndex
from shitu.results import RecognizedObject
from shitu.runtime import Region

DEDUP_FACTOR = 5  # neighbours fetched per requested label, so duplicates of a label can be folded


def match_objects(
    regions: Sequence[Region],
    features: np.ndarray,
    index: GalleryIndex,
    *,
    rec_threshold: float,
    rec_topk: int,
    nms_iou: float | None,
) -> list[RecognizedObject]:
    """One :class:`RecognizedObject` per region (after cross-box NMS when ``nms_iou`` is set)."""
    objects = [RecognizedObject(bbox=b, det_score=s, det_label=lab, whole_image=whole) for b, s, lab, whole in regions]
    if len(objects) and len(index):
        scores, ids = index.search(features, topk=rec_topk * DEDUP_FACTOR)
        floor = index.calibration.floor if index.calibration is not None else None
        raw = index.raw_similarity(features, ids) if floor is not None else None
        for k, (obj, row_s, row_i) in enumerate(zip(objects, scores, ids)):
            fill_matches(obj, row_s, row_i, index, rec_threshold, rec_topk,
                         raw=raw[k] if raw is not None else None, floor=floor)  # fmt: skip
    if nms_iou is not None:
        objects = merge_same_label(objects, nms_iou)
    return objects


def fill_matches(
    obj: RecognizedObject, scores: np.ndarray, ids: np.ndarray, index: GalleryIndex, threshold: float, topk: int,
    *, raw: np.ndarray | None = None, floor: float | None = None,
) -> None:
    """The top-k distinct labels as candidates (best first, whatever their score); those the
    threshold policy accepts are the answers (``raw``: each match's similarity in the model's
    own space, for the ``floor``); the best of all is the (near-miss) candidate."""
    seen: set[str] = set()
    answering = True  # the answers are a prefix of the candidates (best first)
    # labels live in memory with the vectors; an entry's source and thumbnail are on disk
    for k, (score, id_, label) in enumerate(zip(scores, ids, index.labels_of(ids))):
        if id_ < 0 or label is None:
            continue
        if label in seen:
            continue
        seen.add(label)
        obj.candidates.append((label, float(score), int(id_)))
        answering = answering and accepts(float(score), threshold, None if raw is None else float(raw[k]), floor)
        if answering:
            obj.labels.append(label)
            obj.scores.append(float(score))
            obj.ids.append(int(id_))
        if len(obj.candidates) == topk:
            break
    if obj.candidates:
        obj.candidate = obj.candidates[0]


def merge_same_label(objects: list[RecognizedObject], iou: float) -> list[RecognizedObject]:
    """Cross-box NMS: of boxes recognised as the same label that overlap more than ``iou``,
    keep the one with the best recognition score. Unrecognised boxes are kept as they are."""
    recognised = sorted((o for o in objects if o.recognized), key=lambda o: -o.scores[0])
    kept: list[RecognizedObject] = []
    for obj in recognised:
        same = [k for k in kept if k.label == obj.label]
        if same and box_iou(np.array([obj.bbox]), np.array([k.bbox for k in same])).max() > iou:
            continue
        kept.append(obj)
    return kept + [o for o in objects if not o.recognized]
