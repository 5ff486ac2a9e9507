"""A PaddleX model dir → ``inference.onnx`` (+ ``hpi.json``), run in a child process.

``python -m shitu.hpi.export MODEL_DIR OUT_DIR STAGE`` — a child, because paddle2onnx ends the
process (SIGABRT) on an operator it cannot map, and Paddle's program loader can crash natively too;
the parent (:func:`shitu.hpi.convert`) reads the exit status and the last error line as the reason.

What is converted:

* ``full``: the whole program (recognition models, and detectors without in-graph NMS);
* ``ssd-raw``: the starter SSD detector (:mod:`shitu.starter.detector`) cut where its
  ``SsdPostprocess`` layer starts — the raw box regressions ``[N, K, 4]`` and class scores
  ``[N, K, C]`` come out; anchor decoding and NMS run in NumPy (:mod:`shitu.hpi.postprocess`),
  reading the NMS settings from the graph's own ``multiclass_nms3`` op;
* ``nms-cut``: a PaddleDetection-style detector (the official ``PP-ShiTuV2_det``, a PicoDet) whose
  outputs are ``multiclass_nms3``'s own: the program is cut at that op's inputs (decoded boxes
  ``[N, M, 4]`` in original pixels, scores ``[N, C, M]``) and NMS runs in NumPy with the op's settings.

paddle2onnx's optimizer step is never run (``optimize_tool="None"``): its default (polygraphy) sets
``POLYGRAPHY_AUTOINSTALL_DEPS`` and pip-installs packages from another index by itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from shitu.starter.ssd import SSD_BOX_SCALES

OPSET = 11
NMS_OP = "pd_op.multiclass_nms3"
SSD_LAYER = "SsdPostprocess"  # the starter detector's post-processing layer (shitu.starter.tflite_to_paddle)
_CONSTANT_OPS = {"pd_op.data", "builtin.parameter", "pd_op.full", "pd_op.full_int_array", "builtin.constant"}
NMS_ATTRS = ("score_threshold", "nms_top_k", "keep_top_k", "nms_threshold", "normalized", "nms_eta", "background_label")


class ExportRefused(Exception):
    """The graph is not one whose post-processing we reproduce outside it."""


def _program_files(model_dir: Path) -> tuple[Path, Path]:
    for name in ("inference.json", "inference.pdmodel"):
        if (model_dir / name).is_file():
            return model_dir / name, model_dir / "inference.pdiparams"
    raise ExportRefused(f"no inference.json or inference.pdmodel in {model_dir.name}")


def _struct(op: Any) -> str:
    return str(op.attrs().get("struct_name") or "")


def _nms_settings(op: Any) -> dict[str, Any]:
    attrs = op.attrs()
    return {k: (attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]) for k in NMS_ATTRS if k in attrs}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _ssd_anchors(ssd_ops: list[Any], count: int) -> np.ndarray:
    """The anchors buffer [K, 4] (yc, xc, h, w) the SSD post-processing reads, from the program's scope."""
    import paddle

    for op in ssd_ops:
        for value in op.operands_source():
            producer = value.get_defining_op() if value is not None and value.initialized() else None
            if producer is not None and producer.name() == "builtin.parameter" and list(value.shape) == [count, 4]:
                name = producer.attrs()["parameter_name"]
                return np.array(paddle.static.global_scope().find_var(name).get_tensor(), dtype=np.float32)
    raise ExportRefused(f"no [{count}, 4] anchor buffer in the SSD post-processing")


