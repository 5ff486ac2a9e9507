"""Which pooling / input size / layer gives the starter MobileNetV2 the best drink-gallery recall?

Runs the converted backbone eagerly in Paddle on the shared drink gallery once, keeps the
intermediate feature maps, and scores pooling variants in numpy by leave-one-out recall@1.
This is how DEFAULT_POOLING / DEFAULT_INPUT_SIZE in shitu/starter/recognition.py were chosen.

    python bench/starter_variants.py [--data ../shared/data/drink_dataset]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import Settings  # noqa: E402
from shitu.gallery import load_image, read_label_file  # noqa: E402
from shitu.starter.recognition import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    _build_network,
    fetch_mobilenetv2_weights,
)
from shitu.starter.torch_legacy import load_legacy_state_dict  # noqa: E402


def recall(features: np.ndarray, labels: np.ndarray) -> float:
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)
    return float((labels[sims.argmax(1)] == labels).mean())


def gem(x: np.ndarray, p: float) -> np.ndarray:
    return np.power(np.clip(x, 1e-6, None), p).mean(axis=(2, 3)) ** (1 / p)


def main() -> None:
    import cv2
    import paddle

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/drink_dataset")
    args = parser.parse_args()
    settings = Settings.from_env(model_dir=os.environ.get("SHITU_MODEL_DIR"))
    weights = fetch_mobilenetv2_weights(settings.models_dir / "starter" / "downloads")
    net = _build_network(load_legacy_state_dict(weights), "avg")
    batch = read_label_file(args.data / "gallery.txt", args.data).require_clean()
    labels = np.array([i.label for i in batch.items])
    images = [load_image(i.image) for i in batch.items]
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)

    def maps(size: int, layers: tuple[int, ...], flip: bool = False) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {k: [] for k in layers}
        with paddle.no_grad():
            for start in range(0, len(images), 32):
                chunk = [
                    cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in images[start : start + 32]
                ]
                x = np.stack([((c[:, ::-1] if flip else c) / 255.0 - mean) / std for c in chunk])
                t = paddle.to_tensor(x.transpose(0, 3, 1, 2).astype(np.float32))
                for j, layer in enumerate(net.backbone.features):
                    t = layer(t)
                    if j in out:
                        out[j].append(t.numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    base = maps(224, (17, 18))
    print(f"{len(images)} images, {len(set(labels))} labels")
    last = base[18]
    print(f"224px last layer (1280-d): avg {recall(last.mean((2, 3)), labels):.4f}, max "
          f"{recall(last.max((2, 3)), labels):.4f}, GeM p=2 {recall(gem(last, 2), labels):.4f}, "
          f"GeM p=3 {recall(gem(last, 3), labels):.4f}, GeM p=4 {recall(gem(last, 4), labels):.4f}")  # fmt: skip
    print(f"224px block 17 (320-d): avg {recall(base[17].mean((2, 3)), labels):.4f}, "
          f"GeM p=3 {recall(gem(base[17], 3), labels):.4f}")  # fmt: skip
    flipped = maps(224, (18,), flip=True)[18]
    print(f"224px + horizontal-flip average, GeM p=3: {recall(gem(base[18], 3) + gem(flipped, 3), labels):.4f}")
    for size in (256, 288):
        print(f"{size}px last layer, GeM p=3: {recall(gem(maps(size, (18,))[18], 3), labels):.4f}")


if __name__ == "__main__":
    main()
