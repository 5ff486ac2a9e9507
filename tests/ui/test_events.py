"""What the tabs share (shitu.ui.events): user errors as toasts that keep every output, progress
bars from the first frame, handlers that keep what Gradio injects, the sign-in, scratch files."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from shitu.ui import build, events, manage

from .conftest import FakeRequest, ids_of


def test_a_user_error_keeps_every_output_and_says_so_inline(engine, shop, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, **kw: warnings.append(message))
    remove = events.soft_errors(events.bind(manage.remove_entries, engine), 5, status=0)
    status, *rest = remove(shop, "", None, request=FakeRequest("zh-CN"))
    assert warnings == ["请先在表格中选中行（或输入 id）"]  # the UI's own message, translated
    assert "shitu-inline-error" in status and "请先在表格中选中行" in status
    assert all(isinstance(v, type(gr.skip())) for v in rest)  # the table and previews stay as they were
    remove(shop, "3, 999", None)
    assert "not in the index: 999" in warnings[-1]
    assert ids_of(engine, shop) == list(range(24))


def test_long_jobs_stream_a_progress_bar_from_the_start(engine, uploads):
    files, labels = uploads
    streamed = events.live_progress(events.bind(build.build_index, engine), 4, 3, every=0.05)
    frames = list(streamed(files, str(labels), "streamed", "Flat", "IP", True, False))
    first, last = frames[0], frames[-1]
    assert 'role="progressbar"' in first[3] and all(isinstance(v, type(gr.skip())) for v in first[:3])
    counted = [f[3] for f in frames[1:-1] if "aria-valuenow" in f[3]]
    assert counted, "the bar counts images while they are embedded"
    assert "done in" in last[3] and "streamed" in last[0] and last[1]["value"] == "streamed"
    assert "progress" not in inspect.signature(streamed).parameters  # Gradio must not inject its own


def test_progress_bar_text():
    bar = events.LiveProgress("en")
    assert "Reading the upload" in bar.html() and "indeterminate" in bar.html()
    bar((40, 160), desc="embedding")
    text = bar.html()
    assert "Embedding images: 40 / 160" in text and 'aria-valuenow="40"' in text and "width:25.0%" in text
    bar((160, 160), desc="embedding")
    assert "Saving the index" in bar.html()
    zh = events.LiveProgress("zh")
    zh((1, 2), desc="reading images")
    assert "读取图片: 1 / 2" in zh.html()


def test_bound_handlers_keep_what_gradio_injects(engine):
    from gradio.helpers import special_args

    _, progress_index, _, _ = special_args(events.bind(build.build_index, engine), [None] * 9)
    assert progress_index == 10  # after the 9 inputs and the request
    click = gr.EventData(None, {"index": [0, 0], "value": 3, "row_value": [3, "x", "y"]})
    inputs, _, event_index, _ = special_args(
        events.bind(manage.toggle_selection, engine), ["shop", "", None], event_data=click
    )
    assert inputs[:3] == ["shop", "", None] and isinstance(inputs[3], gr.SelectData) and event_index == 3


def test_with_a_token_visitors_recognise_but_only_signed_in_sessions_change(engine, shop):
    """The UI no longer locks everyone out: recognising is open, changes need a sign-in (see
    tests/test_security.py for the same through Gradio's own endpoints)."""
    from shitu.access import AccessPolicy
    from shitu.ui.events import SessionAccess

    access = SessionAccess(AccessPolicy(token="s3cret", restricted=True))
    remove = access.guard(events.bind(manage.remove_entries, engine))
    visitor, owner = FakeRequest("en", "v"), FakeRequest("en", "o")
    with pytest.raises(gr.Error, match="access token"):
        remove(shop, "0", None, request=visitor)
    with pytest.raises(gr.Error, match="wrong access token"):
        access.sign_in("nope", request=visitor)
    assert "Signed in" in access.sign_in("s3cret", request=owner)
    remove(shop, "0", None, request=owner)
    assert 0 not in engine.index(shop).id_map
    with pytest.raises(gr.Error):
        remove(shop, "1", None, request=visitor)
    assert 1 in engine.index(shop).id_map


def test_scratch_files_are_cleared_after_an_hour_and_at_shutdown(engine, monkeypatch):
    """Files handed to the browser do not pile up: an hour-old one goes when the next is made, and
    the whole scratch folder goes when the server stops."""
    import os
    import time

    from fastapi.testclient import TestClient

    from app import build_app

    with TestClient(build_app(engine, prepare_sample=False)):
        old = events.scratch_file("old.json")
        old.write_text("{}", encoding="utf-8")
        an_hour_ago = time.time() - events.Scratch.MAX_AGE_S - 1
        os.utime(old.parent, (an_hour_ago, an_hour_ago))
        new = events.scratch_file("new.json")
        new.write_text("{}", encoding="utf-8")
        assert not old.exists() and new.exists()
        folder = events.SCRATCH.root
        assert folder is not None and new.is_relative_to(folder)
    assert not folder.exists() and events.SCRATCH.root is None
