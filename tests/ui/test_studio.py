"""The page as a whole (shitu.ui.studio): five tabs, named endpoints for programmatic callers,
wiring that keeps what Gradio injects, nothing read from the engine while the page is built and
everything that depends on the data filled in when a page opens."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from shitu.ui import I18N, studio


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_demo_has_five_tabs_and_named_endpoints(engine, shop):
    demo = studio.build_demo(engine)
    config = demo.get_config_file()
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert [str(t) for t in tabs] == [
        str(I18N(k)) for k in ("tab_recognize", "tab_build", "tab_manage", "tab_evaluate", "tab_models")
    ]
    api_names = {fn.api_name for fn in demo.fns.values()}
    assert {"recognize", "build_index", "remove_entries", "add_entries", "rename_index", "delete_index",
            "export_index", "import_index", "switch_model", "filter_entries", "evaluate", "versions",
            "version_changes", "restore_version"} <= api_names  # fmt: skip


def test_wired_handlers_still_get_the_request(engine):
    """Wrappers (user errors, progress, sign-in) must keep the type hints Gradio reads, or the
    request — the visitor's language and session — silently becomes None."""
    from gradio.helpers import special_args

    demo = studio.build_demo(engine)
    request = gr.Request()
    checked = 0
    for block in demo.fns.values():
        if block.fn is None or "request" not in inspect.signature(block.fn).parameters:  # (None: browser-only)
            continue
        inputs, progress_index, *_ = special_args(block.fn, [None] * len(block.inputs), request=request)
        assert request in inputs, block.name
        if block.api_name is None or block.api_visibility == "private":
            assert progress_index is None, block.name  # the page shows our own bar, not an overlay per output
        checked += 1
    assert checked >= 20


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_named_endpoints_keep_errors_errors_while_the_page_gets_toasts(engine, shop, monkeypatch):
    """Programmatic callers of /gradio_api/... learn that a change was refused; the page's own
    event for the same button shows a toast and keeps its outputs."""
    monkeypatch.setattr(gr, "Warning", lambda message, **kw: None)
    demo = studio.build_demo(engine)
    named = {b.api_name: b for b in demo.fns.values() if b.api_visibility != "private" and b.api_name}
    with pytest.raises(gr.Error, match="tick the confirmation box"):
        named["delete_index"].fn(shop, False)
    page = [b for b in demo.fns.values()
            if b.api_visibility == "private" and getattr(b.fn, "__name__", None) == "delete_index"]  # fmt: skip
    status, *rest = page[0].fn(shop, False)
    assert "tick the confirmation box" in status and shop in engine.index_names()


def test_a_failed_model_switch_puts_the_dropdown_back(engine, monkeypatch):
    monkeypatch.setattr(gr, "Warning", lambda message, **kw: None)
    demo = studio.build_demo(engine)
    switch = next(b for b in demo.fns.values()
                  if getattr(b.fn, "__name__", None) == "switch_model" and len(b.outputs) == 4)  # fmt: skip
    *_, dropdown = switch.fn("PP-ShiTuV2_rec_CLIP_vit_base")
    assert dropdown["value"] == engine.models()["recognition"]["model_name"] == "PP-ShiTuV2_rec"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_build_app_serves_ui_and_api_on_one_port(engine, shop):
    from fastapi.testclient import TestClient

    from app import build_app

    client = TestClient(build_app(engine, prepare_sample=False))
    page = client.get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()
    config = client.get("/config").json()
    assert "i18n_translations" in config and "zh" in config["i18n_translations"]
    # Gradio's status tracker announces "common.complete" to screen readers and has no words for it
    assert [config["i18n_translations"][lang]["common.complete"] for lang in ("en", "zh")] == ["Complete", "完成"]


