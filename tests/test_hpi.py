"""High-performance inference (``use_hpip``, :mod:`shitu.hpi`): the starter models converted with
paddle2onnx and run by OpenVINO and ONNX Runtime must give Paddle's own features and boxes, and
every way that can fail must keep Paddle and say why.

Conversions go to a temp dir of this run (``hpi_cache``) or beside the test model cache
(``<SHITU_TEST_MODEL_DIR>/hpi``, where a Runtime's ``<models dir>/hpi`` is) — never ~/.paddlex.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shitu.config import PipelineConfig, parse_hpi_config
from shitu.errors import ShiTuError
from shitu.gallery import list_image_files, load_image
from shitu.hpi import (
    BOX_TOLERANCE_PX,
    FLOOR_MARGIN,
    INSTALL_HINT,
    MIN_COSINE,
    SCORE_TOLERANCE,
    EngineChoice,
    HpiSpec,
    accelerate,
    cache_entry,
    postprocess,
)
from shitu.hpi.runners import FastRunner
from shitu.runtime import Runtime

from .conftest import MODEL_CACHE, make_settings

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("paddle2onnx")

ROOT = Path(__file__).resolve().parents[1]
DRINK_PHOTOS = ROOT.parent / "shared" / "data" / "drink_dataset" / "test_images"
SEGFAULT_PHOTO = Path(__file__).parent / "fixtures" / "detector_segfault_300x261.jpg"
BACKENDS = ("openvino", "onnxruntime")


def starter_dir(stage: str) -> Path:
    from shitu.starter.detector import ensure_starter_detector
    from shitu.starter.recognition import ensure_starter_recognizer

    starter = MODEL_CACHE / "starter"
    return ensure_starter_detector(starter) if stage == "detection" else ensure_starter_recognizer(starter)


def predictor(stage: str):
    import paddlex

    name = "PP-ShiTuV2_det" if stage == "detection" else "PP-ShiTuV2_rec"
    return paddlex.create_model(model_name=name, model_dir=str(starter_dir(stage)), engine_config={"cpu_threads": 2})


@pytest.fixture(scope="module")
def hpi_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hpi-cache")


def photos() -> list[Path]:
    """The 13 drink test photos (when ../shared is here) and the photo that once crashed Paddle's
    oneDNN concat (no box survives NMS)."""
    found = list_image_files(DRINK_PHOTOS) if DRINK_PHOTOS.is_dir() else []
    return [*found, SEGFAULT_PHOTO]


# --- configuration ---------------------------------------------------------------------------------
def test_use_hpip_is_read_as_paddlex_spells_it(tmp_path, monkeypatch):
    config = PipelineConfig.from_dict(
        {
            "pipeline_name": "PP-ShiTuV2",
            "use_hpip": True,
            "hpi_config": {"backend": "onnxruntime", "backend_config": {"cpu_num_threads": 1}},
            "SubModules": {"Detection": {"model_name": "PP-ShiTuV2_det", "use_hpip": False}},
        }
    )
    expected = {"backend": "onnxruntime", "backend_config": {"cpu_num_threads": 1}}
    assert config.hpi_request("recognition") == (True, expected)
    assert config.hpi_request("detection")[0] is False
    again = PipelineConfig.from_dict(config.to_dict())
    assert again.use_hpip and again.detection.use_hpip is False and again.hpi_config == config.hpi_config
    assert PipelineConfig().to_dict()["use_hpip"] is False

    rt = Runtime(config, make_settings(tmp_path), isolate=False)
    try:
        assert rt.hpi["detection"] is None
        spec = rt.hpi["recognition"]
        assert spec.backend == "onnxruntime" and spec.cpu_threads == 1
        assert spec.cache_dir == str(MODEL_CACHE / "hpi")  # beside the model cache, never ~/.paddlex
        models = rt.models
        assert models["use_hpip"] and models["recognition"]["engine"]["requested"] == "onnxruntime"
        assert models["detection"]["engine"]["engine"] == "paddle"
    finally:
        rt.close()
    # SHITU_USE_HPIP overrides the YAML, both ways
    off = Runtime(config, make_settings(tmp_path, use_hpip=False), isolate=False)
    try:
        assert off.hpi == {"detection": None, "recognition": None}
        assert off.models["recognition"]["engine"]["reason"] == "use_hpip is off"
    finally:
        off.close()
    monkeypatch.setenv("SHITU_USE_HPIP", "1")
    assert make_settings(tmp_path).use_hpip is True


@pytest.mark.parametrize(
    "raw, message",
    [({"backend": "tensorrt"}, "backend must be one of"), ({"colour": "red"}, "unknown key"),
     ({"backend_config": {"cpu_num_threads": 0}}, "cpu_num_threads"), ("openvino", "must be a mapping")],
)  # fmt: skip
def test_a_bad_hpi_config_says_what_is_wrong(raw, message):
    with pytest.raises(ShiTuError, match=message):
        parse_hpi_config(raw)
    with pytest.raises(ShiTuError, match=message):
        PipelineConfig.from_dict({"hpi_config": raw})


# --- the real models on the fast engines -------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_features_equal_paddles_on_every_engine(backend, hpi_cache, sample_gallery):
    """Each gallery photo's feature through PaddleX's own preprocessing, on Paddle and on the engine."""
    root, _ = sample_gallery
    images = [np.ascontiguousarray(load_image(p)[..., ::-1]) for p in sorted(root.rglob("*.jpg"))[:12]]
    paddle_rec, fast_rec = predictor("recognition"), predictor("recognition")
    choice = accelerate(fast_rec, "recognition", str(starter_dir("recognition")),
                        HpiSpec(True, backend, cache_dir=str(hpi_cache)), "cpu", 2)  # fmt: skip
    assert choice.engine == backend, choice.reason
    assert "verified against Paddle" in choice.reason and choice.check["min_cosine"] >= MIN_COSINE
    for batch in (images[:1], images[:4], images[:7], images):  # OpenVINO runs 7 as 4 + 2 + 1, 12 as 8 + 4
        a = np.stack([r["feature"] for r in paddle_rec.predict(batch, batch_size=1)]).reshape(len(batch), -1)
        b = list(fast_rec.predict(batch, batch_size=len(batch)))[0]["feature"].reshape(len(batch), -1)
        a, b = (m / np.linalg.norm(m, axis=1, keepdims=True) for m in (a, b))
        assert np.min(np.sum(a * b, axis=1)) >= MIN_COSINE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_boxes_equal_paddles_on_every_test_photo(backend, hpi_cache, runtime, sample_queries):
    """Every box of every photo at threshold 0: Paddle's own detector in the session's worker
    process (a native crash stays there) vs the engine here. Only a box scored at the NMS floor
    itself (0.05 + 1e-5, far below any threshold a user picks) may be kept by one and not the other."""
    fast_det = predictor("detection")
    choice = accelerate(fast_det, "detection", str(starter_dir("detection")),
                        HpiSpec(True, backend, cache_dir=str(hpi_cache)), "cpu", 2)  # fmt: skip
    assert choice.engine == backend, choice.reason
    assert "NMS in NumPy" in choice.reason
    meta = json.loads((cache_entry(starter_dir("detection"), "detection", hpi_cache) / "hpi.json").read_text())
    assert meta["variant"] == "ssd-raw" and meta["nms"]["keep_top_k"] == 100
    floor = meta["nms"]["score_threshold"] + FLOOR_MARGIN
    worst, boxes, at_floor = 0.0, 0, []
    every = [*photos(), *sample_queries]  # the sample's photos have boxes even where ../shared is absent
    for path in every:
        rgb = load_image(path)
        expected = runtime.detect(rgb, 0.0)
        (found,) = list(fast_det.predict([np.ascontiguousarray(rgb[..., ::-1])], threshold=0.0))
        got = [(tuple(float(v) for v in b["coordinate"]), float(b["score"]), b["label"]) for b in found["boxes"]]
        at_floor += [(path.name, s) for _, s, _ in expected + got if s <= floor]
        expected, got = [b for b in expected if b[1] > floor], [b for b in got if b[1] > floor]
        assert len(got) == len(expected), path.name
        for (box_a, score_a, label_a), (box_b, score_b, label_b) in zip(expected, got):
            assert label_a == label_b and abs(score_a - score_b) <= SCORE_TOLERANCE, path.name
            worst = max(worst, float(np.max(np.abs(np.subtract(box_a, box_b)))))
        boxes += len(got)
    assert worst <= BOX_TOLERANCE_PX, worst
    assert boxes > 0 and len(at_floor) <= 2, at_floor
    print(f"\n{backend}: {boxes} boxes on {len(every)} photos, max coordinate difference {worst:.2e} px; "
          f"at the NMS floor (not compared): {at_floor}")


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_runtime_with_use_hpip_reports_and_uses_the_engine(tmp_path, runtime):
    """The real stack: Runtime (models on a thread) with SHITU_USE_HPIP; its analysis equals the
    Paddle runtime's, and ``models`` says which engine runs each model."""
    rt = Runtime(PipelineConfig(), make_settings(tmp_path, use_hpip=True), isolate=False)
    try:
        pending = rt.models["recognition"]["engine"]
        assert pending["engine"] == "openvino" and "when the models load" in pending["reason"]
        image = load_image(photos()[0])
        regions, feats, _ = rt.analyze(image, 0.25, "auto")
        ref_regions, ref_feats, _ = runtime.analyze(image, 0.25, "auto")
        assert len(regions) == len(ref_regions)
        np.testing.assert_allclose([r[0] for r in regions], [r[0] for r in ref_regions], atol=BOX_TOLERANCE_PX)
        assert np.min(np.sum(feats * ref_feats, axis=1)) >= MIN_COSINE
        models = rt.models
        for stage in ("detection", "recognition"):
            engine = models[stage]["engine"]
            assert engine["engine"] == "openvino", engine["reason"]
            assert engine["name"] == "OpenVINO" and "verified against Paddle" in engine["description"]
    finally:
        rt.close()


