"""Drawing: boxes, captions, and Chinese labels with a CJK font found offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.render import CJK_FONT_CANDIDATES, _font, caption, draw_objects, find_cjk_font
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
