"""Tests for the offline SSD main-body detector (shitu/starter/); no network needed.

A tiny SSD-shaped TFLite flatbuffer is built here with the ``tflite`` builder API and run three
ways: by an independent numpy interpreter (below), by the converted Paddle network, and through
PaddleX's ``PP-ShiTuV2_det`` predictor after export. The real objectron model is used only when
it is already cached (``SHITU_OBJECTRON_TFLITE``, the test model cache of conftest.py, or the
settings' ``<models_dir>/starter/downloads``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import flatbuffers
import numpy as np
import paddle
import pytest
import tflite
import yaml

from shitu import npm
from shitu.errors import StarterModelUnavailable
from shitu.fsutil import sha256_file
from shitu.starter import detector as det
from shitu.starter import objectron
from shitu.starter.ssd import SsdAnchorOptions, postprocess_numpy, ssd_anchors
from shitu.starter.tflite_graph import TFLiteGraph, read_tflite_graph
from shitu.starter.tflite_to_paddle import SsdPostprocess, TFLiteNet, same_padding

from .conftest import MODEL_CACHE, npm_tarball

# ------------------------------------------------------------------------------------------
# A tiny TFLite builder and an independent numpy interpreter
# ------------------------------------------------------------------------------------------

_OPS = tflite.BuiltinOperator
_OPT = tflite.BuiltinOptions
_ACT = tflite.ActivationFunctionType
_TYPES = {
    np.dtype(np.float32): tflite.TensorType.FLOAT32,
    np.dtype(np.float16): tflite.TensorType.FLOAT16,
    np.dtype(np.int32): tflite.TensorType.INT32,
}


class GraphBuilder:
    """Collects tensors and ops, then serialises a one-subgraph TFLite model."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, tuple[int, ...], np.dtype, np.ndarray | None]] = []
        self.ops: list[tuple[int, list[int], list[int], str | None, dict]] = []

    def tensor(self, name: str, shape: tuple[int, ...], data: np.ndarray | None = None) -> int:
        dtype = np.dtype(np.float32) if data is None else data.dtype
        self.tensors.append((name, tuple(shape), dtype, data))
        return len(self.tensors) - 1

    def const_fp16(self, name: str, value: np.ndarray) -> int:
        """An fp16 weight behind a DEQUANTIZE op, as the objectron model stores them."""
        half = self.tensor(name + "_fp16", value.shape, value.astype(np.float16))
        out = self.tensor(name, value.shape)
        self.op(_OPS.DEQUANTIZE, [half], [out])
        return out

    def op(self, code: int, inputs: list[int], outputs: list[int], kind=None, **opts) -> None:
        self.ops.append((code, inputs, outputs, kind, opts))

    def conv(self, x, shape_out, w, b, *, stride=1, padding="SAME", act="NONE", dilation=1):
        out = self.tensor(f"conv{len(self.ops)}", shape_out)
        wi, bi = self.const_fp16(f"w{len(self.ops)}", w), self.const_fp16(f"b{len(self.ops)}", b)
        self.op(_OPS.CONV_2D, [x, wi, bi], [out], "conv", stride=stride, padding=padding,
                act=act, dilation=dilation)  # fmt: skip
        return out

    def build(self, inputs: list[int], outputs: list[int]) -> bytes:
        b = flatbuffers.Builder(1024)
        buffers = [self._buffer(b, None)]
        tensor_offsets = []
        for name, shape, dtype, data in self.tensors:
            buf_index = 0
            if data is not None:
                buffers.append(self._buffer(b, data))
                buf_index = len(buffers) - 1
            name_off = b.CreateString(name)
            shape_off = b.CreateNumpyVector(np.asarray(shape, np.int32))
            tflite.TensorStart(b)
            tflite.TensorAddShape(b, shape_off)
            tflite.TensorAddType(b, _TYPES[dtype])
            tflite.TensorAddBuffer(b, buf_index)
            tflite.TensorAddName(b, name_off)
            tensor_offsets.append(tflite.TensorEnd(b))
        codes = sorted({code for code, *_ in self.ops})
        op_offsets = []
        for code, ins, outs, kind, opts in self.ops:
            ins_off = b.CreateNumpyVector(np.asarray(ins, np.int32))
            outs_off = b.CreateNumpyVector(np.asarray(outs, np.int32))
            opt_type, opt_off = self._options(b, kind, opts)
            tflite.OperatorStart(b)
            tflite.OperatorAddOpcodeIndex(b, codes.index(code))
            tflite.OperatorAddInputs(b, ins_off)
            tflite.OperatorAddOutputs(b, outs_off)
            if opt_off is not None:
                tflite.OperatorAddBuiltinOptionsType(b, opt_type)
                tflite.OperatorAddBuiltinOptions(b, opt_off)
            op_offsets.append(tflite.OperatorEnd(b))
        code_offsets = []
        for code in codes:
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, 1)
            code_offsets.append(tflite.OperatorCodeEnd(b))
        tensors_vec = self._vector(b, tflite.SubGraphStartTensorsVector, tensor_offsets)
        ops_vec = self._vector(b, tflite.SubGraphStartOperatorsVector, op_offsets)
        in_vec = b.CreateNumpyVector(np.asarray(inputs, np.int32))
        out_vec = b.CreateNumpyVector(np.asarray(outputs, np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, tensors_vec)
        tflite.SubGraphAddOperators(b, ops_vec)
        tflite.SubGraphAddInputs(b, in_vec)
        tflite.SubGraphAddOutputs(b, out_vec)
        subgraph = tflite.SubGraphEnd(b)
        subgraphs_vec = self._vector(b, tflite.ModelStartSubgraphsVector, [subgraph])
        codes_vec = self._vector(b, tflite.ModelStartOperatorCodesVector, code_offsets)
        buffers_vec = self._vector(b, tflite.ModelStartBuffersVector, buffers)
        description = b.CreateString("synthetic test model")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, codes_vec)
        tflite.ModelAddSubgraphs(b, subgraphs_vec)
        tflite.ModelAddBuffers(b, buffers_vec)
        tflite.ModelAddDescription(b, description)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    @staticmethod
    def _vector(b, start, offsets):
        start(b, len(offsets))
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    @staticmethod
    def _buffer(b, data):
        data_off = None
        if data is not None:
            data_off = b.CreateNumpyVector(np.frombuffer(data.tobytes(), np.uint8))
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        return tflite.BufferEnd(b)

    @staticmethod
    def _options(b, kind, opts):
        act = getattr(_ACT, opts.get("act", "NONE"))
        padding = getattr(tflite.Padding, opts.get("padding", "SAME"))
        if kind in ("conv", "dwconv"):
            prefix = "Conv2DOptions" if kind == "conv" else "DepthwiseConv2DOptions"
            getattr(tflite, prefix + "Start")(b)
            getattr(tflite, prefix + "AddPadding")(b, padding)
            getattr(tflite, prefix + "AddStrideH")(b, opts["stride"])
            getattr(tflite, prefix + "AddStrideW")(b, opts["stride"])
            getattr(tflite, prefix + "AddDilationHFactor")(b, opts.get("dilation", 1))
            getattr(tflite, prefix + "AddDilationWFactor")(b, opts.get("dilation", 1))
            getattr(tflite, prefix + "AddFusedActivationFunction")(b, act)
            if kind == "dwconv":
                tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, opts["multiplier"])
            kind_id = _OPT.Conv2DOptions if kind == "conv" else _OPT.DepthwiseConv2DOptions
            return kind_id, getattr(tflite, prefix + "End")(b)
        if kind == "add":
            tflite.AddOptionsStart(b)
            tflite.AddOptionsAddFusedActivationFunction(b, act)
            return _OPT.AddOptions, tflite.AddOptionsEnd(b)
        if kind == "concat":
            tflite.ConcatenationOptionsStart(b)
            tflite.ConcatenationOptionsAddAxis(b, opts["axis"])
            tflite.ConcatenationOptionsAddFusedActivationFunction(b, act)
            return _OPT.ConcatenationOptions, tflite.ConcatenationOptionsEnd(b)
        return 0, None