# --- every failure keeps Paddle, with a reason ----------------------------------------------------------
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_conversion_that_fails_keeps_paddle_and_is_remembered(hpi_cache, tmp_path):
    """The whole starter detector (with its in-graph NMS) handed over as a plain model: paddle2onnx
    aborts natively on its NMS — in the child process, so only the reason comes back."""
    det = predictor("detection")
    cache = tmp_path / "cache"
    choice = accelerate(det, "recognition", str(starter_dir("detection")), HpiSpec(True, cache_dir=str(cache)),
                        "cpu", 2)  # fmt: skip
    assert choice.engine == "paddle" and choice.requested == "openvino"
    assert "paddle2onnx could not convert it (signal SIGABRT)" in choice.reason, choice.reason
    assert "unsupported operators" in choice.reason and "\n" not in choice.reason
    assert type(det._predictor.runner).__name__ != "FastRunner"  # Paddle still runs it
    again = accelerate(det, "recognition", str(starter_dir("detection")), HpiSpec(True, cache_dir=str(cache)),
                       "cpu", 2)  # fmt: skip
    assert again.engine == "paddle" and "remembered from an earlier attempt" in again.reason


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_conversion_that_does_not_match_paddle_is_refused(hpi_cache, tmp_path):
    """A converted model whose weights are off (here: one conv layer scaled by 1.1) fails the
    verification; Paddle keeps the model and the reason names the cosine."""
    import onnx
    from onnx import numpy_helper

    model_dir = starter_dir("recognition")
    rec = predictor("recognition")
    good = cache_entry(model_dir, "recognition", hpi_cache)
    if not good.is_dir():
        assert accelerate(predictor("recognition"), "recognition", str(model_dir),
                          HpiSpec(True, cache_dir=str(hpi_cache)), "cpu", 2).engine == "openvino"  # fmt: skip
    bad = cache_entry(model_dir, "recognition", tmp_path)
    shutil.copytree(good, bad)
    proto = onnx.load(str(bad / "inference.onnx"))
    constants = [node for node in proto.graph.node if node.op_type == "Constant"]  # paddle2onnx stores weights so
    weights = [a.t for node in constants for a in node.attribute if a.name == "value"]
    weight = next(t for t in [*proto.graph.initializer, *weights] if len(t.dims) == 4 and t.dims[0] >= 32)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, weight.name))
    onnx.save(proto, str(bad / "inference.onnx"))
    choice = accelerate(rec, "recognition", str(model_dir), HpiSpec(True, cache_dir=str(tmp_path)), "cpu", 2)
    assert choice.engine == "paddle" and choice.reason.startswith("refused:") and "cosine" in choice.reason


