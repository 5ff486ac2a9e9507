"""The Models tab's handlers: which models run and why, background downloads, switching."""

from __future__ import annotations

import gradio as gr
import pytest

from shitu.ui import models

from .conftest import FakeRequest


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_models_tab_shows_the_starter_pack(engine, shop):
    text = models.models_markdown(engine)
    assert engine.models()["recognition"]["source"] == "starter"  # the tests run offline
    assert "`PP-ShiTuV2_rec`, offline starter pack: ImageNet MobileNetV2 features" in text
    banner = models.models_banner(engine)
    assert "Offline starter pack running" in banner and "lower accuracy" in banner
    assert "离线入门模型包" in models.models_banner(engine, FakeRequest("zh-CN"))
    for package in ("paddlex", "paddlepaddle", "faiss", "gradio"):
        assert package in text
    assert "| shop | 24 | 6 | Flat | IP |" in text and "usable" in text
    assert "模型" in models.models_markdown(engine, FakeRequest("zh-CN"))


def test_switching_to_an_unavailable_model_is_a_toast(engine):
    before = engine.models()["recognition"]["model_name"]
    with pytest.raises(gr.Error, match="not available here"):
        models.switch_model(engine, "PP-ShiTuV2_rec_CLIP_vit_base")
    with pytest.raises(gr.Error, match="unknown recognition model"):
        models.switch_model(engine, "resnet")
    assert engine.models()["recognition"]["model_name"] == before


def test_models_tab_shows_background_download_progress_and_stale_indices():
    downloading = {"state": "downloading", "running": True,
                   "models": {"PP-ShiTuV2_rec": {"stage": "recognition", "state": "downloading",
                                                 "done": 3_000_000, "total": 16_000_000}}}  # fmt: skip
    text = "\n".join(models.download_lines(downloading, "en"))
    assert "3 / 16 MB" in text and "starter pack answers meanwhile" in text
    switched = {"state": "switched", "models": {}, "indices": {"mine": False, "sample": True}}
    text = "\n".join(models.download_lines(switched, "zh"))
    assert "官方权重" in text and "`mine`" in text and "`sample`" not in text
    assert models.download_lines({"state": "nothing to do"}, "en") == []


@pytest.mark.slow  # starts a model worker with the converted models (cached after the first run): --full runs it
def test_high_performance_inference_is_switched_on_and_off_from_the_tab(engine, shop, sample_queries):
    pytest.importorskip("openvino")
    pytest.importorskip("paddle2onnx")
    before = engine.recognize(str(sample_queries[3]), shop)
    try:
        info, banner, on = models.set_high_performance(engine, True)
        ran = engine.models()
        assert on is True and ran["recognition"]["engine"]["engine"] == "openvino", ran["recognition"]["engine"]
        assert "runs on: OpenVINO" in info and "runs on OpenVINO" in banner
        after = engine.recognize(str(sample_queries[3]), shop)
        assert [o.label for o in after.objects] == [o.label for o in before.objects]  # the same answers
        info, banner, on = models.set_high_performance(engine, False)
        assert on is False and "runs on" not in banner
        assert engine.models()["recognition"]["engine"]["engine"] == "paddle"
        assert "runs on: Paddle Inference" in info
    finally:
        engine.close()  # the runtimes it made (the session's shared one stays up)
