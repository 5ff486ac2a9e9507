"""The Evaluate tab's handlers: the gallery report, the threshold curve, choosing a threshold."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from shitu.ui import evaluate

from .conftest import FakeRequest


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_evaluate_handler_reports_the_gallery_and_its_curve(engine, shop):
    (summary, calibration, curve, slider, point, gallery_map, labels, pairs, flagged, examples,
     files) = evaluate.evaluate_index(engine, shop, FakeRequest("en"))  # fmt: skip
    assert "24 entries, 6 labels" in summary and "recall@1" in summary
    assert "unknown objects rejected" in calibration and "<svg" in curve and "<svg" in gallery_map
    assert gallery_map.count("<circle") >= 24
    assert slider["interactive"] and slider["value"] == engine.index(shop).calibration.threshold
    assert list(labels.columns)[:2] == ["label", "photos"] and len(labels) == 6
    names = [Path(f).name for f in files]
    assert names == ["shop_report.html", "shop_labels.csv", "shop_entries.csv", "shop_pairs.csv"]
    assert "<html" in Path(files[0]).read_text(encoding="utf-8").lower()
    zh = evaluate.evaluate_index(engine, shop, FakeRequest("zh-CN"))
    assert "个条目" in zh[0] and "标签" in zh[6].columns[0]
    curve2, point2 = evaluate.operating_point(engine, shop, 0.3, FakeRequest("en"))
    assert "At **0.300**" in point2 and curve2 != curve
    with pytest.raises(gr.Error, match="choose an index first"):
        evaluate.evaluate_index(engine, None)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_use_threshold_follows_on_the_recognize_tab_only_for_the_same_index(engine, shop):
    status, calibration, slider, curve = evaluate.use_threshold(engine, shop, 0.55, shop)
    assert "0.550" in status and "picked by you" in calibration and slider["value"] == 0.55
    _, _, elsewhere, _ = evaluate.use_threshold(engine, shop, 0.6, "another")
    assert not isinstance(elsewhere, dict) or "value" not in elsewhere  # gr.skip(): that slider is left alone
    assert engine.index(shop).calibration.threshold == 0.6
