"""Offline main-body detector: MediaPipe's SSD-MobileNetV2 (Open Images v4) as a PaddleX model dir.

Without a model hub the starter pack has no ``PP-ShiTuV2_det``. The npm package
``@mediapipe/objectron`` (Apache-2.0) ships an SSD-MobileNetV2 trained on Open Images v4 as an
fp16 TFLite flatbuffer. :func:`ensure_starter_detector`

1. fetches that package once and checks its sha256 values (:mod:`shitu.starter.objectron`),
2. reads the TFLite graph (:mod:`shitu.starter.tflite_graph`) and rebuilds it op by op as a
   ``paddle.nn.Layer``, with SSD anchor decoding and class-agnostic NMS appended inside the graph
   (:mod:`shitu.starter.tflite_to_paddle`; numpy reference in :mod:`shitu.starter.ssd`),
3. exports a PaddleX model dir that PaddleX's own ``PP-ShiTuV2_det`` predictor loads
   (:func:`convert_tflite_detector`).

Every detection is a "main body"; the Open Images class of the best-scoring class is kept as the
box's label for information. Example::

    model_dir = ensure_starter_detector(Path("data/models/starter"))
    det = paddlex.create_model(model_name="PP-ShiTuV2_det", model_dir=str(model_dir))
    boxes = next(det.predict("shelf.jpg", threshold=DEFAULT_DET_THRESHOLD))["boxes"]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import paddle
import yaml

# One project-wide exception type; re-exported here as part of this module's API.
from shitu.errors import StarterModelUnavailable
from shitu.fsutil import replace_dir, sha256_file
from shitu.starter import MARKER
from shitu.starter.objectron import (
    LABELMAP_FILENAME,
    OBJECTRON_NPM_PACKAGE,
    OBJECTRON_NPM_VERSION,
    OBJECTRON_TARBALL_SHA256,
    OBJECTRON_TARBALL_URL,
    OIDV4_LABELS,
    fetch_objectron_tflite,
)
from shitu.starter.ssd import SSD_BOX_SCALES, SsdAnchorOptions
from shitu.starter.tflite_to_paddle import build_ssd_detector

__all__ = [
    "DEFAULT_DET_THRESHOLD",
    "DETECTOR_MODEL_NAME",
    "STARTER_DETECTOR_DIRNAME",
    "STARTER_FORMAT_VERSION",
    "StarterModelUnavailable",
    "build_ssd_detector",
    "convert_tflite_detector",
    "ensure_starter_detector",
    "fetch_objectron_tflite",
]

DETECTOR_MODEL_NAME = "PP-ShiTuV2_det"
STARTER_DETECTOR_DIRNAME = "PP-ShiTuV2_det-objectron-ssd"
# Bumped whenever the exported graph changes, so cached model dirs are converted again.
# 2: no concat after NMS; format 1 crashed Paddle Inference's oneDNN concat when NMS kept nothing.
STARTER_FORMAT_VERSION = 2

# Chosen with bench/detector_report.py on the 13 shared test photos (bench/results/
# detector_report.txt): at 0.25 100.jpeg gives its 3 separate bottles, every photo gets a box,
# and the Red Bull carton and the milk carton that 0.3 misses are found, for 4 false boxes
# (table, croissant, pine cone, berries) over 13 photos; 0.2 adds 2 true and 4 false boxes.
DEFAULT_DET_THRESHOLD = 0.25


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
    num_classes = graph.tensors[graph.outputs[model.score_output]].shape[-1]
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
                "tflite_sha256": sha256_file(tflite_path),
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
        (tmp / MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp creates 0700
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_complete_model_dir(model_dir: Path) -> bool:
    names = ("inference.json", "inference.pdiparams", "inference.yml", MARKER)
    if not all((model_dir / n).is_file() for n in names):
        return False
    try:
        meta = json.loads((model_dir / MARKER).read_text())
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