def test_an_engine_that_killed_its_process_is_not_tried_again(hpi_cache, tmp_path):
    """A native crash while the engine loads or checks a model kills the worker; its marker, left in
    the cache entry by a process that no longer exists, keeps the next start on Paddle."""
    import subprocess
    import sys

    model_dir = starter_dir("recognition")
    good = cache_entry(model_dir, "recognition", hpi_cache)
    if not good.is_dir():
        accelerate(predictor("recognition"), "recognition", str(model_dir), HpiSpec(True, cache_dir=str(hpi_cache)),
                   "cpu", 2)  # fmt: skip
    entry = cache_entry(model_dir, "recognition", tmp_path)
    shutil.copytree(good, entry)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (entry / f".openvino.loading.{gone.pid}").write_text("")
    for _ in range(2):
        choice = accelerate(predictor("recognition"), "recognition", str(model_dir),
                            HpiSpec(True, cache_dir=str(tmp_path)), "cpu", 2)  # fmt: skip
        assert choice.engine == "paddle" and "OpenVINO ended the process" in choice.reason
    other = accelerate(predictor("recognition"), "recognition", str(model_dir),
                       HpiSpec(True, "onnxruntime", cache_dir=str(tmp_path)), "cpu", 2)  # fmt: skip
    assert other.engine == "onnxruntime", other.reason  # the other engine is still tried
    assert not list(entry.glob(".onnxruntime.loading.*"))  # its marker went away after the check


