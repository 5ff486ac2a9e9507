"""The Recognize tab's handlers: answers, evidence, near misses, highlights, examples, teaching."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from shitu.ui import recognize

from .conftest import LABELS, FakeRequest


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_recognize_held_out_view(engine, shop, sample_queries):
    image, table, summary, json_path, evidence, state = recognize.recognize_image(engine, str(sample_queries[3]), shop)
    assert image.size[0] > 0
    assert list(table.columns) == ["#", "answer", "score", "top-k candidates (✗: below the threshold)"]
    assert table["answer"].iloc[0] == LABELS[2]
    assert "None" not in table.to_string()
    for stage in ("detect", "embed", "search", "total"):
        assert stage in summary
    assert "cosine similarities" in summary and "threshold" in summary
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    assert data["index"] == shop and data["boxes"][0]["labels"][0] == LABELS[2]
    assert data["boxes"][0]["det_label"] is not None or data["boxes"][0]["whole_image"]  # kept in the JSON ...
    assert "detector" not in table.columns  # ... and not shown as if it were an answer
    assert state["result"].index_name == shop and len(state["owners"]) == len(evidence)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_evidence_shows_each_box_and_the_gallery_photos_it_matched(engine, shop, sample_queries):
    _, table, _, _, evidence, state = recognize.recognize_image(engine, str(sample_queries[0]), shop, None, None, 3)
    result = state["result"]
    index = engine.index(shop)
    for n, obj in enumerate(result.objects):
        captions = [caption for (_, caption), owner in zip(evidence, state["owners"]) if owner == n]
        assert captions[0] == f"box {n + 1} (query)"  # the box's own crop first
        matched = captions[1:]
        assert 1 <= len(matched) <= recognize.MAX_EVIDENCE_PER_BOX
        label, score, id_ = obj.candidates[0]
        assert matched[0] == f"{n + 1}: {label} {score:.3f} {'✓' if obj.recognized else '✗'} #{id_}"
        assert index.entry(id_).label == label  # the photo shown is the entry named
    recognised = [o for o in result.objects if o.recognized]
    assert recognised and {o.label for o in recognised} <= set(LABELS)

    # an entry removed since the query is no longer shown; the others still are
    gone = result.objects[0].candidates[0][2]
    engine.remove(shop, [gone])
    items, owners = recognize.evidence(engine, result)
    captions = [caption for _, caption in items]
    assert not any(c.endswith(f" #{gone}") for c in captions)
    assert len(captions) == len(evidence) - 1 and len(owners) == len(captions)


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_unknown_boxes_show_their_near_miss(engine, shop, sample_queries):
    # a threshold nothing can reach: every box is unknown, with its best candidate and the threshold
    image, table, summary, _, evidence, state = recognize.recognize_image(
        engine, str(sample_queries[1]), shop, None, 1.0, 5, "auto", False, 0.5
    )
    assert len(table) >= 1 and "None" not in table.to_string()
    for answer, obj in zip(table["answer"], state["result"].objects):
        label, score, _ = obj.candidate
        assert answer == f"unknown — maybe {label} {score:.3f} < 1.00"
    assert set(table["score"]) == {"—"}
    assert all(cell.count("✗") == len(cell.split("<br>")) for cell in table.iloc[:, 3])  # all below: all marked
    assert "0 recognised" in summary
    assert all("✗" in caption for caption, owner in ((c, o) for (_, c), o in zip(evidence, state["owners"]))
               if "(query)" not in caption)  # fmt: skip


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_moving_the_threshold_after_a_query_decides_it_again_without_a_new_query(engine, shop, sample_queries,
                                                                                  monkeypatch):  # fmt: skip
    _, table, _, _, _, state = recognize.recognize_image(engine, str(sample_queries[0]), shop, None, 0.0, 5)
    assert all(o.recognized for o in state["result"].objects)
    monkeypatch.setattr(engine, "recognize", lambda *a, **k: pytest.fail("the slider must not run a new query"))
    image, high, summary, evidence, moved = recognize.redraw_at_threshold(engine, state, 1.0)
    assert set(high["score"]) == {"—"} and len(high) == len(table)  # nothing reaches 1.0: every box unknown
    assert all(a.startswith("unknown — maybe ") and a.endswith("< 1.00") for a in high["answer"])
    assert "0 recognised" in summary and moved["result"].rec_threshold == 1.0 and image.size[0] > 0
    # and back: the same answers as the query gave, again without a query
    _, again, *_ = recognize.redraw_at_threshold(engine, moved, 0.0)
    assert again["answer"].tolist() == table["answer"].tolist()
    assert recognize.redraw_at_threshold(engine, None, 0.5) == (gr.skip(),) * 5  # before any query: nothing


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_recognize_in_chinese(engine, shop, sample_queries):
    _, table, summary, *_ = recognize.recognize_image(
        engine, str(sample_queries[1]), shop, None, 1.0, 5, "auto", True, 0.5, FakeRequest("zh-CN,zh;q=0.9")
    )
    assert "结果" in table.columns and all(a.startswith("未知 — 可能是 ") for a in table["结果"])
    assert "合计" in summary and "余弦相似度" in summary


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_clicks_on_a_row_the_image_or_the_evidence_highlight_the_same_box(engine, shop, sample_queries):
    plain, _, _, _, evidence, state = recognize.recognize_image(
        engine, str(sample_queries[0]), shop, None, None, 3, "never", False, 0.5
    )
    objects = state["result"].objects
    assert len(objects) >= 2
    first, second = objects[0], objects[1]
    by_row, styled_row = recognize.select_row(state, gr.SelectData(None, {"index": [1, 0], "value": 2}))
    x = (second.bbox[0] + second.bbox[2]) / 2
    y = (second.bbox[1] + second.bbox[3]) / 2
    if first.bbox[0] <= x <= first.bbox[2] and first.bbox[1] <= y <= first.bbox[3]:
        pytest.skip("the boxes overlap at the second one's centre")
    by_click, styled_click = recognize.select_on_image(state, gr.SelectData(None, {"index": [x, y], "value": None}))
    item = state["owners"].index(1)
    by_evidence, _ = recognize.select_evidence(state, gr.SelectData(None, {"index": item, "value": None}))
    import numpy as np

    assert np.array_equal(np.asarray(by_row), np.asarray(by_click))
    assert np.array_equal(np.asarray(by_row), np.asarray(by_evidence))
    assert not np.array_equal(np.asarray(by_row), np.asarray(plain))  # the drawing changed
    for styled in (styled_row, styled_click):
        marked = [r for (r, _), props in styled._compute().ctx.items() if any("#fde68a" in v for _, v in props)]
        assert set(marked) == {1}
    nowhere = recognize.select_on_image(state, gr.SelectData(None, {"index": [-5, -5], "value": None}))
    assert all(isinstance(v, type(gr.skip())) for v in nowhere) or nowhere == (gr.skip(), gr.skip())


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_examples_belong_to_the_index(engine, shop):
    examples = recognize.examples_for(engine, shop)
    labels = {caption.split(" · ")[0] for _, caption in examples}
    assert 1 <= len(examples) <= 8 and labels <= set(LABELS) and len(labels) == len(examples)
    assert recognize.examples_for(engine, "no-such-index") == []


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_recognize_errors_are_toasts(engine, shop, tmp_path):
    with pytest.raises(gr.Error, match="upload, paste or take a picture"):
        recognize.recognize_image(engine, None, shop)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(gr.Error, match="not a readable image"):
        recognize.recognize_image(engine, str(corrupt), shop)
    with pytest.raises(gr.Error, match="no index named 'nope'"):
        recognize.recognize_image(engine, str(corrupt), "nope")


def bad_photos(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files a visitor may pick as a photo, and the start of what the studio says about each."""
    import io

    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(good, format="JPEG")
    big = io.BytesIO()
    Image.new("L", (13000, 13000)).save(big, format="PNG")  # 169 Mpx: a small file, 4 GB once decoded
    files = {
        "notes.jpg": (b"a text file named .jpg", "notes.jpg is not an image"),
        "cut.jpg": (good.getvalue()[: len(good.getvalue()) // 2], "cut.jpg is damaged or cut short"),
        "empty.jpg": (b"", "empty.jpg is empty (0 bytes)"),
        "iphone.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "iphone.heic is a HEIC photo"),
        "huge.png": (big.getvalue(), "huge.png is 13000x13000 pixels; the limit is 40,000,000 pixels"),
    }
    out = {}
    for name, (data, said) in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name, said
    return out


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_every_bad_photo_is_the_products_own_one_line_message(engine, shop, tmp_path):
    """The query component hands the upload over undecoded (Gradio's decoding used to fail with its
    own error and a server path, and to decode a 13000 x 13000 PNG whatever the limit); the engine
    says what is wrong, in the visitor's language, and no server path."""
    from gradio.data_classes import ImageData

    from shitu.ui import events

    query = recognize.query_image()
    for name, (path, said) in bad_photos(tmp_path / "uploads").items():
        payload = ImageData(path=str(path), orig_name=name)
        assert query.preprocess(payload) == str(path), "not decoded by Gradio"
        with pytest.raises(gr.Error) as raised:
            recognize.recognize_image(engine, query.preprocess(payload), shop)
        message = str(raised.value.message)
        assert message.startswith(said) and "\n" not in message and str(tmp_path) not in message, message
        zh = events.error_text("zh", message)
        assert name in zh and zh.replace(name, "").isascii() is False and "未完成" not in zh, zh
    gone = tmp_path / "gone.jpg"
    with pytest.raises(gr.Error, match="no longer on the server: upload it again"):
        recognize.recognize_image(engine, str(gone), shop)
    pasted = ImageData(url="data:image/png;base64,bm90IGFuIGltYWdl")
    assert query.preprocess(pasted) == b"not an image"
    assert not list(Path(recognize.__file__).parent.glob("*.pyi")), "Gradio wrote no stub into the package"


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_threshold_slider_follows_the_index(engine, sample_gallery):
    from shitu.gallery import read_label_file
    from shitu.ui.recognize import threshold_for_index

    root, labels = sample_gallery
    engine.build("plain", read_label_file(labels, root), index_type="Flat")
    calibrated = engine.index("plain").calibration.threshold
    assert threshold_for_index(engine, "plain")["value"] == calibrated  # the index's own, measured on its gallery
    engine.set_threshold("plain", 0.25)  # a point the user picked on the curve
    assert threshold_for_index(engine, "plain")["value"] == 0.25
    from shitu.gallery import GalleryBatch

    two = [i for i in read_label_file(labels, root).items if i.label in {"猫 cat", "咖啡 coffee"}]
    engine.build("two", GalleryBatch(items=two))
    assert engine.index("two").calibration is None  # two labels cannot be calibrated: the model's default
    assert threshold_for_index(engine, "two")["value"] == engine.default_rec_threshold
    assert "value" not in threshold_for_index(engine, "no-such-index")


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_teach_needs_a_result_and_a_label(engine, shop):
    with pytest.raises(gr.Error, match="recognize an image first"):
        recognize.teach_box(engine, None, "1", "x")
    box, label = recognize.teach_choices(None)
    assert box["choices"] == [] and label["value"] == ""


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_teach_uses_the_querys_feature_and_says_when_a_box_is_already_there(engine, shop, sample_queries, monkeypatch):
    *_, state = recognize.recognize_image(engine, str(sample_queries[0]), shop, None, None, 3, "never", False, 0.5)
    assert all(o.feature is not None for o in state["result"].objects), "the state keeps each box's feature"
    monkeypatch.setattr(engine, "embed_gallery", lambda *a, **k: pytest.fail("the crop was embedded again"))
    status, _ = recognize.teach_box(engine, state, "1", "taught product", FakeRequest("en"))
    new_id = len(engine.index(shop)) - 1
    assert f"Added box 1 to **{shop}** as #{new_id} under **taught product**" in status
    with pytest.raises(gr.Error, match=f"this box is already entry #{new_id} \\(taught product\\) of {shop}"):
        recognize.teach_box(engine, state, "1", "taught product")
    from shitu.ui import events

    said = f"this box is already entry #{new_id} (taught product) of {shop}: nothing was added"
    assert events.error_text("zh", said) == (
        f"这个框已经是 {shop} 的条目 #{new_id}（taught product）：未重复添加"
    )
