"""The pure recognise step: boxes + their features + a gallery index → recognised objects.

No models and no I/O here: :class:`~shitu.runtime.Runtime` produced the boxes and features,
this module searches the index, keeps the top-k distinct labels at or above the threshold
(remembering the best candidate of an unknown box), and merges boxes that found the same
product twice (cross-box NMS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    objects = [RecognizedObject(bbox=b, det_score=s, det_label=lab, whole_image=whole, feature=feature)
               for (b, s, lab, whole), feature in zip(regions, features)]  # fmt: skip
    if len(objects) and len(index):
        scores, ids = index.search(features, topk=rec_topk * DEDUP_FACTOR)
        for obj, row_s, row_i in zip(objects, scores, ids):
            fill_matches(obj, row_s, row_i, index, rec_threshold, rec_topk)
    if nms_iou is not None:
        objects = merge_same_label(objects, nms_iou)
    return objects


def fill_matches(
    obj: RecognizedObject, scores: np.ndarray, ids: np.ndarray, index: GalleryIndex, threshold: float, topk: int
) -> None:
    """The top-k distinct labels as candidates (best first, whatever their score); those at or
    above the threshold are the answers; the best of all is the (near-miss) candidate."""
    seen: set[str] = set()
    # labels live in memory with the vectors; an entry's source and thumbnail are on disk
    for score, id_, label in zip(scores, ids, index.labels_of(ids)):
        if id_ < 0 or label is None:
            continue
        if label in seen:
            continue
        seen.add(label)
        obj.candidates.append((label, float(score), int(id_)))
        if score >= threshold:  # scores come best first, so the answers are a prefix
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