TINY_ANCHORS = SsdAnchorOptions(
    input_height=8, input_width=8, strides=(4, 8), aspect_ratios=(1.0, 2.0, 0.5)
)
TINY_CLASSES = 4  # background + 3
TINY_LABELS = ["apple", "bottle", "can"]


def tiny_ssd(with_logistic: bool, seed: int = 0) -> bytes:
    """An 8x8 SSD: 2x2 cells x 3 boxes + 1x1 cell x 4 boxes = 16 anchors, 4 classes.

    Covers SAME (asymmetric) and VALID padding, strides, dilation, depth multiplier, fused
    RELU/RELU6, ADD, channel CONCATENATION, RESHAPE, CONCATENATION of heads, LOGISTIC.
    """
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    g = GraphBuilder()
    x = g.tensor("image", (1, 8, 8, 3))
    t1 = g.conv(x, (1, 4, 4, 4), w(4, 3, 3, 3), w(4), stride=2, act="RELU6")
    t2 = g.tensor("dw", (1, 2, 2, 8))
    g.op(_OPS.DEPTHWISE_CONV_2D, [t1, g.const_fp16("dw_w", w(1, 3, 3, 8)),
         g.const_fp16("dw_b", w(8))], [t2], "dwconv", stride=2, padding="SAME",
         act="RELU", multiplier=2)  # fmt: skip
    t3 = g.conv(t2, (1, 2, 2, 8), w(8, 3, 3, 8, scale=0.3), w(8), dilation=2)
    t4 = g.tensor("add", (1, 2, 2, 8))
    g.op(_OPS.ADD, [t2, t3], [t4], "add", act="RELU6")
    t4c = g.tensor("concat_c", (1, 2, 2, 16))
    g.op(_OPS.CONCATENATION, [t4, t3], [t4c], "concat", axis=3)
    t5 = g.conv(t4c, (1, 1, 1, 8), w(8, 2, 2, 16, scale=0.3), w(8), stride=2,
                padding="VALID", act="RELU6")  # fmt: skip
    shape4 = g.tensor("shape4", (4,), np.asarray([1, -1, 1, 4], np.int32))
    shape3 = g.tensor("shape3", (3,), np.asarray([1, -1, TINY_CLASSES], np.int32))
    boxes, scores = [], []
    # heads: 2x2 cells x 3 boxes on the 16-channel map, 1x1 cell x 4 boxes on the 8-channel one
    for feat, side, per_cell, chans in ((t4c, 2, 3, 16), (t5, 1, 4, 8)):
        cells = side * side
        nb, nc = per_cell * 4, per_cell * TINY_CLASSES
        bh = g.conv(feat, (1, side, side, nb), w(nb, 1, 1, chans, scale=0.1), w(nb, scale=0.1))
        ch = g.conv(feat, (1, side, side, nc), w(nc, 1, 1, chans), w(nc))
        br = g.tensor(f"box_r{feat}", (1, cells * per_cell, 1, 4))
        cr = g.tensor(f"cls_r{feat}", (1, cells * per_cell, TINY_CLASSES))
        g.op(_OPS.RESHAPE, [bh, shape4], [br])
        g.op(_OPS.RESHAPE, [ch, shape3], [cr])
        boxes.append(br)
        scores.append(cr)
    bc = g.tensor("box_concat", (1, 16, 1, 4))
    g.op(_OPS.CONCATENATION, boxes, [bc], "concat", axis=1)
    box_out = g.tensor("raw_outputs/box_encodings", (1, 16, 4))
    g.op(_OPS.RESHAPE, [bc, g.tensor("shape_b", (3,), np.asarray([1, 16, 4], np.int32))],
         [box_out])  # fmt: skip
    cls_out = g.tensor("class_concat", (1, 16, TINY_CLASSES))
    g.op(_OPS.CONCATENATION, scores, [cls_out], "concat", axis=1)
    if with_logistic:
        prob = g.tensor("raw_outputs/class_predictions", (1, 16, TINY_CLASSES))
        g.op(_OPS.LOGISTIC, [cls_out], [prob])
        cls_out = prob
    return g.build([x], [box_out, cls_out])


