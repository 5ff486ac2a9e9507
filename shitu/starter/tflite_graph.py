"""Reading a TFLite flatbuffer into plain Python objects (tensors, ops, graph inputs/outputs).

Uses the ``tflite`` package's generated flatbuffer accessors only: no TensorFlow is involved.
Constant tensors come with their data as numpy arrays; op options are decoded for the ops the
converter (:mod:`shitu.starter.tflite_to_paddle`) supports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tflite

__all__ = ["TFLiteGraph", "TFLiteOp", "TFLiteTensor", "read_tflite_graph"]

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