class Untouchable:
    """An engine that fails any read: building the page must not ask it anything."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the page read engine.{name} while it was being built")


def test_building_the_page_reads_nothing_from_the_engine():
    demo = studio.build_demo(Untouchable())
    assert {"recognize", "open_index", "evaluate", "switch_model"} <= {fn.api_name for fn in demo.fns.values()}


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_every_data_dependent_value_is_filled_in_when_a_page_opens(engine, shop):
    """The page's load events read the indices, the options and the models when a visitor opens
    it (here: ``shop`` is the only index, so every picker chooses it)."""
    from shitu.ui import evaluate, manage, models, recognize

    demo = studio.build_demo(engine)
    loaded = {c.elem_id for fn in demo.fns.values() if any(t == "load" for _, t in fn.targets) for c in fn.outputs}
    assert {"rec-index", "examples", "rec-threshold", "manage-index", "manage-info", "entries-table", "eval-index",
            "models-info", "models-banner", "rec-model", "rec-models-table"} <= loaded  # fmt: skip

    picker, examples, threshold, topk, det_threshold, whole_image, use_nms, nms_iou = recognize.initial_values(engine)
    assert picker["choices"] == ["shop"] and picker["value"] == "shop"
    assert examples and {caption.split(" · ")[0] for _, caption in examples} <= set(engine.index(shop).label_counts())
    assert threshold == engine.rec_threshold_for(engine.index(shop))
    assert (topk, det_threshold, whole_image) == (engine.config.rec_topk, engine.default_det_threshold, "auto")
    assert use_nms is (engine.config.nms_iou is not None) and nms_iou == engine.config.nms_iou
    picker, info, table, label_filter, previews, selected = manage.initial_view(engine)
    assert picker["value"] == "shop" and "24 entries" in info and len(table) == 24 and len(previews) == 24
    assert evaluate.initial_index(engine)["value"] == "shop"
    markdown, banner, model, table, timer, fast = models.initial_view(engine)
    assert "| shop | 24 | 6 | Flat | IP |" in markdown and "Offline starter pack running" in banner
    assert model == "PP-ShiTuV2_rec" and "AliProducts recall@1" in table and timer.active is False
    assert fast is False and "runs on: Paddle Inference" in markdown  # use_hpip off unless asked for


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_named_endpoints_take_an_index_made_after_the_page(engine, shop):
    """Programmatic callers name any index (the engine checks the name); the page's dropdowns only
    offer what a visitor's page has loaded."""
    from fastapi.testclient import TestClient

    from app import build_app

    from ..test_security import gradio_call

    with TestClient(build_app(engine, prepare_sample=False)) as client:
        engine.import_zip("later", engine.export_zip(shop))  # an index the page was never built with
        kind, payload = gradio_call(client, "open_index", ["later"])
        assert kind == "complete" and "24 entries" in payload[0]
        kind, payload = gradio_call(client, "versions", ["no-such-index"])
        assert kind == "error" and "no-such-index" in str(payload)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_every_tab_opens_on_the_index_this_browser_picked(engine, shop):
    """The browser keeps the index picked last (gr.BrowserState, across reloads); every tab opens on
    it, and one that is gone falls back to the default index."""
    from shitu.ui import evaluate, events, manage, recognize

    engine.import_zip("drinks", engine.export_zip(shop))
    demo = studio.build_demo(engine)
    kept = [b for b in demo.blocks.values() if isinstance(b, gr.BrowserState)]
    assert len(kept) == 1 and kept[0].storage_key == events.REMEMBERED_INDEX["storage_key"]
    loads = [fn for fn in demo.fns.values() if any(t == "load" for _, t in fn.targets) and fn.inputs]
    assert {c.elem_id for fn in loads for c in fn.outputs} >= {"rec-index", "manage-index", "eval-index"}
    assert all(fn.inputs == [kept[0]] for fn in loads)
    assert recognize.initial_values(engine, "drinks")[0]["value"] == "drinks"
    assert manage.initial_view(engine, "drinks")[0]["value"] == "drinks"
    assert evaluate.initial_index(engine, "drinks")["value"] == "drinks"
    assert evaluate.initial_index(engine, "deleted-since")["value"] == evaluate.initial_index(engine)["value"]
    # another tab picked (or built) one: a tab opened again follows, and its threshold with it
    picker, threshold = recognize.follow_remembered(engine, "shop", "drinks")
    assert picker["value"] == "drinks" and threshold["value"] == engine.rec_threshold_for(engine.index("drinks"))
    picker, threshold = recognize.follow_remembered(engine, "drinks", "drinks")
    assert isinstance(threshold, type(gr.skip())), "the visitor's own threshold stays while the index does"
    # what is remembered: a visitor's pick, a build, an import, a rename, a deletion
    remembering = [fn for fn in demo.fns.values() if kept[0] in fn.outputs]
    assert len(remembering) >= 6


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_evaluate_shows_the_index_threshold_before_any_report(engine, shop):
    from shitu.ui import evaluate

    calibration, curve, slider, point = evaluate.index_view(engine, shop)
    c = engine.index(shop).calibration
    assert slider["value"] == round(c.threshold, 4) and slider["interactive"] is True
    assert "<svg" in curve and "At **" in point and str(round(c.threshold, 3))[:4] in calibration
    demo = studio.build_demo(engine)
    report_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "eval-report")
    assert report_box.visible is False, "no empty tables (headers 1 2 3) before a report is run"