def _same_pads(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    eff = (k - 1) * d + 1
    out = (size + s - 1) // s
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _act(x: np.ndarray, name: str) -> np.ndarray:
    return {
        "NONE": lambda v: v,
        "RELU": lambda v: np.maximum(v, 0),
        "RELU6": lambda v: np.clip(v, 0, 6),
    }[name](x)


def _np_conv(x, w, b, opts, depthwise):
    """NHWC convolution straight from TFLite's definition, one kernel tap at a time."""
    n, h, wd, c = x.shape
    kh, kw = w.shape[1:3]
    (sh, sw), (dh, dw) = opts["stride"], opts["dilation"]
    if opts["padding"] == "SAME":
        (pt, pb), (pl, pr) = _same_pads(h, kh, sh, dh), _same_pads(wd, kw, sw, dw)
    else:
        pt = pb = pl = pr = 0
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((n, oh, ow, w.shape[0] if not depthwise else w.shape[3]), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                       j * dw : j * dw + sw * (ow - 1) + 1 : sw, :]  # fmt: skip
            if depthwise:
                out += np.repeat(patch, w.shape[3] // c, axis=-1) * w[0, i, j]
            else:
                out += patch @ w[:, i, j, :].T
    return _act(out + b, opts["activation"])


def run_numpy(graph: TFLiteGraph, image_nhwc: np.ndarray) -> list[np.ndarray]:
    """Execute a parsed TFLite graph with numpy in float64 (the reference)."""
    vals: dict[int, np.ndarray] = {
        i: t.data.astype(np.float64) for i, t in enumerate(graph.tensors) if t.data is not None
    }
    vals[graph.inputs[0]] = image_nhwc.astype(np.float64)
    for op in graph.ops:
        ins = [vals[i] for i in op.inputs if i >= 0]
        if op.kind == "DEQUANTIZE":
            out = ins[0]
        elif op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            out = _np_conv(ins[0], ins[1], ins[2], op.options, op.kind == "DEPTHWISE_CONV_2D")
        elif op.kind == "ADD":
            out = _act(ins[0] + ins[1], op.options["activation"])
        elif op.kind == "CONCATENATION":
            out = _act(np.concatenate(ins, axis=op.options["axis"]), op.options["activation"])
        elif op.kind == "RESHAPE":
            out = ins[0].reshape((-1, *graph.tensors[op.outputs[0]].shape[1:]))  # batch-aware
        elif op.kind == "LOGISTIC":
            out = 1 / (1 + np.exp(-ins[0]))
        else:
            raise AssertionError(op.kind)
        vals[op.outputs[0]] = out
    return [vals[i] for i in graph.outputs]


def _nchw(x_nhwc: np.ndarray) -> paddle.Tensor:
    return paddle.to_tensor(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2), np.float32))


