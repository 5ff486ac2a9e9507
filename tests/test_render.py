"""Drawing: boxes, captions, and Chinese labels with a CJK font found offline."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.render import (
    CJK_FONT_CANDIDATES,
    DISPLAY_SIDE,
    PALETTE,
    UNRECOGNISED_COLOR,
    _font,
    _overlaps,
    box_thickness,
    caption,
    color_for,
    contrast_ratio,
    dimmed,
    draw_objects,
    find_cjk_font,
    label_font_size,
    layout_label,
    text_color_for,
)
from shitu.results import Recognition, RecognizedObject


def glyph(text: str, font) -> np.ndarray:
    im = Image.new("L", (80, 80), 0)
    from PIL import ImageDraw

    ImageDraw.Draw(im).text((5, 5), text, fill=255, font=font)
    return np.asarray(im)


@pytest.mark.skipif(not any(Path(p).exists() for p in CJK_FONT_CANDIDATES), reason="no CJK font installed")
def test_chinese_labels_are_real_glyphs():
    assert find_cjk_font() is not None
    font = _font(40)
    cat, dog, missing = glyph("猫", font), glyph("狗", font), glyph("\ue000", font)
    assert cat.any() and not np.array_equal(cat, dog), "two different characters draw differently"
    assert not np.array_equal(cat, missing), "not the missing-glyph box"


def test_draw_objects_colours_boxes_and_marks_unknown():
    image = np.full((200, 300, 3), 255, np.uint8)
    known = RecognizedObject(bbox=(10, 40, 120, 190), det_score=0.9, labels=["可乐 cola"], scores=[0.91], ids=[0])
    unknown = RecognizedObject(bbox=(150, 40, 290, 190), det_score=0.6)
    drawn = np.asarray(draw_objects(image, [known, unknown]))
    assert drawn.shape == image.shape
    assert (drawn[100, 10] != 255).any() and (drawn[100, 150] != 255).any(), "both boxes drawn"
    assert caption(known) == "可乐 cola 0.91" and caption(unknown) == "unknown"
    assert (image == 255).all(), "the input is not modified"


def obj(bbox, label: str | None = None, score: float = 0.9) -> RecognizedObject:
    if label is None:
        return RecognizedObject(bbox=bbox, det_score=0.8)
    return RecognizedObject(bbox=bbox, det_score=0.8, labels=[label], scores=[score], ids=[0])


def label_with_color(color) -> str:
    return next(f"item {i}" for i in range(1000) if color_for(f"item {i}") == color)


@pytest.mark.parametrize("size", [(4032, 3024), (3024, 4032), (1920, 1080), (640, 480), (300, 200), (160, 120)])
def test_captions_are_legible_when_fitted_to_a_phone(size):
    """Fitted in a phone's 360 x 360 box, the caption font is about 16 px (15 px at least)."""
    width, height = size
    assert DISPLAY_SIDE == 360
    shown = min(360 / max(width, height), 1)  # small images are shown unscaled
    layout = layout_label(
        "可乐 cola 0.91", (width // 4, height // 2, width // 2, height - 1), PALETTE[0], width, height
    )
    assert layout.font_size * shown >= 15 and layout.font_size == label_font_size(width, height)
    assert (layout.rect[3] - layout.rect[1]) * shown >= 18, "the caption's band, padding included"
    if max(width, height) >= 360:
        assert layout.font_size * shown <= 17, "not needlessly large either"


@pytest.mark.parametrize("fill", [*PALETTE, UNRECOGNISED_COLOR])
def test_caption_text_contrasts_with_every_box_colour(fill):
    assert contrast_ratio(fill, text_color_for(fill)) >= 4.5


def test_light_box_gets_dark_caption_text():
    lime = (210, 245, 60)
    image = np.full((600, 800, 3), 255, np.uint8)
    drawn = np.asarray(draw_objects(image, [obj((200, 300, 600, 550), label_with_color(lime))])).astype(int)
    above = drawn[:290]  # the caption sits above the box
    is_fill = np.abs(above - lime).sum(axis=2) < 30
    ys, xs = np.nonzero(is_fill)
    assert len(ys), "a filled caption background"
    inside = above[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    text = inside[np.abs(inside - lime).sum(axis=2) > 150]  # clearly not the background
    assert len(text) and text.mean() < 80, "dark text on a light box"


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (4032, 3024), (300, 200)])
def test_whole_image_caption_is_inside_at_the_top_left_and_fully_drawn(size):
    width, height = size
    image = np.full((height, width, 3), 255, np.uint8)
    whole = obj((0, 0, width, height), label_with_color(PALETTE[2]))
    drawn = np.asarray(draw_objects(image, [whole])).astype(int)
    t = box_thickness(width, height)
    layout = layout_label(caption(whole), (0, 0, width - 1, height - 1), PALETTE[2], width, height)
    x1, y1, x2, y2 = layout.rect
    assert (x1, y1) == (t, t), "just inside the outline, at the image's top-left"
    assert x2 <= width and y2 <= height
    band = drawn[y1:y2, x1:x2]
    # every edge of the caption is drawn (its border, in the text colour), so none is cut off
    for edge in (band[0], band[-1], band[:, 0], band[:, -1]):
        assert (np.abs(edge - layout.text_color).sum(axis=-1) < 60).all()
    inner = band[layout.border_width : -layout.border_width, layout.border_width : -layout.border_width]
    is_fill = np.abs(inner - PALETTE[2]).sum(axis=-1) < 60
    assert is_fill.mean() > 0.5 and (~is_fill).any(), "a filled caption with text on it"
    assert (drawn[y2 + 2 : y2 + 20, x1 + 2 : x2 - 2] == 255).all(), "nothing else drawn below it"