def plan_detector(model_dir: Path, out_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """Cut a detector's program before its NMS; ``(pruned model dir or None for the whole
    program, what the NumPy post-processing needs)``."""
    import paddle

    paddle.enable_static()
    exe = paddle.static.Executor(paddle.CPUPlace())
    program, feed_names, fetches = paddle.static.load_inference_model(str(model_dir / "inference"), exe)
    ops = list(program.global_block().ops)
    nms = [op for op in ops if op.name() == NMS_OP]
    if not nms:
        return None, {"variant": "full"}
    if len(nms) > 1:
        raise ExportRefused(f"{len(nms)} NMS ops in the graph (one expected)")
    settings = _nms_settings(nms[0])
    data = {op.attrs()["name"]: op.result(0) for op in ops if op.name() == "pd_op.data"}
    feeds = [data[name] for name in feed_names]
    ssd_ops = [op for op in ops if SSD_LAYER in _struct(op)]
    if ssd_ops:
        inside = {id(op) for op in ssd_ops}
        raw: list[Any] = []
        for op in ssd_ops:
            for value in op.operands_source():
                producer = value.get_defining_op() if value is not None and value.initialized() else None
                if producer is None or id(producer) in inside or producer.name() in _CONSTANT_OPS:
                    continue
                if not any(value.is_same(r) for r in raw):
                    raw.append(value)
        shapes = [list(v.shape) for v in raw]
        boxes = [v for v, s in zip(raw, shapes) if len(s) == 3 and s[-1] == 4]
        scores = [v for v, s in zip(raw, shapes) if len(s) == 3 and s[-1] != 4]
        if len(raw) != 2 or len(boxes) != 1 or len(scores) != 1:
            raise ExportRefused(f"the SSD post-processing takes {shapes}; expected boxes [N,K,4] and scores [N,K,C]")
        outputs = [boxes[0], scores[0]]
        anchors = _ssd_anchors(ssd_ops, int(boxes[0].shape[1]))
        np.save(out_dir / "anchors.npy", anchors)
        starter = _read_json(model_dir / "starter.json")
        meta: dict[str, Any] = {
            "variant": "ssd-raw",
            "nms": settings,
            "scores_are_logits": any(op.name() == "pd_op.sigmoid" for op in ssd_ops),
            "box_scales": (starter.get("conversion") or {}).get("box_scales") or list(SSD_BOX_SCALES),
            "input_hw": [int(d) for d in data["image"].shape[2:4]],
            "outputs": ["raw_boxes", "raw_scores"],
        }
    else:
        fetched = [f.get_defining_op().name() for f in fetches]
        if fetched != [NMS_OP, NMS_OP] or len(fetches) != 2:
            raise ExportRefused(
                f"the detector's outputs come from {fetched}, not from multiclass_nms3 directly: "
                "its post-NMS steps are not reproduced outside the graph"
            )
        bboxes, scores = nms[0].operands_source()[:2]
        if len(bboxes.shape) != 3 or len(scores.shape) != 3:
            raise ExportRefused(f"NMS inputs {list(bboxes.shape)} and {list(scores.shape)}: expected [N,M,4], [N,C,M]")
        outputs = [bboxes, scores]
        meta = {"variant": "nms-cut", "nms": settings, "outputs": ["bboxes", "scores"]}
    pruned = out_dir / "pruned"
    pruned.mkdir(parents=True, exist_ok=True)
    _save_pruned(str(pruned / "inference"), feeds, outputs, exe, program)
    return pruned, meta


def _save_pruned(path: str, feeds: list[Any], outputs: list[Any], exe: Any, program: Any) -> None:
    """The program cut to ``outputs``; an input they do not need (Paddle refuses it) is left out."""
    import paddle

    for drop in [None, *range(len(feeds))]:
        kept = [f for k, f in enumerate(feeds) if k != drop]
        try:
            paddle.static.save_inference_model(path, kept, outputs, exe, program=program)
            return
        except ValueError as exc:
            if "not involved" not in str(exc) or not kept:
                raise
    raise ExportRefused("the cut program needs none of the model's inputs")


def export(model_dir: Path, out_dir: Path, stage: str) -> dict[str, Any]:
    """Write ``out_dir/inference.onnx`` and ``out_dir/hpi.json``; returns the meta written."""
    import paddle2onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"variant": "full"}
    source = model_dir
    if stage == "detection":
        pruned, meta = plan_detector(model_dir, out_dir)
        source = pruned or model_dir
    program, params = _program_files(source)
    onnx_path = out_dir / "inference.onnx"
    paddle2onnx.export(
        str(program), str(params), save_file=str(onnx_path), opset_version=OPSET, enable_onnx_checker=True,
        optimize_tool="None",
    )  # fmt: skip
    if not onnx_path.is_file() or onnx_path.stat().st_size == 0:
        raise ExportRefused("paddle2onnx wrote no model")
    if source != model_dir:
        for f in source.iterdir():
            f.unlink()
        source.rmdir()
    meta.update(
        stage=stage, opset=OPSET, paddle2onnx=paddle2onnx.__version__, source=model_dir.name,
    )  # fmt: skip
    (out_dir / "hpi.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str]) -> int:
    model_dir, out_dir, stage = Path(argv[0]), Path(argv[1]), argv[2]
    tempfile.tempdir = str(out_dir)  # paddle2onnx's intermediate files stay in the entry being made
    try:
        export(model_dir, out_dir, stage)
    except ExportRefused as exc:
        print(f"REFUSED: {exc}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
