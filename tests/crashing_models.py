"""A test-only model factory for the worker process: PaddleX's real predictors, except that the
detector dies natively (SIGSEGV, like a crashing Paddle kernel) on an all-red image, the feature
extractor on an all-blue one."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from shitu.runtime import ModelSpec, create_paddlex_predictors

RED, BLUE = 2, 0  # the channel that is full in each poison (BGR order, as the predictors see it)


def is_all(bgr: np.ndarray, channel: int) -> bool:
    """Is ``bgr`` one pure colour: ``channel`` full, the other two empty?"""
    others = [c for c in range(3) if c != channel]
    return bgr.ndim == 3 and bool(np.all(bgr[..., channel] > 250)) and bool(np.all(bgr[..., others] < 5))


class Crashing:
    """A predictor that kills its process on an image of one pure colour."""

    def __init__(self, real: Any, channel: int):
        self.real = real
        self.channel = channel

    def predict(self, images: list[np.ndarray], **kwargs: Any) -> Any:
        if any(is_all(im, self.channel) for im in images):
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.real.predict(images, **kwargs)


def create(spec: ModelSpec) -> tuple[Any, Any]:
    det, rec = create_paddlex_predictors(spec)
    return (Crashing(det, RED) if det is not None else None), Crashing(rec, BLUE)
