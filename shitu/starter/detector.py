"""Offline main-body detector: MediaPipe's SSD-MobileNetV2 (Open Images v4) as a PaddleX model dir.

Without a model hub the starter pack has no ``PP-ShiTuV2_det``. The npm package
``@mediapipe/objectron`` (Apache-2.0) ships an SSD-MobileNetV2 trained on Open Images v4 as an
fp16 TFLite flatbuffer. This module

1. fetches that package once from the npm registry and checks its sha256 values
   (:func:`fetch_objectron_tflite`),
2. reads the TFLite graph with the ``tflite`` flatbuffer reader and rebuilds it op by op as a
   ``paddle.nn.Layer`` (:class:`TFLiteNet`; no TensorFlow involved),
3. appends SSD anchor decoding and class-agnostic NMS inside the graph
   (:class:`SsdPostprocess`) and exports a PaddleX model dir that PaddleX's own
   ``PP-ShiTuV2_det`` predictor loads (:func:`convert_tflite_detector`).

Every detection is a "main body"; the Open Images class of the best-scoring class is kept as the
box's label for information. Example::

    model_dir = ensure_starter_detector(Path("data/models/starter"))
    det = paddlex.create_model(model_name="PP-ShiTuV2_det", model_dir=str(model_dir))
    boxes = next(det.predict("shelf.jpg", threshold=DEFAULT_DET_THRESHOLD))["boxes"]
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
import requests
import tflite
import yaml
from paddle import _C_ops, nn

# One project-wide exception type; re-exported here as part of this module's API.
from shitu.errors import StarterModelUnavailable

__all__ = [
    "DEFAULT_DET_THRESHOLD",
    "DETECTOR_MODEL_NAME",
    "STARTER_DETECTOR_DIRNAME",
    "StarterModelUnavailable",
    "build_ssd_detector",
    "convert_tflite_detector",
    "ensure_starter_detector",
    "fetch_objectron_tflite",
]

OBJECTRON_NPM_PACKAGE = "@mediapipe/objectron"
OBJECTRON_NPM_VERSION = "0.4.1675468480"
OBJECTRON_TARBALL_URL = (
    "https://registry.npmjs.org/@mediapipe/objectron/-/objectron-0.4.1675468480.tgz"
)
OBJECTRON_TARBALL_SHA256 = "fc3e37b326b05e8f596099c90b3e0931b05a56cd3160b9ac450b621794bac94c"
OBJECTRON_TFLITE_SHA256 = "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6"
OBJECTRON_LABELMAP_SHA256 = "c148336a65f673013609a923fdcbdeec0f49df935045029c3746a3828a0e80e0"
TFLITE_FILENAME = "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite"
LABELMAP_FILENAME = "object_detection_oidv4_labelmap.txt"
# Byte ranges inside package/objectron_solution_packed_assets.data, as listed by the package's
# objectron_solution_packed_assets_loader.js.
_PACKED_ASSETS_MEMBER = "package/objectron_solution_packed_assets.data"
_LABELMAP_RANGE = (0, 184)
_TFLITE_RANGE = (184, 9987912)

DETECTOR_MODEL_NAME = "PP-ShiTuV2_det"
STARTER_DETECTOR_DIRNAME = "PP-ShiTuV2_det-objectron-ssd"
STARTER_FORMAT_VERSION = 1

# Chosen with bench/detector_report.py on the 13 shared test photos (bench/results/
# detector_report.txt): at 0.25 100.jpeg gives its 3 separate bottles, every photo gets a box,
# and the Red Bull carton and the milk carton that 0.3 misses are found, for 4 false boxes
# (table, croissant, pine cone, berries) over 13 photos; 0.2 adds 2 true and 4 false boxes.
DEFAULT_DET_THRESHOLD = 0.25

# Open Images v4 classes of the objectron SSD, in output order; index 0 ("???") is background.
OIDV4_LABELS: tuple[str, ...] = (
    "???", "Bicycle", "Boot", "Laptop", "Person", "Chair", "Cattle", "Desk", "Cat",
    "Computer mouse", "Computer monitor", "Box", "Mug", "Coffee cup", "Stationary bicycle",
    "Table", "Bottle", "High heels", "Vehicle", "Footwear", "Dog", "Book", "Camera", "Car",
)  # fmt: skip

# TF object-detection box coder scales for (ty, tx, th, tw).
SSD_BOX_SCALES = (10.0, 10.0, 5.0, 5.0)


# --------------------------------------------------------------------------------------------
# Fetching the weights
# --------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same dir, so readers never see a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _npm_error(stderr: bytes | str | None, fallback: str) -> str:
    """The informative part of npm's stderr (its code and message, not the log-file hint)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    lines = [
        line.removeprefix("npm error").strip()
        for line in text.splitlines()
        if line.startswith("npm error") and "complete log" not in line
    ]
    return " ".join(line for line in lines[:2] if line) or fallback


