"""A query's options: what a call may set, and the defaults the rest get.

Every front end passes what its caller gave (``None`` or nothing: "the default") and gets an
:class:`Options` with every value checked and filled in — from the pipeline YAML, the active
models and the index's own threshold (:mod:`shitu.threshold`). Only ``nms_iou=None`` means "off"
(cross-box NMS disabled), so "not given" there is :data:`UNSET`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shitu.config import WHOLE_IMAGE_MODES, PipelineConfig
from shitu.errors import ShiTuError
from shitu.threshold import ThresholdPolicy

UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # "not given" where None means "off"


@dataclass(frozen=True)
class Options:
    """Per-call recognition options with every default filled in."""

    det_threshold: float
    rec_threshold: float
    rec_topk: int
    whole_image: str
    nms_iou: float | None


def resolve_options(
    config: PipelineConfig, thresholds: ThresholdPolicy, index_own: float | None, *, det_default: float,
    det_threshold: float | None = None, rec_threshold: float | None = None, rec_topk: int | None = None,
    whole_image: str | None = None, nms_iou: float | None = UNSET,
) -> Options:  # fmt: skip
    """The options of one query of an index whose own threshold is ``index_own``; a value out of
    range is refused with the product's message."""

    def number(name: str, value: Any, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ShiTuError(f"{name} must be a number, not {value!r}")
        if not lo <= float(value) <= hi:
            raise ShiTuError(f"{name} must be between {lo} and {hi}, not {value}")
        return float(value)

    if rec_topk is not None and (isinstance(rec_topk, bool) or int(rec_topk) != rec_topk or rec_topk < 1):
        raise ShiTuError(f"rec_topk must be a whole number of at least 1, not {rec_topk!r}")
    mode = whole_image or config.whole_image
    if mode not in WHOLE_IMAGE_MODES:
        raise ShiTuError(f"whole_image must be one of {', '.join(WHOLE_IMAGE_MODES)}, not {mode!r}")
    nms = config.nms_iou if nms_iou is UNSET else nms_iou
    return Options(
        det_threshold=det_default
        if det_threshold is None
        else number("det_threshold", det_threshold, 0, 1),
        rec_threshold=thresholds.resolve(
            None if rec_threshold is None else number("rec_threshold", rec_threshold, -1, 1),
            index_own,
        ),
        rec_topk=config.rec_topk if rec_topk is None else int(rec_topk),
        whole_image=mode,
        nms_iou=None if nms is None else number("nms_iou", nms, 0, 1),
    )
