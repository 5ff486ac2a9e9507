"""Drawing: boxes, captions, and Chinese labels with a CJK font found offline."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.render import (
    CJK_FONT_CANDIDATES,
    PALETTE,
    UNRECOGNISED_COLOR,
    _font,
    box_thickness,
    caption,
    color_for,
    contrast_ratio,
    corner_badge,
    draw_objects,
    find_cjk_font,
    label_font_size,
    layout_label,
    text_color_for,
)
from shitu.results import RecognizedObject


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
def test_captions_are_legible_when_shrunk_to_a_phone(size):
    """Shrunk to fit 400 px (a phone, the UI's result box), caption text stays about 12 px+."""
    width, height = size
    shown = 400 / max(width, height)
    assert label_font_size(width, height) * min(shown, 1) >= 12  # small images are shown unscaled
    layout = layout_label(
        "可乐 cola 0.91", (width // 4, height // 2, width // 2, height - 1), PALETTE[0], width, height
    )
    assert (layout.rect[3] - layout.rect[1]) * min(shown, 1) >= 15


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


def test_whole_image_caption_stays_inside_and_clear_of_the_corner_badge():
    width, height = 640, 480
    image = np.full((height, width, 3), 255, np.uint8)
    whole = obj((0, 0, width, height), "可乐 cola")
    drawn = np.asarray(draw_objects(image, [whole]))
    t = box_thickness(width, height)
    _, _, badge_w, badge_h = corner_badge(width, height)
    assert (drawn[t + 1 : badge_h, t + 1 : badge_w] == 255).all(), "nothing but the outline under the badge"
    layout = layout_label(caption(whole), (0, 0, width - 1, height - 1), color_for("可乐 cola"), width, height)
    x1, y1, x2, y2 = layout.rect
    assert 0 < x1 < x2 <= width and badge_h <= y1 < y2 <= height
    assert y1 < height / 4, "still near the box's corner"
    assert (drawn[y1:y2, x1:x2] != 255).any()


@pytest.mark.parametrize(
    "bbox", [(0, 0, 640, 480), (600, 0, 640, 30), (0, 450, 40, 480), (620, 460, 640, 480), (-50, -50, 700, 500)]
)
def test_captions_are_kept_inside_the_image(bbox):
    x1, y1, x2, y2 = layout_label(
        "a rather long product name 0.99", tuple(int(max(0, min(v, 639))) for v in bbox), PALETTE[2], 640, 480
    ).rect
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480


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