@pytest.mark.parametrize(
    "bbox", [(0, 0, 640, 480), (600, 0, 640, 30), (0, 450, 40, 480), (620, 460, 640, 480), (-50, -50, 700, 500)]
)
def test_captions_are_kept_inside_the_image(bbox):
    x1, y1, x2, y2 = layout_label(
        "a rather long product name 0.99", tuple(int(max(0, min(v, 639))) for v in bbox), PALETTE[2], 640, 480
    ).rect
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480


def test_unknown_box_shows_its_near_miss_in_both_languages():
    miss = RecognizedObject(bbox=(10, 10, 90, 90), det_score=0.7, candidate=("农夫山泉", 0.8412, 3))
    assert caption(miss, threshold=0.85) == "unknown · maybe 农夫山泉 0.84 < 0.85"
    assert caption(miss, lang="zh", threshold=0.85) == "未知 · 可能是 农夫山泉 0.84 < 0.85"
    assert caption(miss, lang="zh-CN") == caption(miss, lang="zh", threshold=None) == "未知 · 可能是 农夫山泉 0.84"
    assert caption(miss) == "unknown · maybe 农夫山泉 0.84", "no threshold known: no '<'"
    close = RecognizedObject(bbox=(10, 10, 90, 90), det_score=0.7, candidate=("cola", 0.8496, 3))
    # 0.8496 would show as "0.85 < 0.85": as many decimals as it takes to tell them apart
    assert caption(close, threshold=0.85) == "unknown · maybe cola 0.8496 < 0.8500"
    nothing = RecognizedObject(bbox=(10, 10, 90, 90), det_score=0.7)
    assert caption(nothing, threshold=0.85) == "unknown" and caption(nothing, lang="zh") == "未知"


def test_near_miss_caption_is_what_is_drawn_and_the_box_is_grey():
    width, height = 400, 300
    image = np.full((height, width, 3), 255, np.uint8)
    miss = RecognizedObject(bbox=(100, 120, 300, 280), det_score=0.7, candidate=("农夫山泉", 0.84, 3))
    drawn = np.asarray(draw_objects(image, [miss], lang="zh", threshold=0.85)).astype(int)
    assert (drawn[200, 100] == UNRECOGNISED_COLOR).all(), "greyed outline"
    layout = layout_label("未知 · 可能是 农夫山泉 0.84 < 0.85", (100, 120, 300, 280), UNRECOGNISED_COLOR, width, height)
    shorter = layout_label("未知", (100, 120, 300, 280), UNRECOGNISED_COLOR, width, height)
    x1, y1, x2, y2 = layout.rect
    assert x2 - x1 > 2 * (shorter.rect[2] - shorter.rect[0]), "the near miss makes a longer caption"
    band = drawn[y1:y2, x1:x2]
    assert (np.abs(band - UNRECOGNISED_COLOR).sum(axis=-1) < 30).mean() > 0.5, "drawn where laid out"
    assert (drawn[y1 + 2 : y2 - 2, x2 - 8 : x2 - 2] != 255).any(), "drawn to its full width"


def test_the_detectors_class_name_is_never_drawn():
    image = np.full((200, 300, 3), 255, np.uint8)
    known = obj((10, 40, 120, 190), "cola")
    unknown = RecognizedObject(bbox=(150, 40, 290, 190), det_score=0.6, candidate=("tea", 0.5, 1))
    named = [replace(o, det_label="bottle") for o in (known, unknown)]  # the same, with the detector's class
    for plain, with_name in zip((known, unknown), named):
        assert "bottle" not in caption(with_name, threshold=0.6)
        assert caption(with_name, threshold=0.6) == caption(plain, threshold=0.6)
    assert np.array_equal(
        np.asarray(draw_objects(image, named, threshold=0.6)),
        np.asarray(draw_objects(image, [known, unknown], threshold=0.6)),
    )