# ------------------------------------------------------------------------------------------
# Anchors, padding, graph reading and op conversion
# ------------------------------------------------------------------------------------------


def test_objectron_anchor_layout() -> None:
    anchors = ssd_anchors()
    assert anchors.shape == (1917, 4)
    first = 0.5 / 19
    np.testing.assert_allclose(anchors[0], [first, first, 0.1, 0.1], rtol=1e-6)
    # second box of the lowest layer: scale 0.2, aspect ratio 2 -> wider than tall
    np.testing.assert_allclose(anchors[1, 2:], [0.2 / math.sqrt(2), 0.2 * math.sqrt(2)], 1e-6)
    # last box: the 1x1 layer's interpolated scale sqrt(0.95 * 1.0), ratio 1, centred
    np.testing.assert_allclose(anchors[-1], [0.5, 0.5, math.sqrt(0.95), math.sqrt(0.95)], 1e-6)
    assert len(ssd_anchors(TINY_ANCHORS)) == 16


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "expected"),
    [(300, 3, 2, 1, (0, 1)), (150, 3, 1, 1, (1, 1)), (19, 3, 2, 1, (1, 1)), (2, 3, 1, 2, (2, 2)),
     (10, 1, 1, 1, (0, 0)), (3, 3, 2, 1, (1, 1))],
)  # fmt: skip
def test_same_padding_matches_tensorflow(size, kernel, stride, dilation, expected) -> None:
    assert same_padding(size, kernel, stride, dilation) == expected


def test_read_tflite_graph_parses_ops_and_options() -> None:
    graph = read_tflite_graph(tiny_ssd(with_logistic=True))
    kinds = [op.kind for op in graph.ops]
    assert {"DEQUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "CONCATENATION", "RESHAPE",
            "LOGISTIC"} <= set(kinds)  # fmt: skip
    dw = next(op for op in graph.ops if op.kind == "DEPTHWISE_CONV_2D")
    assert dw.options == {"padding": "SAME", "stride": (2, 2), "dilation": (1, 1),
                          "activation": "RELU", "depth_multiplier": 2}  # fmt: skip
    valid = [op for op in graph.ops if op.kind == "CONV_2D" and op.options["padding"] == "VALID"]
    assert len(valid) == 1 and valid[0].options["activation"] == "RELU6"
    weight = graph.tensors[next(op for op in graph.ops if op.kind == "DEQUANTIZE").inputs[0]]
    assert weight.dtype == np.float16 and weight.data is not None
    assert [graph.tensors[i].shape for i in graph.outputs] == [(1, 16, 4), (1, 16, 4)]