def _download_tarball(workdir: Path) -> bytes:
    """Get the package tarball with ``npm pack`` (honours the user's npm registry, proxy and
    cache settings), or else by HTTP GET of the registry's tarball URL, as npm does."""
    reasons = []
    npm = shutil.which("npm")
    if npm:
        spec = f"{OBJECTRON_NPM_PACKAGE}@{OBJECTRON_NPM_VERSION}"
        # Bounded retries/timeouts: a black-holed registry should fail in minutes, not 15.
        command = [npm, "pack", spec, "--loglevel=error", "--fetch-retries=1",
                   "--fetch-timeout=60000"]  # fmt: skip
        try:
            subprocess.run(
                command,
                cwd=workdir,
                check=True,
                capture_output=True,
                timeout=180,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )
            tarballs = sorted(workdir.glob("*.tgz"))
            if tarballs:
                return tarballs[0].read_bytes()
            reasons.append("npm pack wrote no tarball")
        except subprocess.CalledProcessError as exc:
            reasons.append(f"npm pack failed: {_npm_error(exc.stderr, f'exit {exc.returncode}')}")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"npm pack failed: {exc}")
    else:
        reasons.append("npm not installed")
    try:
        response = requests.get(OBJECTRON_TARBALL_URL, timeout=(10, 120))
        response.raise_for_status()
        return response.content
    except (requests.RequestException, OSError) as exc:
        reasons.append(f"HTTP GET failed: {type(exc).__name__}: {exc}")
    raise StarterModelUnavailable(
        f"cannot reach the npm registry for {OBJECTRON_NPM_PACKAGE}@{OBJECTRON_NPM_VERSION} "
        f"({'; '.join(reasons)})".replace("\n", " ")
    )