def test_highlight_thickens_one_box_and_fades_the_others():
    width, height = 600, 400
    image = np.full((height, width, 3), 255, np.uint8)
    a_color, b_color = PALETTE[0], PALETTE[2]
    a = obj((50, 100, 250, 350), label_with_color(a_color))
    b = obj((350, 100, 550, 350), label_with_color(b_color))
    t = box_thickness(width, height)
    plain = np.asarray(draw_objects(image, [a, b])).astype(int)
    lit = np.asarray(draw_objects(image, [a, b], highlight=1)).astype(int)  # index into the list given

    def outline_width(drawn: np.ndarray, x: int, color) -> int:
        """How many pixels of ``color`` run right from the box's left edge at mid-height."""
        row = drawn[225, x : x + 40]
        return int(np.argmax(np.abs(row - color).sum(axis=-1) > 30))

    assert outline_width(plain, 350, b_color) == t and outline_width(lit, 350, b_color) == 2 * t
    assert outline_width(plain, 50, a_color) == t
    assert (lit[225, 50] == dimmed(a_color)).all() and outline_width(lit, 50, dimmed(a_color)) < t
    assert contrast_ratio(dimmed(a_color), (255, 255, 255)) < contrast_ratio(a_color, (255, 255, 255))
    assert not np.array_equal(lit[:, :300], plain[:, :300]), "the other box (and its caption) changed"
    # out of range: nothing highlighted; the order is the list's, not the drawing order
    assert np.array_equal(np.asarray(draw_objects(image, [a, b], highlight=7)), plain)
    first = np.asarray(draw_objects(image, [a, b], highlight=0)).astype(int)
    assert outline_width(first, 50, a_color) == 2 * t


def test_recognition_render_passes_its_threshold_language_and_highlight():
    image = np.full((300, 400, 3), 255, np.uint8)
    miss = RecognizedObject(bbox=(100, 120, 300, 280), det_score=0.7, candidate=("农夫山泉", 0.84, 3))
    result = Recognition(input_path=None, image=image, objects=[miss], rec_threshold=0.85)
    expected = draw_objects(image, [miss], lang="zh", threshold=0.85, highlight=0)
    assert np.array_equal(np.asarray(result.render(lang="zh", highlight=0)), np.asarray(expected))
    assert not np.array_equal(np.asarray(result.render()), np.asarray(expected))
    assert np.array_equal(np.asarray(result.render()), np.asarray(draw_objects(image, [miss], threshold=0.85)))


def test_captions_that_would_collide_are_placed_apart():
    width, height = 600, 400
    first = layout_label("可乐 cola 0.91", (100, 100, 300, 300), PALETTE[0], width, height)
    # a second box at the right edge: its caption cannot sit unmoved above or inside it
    second_box = (420, 80, 599, 300)
    alone = layout_label("unknown · maybe a long product name 0.84 < 0.85", second_box, PALETTE[1], width, height)
    placed = layout_label(
        "unknown · maybe a long product name 0.84 < 0.85", second_box, PALETTE[1], width, height, avoid=[first.rect]
    )
    assert _overlaps(alone.rect, first.rect), "the case this is about"
    assert not _overlaps(placed.rect, first.rect)
    x1, y1, x2, y2 = placed.rect
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_long_caption_on_a_narrow_image_is_shortened():
    layout = layout_label("可乐 " * 30, (0, 100, 119, 300), PALETTE[1], 120, 2400)
    assert layout.rect[2] <= 120 and layout.text.endswith("...")


@pytest.mark.parametrize("size", [(4000, 200), (200, 4000), (30000, 300), (300, 30000)])
def test_strips_draw_and_encode_as_jpeg(size):
    """1:20 and 1:100 images (what load_image accepts) draw and encode without errors."""
    width, height = size
    image = np.full((height, width, 3), 200, np.uint8)
    objects = [
        obj((0, 0, width, height), "可乐 cola zero"),
        obj((width * 0.4, height * 0.4, width * 0.6, height * 0.6)),
    ]
    drawn = draw_objects(image, objects)
    assert drawn.size == size
    buf = io.BytesIO()
    drawn.save(buf, format="JPEG", quality=90)
    assert Image.open(buf).size == size


def test_huge_images_do_not_break_the_font():
    """Past what FreeType renders, the caption size is clamped (drawing used to fail)."""
    assert label_font_size(3_000_000, 20_000) <= 1000
    drawn = draw_objects(np.zeros((4, 3_000_000, 3), np.uint8), [obj((0, 0, 3_000_000, 4), "cola")])
    assert drawn.size == (3_000_000, 4)
