"""What the tabs share (shitu.ui.events): user errors as toasts that keep every output, progress
bars from the first frame, handlers that keep what Gradio injects, the sign-in, scratch files."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest

from shitu.ui import build, events, manage

from .conftest import FakeRequest, ids_of


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
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


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
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


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulated_build(total: int = 987, *, reading: float = 8.0, warmup: float = 25.0, rates=((0.5, 12.0), (1.0, 24.0)),
                    chunk: int = 4, poll: float = 0.3):  # fmt: skip
    """A build as the bar sees it, on a fake clock: the upload read (``reading`` s), then the models
    warm up (the first chunk takes ``warmup`` s), then images are embedded ``chunk`` at a time at
    ``rates`` (up to a fraction of the images, images/s: the gallery workers join half-way). Yields
    (time, seconds really left, the bar's estimate, the estimate the first bar made) at every poll."""
    clock = FakeClock()
    bar = events.LiveProgress("en", clock=clock)
    clock.now = reading
    bar((0, total), desc="embedding")
    done, ticks = 0, []
    t = reading + warmup
    while done < total:
        done = min(total, done + chunk)
        ticks.append((t, done))
        rate = next(r for upto, r in rates if done < upto * total or upto == 1.0)
        t += chunk / rate
    finish = ticks[-1][0]
    now = reading
    for when, count in ticks:
        while now + poll < when:
            now += poll
            clock.now = now
            naive = (now / bar.done * (total - bar.done)) if 0 < bar.done < total else None
            yield now, finish - now, bar.seconds_left(), naive
        clock.now = now = when
        bar((count, total), desc="embedding")


@pytest.mark.parametrize("rates", [((1.0, 12.0),), ((0.5, 12.0), (1.0, 24.0))], ids=["steady", "workers-join"])
def test_the_time_left_is_said_only_once_it_means_something(rates):
    """The first estimate of a real build said "about 1097 s left" for a build that took 96 s: the
    model warm-up and the reading counted as if every image took that long. Now nothing is said
    until embedding has gone on a while; then a steady pace is estimated within 15 %, and a pace
    that changes (the gallery workers join half-way, which nothing can foresee) within a factor 2."""
    frames = list(simulated_build(rates=rates))
    shown = [(t, truth, est) for t, truth, est, _ in frames if est is not None]
    first_done = 8.0 + 25.0
    assert shown and shown[0][0] >= first_done + events.LiveProgress.ETA_MIN_SECONDS, "nothing during the warm-up"
    steady = len(rates) == 1
    for t, truth, est in shown:
        if steady:
            assert abs(est - truth) <= 0.15 * truth + 1, (t, truth, est)
        else:
            assert 0.5 * truth - 1 <= est <= 2.0 * truth + 1, (t, truth, est)
    naive = [(truth, n) for _, truth, est, n in frames if n is not None]
    assert naive[0][1] > 5 * naive[0][0], "what the old estimate said at first (the bug this replaces)"


def test_the_progress_bar_text_shows_the_estimate_in_words():
    clock = FakeClock()
    bar = events.LiveProgress("zh", clock=clock)
    bar((0, 100), desc="embedding")
    clock.now = 10.0
    bar((4, 100), desc="embedding")
    assert "预计" not in bar.html(), "not after the first images"
    for k in range(2, 12):
        clock.now = 10.0 + k
        bar((4 * k, 100), desc="embedding")
    assert "预计还需" in bar.html() and "提取特征: 44 / 100" in bar.html()


def test_bound_handlers_keep_what_gradio_injects(engine):
    from gradio.helpers import special_args

    _, progress_index, _, _ = special_args(events.bind(build.build_index, engine), [None] * 9)
    assert progress_index == 10  # after the 9 inputs and the request
    click = gr.EventData(None, {"index": [0, 0], "value": 3, "row_value": [3, "x", "y"]})
    inputs, _, event_index, _ = special_args(
        events.bind(manage.toggle_selection, engine), ["shop", "", None], event_data=click
    )
    assert inputs[:3] == ["shop", "", None] and isinstance(inputs[3], gr.SelectData) and event_index == 3


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
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
