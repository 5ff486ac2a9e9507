"""Numerical agreement of the converted objectron SSD with the original TFLite model.

For every photo in the test folder the same [-1, 1] 300x300 input goes to

* the TFLite model, run by a TFLite interpreter (LiteRT), and
* our Paddle rebuild of the graph (``TFLiteNet``, dygraph),

and the script prints the max abs difference of the raw box regressions, class logits and
class scores (sigmoid), then applies the *same* numpy decode + class-agnostic NMS to both raw
outputs and checks the boxes are identical (same count, order, classes; coordinates within
0.5 px). Finally the exported model dir, run by PaddleX's ``PP-ShiTuV2_det`` predictor (Paddle
Inference, in-graph decode + NMS), is compared with that numpy decode of the TFLite outputs.

The interpreter is not a project dependency; install it aside, without its dependencies
(they would change numpy/protobuf for the project)::

    pip install --no-deps --target /tmp/litert ai-edge-litert==2.3.0

Run (fetches and converts the model into the data dir once)::

    PYTHONPATH=/tmp/litert python bench/detector_agreement.py \\
        --images ../shared/data/drink_dataset/test_images --starter-dir data/models/starter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shitu.config import Settings
from shitu.starter.detector import ensure_starter_detector
from shitu.starter.objectron import fetch_objectron_tflite
from shitu.starter.ssd import postprocess_numpy, ssd_anchors
from shitu.starter.tflite_to_paddle import build_ssd_detector

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def load_interpreter(model_path: Path):
    """A TFLite interpreter from ai-edge-litert, or tflite-runtime as a fallback."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(model_path), num_threads=2)
    interpreter.allocate_tensors()
    return interpreter


def preprocess(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB, stretched to ``size`` (h, w) with bilinear resize, scaled to [-1, 1]: NHWC [1,h,w,3]."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    rgb = cv2.resize(bgr[:, :, ::-1], (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = (rgb.astype(np.float32) / 255.0 - 0.5) / 0.5
    return x[None], bgr.shape[:2]


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v.astype(np.float64)))