def test_a_missing_engine_keeps_paddle(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    choice = accelerate(predictor("recognition"), "recognition", str(starter_dir("recognition")), HpiSpec(True),
                        "cpu", 2)  # fmt: skip
    assert choice.engine == "paddle" and "openvino not installed" in choice.reason and INSTALL_HINT in choice.reason
    gpu = accelerate(predictor("recognition"), "recognition", str(starter_dir("recognition")),
                     HpiSpec(True, "paddle"), "cpu", 2)  # fmt: skip
    assert gpu.engine == "paddle" and "backend: paddle" in gpu.reason


def test_an_engine_that_fails_later_hands_over_to_paddle():
    class Broken:
        engine = "openvino"
        input_names = ["x"]

        def run(self, feeds):
            raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223:\nshape mismatch")

    told: list[str] = []
    choice = EngineChoice("openvino", "verified", "openvino")
    runner = FastRunner(Broken(), ["x"], {"variant": "full"}, fallback=lambda x: ["paddle's answer"],
                        on_fallback=told.append)  # fmt: skip
    assert runner(x=[np.zeros((1, 3), np.float32)]) == ["paddle's answer"]
    assert runner([np.zeros((1, 3), np.float32)]) == ["paddle's answer"]
    assert len(told) == 1 and "openvino failed on an input" in told[0] and "\n" not in told[0]
    del choice


# --- the detector's NumPy tail is Paddle's kernel ---------------------------------------------------
def test_multiclass_nms_matches_paddles_kernel():
    """``nms-cut`` (the official PicoDet detector's path): per-class NMS, keep_top_k across classes,
    rows grouped by class — against Paddle's own ``multiclass_nms3`` on random boxes."""
    import paddle
    from paddle import _C_ops

    rng = np.random.default_rng(0)
    n, m, c = 2, 300, 4
    xy = rng.uniform(0, 200, (n, m, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (n, m, 2)).astype(np.float32)], axis=-1)
    scores = rng.uniform(0, 1, (n, c, m)).astype(np.float32)
    for settings in (
        {"score_threshold": 0.3, "nms_top_k": 1000, "keep_top_k": 100, "nms_threshold": 0.6, "normalized": True,
         "nms_eta": 1.0, "background_label": -1},
        {"score_threshold": 0.5, "nms_top_k": 50, "keep_top_k": -1, "nms_threshold": 0.3, "normalized": False,
         "nms_eta": 1.0, "background_label": 0},
    ):  # fmt: skip
        out, _, count = _C_ops.multiclass_nms3(
            paddle.to_tensor(boxes), paddle.to_tensor(scores), None, settings["score_threshold"],
            settings["nms_top_k"], settings["keep_top_k"], settings["nms_threshold"], settings["normalized"],
            settings["nms_eta"], settings["background_label"],
        )  # fmt: skip
        ours, our_count = postprocess.nms_cut(boxes, scores, settings)
        np.testing.assert_array_equal(our_count, count.numpy())
        np.testing.assert_allclose(ours, out.numpy(), atol=1e-5)


