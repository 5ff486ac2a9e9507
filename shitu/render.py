"""Drawing boxes and labels, with a font that can show Chinese labels offline."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shitu import i18n

if TYPE_CHECKING:  # results draws through here: only the type goes the other way
    from shitu.results import RecognizedObject

log = logging.getLogger(__name__)

# Fonts with CJK glyphs, in order of preference, where common systems install them.
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # Debian fonts-wqy-microhei
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # Debian fonts-noto-cjk
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",  # Arch, Fedora
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",  # macOS
    "/System/Library/Fonts/STHeiti Medium.ttc",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/msyh.ttc",  # Windows
    "C:/Windows/Fonts/simhei.ttf",
)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # fmt: skip
UNRECOGNISED_COLOR = (150, 150, 150)
DIMMED_TOWARD = (200, 200, 200)  # with a highlight, the other boxes are blended toward this grey
DIM_MIX = 0.6  # how far toward it (0 keeps the colour, 1 is the grey)
BLACK, WHITE = (0, 0, 0), (255, 255, 255)

# Results are mostly looked at fitted in a phone's 360 x 360 box: captions are sized so their
# font is about DISPLAY_TEXT_PX high there (images smaller than that are shown at their size).
DISPLAY_SIDE = 360
DISPLAY_TEXT_PX = 16
MIN_FONT_SIZE = 12
MAX_FONT_SIZE = 1000  # FreeType fails on glyphs tens of thousands of pixels high
MAX_THICKNESS = 200
MAX_LABEL_EM = 40  # longer captions are cut with "..." (unreadable anyway, and slow to render)


def _fc_match() -> str | None:
    if not shutil.which("fc-match"):
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = out.stdout.strip()
    # fc-match always answers something; only accept fonts that are known to be CJK-capable
    return path if path and any(k in path.lower() for k in ("cjk", "wqy", "hei", "song", "ming", "han")) else None


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """Path of a CJK-capable font: ``$SHITU_FONT``, PaddleX's cached font, a system font."""
    env = os.environ.get("SHITU_FONT")
    if env and Path(env).is_file():
        return env
    pdx_cache = Path(os.environ.get("PADDLE_PDX_CACHE_HOME", Path.home() / ".paddlex"))
    for candidate in (*CJK_FONT_CANDIDATES, *(str(p) for p in pdx_cache.glob("fonts/*.tt[fc]"))):
        if Path(candidate).is_file():
            return candidate
    found = _fc_match()
    if found is None:
        log.warning(
            "no CJK font found: Chinese labels will show as boxes in drawn images. "
            "Install one (Debian: apt-get install fonts-wqy-microhei) or set SHITU_FONT."
        )
    return found


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    path = find_cjk_font()
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            log.warning("could not open font %s", path)
    return ImageFont.load_default(size)


def color_for(label: str | None) -> tuple[int, int, int]:
    """A stable color per label, so the same product has the same color everywhere."""
    if not label:
        return UNRECOGNISED_COLOR
    return PALETTE[sum(label.encode("utf-8")) % len(PALETTE)]


def _below(score: float, threshold: float | None) -> str:
    """``0.84 < 0.85``: the score and the threshold it missed, with as many decimals (2 to 4) as
    it takes to tell them apart; just the score when there is no threshold it is under."""
    if threshold is None or not score < threshold:
        return f"{score:.2f}"
    for digits in (2, 3, 4):
        shown, limit = f"{score:.{digits}f}", f"{threshold:.{digits}f}"
        if shown != limit:
            break
    return f"{shown} < {limit}"