def fetch_objectron_tflite(cache_dir: Path) -> Path:
    """Return the cached objectron SSD ``.tflite`` in ``cache_dir``, downloading it once.

    Both the package tarball and the extracted model are checked against pinned sha256 values;
    the label map is written next to the model as ``object_detection_oidv4_labelmap.txt``.
    Raises :class:`StarterModelUnavailable` when the registry is unreachable or a checksum fails.
    """
    cache_dir = Path(cache_dir)
    tflite_path = cache_dir / TFLITE_FILENAME
    labelmap_path = cache_dir / LABELMAP_FILENAME
    if (
        tflite_path.is_file()
        and labelmap_path.is_file()
        and _file_sha256(tflite_path) == OBJECTRON_TFLITE_SHA256
    ):
        return tflite_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=cache_dir) as tmp:
        tarball = _download_tarball(Path(tmp))
    if _sha256(tarball) != OBJECTRON_TARBALL_SHA256:
        raise StarterModelUnavailable(
            f"checksum mismatch for the {OBJECTRON_NPM_PACKAGE} tarball "
            f"(sha256 {_sha256(tarball)}, expected {OBJECTRON_TARBALL_SHA256})"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            member = tar.extractfile(_PACKED_ASSETS_MEMBER)
            if member is None:
                raise KeyError(_PACKED_ASSETS_MEMBER)
            packed = member.read()
    except (KeyError, tarfile.TarError) as exc:
        raise StarterModelUnavailable(f"unexpected package layout: {exc}") from exc
    model_bytes = packed[slice(*_TFLITE_RANGE)]
    labelmap_bytes = packed[slice(*_LABELMAP_RANGE)]
    for what, data, expected in (
        ("model", model_bytes, OBJECTRON_TFLITE_SHA256),
        ("label map", labelmap_bytes, OBJECTRON_LABELMAP_SHA256),
    ):
        if _sha256(data) != expected:
            raise StarterModelUnavailable(
                f"checksum mismatch for the objectron SSD {what} "
                f"(sha256 {_sha256(data)}, expected {expected})"
            )
    # Label map first: the model file's presence is what marks the cache as complete.
    _write_atomic(labelmap_path, labelmap_bytes)
    _write_atomic(tflite_path, model_bytes)
    return tflite_path


# --------------------------------------------------------------------------------------------
# SSD anchors, decoding and NMS (numpy reference; the exported graph mirrors it)
# --------------------------------------------------------------------------------------------


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


def _iou_one_to_many(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    def area(b: np.ndarray) -> np.ndarray:
        return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)

    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    union = area(box) + area(others) - inter
    return np.where(inter > 0, inter / np.maximum(union, 1e-12), 0.0)


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
        if kept and np.any(_iou_one_to_many(boxes[idx], boxes[kept]) > iou_threshold):
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


# --------------------------------------------------------------------------------------------
# Reading the TFLite flatbuffer
# --------------------------------------------------------------------------------------------

_OP_NAMES = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
_ACTIVATIONS = {
    v: k for k, v in vars(tflite.ActivationFunctionType).items() if not k.startswith("_")
}
_NUMPY_TYPES = {
    tflite.TensorType.FLOAT32: np.float32,
    tflite.TensorType.FLOAT16: np.float16,
    tflite.TensorType.INT32: np.int32,
    tflite.TensorType.INT64: np.int64,
    tflite.TensorType.INT8: np.int8,
    tflite.TensorType.UINT8: np.uint8,
}


@dataclass
class TFLiteTensor:
    """One tensor of the graph: static shape, numpy dtype and, for constants, its data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None = None


@dataclass
class TFLiteOp:
    """One operator: builtin name (``CONV_2D`` ...), tensor indices (-1 = absent), options."""

    kind: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TFLiteGraph:
    """The single subgraph of a TFLite model in plain Python objects."""

    tensors: list[TFLiteTensor]
    ops: list[TFLiteOp]
    inputs: list[int]
    outputs: list[int]


def _read_options(op: Any, kind: str) -> dict[str, Any]:
    table = op.BuiltinOptions()
    if table is None:
        return {}
    padding = {tflite.Padding.SAME: "SAME", tflite.Padding.VALID: "VALID"}
    if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        opt = tflite.Conv2DOptions() if kind == "CONV_2D" else tflite.DepthwiseConv2DOptions()
        opt.Init(table.Bytes, table.Pos)
        out = {
            "padding": padding[opt.Padding()],
            "stride": (opt.StrideH(), opt.StrideW()),
            "dilation": (opt.DilationHFactor() or 1, opt.DilationWFactor() or 1),
            "activation": _ACTIVATIONS[opt.FusedActivationFunction()],
        }
        if kind == "DEPTHWISE_CONV_2D":
            out["depth_multiplier"] = opt.DepthMultiplier()
        return out
    if kind in ("ADD", "CONCATENATION"):
        opt = tflite.AddOptions() if kind == "ADD" else tflite.ConcatenationOptions()
        opt.Init(table.Bytes, table.Pos)
        out = {"activation": _ACTIVATIONS[opt.FusedActivationFunction()]}
        if kind == "CONCATENATION":
            out["axis"] = opt.Axis()
        return out
    return {}


def read_tflite_graph(model: Path | bytes) -> TFLiteGraph:
    """Parse a single-subgraph TFLite flatbuffer (a path or its bytes) into a :class:`TFLiteGraph`."""
    buf = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
    root = tflite.Model.GetRootAsModel(buf, 0)
    if root.SubgraphsLength() != 1:
        raise ValueError(f"expected one subgraph, found {root.SubgraphsLength()}")
    graph = root.Subgraphs(0)
    codes = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        # Old files fill only the int8 deprecated field, new ones the int32 field.
        codes.append(_OP_NAMES.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?"))
    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        dtype = np.dtype(_NUMPY_TYPES.get(t.Type(), np.uint8))
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        data = None
        buffer = root.Buffers(t.Buffer())
        if buffer is not None and buffer.DataLength() > 0:
            data = buffer.DataAsNumpy().view(dtype).reshape(shape).copy()
        elif buffer is not None and buffer.Offset() > 1:  # large models keep data after the root
            raw = buf[buffer.Offset() : buffer.Offset() + buffer.Size()]
            data = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        tensors.append(TFLiteTensor(t.Name().decode(), shape, dtype, data))
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        kind = codes[op.OpcodeIndex()]
        ops.append(
            TFLiteOp(
                kind,
                [int(x) for x in op.InputsAsNumpy()],
                [int(x) for x in op.OutputsAsNumpy()],
                _read_options(op, kind),
            )
        )
    return TFLiteGraph(
        tensors,
        ops,
        [int(x) for x in graph.InputsAsNumpy()],
        [int(x) for x in graph.OutputsAsNumpy()],
    )


# --------------------------------------------------------------------------------------------
# TFLite graph -> paddle.nn.Layer
# --------------------------------------------------------------------------------------------

_NHWC_TO_NCHW = (0, 3, 1, 2)
_NCHW_TO_NHWC = (0, 2, 3, 1)


def _activate(x: paddle.Tensor, activation: str) -> paddle.Tensor:
    if activation == "RELU":
        return F.relu(x)
    if activation == "RELU6":
        return F.relu6(x)
    if activation == "RELU_N1_TO_1":
        return paddle.clip(x, -1.0, 1.0)
    if activation == "TANH":
        return paddle.tanh(x)
    if activation == "LOGISTIC":
        return F.sigmoid(x)
    return x


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial axis; the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Conv2d(nn.Layer):
    """CONV_2D / DEPTHWISE_CONV_2D on NCHW input, with explicit (possibly asymmetric) padding."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray,
        stride: tuple[int, int],
        padding: list[int],
        dilation: tuple[int, int],
        groups: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.weight = self.create_parameter(
            list(weight.shape), default_initializer=nn.initializer.Assign(weight)
        )
        self.bias = self.create_parameter(
            list(bias.shape), is_bias=True, default_initializer=nn.initializer.Assign(bias)
        )
        self._stride = list(stride)
        self._padding = padding
        self._dilation = list(dilation)
        self._groups = groups
        self._activation = activation

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = F.conv2d(
            x,
            self.weight,
            self.bias,
            stride=self._stride,
            padding=self._padding,
            dilation=self._dilation,
            groups=self._groups,
        )
        return _activate(y, self._activation)


class _Constant(nn.Layer):
    """A constant operand (e.g. of ADD), stored with the parameters."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("value", paddle.to_tensor(value))

    def forward(self) -> paddle.Tensor:
        return self.value


class _Add(nn.Layer):
    def __init__(self, activation: str) -> None:
        super().__init__()
        self._activation = activation

    def forward(self, a: paddle.Tensor, b: paddle.Tensor) -> paddle.Tensor:
        return _activate(a + b, self._activation)


class _Concat(nn.Layer):
    def __init__(self, axis: int, activation: str) -> None:
        super().__init__()
        self._axis = axis
        self._activation = activation

    def forward(self, *xs: paddle.Tensor) -> paddle.Tensor:
        return _activate(paddle.concat(list(xs), axis=self._axis), self._activation)


class _Reshape(nn.Layer):
    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self._shape = shape

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.reshape(x, self._shape)


class _Transpose(nn.Layer):
    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self._perm = list(perm)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.transpose(x, self._perm)


class _Activation(nn.Layer):
    def __init__(self, activation: str) -> None:
        super().__init__()
        self._activation = activation

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return _activate(x, self._activation)


_STANDALONE_ACTIVATIONS = frozenset({"LOGISTIC", "RELU", "RELU6", "TANH"})


class TFLiteNet(nn.Layer):
    """A TFLite float graph rebuilt as Paddle ops; takes NCHW input, returns the graph outputs.

    4-D activations are kept NCHW (Paddle's fast conv layout) and transposed back to TFLite's
    NHWC only where an op's semantics depend on the memory order (RESHAPE, graph outputs).
    Supported ops: CONV_2D, DEPTHWISE_CONV_2D, ADD, CONCATENATION, RESHAPE, DEQUANTIZE (of fp16
    constants), LOGISTIC, RELU, RELU6, TANH; anything else raises ``NotImplementedError``.
    """

    def __init__(self, graph: TFLiteGraph) -> None:
        super().__init__()
        if len(graph.inputs) != 1 or len(graph.tensors[graph.inputs[0]].shape) != 4:
            raise NotImplementedError("only graphs with one NHWC image input are supported")
        self._tensors = graph.tensors
        self._consts: dict[int, np.ndarray] = {
            i: t.data for i, t in enumerate(graph.tensors) if t.data is not None
        }
        # Layout of each materialised value: key -> "nchw" | "native".
        self._layouts: dict[str, str] = {}
        self._plan: list[tuple[list[str], str]] = []
        self.steps = nn.LayerList()
        self._input_key = self._key(graph.inputs[0])
        self._layouts[self._input_key] = "nchw"
        for op in graph.ops:
            self._convert(op)
        self._output_keys = [self._want(t, "native") for t in graph.outputs]
        # Weights now live in the steps' parameters; drop the build-time numpy copies.
        del self._consts, self._tensors

    # -- plan building ----------------------------------------------------------------------
    @staticmethod
    def _key(tid: int) -> str:
        return f"t{tid}"

    def _add_step(self, layer: nn.Layer, inputs: list[str], output: str, layout: str) -> str:
        self.steps.append(layer)
        self._plan.append((inputs, output))
        self._layouts[output] = layout
        return output

    def _const_step(self, value: np.ndarray, key: str) -> str:
        if key not in self._layouts:
            self._add_step(_Constant(np.ascontiguousarray(value)), [], key, "native")
        return key

    def _want(self, tid: int, layout: str) -> str:
        """Key of tensor ``tid`` in ``layout``, adding a transpose (or constant) step if needed."""
        key = self._key(tid)
        if tid in self._consts and key not in self._layouts:
            value = self._consts[tid].astype(np.float32)
            if layout == "nchw" and value.ndim == 4:
                return self._const_step(value.transpose(_NHWC_TO_NCHW), key + "_nchw")
            if layout == "nchw" and value.ndim == 1 and value.size > 1:
                return self._const_step(value.reshape(1, -1, 1, 1), key + "_nchw")
            return self._const_step(value, key)
        if key not in self._layouts:
            raise ValueError(f"tensor {self._tensors[tid].name!r} is used before it is computed")
        have = self._layouts[key]
        if have == layout or len(self._tensors[tid].shape) != 4:
            return key
        perm = _NHWC_TO_NCHW if layout == "nchw" else _NCHW_TO_NHWC
        target = f"{key}_{layout}"
        if target not in self._layouts:
            self._add_step(_Transpose(perm), [key], target, layout)
        return target

    def _constant_float(self, tid: int, what: str) -> np.ndarray:
        if tid not in self._consts:
            raise NotImplementedError(f"{what} must be a constant tensor")
        return self._consts[tid].astype(np.float32)

    def _convert(self, op: TFLiteOp) -> None:
        kind, out = op.kind, op.outputs[0]
        if kind == "DEQUANTIZE":
            if op.inputs[0] not in self._consts:
                raise NotImplementedError("DEQUANTIZE of a computed tensor is not supported")
            source = self._tensors[op.inputs[0]]
            if source.dtype != np.float16:
                raise NotImplementedError(f"DEQUANTIZE from {source.dtype} is not supported")
            # fp16 weights become fp32 constants at conversion time, as TFLite's CPU path does.
            self._consts[out] = self._consts[op.inputs[0]].astype(np.float32)
        elif kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            self._convert_conv(op)
        elif kind == "ADD":
            a, b = op.inputs
            computed = [t for t in (a, b) if t not in self._consts]
            layout = "nchw" if any(
                self._layouts.get(self._key(t)) == "nchw" for t in computed
            ) else "native"
            keys = [self._want(t, layout) for t in (a, b)]
            self._add_step(_Add(op.options["activation"]), keys, self._key(out), layout)
        elif kind == "CONCATENATION":
            rank = len(self._tensors[out].shape)
            axis = op.options["axis"] % rank
            use_nchw = rank == 4 and any(
                self._layouts.get(self._key(t)) == "nchw" for t in op.inputs
            )
            if use_nchw:
                axis = _NHWC_TO_NCHW.index(axis)
            layout = "nchw" if use_nchw else "native"
            keys = [self._want(t, layout) for t in op.inputs]
            self._add_step(
                _Concat(axis, op.options["activation"]), keys, self._key(out), layout
            )
        elif kind == "RESHAPE":
            source = self._tensors[op.inputs[0]].shape
            shape = list(self._tensors[out].shape)
            # Keep the batch dimension free so the exported model accepts any batch size. It is
            # 0 ("copy from input") rather than -1: Paddle Inference's oneDNN
            # operator_reshape fuse pass breaks transpose + reshape(-1, ...) at load time.
            if source and shape and source[0] == shape[0] == 1:
                shape[0] = 0
            key = self._want(op.inputs[0], "native")
            self._add_step(_Reshape(shape), [key], self._key(out), "native")
        elif kind in _STANDALONE_ACTIVATIONS:
            key = self._key(op.inputs[0])
            layout = self._layouts.get(key, "native")
            key = self._want(op.inputs[0], layout)
            self._add_step(_Activation(kind), [key], self._key(out), layout)
        else:
            raise NotImplementedError(f"TFLite op {kind} is not supported by the converter")

    def _convert_conv(self, op: TFLiteOp) -> None:
        x_tid, w_tid = op.inputs[0], op.inputs[1]
        b_tid = op.inputs[2] if len(op.inputs) > 2 else -1
        in_shape = self._tensors[x_tid].shape  # NHWC
        filt = self._constant_float(w_tid, f"{op.kind} filter")
        if op.kind == "CONV_2D":
            # TFLite [O, KH, KW, I] -> Paddle [O, I, KH, KW]; I < C_in means grouped conv.
            weight = filt.transpose(0, 3, 1, 2)
            groups = in_shape[3] // filt.shape[3]
        else:
            # TFLite [1, KH, KW, C*M] -> Paddle [C*M, 1, KH, KW]; output c*M+m reads input c.
            weight = filt[0].transpose(2, 0, 1)[:, None]
            groups = in_shape[3]
        out_channels = weight.shape[0]
        bias = (
            self._constant_float(b_tid, f"{op.kind} bias")
            if b_tid >= 0
            else np.zeros(out_channels, np.float32)
        )
        stride, dilation = op.options["stride"], op.options["dilation"]
        if op.options["padding"] == "SAME":
            pads = [
                *same_padding(in_shape[1], weight.shape[2], stride[0], dilation[0]),
                *same_padding(in_shape[2], weight.shape[3], stride[1], dilation[1]),
            ]
        else:
            pads = [0, 0, 0, 0]
        layer = _Conv2d(
            np.ascontiguousarray(weight, np.float32),
            bias.astype(np.float32),
            stride,
            pads,
            dilation,
            groups,
            op.options["activation"],
        )
        key = self._want(x_tid, "nchw")
        self._add_step(layer, [key], self._key(op.outputs[0]), "nchw")

    # -- execution --------------------------------------------------------------------------
    def forward(self, image: paddle.Tensor) -> list[paddle.Tensor]:
        """Run the graph on ``image`` [N, C, H, W]; returns the outputs in TFLite order/layout."""
        values = {self._input_key: image}
        for layer, (inputs, output) in zip(self.steps, self._plan):
            values[output] = layer(*[values[k] for k in inputs])
        return [values[k] for k in self._output_keys]


# --------------------------------------------------------------------------------------------
# Decode + NMS inside the graph, and the exported detector
# --------------------------------------------------------------------------------------------


class SsdPostprocess(nn.Layer):
    """SSD decoding + class-agnostic NMS, producing PaddleX's detector outputs.

    ``forward(raw_boxes [N,K,4], raw_scores [N,K,C], scale_factor [N,2])`` returns boxes
    float32 [M, 6] = (class_id, score, x1, y1, x2, y2) in original-image pixels and an int32 [N]
    count per image. ``scale_factor`` is (input_h / orig_h, input_w / orig_w), as PaddleX feeds.
    NMS runs on one "main body" score (the best non-background class) so overlapping boxes of
    different classes suppress each other; the winning class id (Open Images id - 1) is kept.
    """

    def __init__(
        self,
        anchors: np.ndarray,
        input_hw: tuple[int, int],
        *,
        scores_are_logits: bool = True,
        score_threshold: float = 0.05,
        nms_iou: float = 0.45,
        keep_top_k: int = 100,
        box_scales: Sequence[float] = SSD_BOX_SCALES,
    ) -> None:
        super().__init__()
        self.register_buffer("anchors", paddle.to_tensor(np.asarray(anchors, np.float32)))
        self._input_h = float(input_hw[0])
        self._input_w = float(input_hw[1])
        self._scores_are_logits = scores_are_logits
        self._score_threshold = float(score_threshold)
        self._nms_iou = float(nms_iou)
        self._keep_top_k = int(keep_top_k)
        self._scales = [float(s) for s in box_scales]

    def forward(
        self, raw_boxes: paddle.Tensor, raw_scores: paddle.Tensor, scale_factor: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        a = self.anchors
        yc = raw_boxes[:, :, 0] / self._scales[0] * a[:, 2] + a[:, 0]
        xc = raw_boxes[:, :, 1] / self._scales[1] * a[:, 3] + a[:, 1]
        h = paddle.exp(raw_boxes[:, :, 2] / self._scales[2]) * a[:, 2]
        w = paddle.exp(raw_boxes[:, :, 3] / self._scales[3]) * a[:, 3]
        # Normalised coords refer to the stretched input, so original size = input / scale.
        orig_h = self._input_h / scale_factor[:, 0:1]
        orig_w = self._input_w / scale_factor[:, 1:2]
        zero = paddle.zeros_like(xc)
        x1 = paddle.minimum(paddle.maximum((xc - w * 0.5) * orig_w, zero), orig_w + zero)
        y1 = paddle.minimum(paddle.maximum((yc - h * 0.5) * orig_h, zero), orig_h + zero)
        x2 = paddle.minimum(paddle.maximum((xc + w * 0.5) * orig_w, zero), orig_w + zero)
        y2 = paddle.minimum(paddle.maximum((yc + h * 0.5) * orig_h, zero), orig_h + zero)
        boxes = paddle.stack([x1, y1, x2, y2], axis=-1)

        foreground = raw_scores[:, :, 1:]
        if self._scores_are_logits:
            foreground = F.sigmoid(foreground)
        best = paddle.max(foreground, axis=-1)
        class_ids = paddle.argmax(foreground, axis=-1)
        out, index, count = _C_ops.multiclass_nms3(
            boxes,
            paddle.unsqueeze(best, 1),
            None,
            self._score_threshold,
            -1,
            self._keep_top_k,
            self._nms_iou,
            True,
            1.0,
            -1,
        )
        # ``index`` addresses the flattened [N*K] candidates, so it recovers each box's class.
        kept_class = paddle.gather(paddle.reshape(class_ids, [-1]), paddle.reshape(index, [-1]))
        kept_class = paddle.cast(paddle.unsqueeze(kept_class, 1), "float32")
        return paddle.concat([kept_class, out[:, 1:]], axis=1), count


class SsdMainBodyDetector(nn.Layer):
    """The exported model: ``forward(image, scale_factor) -> (boxes [M,6], count [N])``."""

    def __init__(
        self, backbone: TFLiteNet, postprocess: SsdPostprocess, box_output: int, score_output: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.postprocess = postprocess
        self._box_output = box_output
        self._score_output = score_output

    def forward(
        self, image: paddle.Tensor, scale_factor: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        outputs = self.backbone(image)
        return self.postprocess(
            outputs[self._box_output], outputs[self._score_output], scale_factor
        )


def _find_ssd_outputs(graph: TFLiteGraph) -> tuple[int, int, bool]:
    """(box output position, score output position, scores are logits) of an SSD graph.

    The box output is the [1, K, 4] one; when both outputs end in 4 (a 4-class model), the
    TF exporter's names (``box_encodings``) or its order (boxes first) decide.
    """
    shapes = [graph.tensors[t].shape for t in graph.outputs]
    if len(shapes) != 2 or any(len(s) != 3 for s in shapes) or shapes[0][1] != shapes[1][1]:
        raise ValueError(f"expected SSD outputs [1,K,4] and [1,K,C], got {shapes}")
    names = [graph.tensors[t].name for t in graph.outputs]
    if shapes[0][-1] == shapes[1][-1] == 4:
        box_i = 1 if "box" in names[1] and "box" not in names[0] else 0
    elif 4 in (shapes[0][-1], shapes[1][-1]):
        box_i = 0 if shapes[0][-1] == 4 else 1
    else:
        raise ValueError(f"no [1,K,4] box output among {shapes}")
    score_i = 1 - box_i
    producers = {o: op.kind for op in graph.ops for o in op.outputs}
    is_logits = producers.get(graph.outputs[score_i]) != "LOGISTIC"
    return box_i, score_i, is_logits


def _read_labels(tflite_path: Path, num_classes: int) -> list[str]:
    labelmap = tflite_path.with_name(LABELMAP_FILENAME)
    names = (
        [line.strip() for line in labelmap.read_text().splitlines() if line.strip()]
        if labelmap.is_file()
        else list(OIDV4_LABELS)
    )
    if len(names) != num_classes:
        raise ValueError(f"label map has {len(names)} names, the model {num_classes} classes")
    return names[1:]  # output class ids skip background


def build_ssd_detector(
    tflite_path: Path | bytes,
    *,
    anchor_options: SsdAnchorOptions | None = None,
    score_threshold_floor: float = 0.05,
    nms_iou: float = 0.45,
    keep_top_k: int = 100,
) -> tuple[SsdMainBodyDetector, TFLiteGraph, SsdAnchorOptions]:
    """Rebuild an SSD TFLite model as a :class:`SsdMainBodyDetector` (eval mode, dygraph)."""
    graph = read_tflite_graph(tflite_path)
    _, in_h, in_w, _ = graph.tensors[graph.inputs[0]].shape
    options = anchor_options or SsdAnchorOptions(input_height=in_h, input_width=in_w)
    if (options.input_height, options.input_width) != (in_h, in_w):
        raise ValueError(f"anchor input size differs from the model's {in_h}x{in_w}")
    anchors = ssd_anchors(options)
    box_i, score_i, logits = _find_ssd_outputs(graph)
    num_boxes = graph.tensors[graph.outputs[box_i]].shape[1]
    if len(anchors) != num_boxes:
        raise ValueError(f"{len(anchors)} anchors for {num_boxes} predicted boxes")
    backbone = TFLiteNet(graph)
    postprocess = SsdPostprocess(
        anchors,
        (in_h, in_w),
        scores_are_logits=logits,
        score_threshold=score_threshold_floor,
        nms_iou=nms_iou,
        keep_top_k=keep_top_k,
    )
    model = SsdMainBodyDetector(backbone, postprocess, box_i, score_i)
    model.eval()
    return model, graph, options


def _inference_yml(input_hw: tuple[int, int], labels: list[str], threshold: float) -> dict:
    """PaddleX detection config: the preprocessing TFLite expects, labels, default threshold."""
    return {
        "Global": {"model_name": DETECTOR_MODEL_NAME},
        # Stretch to the network size and scale to [-1, 1], as MediaPipe feeds this SSD.
        "Preprocess": [
            {"type": "Resize", "target_size": list(input_hw), "keep_ratio": False, "interp": 1},
            {
                "type": "NormalizeImage",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
                "is_scale": True,
                "norm_type": "mean_std",
            },
            {"type": "Permute"},
        ],
        "label_list": labels,
        # PaddleX uses draw_threshold as the predictor's default score threshold.
        "draw_threshold": threshold,
    }


def convert_tflite_detector(
    tflite_path: Path,
    out_dir: Path,
    *,
    score_threshold_floor: float = 0.05,
    nms_iou: float = 0.45,
    keep_top_k: int = 100,
    anchor_options: SsdAnchorOptions | None = None,
    labels: Sequence[str] | None = None,
    default_threshold: float = DEFAULT_DET_THRESHOLD,
) -> Path:
    """Convert an SSD TFLite detector into a PaddleX ``PP-ShiTuV2_det`` model dir at ``out_dir``.

    Writes ``inference.json``/``.pdiparams``/``.yml`` and ``starter.json`` (provenance and
    parameters) into a temp dir, then renames it into place. ``labels`` name classes 1..C-1;
    by default they come from the label map next to the model (or the Open Images list).
    """
    tflite_path, out_dir = Path(tflite_path), Path(out_dir)
    model, graph, options = build_ssd_detector(
        tflite_path,
        anchor_options=anchor_options,
        score_threshold_floor=score_threshold_floor,
        nms_iou=nms_iou,
        keep_top_k=keep_top_k,
    )
    num_classes = graph.tensors[graph.outputs[model._score_output]].shape[-1]
    label_list = list(labels) if labels is not None else _read_labels(tflite_path, num_classes)
    if len(label_list) != num_classes - 1:
        raise ValueError(f"{len(label_list)} labels for {num_classes - 1} foreground classes")
    input_hw = (options.input_height, options.input_width)
    channels = graph.tensors[graph.inputs[0]].shape[3]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        static = paddle.jit.to_static(
            model,
            input_spec=[
                paddle.static.InputSpec([None, channels, *input_hw], "float32", "image"),
                paddle.static.InputSpec([None, 2], "float32", "scale_factor"),
            ],
            full_graph=True,
        )
        paddle.jit.save(static, str(tmp / "inference"))
        (tmp / "inference.yml").write_text(
            yaml.safe_dump(_inference_yml(input_hw, label_list, default_threshold), sort_keys=False)
        )
        provenance = {
            "format_version": STARTER_FORMAT_VERSION,
            "model_name": DETECTOR_MODEL_NAME,
            "source": {
                "npm_package": f"{OBJECTRON_NPM_PACKAGE}@{OBJECTRON_NPM_VERSION}",
                "tarball_url": OBJECTRON_TARBALL_URL,
                "tarball_sha256": OBJECTRON_TARBALL_SHA256,
                "file": tflite_path.name,
                "tflite_sha256": _file_sha256(tflite_path),
                "license": "Apache-2.0",
            },
            "conversion": {
                "score_threshold_floor": score_threshold_floor,
                "nms_iou": nms_iou,
                "keep_top_k": keep_top_k,
                "class_agnostic_nms": True,
                "box_scales": list(SSD_BOX_SCALES),
                "anchors": {**asdict(options), "count": int(model.postprocess.anchors.shape[0])},
                "paddle_version": paddle.__version__,
            },
            "recommended_threshold": default_threshold,
        }
        (tmp / "starter.json").write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp creates 0700
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, replacing an existing dir with as short a gap as renames allow."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _is_complete_model_dir(model_dir: Path) -> bool:
    names = ("inference.json", "inference.pdiparams", "inference.yml", "starter.json")
    if not all((model_dir / n).is_file() for n in names):
        return False
    try:
        meta = json.loads((model_dir / "starter.json").read_text())
    except (OSError, ValueError):
        return False
    # A changed default threshold re-converts (seconds, no network): the yml carries it.
    return (
        meta.get("format_version") == STARTER_FORMAT_VERSION
        and meta.get("recommended_threshold") == DEFAULT_DET_THRESHOLD
    )


def ensure_starter_detector(models_dir: Path) -> Path:
    """Return the starter detector's PaddleX model dir in ``models_dir``, building it once.

    Layout (``models_dir`` is the starter pack's folder, e.g. ``<data>/models/starter``):
    ``models_dir/PP-ShiTuV2_det-objectron-ssd`` is the model dir and ``models_dir/downloads``
    keeps the checked TFLite file and label map, so a rebuild needs no network.
    Raises :class:`StarterModelUnavailable` when the weights cannot be fetched or converted.
    """
    models_dir = Path(models_dir)
    model_dir = models_dir / STARTER_DETECTOR_DIRNAME
    if _is_complete_model_dir(model_dir):
        return model_dir
    tflite_path = fetch_objectron_tflite(models_dir / "downloads")
    try:
        convert_tflite_detector(tflite_path, model_dir)
    except (ValueError, NotImplementedError, RuntimeError, OSError) as exc:
        if _is_complete_model_dir(model_dir):  # another process finished first
            return model_dir
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StarterModelUnavailable(f"converting the objectron SSD failed: {reason}") from exc
    return model_dir