def boxes_identical(
    a: np.ndarray, b: np.ndarray, floor: float, tol_px: float = 0.5
) -> tuple[bool, float]:
    """Same count, order and classes, coordinates within ``tol_px``; returns (ok, max px diff).

    Boxes scoring within 1e-5 of ``floor`` are left out on both sides: a 1e-7 score difference
    may put such a box on either side of the floor, and being last it suppresses nothing.
    """
    a = a[a[:, 1] > floor + 1e-5]
    b = b[b[:, 1] > floor + 1e-5]
    if a.shape != b.shape:
        return False, float("inf")
    if len(a) == 0:
        return True, 0.0
    diff = float(np.abs(a[:, 2:] - b[:, 2:]).max())
    return bool(np.array_equal(a[:, 0], b[:, 0]) and diff <= tol_px), diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path,
                        default=Path("../shared/data/drink_dataset/test_images"))  # fmt: skip
    parser.add_argument("--starter-dir", type=Path, default=Settings.from_env().models_dir / "starter",
                        help="the starter pack folder (default: <SHITU_DATA_DIR>/models/starter)")
    parser.add_argument("--nms-floor", type=float, default=0.05,
                        help="score floor for the NMS comparison (the exported model's floor)")  # fmt: skip
    args = parser.parse_args()

    model_dir = ensure_starter_detector(args.starter_dir)
    tflite_path = fetch_objectron_tflite(args.starter_dir / "downloads")
    interpreter = load_interpreter(tflite_path)
    model, _, options = build_ssd_detector(tflite_path)
    anchors = ssd_anchors(options)
    size = (options.input_height, options.input_width)
    in_index = interpreter.get_input_details()[0]["index"]
    out_details = {d["name"]: d["index"] for d in interpreter.get_output_details()}
    box_name = next(n for n in out_details if "box" in n)
    cls_name = next(n for n in out_details if "class" in n)

    import paddlex

    predictor = paddlex.create_model(
        model_name="PP-ShiTuV2_det", model_dir=str(model_dir), device="cpu"
    )
    photos = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    print(f"model: {tflite_path.name}  paddle {paddle.__version__}  photos: {len(photos)}")
    print(f"exported model dir: {model_dir.name} (in the starter dir)")
    print(f"NMS comparison: score > {args.nms_floor}, IoU 0.45, class-agnostic; 'same' = equal")
    print("count, order and classes, coordinates within 0.5 px (PaddleX column: 1 px), boxes")
    print(f"scoring within 1e-5 of the {args.nms_floor} floor ignored\n")
    header = (f"{'photo':<18}{'|d box reg|':>12}{'|d logit|':>11}{'|d score|':>11}"
              f"{'boxes':>7}{'same':>6}{'max px':>9}{'paddlex':>9}{'px':>8}")  # fmt: skip
    print(header)
    worst = {"reg": 0.0, "logit": 0.0, "score": 0.0, "px": 0.0, "px_paddlex": 0.0}
    all_same = all_same_paddlex = True
    for photo in photos:
        x, (h, w) = preprocess(photo, size)
        interpreter.set_tensor(in_index, x)
        interpreter.invoke()
        t_boxes = interpreter.get_tensor(out_details[box_name])[0]
        t_logits = interpreter.get_tensor(out_details[cls_name])[0]
        with paddle.no_grad():
            outs = model.backbone(paddle.to_tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        p_boxes = outs[model.box_output].numpy()[0]
        p_logits = outs[model.score_output].numpy()[0]

        d_reg = float(np.abs(t_boxes - p_boxes).max())
        d_logit = float(np.abs(t_logits - p_logits).max())
        d_score = float(np.abs(sigmoid(t_logits) - sigmoid(p_logits)).max())

        ref_t = postprocess_numpy(t_boxes, t_logits, anchors, (h, w), score_threshold=args.nms_floor)
        ref_p = postprocess_numpy(p_boxes, p_logits, anchors, (h, w), score_threshold=args.nms_floor)
        same, px = boxes_identical(ref_t, ref_p, args.nms_floor)

        # Through PaddleX (its own resize + normalise, in-graph decode + NMS).
        res = next(iter(predictor.predict(str(photo), threshold=args.nms_floor)))
        got = np.asarray(
            [[b["cls_id"], b["score"], *b["coordinate"]] for b in res["boxes"]], np.float32
        ).reshape(-1, 6)
        ref_valid = ref_t[(ref_t[:, 4] > ref_t[:, 2]) & (ref_t[:, 5] > ref_t[:, 3])]
        same_px, px_px = boxes_identical(ref_valid, got, args.nms_floor, tol_px=1.0)

        worst["reg"] = max(worst["reg"], d_reg)
        worst["logit"] = max(worst["logit"], d_logit)
        worst["score"] = max(worst["score"], d_score)
        worst["px"] = max(worst["px"], px)
        worst["px_paddlex"] = max(worst["px_paddlex"], px_px)
        all_same &= same
        all_same_paddlex &= same_px
        print(f"{photo.name:<18}{d_reg:>12.2e}{d_logit:>11.2e}{d_score:>11.2e}{len(ref_t):>7}"
              f"{'yes' if same else 'NO':>6}{px:>9.4f}{'yes' if same_px else 'NO':>9}{px_px:>8.3f}")  # fmt: skip

    print()
    print(f"max |diff| raw box regressions (ty,tx,th,tw): {worst['reg']:.3e}")
    print(f"max |diff| raw class logits:                  {worst['logit']:.3e}")
    print(f"max |diff| class scores (sigmoid):            {worst['score']:.3e}")
    print(f"boxes after the same decode+NMS identical on all photos: {all_same} "
          f"(max coordinate diff {worst['px']:.4f} px)")  # fmt: skip
    print(f"exported model via PaddleX == numpy decode+NMS of TFLite outputs: {all_same_paddlex} "
          f"(max coordinate diff {worst['px_paddlex']:.3f} px)")  # fmt: skip


if __name__ == "__main__":
    main()