def caption(obj: RecognizedObject, *, lang: str = "en", threshold: float | None = None) -> str:
    """The text drawn for a box: ``label score`` when recognised; for an unknown box its near
    miss (``unknown · maybe 农夫山泉 0.84 < 0.85``, ``threshold`` being the recognition threshold
    it missed), or just ``unknown``. Never the detector's class name (``det_label`` is internal).
    """
    if obj.recognized:
        return f"{obj.label} {obj.score:.2f}"
    unknown = i18n.text(lang, "caption.unknown")  # the few words drawn on images; labels are the user's own
    if obj.candidate is None:
        return unknown
    label, score, _id = obj.candidate
    return f"{unknown} · {i18n.text(lang, 'caption.maybe', label=label, score=_below(float(score), threshold))}"


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG relative luminance of an sRGB colour (0 black .. 1 white)."""

    def linear(c: int) -> float:
        v = c / 255
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = rgb
    return 0.2126 * linear(r) + 0.7152 * linear(g) + 0.0722 * linear(b)


def contrast_ratio(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """WCAG contrast ratio between two colours (1 .. 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color_for(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``fill`` (at least 4.5:1 for any colour)."""
    return BLACK if contrast_ratio(fill, BLACK) >= contrast_ratio(fill, WHITE) else WHITE


def label_font_size(width: int, height: int) -> int:
    """Caption size in image pixels: about ``DISPLAY_TEXT_PX`` once the image is fitted in a
    ``DISPLAY_SIDE`` square (a phone; smaller images are shown at their own size), at most a
    quarter of the short side (strips), clamped to what fonts can render."""
    size = max(width, height, DISPLAY_SIDE) * DISPLAY_TEXT_PX / DISPLAY_SIDE
    size = min(size, min(width, height) / 4)
    return int(min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, round(size))))


def box_thickness(width: int, height: int) -> int:
    """Outline width: visible once shrunk to fit the display, thin next to a strip's short side."""
    t = min(max(width, height) / 300, min(width, height) / 40)
    return int(min(MAX_THICKNESS, max(2, round(t))))


def dimmed(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """``rgb`` blended toward light grey: a box that is not the highlighted one."""
    r, g, b = (round(c + (grey - c) * DIM_MIX) for c, grey in zip(rgb, DIMMED_TOWARD))
    return r, g, b


@dataclass(frozen=True)
class LabelLayout:
    """Where and how one caption is drawn: a ``rect`` (x1, y1, x2, y2; x2 and y2 exclusive)
    filled with ``fill`` and edged ``border_width`` pixels wide in ``text_color`` (so a light
    caption stands out on a white box), with ``text`` in ``text_color`` at ``font_size``, its
    top-left text corner at ``origin``."""

    text: str
    font_size: int
    rect: tuple[int, int, int, int]
    origin: tuple[int, int]
    fill: tuple[int, int, int]
    text_color: tuple[int, int, int]
    border_width: int = 1


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    """Width and line height (the same height for every caption in one font)."""
    left, _top, right, bottom = font.getbbox(text)
    width = max(int(round(font.getlength(text))), int(right)) - min(0, int(left))
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return width, ascent + descent
    return width, int(bottom)


def _fit_text(text: str, size: int, max_width: int) -> tuple[str, int]:
    """Shrink the font (to 60 %, not below the minimum), then shorten the text with "...",
    until it fits ``max_width``."""
    width, _ = _text_size(_font(size), text)
    if width > max_width:
        smaller = max(MIN_FONT_SIZE, round(size * 0.6), int(size * max_width / max(width, 1)))
        size = min(size, smaller)
        width, _ = _text_size(_font(size), text)
    if width <= max_width:
        return text, size
    font = _font(size)
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_size(font, text[:mid].rstrip() + "...")[0] <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return (text[:lo].rstrip() + "..." if lo else text[:1]), size


def _clamp(v: float, lo: float, hi: float) -> float:
    return max(lo, min(v, hi))


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _clamped_box(bbox: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A box in drawable pixels: ordered corners inside the image (NaNs at the edge)."""
    xs = sorted(_clamp(float(v) if v == v else 0.0, 0, width - 1) for v in (bbox[0], bbox[2]))
    ys = sorted(_clamp(float(v) if v == v else 0.0, 0, height - 1) for v in (bbox[1], bbox[3]))
    return round(xs[0]), round(ys[0]), round(xs[1]), round(ys[1])


def layout_label(
    text: str,
    box: tuple[int, int, int, int],
    fill: tuple[int, int, int],
    width: int,
    height: int,
    *,
    thickness: int | None = None,
    avoid: Sequence[tuple[int, int, int, int]] = (),
) -> LabelLayout:
    """Place one caption for ``box`` (see :func:`_clamped_box`) in a ``width`` x ``height`` image.

    Above the box's top-left corner when there is room, else inside the box just below/right
    of its corner (clear of an outline ``thickness`` wide), else moved sideways above or below
    the box; the first of these that covers none of the ``avoid`` rects (captions already
    placed), or the first of all if each does. Never outside the image.
    """
    thickness = box_thickness(width, height) if thickness is None else thickness
    size = label_font_size(width, height)
    pad = max(1, round(size * 0.2))
    max_text = max(1, min(width - 2 * pad, MAX_LABEL_EM * size))
    text, size = _fit_text(text, size, max_text)
    pad = max(1, round(size * 0.2))
    text_w, text_h = _text_size(_font(size), text)
    lw, lh = text_w + 2 * pad, text_h + 2 * pad
    x1, y1, _x2, y2 = box

    def at(x: float, y: float) -> tuple[int, int, int, int]:
        x, y = round(_clamp(x, 0, max(0, width - lw))), round(_clamp(y, 0, max(0, height - lh)))
        return x, y, x + lw, y + lh

    def fits(x: float, y: float) -> bool:
        return x >= 0 and y >= 0 and x + lw <= width and y + lh <= height

    above, inside, below = (x1, y1 - lh), (x1 + thickness, y1 + thickness), (x1, y2 + 1)
    # best first: where it fits as placed (a whole-image box's goes inside, at the image's
    # corner); then moved sideways, never up or down over the box's own contents; then moved
    # into the image wherever that takes it (a tiny image or box)
    places = [at(*p) for p in (above, inside) if fits(*p)]
    places += [at(*p) for p in (above, below) if p[1] >= 0 and p[1] + lh <= height]
    places.append(at(*inside))
    rect = next((r for r in places if not any(_overlaps(r, other) for other in avoid)), places[0])
    # one pixel once the image is fitted to the display, as the text is DISPLAY_TEXT_PX there
    border = max(1, round(size / DISPLAY_TEXT_PX))
    return LabelLayout(text, size, rect, (rect[0] + pad, rect[1] + pad), fill, text_color_for(fill), border)


def draw_objects(
    image: np.ndarray | Image.Image,
    objects: Sequence[RecognizedObject],
    *,
    lang: str = "en",
    threshold: float | None = None,
    highlight: int | None = None,
) -> Image.Image:
    """Boxes and top-1 captions on a copy of an RGB image.

    Unknown boxes are grey, captioned with their near miss against ``threshold`` (the
    recognition threshold) in ``lang`` (see :func:`caption`). ``highlight`` is an index into
    ``objects`` as given: that box is drawn thicker and on top, the others thinner and faded
    toward grey; an index outside ``objects`` highlights nothing.
    """
    canvas = image.copy().convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    thickness = box_thickness(width, height)
    if highlight is not None and not 0 <= highlight < len(objects):
        highlight = None
    # unrecognised boxes first so recognised ones stay on top, the highlighted one last of all;
    # all captions after all boxes, so no outline crosses a caption
    order = sorted(range(len(objects)), key=lambda i: (i == highlight, objects[i].recognized))
    lines: dict[int, tuple[tuple[int, int, int, int], tuple[int, int, int], int]] = {}  # box, colour, width
    for i in order:
        obj = objects[i]
        color, line = color_for(obj.label), thickness
        if highlight is not None:
            if i == highlight:
                line = min(MAX_THICKNESS, 2 * thickness)
            else:
                color, line = dimmed(color), max(1, thickness // 2)
        box = _clamped_box(obj.bbox, width, height)
        draw.rectangle(box, outline=color, width=min(line, max(1, min(box[2] - box[0], box[3] - box[1]))))
        lines[i] = box, color, line
    # captions are placed top of the drawing order first, so theirs get the best places, clear
    # of each other where possible, and drawn in the drawing order (the top one last)
    labels: list[LabelLayout] = []
    for i in reversed(order):
        box, color, line = lines[i]
        text = caption(objects[i], lang=lang, threshold=threshold)
        labels.append(
            layout_label(text, box, color, width, height, thickness=line, avoid=[label.rect for label in labels])
        )
    for label in reversed(labels):
        x1, y1, x2, y2 = label.rect
        try:
            draw.rectangle(
                (x1, y1, x2 - 1, y2 - 1), fill=label.fill, outline=label.text_color, width=label.border_width
            )
            draw.text(label.origin, label.text, fill=label.text_color, font=_font(label.font_size))
        except (OSError, ValueError) as exc:  # a font that cannot render it must not lose the boxes
            log.warning("could not draw the caption %r: %s", label.text, exc)
    return canvas