# A PaddleDetection-style detector (the official PP-ShiTuV2_det, a PicoDet, is one): a head whose
# decoded boxes [N, M, 4] (original pixels: divided by scale_factor) and class scores [N, C, M] go into
# multiclass_nms3, whose own outputs are the model's. Saved by paddle.jit from this file (to_static
# needs the source in a real file).
def _picodet_like(tmp_path: Path) -> Path:
    import paddle
    from paddle import _C_ops, nn

    class TinyPicoDet(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2D(3, 8, 3, stride=4, padding=1)
            self.box_head = nn.Conv2D(8, 4, 1)
            self.cls_head = nn.Conv2D(8, 3, 1)

        def forward(self, image, scale_factor):
            f = nn.functional.relu(self.features(image))
            n = image.shape[0]
            grid = paddle.arange(64, dtype="float32")
            cx = (grid % 8) * 4 + 2
            cy = paddle.floor(grid / 8) * 4 + 2
            d = paddle.exp(paddle.reshape(self.box_head(f), [n, 4, 64]) * 0.5) * 3
            boxes = paddle.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=-1)
            scale = paddle.concat([scale_factor[:, 1:2], scale_factor[:, 0:1]] * 2, axis=1)
            boxes = boxes / paddle.unsqueeze(scale, 1)
            scores = nn.functional.sigmoid(paddle.reshape(self.cls_head(f), [n, 3, 64]))
            out, _, count = _C_ops.multiclass_nms3(boxes, scores, None, 0.3, 1000, 20, 0.5, True, 1.0, -1)
            return out, count

    paddle.seed(3)
    net = TinyPicoDet()
    net.eval()
    spec = [paddle.static.InputSpec([None, 3, 32, 32], "float32", "image"),
            paddle.static.InputSpec([None, 2], "float32", "scale_factor")]  # fmt: skip
    model_dir = tmp_path / "picodet"
    paddle.jit.save(paddle.jit.to_static(net, input_spec=spec, full_graph=True), str(model_dir / "inference"))
    return model_dir


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_picodet_style_detector_is_cut_before_its_nms(tmp_path):
    import paddle.inference as pi

    from shitu.hpi import convert, load_fast_model

    model_dir = _picodet_like(tmp_path)
    entry, made = convert(model_dir, "detection", tmp_path / "cache")
    meta = json.loads((entry / "hpi.json").read_text())
    assert made and meta["variant"] == "nms-cut" and meta["nms"]["keep_top_k"] == 20
    config = pi.Config(str(model_dir / "inference.json"), str(model_dir / "inference.pdiparams"))
    config.disable_mkldnn()
    config.disable_glog_info()
    paddle_model = pi.create_predictor(config)
    rng = np.random.default_rng(0)
    for backend in BACKENDS:
        runner = FastRunner(load_fast_model(entry, backend, 1, "cpu"), ["image", "scale_factor"], meta)
        for n in (1, 3):
            image = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
            scale = rng.uniform(0.2, 1.5, (n, 2)).astype(np.float32)
            for name, value in zip(paddle_model.get_input_names(), (image, scale)):
                paddle_model.get_input_handle(name).copy_from_cpu(value)
            paddle_model.run()
            expected = [paddle_model.get_output_handle(o).copy_to_cpu() for o in paddle_model.get_output_names()]
            got = runner([image, scale])
            assert expected[0].shape[0] > 0
            np.testing.assert_array_equal(got[1], expected[1])
            np.testing.assert_array_equal(got[0][:, 0], expected[0][:, 0])
            np.testing.assert_allclose(got[0][:, 1:], expected[0][:, 1:], atol=1e-3)
