"""Paddle layers that get exported (``paddle.jit.to_static`` needs their source in a file)."""

from __future__ import annotations

import paddle
from paddle import nn
from paddle.vision.models import MobileNetV2


class PooledMobileNetV2(nn.Layer):
    """MobileNetV2 features + global pooling → (N, 1280) embedding.

    ``gem`` is generalised-mean pooling, mean(x^p)^(1/p): it leans towards the strongest
    activations, which suits retrieval of objects that do not fill the crop.
    """

    def __init__(self, pooling: str = "avg", gem_p: float = 3.0):
        super().__init__()
        if pooling not in ("avg", "gem", "max"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.backbone = MobileNetV2(num_classes=0, with_pool=False)
        self.pooling = pooling
        self.gem_p = gem_p

    def forward(self, x):
        f = self.backbone.features(x)
        if self.pooling == "gem":
            f = paddle.clip(f, min=1e-6).pow(self.gem_p).mean(axis=[2, 3]).pow(1.0 / self.gem_p)
        elif self.pooling == "max":
            f = f.max(axis=[2, 3])
        else:
            f = f.mean(axis=[2, 3])
        return f
