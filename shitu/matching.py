"""The pure recognise step: boxes + their features + a gallery index → recognised objects.

No models and no I/O here: :class:`~shitu.runtime.Runtime` produced the boxes and features,
this module searches the index and keeps each box's top-k distinct labels as its candidates,
whatever their score; the threshold policy (:mod:`shitu.threshold`, through
:meth:`~shitu.results.RecognizedObject.decide`) picks the answers among them, remembering the
best candidate of an unknown box, and boxes that found the same product twice are merged
(cross-box NMS, :func:`~shitu.results.merge_same_label`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shitu.index import GalleryIndex
from shitu.results import RecognizedObject, merge_same_label
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
    """One :class:`RecognizedObject` per region (after cross-box NMS when ``nms_iou`` is set;
    :func:`search_regions` gives them all)."""
    objects = search_regions(regions, features, index, rec_threshold=rec_threshold, rec_topk=rec_topk)
    return merge_same_label(objects, nms_iou) if nms_iou is not None else objects


def search_regions(
    regions: Sequence[Region], features: np.ndarray, index: GalleryIndex, *, rec_threshold: float, rec_topk: int
) -> list[RecognizedObject]:
    """One :class:`RecognizedObject` per region, its candidates found and its answers decided."""
    objects = [RecognizedObject(bbox=b, det_score=s, det_label=lab, whole_image=whole, feature=feature)
               for (b, s, lab, whole), feature in zip(regions, features)]  # fmt: skip
    if len(objects) and len(index):
        scores, ids = index.search(features, topk=rec_topk * DEDUP_FACTOR)
        floor = index_floor(index)
        raw = index.raw_similarity(features, ids) if floor is not None else None
        for k, (obj, row_s, row_i) in enumerate(zip(objects, scores, ids)):
            fill_matches(obj, row_s, row_i, index, rec_threshold, rec_topk,
                         raw=raw[k] if raw is not None else None, floor=floor)  # fmt: skip
    return objects


def index_floor(index: GalleryIndex) -> float | None:
    """The floor in the model's own space that an index's calibration keeps (adapted indices),
    which :func:`shitu.threshold.accepts` applies beside the threshold."""
    return index.calibration.floor if index.calibration is not None else None


def fill_matches(
    obj: RecognizedObject, scores: np.ndarray, ids: np.ndarray, index: GalleryIndex, threshold: float, topk: int,
    *, raw: np.ndarray | None = None, floor: float | None = None,
) -> None:
    """The top-k distinct labels as candidates (best first, whatever their score), then the
    answers among them (:meth:`RecognizedObject.decide`; ``raw``: each match's similarity in
    the model's own space, for the ``floor``)."""
    seen: set[str] = set()
    # labels live in memory with the vectors; an entry's source and thumbnail are on disk
    for k, (score, id_, label) in enumerate(zip(scores, ids, index.labels_of(ids))):
        if id_ < 0 or label is None:
            continue
        if label in seen:
            continue
        seen.add(label)
        obj.candidates.append((label, float(score), int(id_)))
        obj.candidate_raw.append(float("nan") if raw is None else float(raw[k]))
        if len(obj.candidates) == topk:
            break
    obj.decide(threshold, floor)