@pytest.mark.parametrize("with_logistic", [False, True])
def test_converted_network_matches_numpy_reference(with_logistic: bool) -> None:
    graph = read_tflite_graph(tiny_ssd(with_logistic))
    net = TFLiteNet(graph)
    image = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    expected = run_numpy(graph, image)
    got = [o.numpy() for o in net(_nchw(image))]
    assert [g.shape for g in got] == [(2, 16, 4), (2, 16, TINY_CLASSES)]  # batch of 2 works
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5)


def test_unsupported_op_is_reported() -> None:
    g = GraphBuilder()
    x = g.tensor("image", (1, 4, 4, 3))
    y = g.tensor("y", (1, 4, 4, 3))
    g.op(_OPS.MUL, [x, x], [y])
    with pytest.raises(NotImplementedError, match="MUL"):
        TFLiteNet(read_tflite_graph(g.build([x], [y])))


# ------------------------------------------------------------------------------------------
# Decoding + NMS in the graph
# ------------------------------------------------------------------------------------------


def _encode(boxes_xyxy: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Inverse of the SSD decoding: normalised (x1, y1, x2, y2) -> (ty, tx, th, tw)."""
    x1, y1, x2, y2 = boxes_xyxy.T
    yc, xc, h, w = anchors.T
    ty = ((y1 + y2) / 2 - yc) / h * 10
    tx = ((x1 + x2) / 2 - xc) / w * 10
    th = np.log((y2 - y1) / h) * 5
    tw = np.log((x2 - x1) / w) * 5
    return np.stack([ty, tx, th, tw], axis=1)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _postprocess_case():
    anchors = np.asarray([[0.5, 0.5, 0.5, 0.5]] * 5, np.float32)
    targets = np.asarray(
        [
            [0.10, 0.10, 0.50, 0.90],  # A: best, class 2
            [0.12, 0.10, 0.52, 0.88],  # B: overlaps A (IoU ~0.9), other class -> suppressed
            [0.60, 0.20, 0.90, 0.60],  # C: separate, class 1
            [0.55, 0.55, 0.95, 0.95],  # D: overlaps C a little (IoU < 0.45) -> kept
            [0.00, 0.00, 0.20, 0.20],  # E: score below the floor -> dropped
        ],
        np.float32,
    )
    raw_boxes = _encode(targets, anchors).astype(np.float32)
    logits = np.full((5, 4), -9.0, np.float32)
    for row, (cls, p) in enumerate([(3, 0.9), (1, 0.8), (2, 0.7), (1, 0.6), (2, 0.01)]):
        logits[row, cls] = _logit(p)
    return anchors, targets, raw_boxes, logits


def test_nms_is_class_agnostic_ordered_and_in_original_pixels() -> None:
    anchors, targets, raw_boxes, logits = _postprocess_case()
    post = SsdPostprocess(anchors, (100, 100), score_threshold=0.05, nms_iou=0.45)
    # a non-square 640x360 photo resized to 100x100: scale = (100/360, 100/640)
    orig_h, orig_w = 360, 640
    scale = paddle.to_tensor([[100 / orig_h, 100 / orig_w]], dtype="float32")
    boxes, count = post(paddle.to_tensor(raw_boxes[None]), paddle.to_tensor(logits[None]), scale)
    boxes, count = boxes.numpy(), count.numpy()
    assert count.tolist() == [3] and count.dtype == np.int32
    assert boxes.shape == (3, 6)
    np.testing.assert_allclose(boxes[:, 1], [0.9, 0.7, 0.6], rtol=1e-5)  # best first
    assert boxes[:, 0].tolist() == [2.0, 1.0, 0.0]  # class id = Open Images id - 1
    expected = targets[[0, 2, 3]] * [orig_w, orig_h, orig_w, orig_h]
    np.testing.assert_allclose(boxes[:, 2:], expected, rtol=1e-4, atol=1e-2)
    reference = postprocess_numpy(raw_boxes, logits, anchors, (orig_h, orig_w))
    np.testing.assert_allclose(boxes, reference, rtol=1e-4, atol=1e-2)


def test_nms_batches_keep_their_own_boxes_and_classes() -> None:
    anchors, targets, raw_boxes, logits = _postprocess_case()
    second = logits.copy()
    second[:, 1:] = -9.0
    second[4, 4 - 1] = _logit(0.95)  # only box E, class 3, in the second image
    post = SsdPostprocess(anchors, (100, 100))
    scale = paddle.to_tensor([[1.0, 1.0], [0.5, 0.25]], dtype="float32")
    boxes, count = post(
        paddle.to_tensor(np.stack([raw_boxes, raw_boxes])),
        paddle.to_tensor(np.stack([logits, second])),
        scale,
    )
    boxes, count = boxes.numpy(), count.numpy()
    assert count.tolist() == [3, 1]
    assert boxes[3, 0] == 2.0  # class recovered from the second image's own candidates
    np.testing.assert_allclose(boxes[3, 2:], targets[4] * [400, 200, 400, 200], atol=1e-2)


def test_nms_without_detections_returns_empty() -> None:
    anchors, _, raw_boxes, logits = _postprocess_case()
    post = SsdPostprocess(anchors, (100, 100))
    boxes, count = post(
        paddle.to_tensor(raw_boxes[None]),
        paddle.to_tensor(np.full_like(logits, -9.0)[None]),
        paddle.to_tensor([[1.0, 1.0]], dtype="float32"),
    )
    assert boxes.shape == [0, 6] and count.numpy().tolist() == [0]


# ------------------------------------------------------------------------------------------
# Export and PaddleX
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    tflite_path = root / "tiny.tflite"
    tflite_path.write_bytes(tiny_ssd(with_logistic=False))
    return det.convert_tflite_detector(
        tflite_path,
        root / "model",
        anchor_options=TINY_ANCHORS,
        labels=TINY_LABELS,
        score_threshold_floor=0.05,
    )


def test_exported_dir_follows_the_paddlex_contract(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"inference.json", "inference.pdiparams", "inference.yml", "starter.json"} <= names
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]
    config = yaml.safe_load((tiny_model_dir / "inference.yml").read_text())
    assert config["Global"]["model_name"] == "PP-ShiTuV2_det"
    assert config["label_list"] == TINY_LABELS
    assert [step["type"] for step in config["Preprocess"]] == ["Resize", "NormalizeImage", "Permute"]
    assert config["Preprocess"][0]["target_size"] == [8, 8]
    meta = json.loads((tiny_model_dir / "starter.json").read_text())
    assert meta["conversion"]["anchors"]["count"] == 16
    assert meta["conversion"]["nms_iou"] == 0.45


def test_paddlex_predictor_returns_boxes_in_original_pixels(tiny_model_dir, tmp_path) -> None:
    import paddlex

    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # non-square, 40 wide
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), bgr)
    predictor = paddlex.create_model(
        model_name="PP-ShiTuV2_det", model_dir=str(tiny_model_dir), device="cpu"
    )
    result = next(iter(predictor.predict(str(path), threshold=0.1)))
    got = sorted((b["score"], b["cls_id"], *b["coordinate"]) for b in result["boxes"])

    # Reference: PaddleX's preprocessing by hand, numpy interpreter, numpy decode + NMS.
    rgb = cv2.resize(bgr[:, :, ::-1], (8, 8), interpolation=cv2.INTER_LINEAR)
    x = (rgb.astype(np.float32) / 255.0 - 0.5) / 0.5
    graph = read_tflite_graph(tiny_ssd(with_logistic=False))
    raw_boxes, logits = run_numpy(graph, x[None])
    ref = postprocess_numpy(raw_boxes[0], logits[0], ssd_anchors(TINY_ANCHORS), (24, 40))
    ref = ref[(ref[:, 1] > 0.1) & (ref[:, 4] > ref[:, 2]) & (ref[:, 5] > ref[:, 3])]
    expected = sorted((float(r[1]), int(r[0]), *map(float, r[2:])) for r in ref)
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert g[1] == e[1]
        np.testing.assert_allclose(g[2:], e[2:], atol=1e-2)
        assert g[0] == pytest.approx(e[0], abs=1e-4)
    for box in result["boxes"]:
        x1, y1, x2, y2 = box["coordinate"]
        assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 24
        assert box["label"] == TINY_LABELS[box["cls_id"]]


# ------------------------------------------------------------------------------------------
# Fetching
# ------------------------------------------------------------------------------------------


def _fake_package(model: bytes, labels: bytes) -> bytes:
    return npm_tarball({"package/objectron_solution_packed_assets.data": labels + model})


@pytest.fixture
def fake_registry(monkeypatch):
    """Point the fetcher at an in-memory package; counts downloads."""
    model, labels = b"not really a tflite model", b"???\nBottle\n"
    tarball = _fake_package(model, labels)
    calls = []

    def download(workdir: Path) -> bytes:
        calls.append(workdir)
        return tarball

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(objectron, "_download_tarball", download)
    monkeypatch.setattr(objectron, "_LABELMAP_RANGE", (0, len(labels)))
    monkeypatch.setattr(objectron, "_TFLITE_RANGE", (len(labels), len(labels) + len(model)))
    monkeypatch.setattr(objectron, "OBJECTRON_TARBALL_SHA256", sha(tarball))
    monkeypatch.setattr(objectron, "OBJECTRON_TFLITE_SHA256", sha(model))
    monkeypatch.setattr(objectron, "OBJECTRON_LABELMAP_SHA256", sha(labels))
    return calls, model, labels


def test_fetch_extracts_once_and_then_stays_offline(fake_registry, tmp_path) -> None:
    calls, model, labels = fake_registry
    path = objectron.fetch_objectron_tflite(tmp_path / "cache")
    assert path.read_bytes() == model
    assert (tmp_path / "cache" / objectron.LABELMAP_FILENAME).read_bytes() == labels
    assert objectron.fetch_objectron_tflite(tmp_path / "cache") == path
    assert len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        [objectron.TFLITE_FILENAME, objectron.LABELMAP_FILENAME]
    )


def test_fetch_rejects_a_tampered_package(fake_registry, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(objectron, "OBJECTRON_TFLITE_SHA256", "0" * 64)
    with pytest.raises(StarterModelUnavailable, match="checksum mismatch"):
        objectron.fetch_objectron_tflite(tmp_path)
    assert not (tmp_path / objectron.TFLITE_FILENAME).exists()


def test_fetch_without_registry_says_so(monkeypatch, tmp_path) -> None:
    import requests

    def refuse(*args, **kwargs):
        raise requests.ConnectionError("no route to host")

    monkeypatch.setattr(npm.shutil, "which", lambda name: None)
    monkeypatch.setattr(npm.requests, "get", refuse)
    with pytest.raises(StarterModelUnavailable, match="cannot reach the npm registry") as info:
        det.ensure_starter_detector(tmp_path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------
# The real objectron model, when it is already cached
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starter_detector_dir() -> Path:
    """The real starter detector, in the test model cache conftest.py's settings use."""
    try:
        return det.ensure_starter_detector(MODEL_CACHE / "starter")
    except StarterModelUnavailable as exc:
        pytest.skip(f"the starter detector is unavailable here: {exc}")


def _cached_objectron() -> Path | None:
    """The real model if a starter cache holds it (``starter_detector_dir`` fills the test cache)."""
    from shitu.config import Settings

    candidates = [
        Path(os.environ.get("SHITU_OBJECTRON_TFLITE", "/nonexistent")),
        MODEL_CACHE / "starter" / "downloads" / objectron.TFLITE_FILENAME,
        Settings.from_env().models_dir / "starter" / "downloads" / objectron.TFLITE_FILENAME,
    ]
    for path in candidates:
        if path.is_file() and sha256_file(path) == objectron.OBJECTRON_TFLITE_SHA256:
            return path
    return None


@pytest.mark.slow
def test_real_objectron_model_converts_and_matches_reference(tmp_path, starter_detector_dir) -> None:
    import paddlex

    path = _cached_objectron()  # `starter_detector_dir` has fetched it (or skipped the test)
    if path is None:
        pytest.skip("the objectron SSD is not in any starter cache")
    graph = read_tflite_graph(path)
    assert [graph.tensors[i].shape for i in graph.outputs] == [(1, 1917, 4), (1, 1917, 24)]
    net = TFLiteNet(graph)
    image = np.random.default_rng(0).uniform(-1, 1, (1, 300, 300, 3)).astype(np.float32)
    for got, expected in zip(net(_nchw(image)), run_numpy(graph, image)):
        np.testing.assert_allclose(got.numpy(), expected, atol=5e-4)
    model_dir = det.convert_tflite_detector(path, tmp_path / "det")
    config = yaml.safe_load((model_dir / "inference.yml").read_text())
    assert config["label_list"][15] == "Bottle" and len(config["label_list"]) == 23
    photo = tmp_path / "photo.jpg"
    cv2.imwrite(str(photo), (np.random.default_rng(1).uniform(0, 255, (200, 320, 3))).astype(np.uint8))
    predictor = paddlex.create_model(model_name="PP-ShiTuV2_det", model_dir=str(model_dir))
    result = next(iter(predictor.predict(str(photo), threshold=0.0)))
    assert isinstance(result["boxes"], list)


# ------------------------------------------------------------------------------------------
# Photos where NMS keeps nothing (they used to SIGSEGV Paddle Inference's oneDNN concat)
# ------------------------------------------------------------------------------------------

SEGFAULT_PHOTO = Path(__file__).parent / "fixtures" / "detector_segfault_300x261.jpg"

# Runs in a child process: a regression kills the child, not pytest. argv: model dir, image
# paths; prints one JSON line with the box count (all boxes, threshold 0) and the default-
# threshold count for each image and its 2x resize.
_PREDICT_IN_CHILD = """
import json, sys
import cv2, paddlex
predictor = paddlex.create_model(model_name="PP-ShiTuV2_det", model_dir=sys.argv[1], device="cpu")
report = []
for path in sys.argv[2:]:
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    for image in (bgr, cv2.resize(bgr, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)):
        everything = next(iter(predictor.predict([image], threshold=0.0)))["boxes"]
        default = next(iter(predictor.predict([image], threshold=0.25)))["boxes"]
        report.append({"hw": list(image.shape[:2]), "all": len(everything), "default": len(default)})
print("RESULT " + json.dumps(report), flush=True)
"""


def _predict_in_child(model_dir: Path, *images: Path) -> list[dict]:
    """PaddleX's own predictor (default CPU settings: oneDNN on) in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _PREDICT_IN_CHILD, str(model_dir), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    died = f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else f"exit {proc.returncode}"
    assert proc.returncode == 0, f"PaddleX predictor process died ({died}):\n{output[-3000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_exported_model_survives_no_detections_with_onednn(tmp_path) -> None:
    # Scores are sigmoids (<= 1) and NMS keeps score > floor, so a floor of 1 keeps nothing.
    tflite_path = tmp_path / "tiny.tflite"
    tflite_path.write_bytes(tiny_ssd(with_logistic=False))
    model_dir = det.convert_tflite_detector(
        tflite_path, tmp_path / "model", anchor_options=TINY_ANCHORS, labels=TINY_LABELS,
        score_threshold_floor=1.0,
    )  # fmt: skip
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    report = _predict_in_child(model_dir, photo)
    assert [r["all"] for r in report] == [0, 0]


@pytest.mark.slow
def test_real_photo_without_detections_does_not_crash_paddlex(starter_detector_dir: Path) -> None:
    assert SEGFAULT_PHOTO.is_file()
    meta = json.loads((starter_detector_dir / "starter.json").read_text())
    assert meta["format_version"] == det.STARTER_FORMAT_VERSION
    report = _predict_in_child(starter_detector_dir, SEGFAULT_PHOTO)
    assert [r["hw"] for r in report] == [[261, 300], [522, 600]]
    # The photo's best score is just under the 0.05 NMS floor, so no box survives at all.
    assert [(r["all"], r["default"]) for r in report] == [(0, 0), (0, 0)]


@pytest.mark.slow
def test_quick_crash_corpus_runs_clean(starter_detector_dir: Path, tmp_path) -> None:
    """Smoke test of bench/detector_corpus.py: ~200 varied inputs, none may crash or raise."""
    summary = tmp_path / "corpus.txt"
    proc = subprocess.run(
        [sys.executable, "bench/detector_corpus.py", "--quick", "--model-dir", str(starter_detector_dir),
         "--out", str(summary)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    text = summary.read_text()
    assert "crashes (child process died): 0" in text
    assert "errors (Python exceptions):   0" in text
    # The corpus must hold inputs that exercise the empty-NMS path (the fixture photo's).
    kept_nothing = int(text.split("NMS kept no box at the 0.05 floor (what crashed format 1):")[1].split()[0])
    assert kept_nothing > 0
