"""A test-only model factory for the worker process: PaddleX's real predictors, except that the
detector dies natively (SIGSEGV, like a crashing Paddle kernel) on an all-red image, the feature
extractor on an all-blue one."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from shitu.runtime import ModelSpec, create_paddlex_predictors


def is_poison(bgr: np.ndarray) -> bool:
    return bgr.ndim == 3 and bool(np.all(bgr[..., 2] > 250)) and bool(np.all(bgr[..., :2] < 5))


class CrashingDetector:
    def __init__(self, real: Any):
        self.real = real

    def predict(self, images: list[np.ndarray], **kwargs: Any) -> Any:
        if any(is_poison(im) for im in images):
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.real.predict(images, **kwargs)


def is_blue(bgr: np.ndarray) -> bool:
    return bgr.ndim == 3 and bool(np.all(bgr[..., 0] > 250)) and bool(np.all(bgr[..., 1:] < 5))


class CrashingRecognizer:
    def __init__(self, real: Any):
        self.real = real

    def predict(self, images: list[np.ndarray], **kwargs: Any) -> Any:
        if any(is_blue(im) for im in images):
            os.kill(os.getpid(), signal.SIGSEGV)
        return self.real.predict(images, **kwargs)


def create(spec: ModelSpec) -> tuple[Any, Any]:
    det, rec = create_paddlex_predictors(spec)
    return (CrashingDetector(det) if det is not None else None), CrashingRecognizer(rec)
