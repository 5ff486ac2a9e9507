"""A TFLite SSD rebuilt as Paddle layers, with SSD decoding and NMS appended inside the graph.

:class:`TFLiteNet` turns a :class:`~shitu.starter.tflite_graph.TFLiteGraph` op by op into
``paddle.nn`` layers; :class:`SsdPostprocess` decodes the anchors' regressions and runs
class-agnostic NMS so that the exported model has exactly the inputs and outputs PaddleX's
``PP-ShiTuV2_det`` predictor expects; :func:`build_ssd_detector` puts the two together.
The layers are exported with ``paddle.jit.to_static``, which needs their source in this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import _C_ops, nn

from shitu.starter.ssd import SSD_BOX_SCALES, SsdAnchorOptions, ssd_anchors
from shitu.starter.tflite_graph import TFLiteGraph, TFLiteOp, read_tflite_graph

__all__ = [
    "SsdMainBodyDetector",
    "SsdPostprocess",
    "TFLiteNet",
    "build_ssd_detector",
    "find_ssd_outputs",
    "same_padding",
]

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
    M may be 0, so nothing but a row gather follows NMS in the graph (see ``forward``).
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
        class_ids = paddle.cast(paddle.argmax(foreground, axis=-1), "float32")
        # Every candidate's finished output row, built while the size is still fixed at [N, K]:
        # after NMS only a row gather may follow. NMS can keep no box at all (a photo whose best
        # score is under the floor), and Paddle Inference's oneDNN concat kernel dereferences
        # its first non-empty input without checking there is one, so a concat of the [0, x]
        # NMS outputs (as format 1 did to put the class id in column 0) kills the process.
        rows = paddle.stack([class_ids, best, x1, y1, x2, y2], axis=-1)
        _, index, count = _C_ops.multiclass_nms3(
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
        # ``index`` [M, 1] addresses the flattened [N*K] candidates, in NMS output order; NMS
        # copies score and box of the candidate, so gathering its row gives the same values.
        return paddle.gather_nd(paddle.reshape(rows, [-1, 6]), index), count


class SsdMainBodyDetector(nn.Layer):
    """The exported model: ``forward(image, scale_factor) -> (boxes [M,6], count [N])``."""

    def __init__(
        self, backbone: TFLiteNet, postprocess: SsdPostprocess, box_output: int, score_output: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.postprocess = postprocess
        self.box_output = box_output
        self.score_output = score_output

    def forward(
        self, image: paddle.Tensor, scale_factor: paddle.Tensor
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        outputs = self.backbone(image)
        return self.postprocess(
            outputs[self.box_output], outputs[self.score_output], scale_factor
        )


def find_ssd_outputs(graph: TFLiteGraph) -> tuple[int, int, bool]:
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
    box_i, score_i, logits = find_ssd_outputs(graph)
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
