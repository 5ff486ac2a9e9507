"""Drawing boxes and their captions so that a person can read every one of them.

* **Captions never overlap** and cover other objects as little as they can: each caption is
  placed where it costs least among many places (above, inside, below or beside its box, slid
  along an edge, stacked further out with a leader line to its box, or anywhere in the image),
  with another caption as a hard "no" and another box's object as a cost
  (:func:`layout_captions`). Where even the box's number does not fit, the caption is left out
  (the table lists every box).
* **Unknown boxes are discreet**: a thin dashed grey outline and a short ``?`` tag; their near
  miss (``unknown · maybe 农夫山泉 0.84 < 0.85``) is in the table and the evidence, and drawn in
  full when that box is highlighted (selected).
* **Sized to the display**: the caption font is about ``DISPLAY_TEXT_PX`` high once the image is
  fitted in a ``DISPLAY_SIDE`` square, whatever its pixel count, so a 6400 x 4278 photo reads
  like a 640 px one; ``max_side`` draws on a copy scaled down to what a screen shows.
* **Chinese labels need a CJK font** (:mod:`shitu.fonts`); until there is one, a label the font
  cannot draw is shown by its entry id (``#12 0.91``) — Latin only, never tofu.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shitu import fonts, i18n

if TYPE_CHECKING:  # results draws through here: only the type goes the other way
    from shitu.results import RecognizedObject

log = logging.getLogger(__name__)

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]  # fmt: skip
UNRECOGNISED_COLOR = (150, 150, 150)
DIMMED_TOWARD = (200, 200, 200)  # with a highlight, the other boxes are blended toward this grey
DIM_MIX = 0.6  # how far toward it (0 keeps the colour, 1 is the grey)
BLACK, WHITE = (0, 0, 0), (255, 255, 255)
UNKNOWN_TAG = "?"  # what an unknown box shows unless it is highlighted

# Results are mostly looked at fitted in a phone's 360 x 360 box: captions are sized so their
# font is about DISPLAY_TEXT_PX high there (images smaller than that are shown at their size).
DISPLAY_SIDE = 360
DISPLAY_TEXT_PX = 16
MIN_FONT_SIZE = 12
MAX_FONT_SIZE = 1000  # FreeType fails on glyphs tens of thousands of pixels high
MAX_THICKNESS = 200
MAX_LABEL_EM = 40  # longer captions are cut with "..." (unreadable anyway, and slow to render)

# What a caption's place costs (see layout_captions), per unit of the caption's own area
COVER_OTHER = 8.0  # over another recognised box's object
COVER_UNKNOWN = 2.0  # over an unknown box's object
COVER_OWN = 0.3  # over its own object (inside the box: fine, if nothing else is free)
DISTANCE = 0.35  # per caption height away from its box
LEADER = 0.8  # needing a leader line at all
SHORTENED = 1.5  # the box's number instead of its caption: only where the caption would cover this much more
MOVED = 0.5  # per caption height a place had to move into the image (e.g. "above" a box at the top edge)


# --- fonts -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=128)
def _load_font(path: str | None, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if path:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            log.warning("could not open font %s", path)
    return ImageFont.load_default(size)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The caption font at ``size`` pixels: the CJK font (:func:`shitu.fonts.cjk_font`), else a Latin one."""
    return _load_font(fonts.cjk_font(), size)


@functools.lru_cache(maxsize=4096)
def _has_glyph(path: str | None, char: str) -> bool:
    if char.isspace():
        return True
    font = _load_font(path, 24)
    if not isinstance(font, ImageFont.FreeTypeFont):
        return char.isascii()
    try:
        shape = font.getmask(char)
        missing = font.getmask("\U0010fffd")  # a private-use code point no font draws: its missing-glyph box
    except (OSError, ValueError):
        return False
    return bytes(shape) != bytes(missing) or shape.size != missing.size


def covers(text: str) -> bool:
    """Whether the caption font draws every character of ``text`` (not the missing-glyph box)."""
    path = fonts.cjk_font()
    return all(_has_glyph(path, ch) for ch in set(text))


def _drawable(label: str, entry_id: int | None) -> str:
    """``label``, or ``#id`` when the font cannot draw it (no CJK font yet: never tofu)."""
    if covers(label):
        return label
    if fonts.cjk_font() is None:
        fonts.fetch_in_background()  # a first drawing asks for the font; later ones get it
        fonts.warn_if_missing()
    return f"#{entry_id}" if entry_id is not None else UNKNOWN_TAG


# --- captions ---------------------------------------------------------------------------------------
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
    """The full text for a box: ``label score`` when recognised; for an unknown box its near
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


def drawn_caption(
    obj: RecognizedObject, *, lang: str = "en", threshold: float | None = None, full: bool = False
) -> str:
    """What is drawn on the image for a box: ``label score`` for a recognised one; ``?`` for an
    unknown one unless ``full`` (highlighted), then its near miss. A label the font cannot draw
    becomes its entry id, and the words around it English."""
    if obj.recognized:
        return f"{_drawable(str(obj.label), obj.ids[0] if obj.ids else None)} {obj.score:.2f}"
    if not full:
        return UNKNOWN_TAG
    if not covers(i18n.text(lang, "caption.unknown") + i18n.text(lang, "caption.maybe", label="", score="")):
        lang = "en"  # the words around a label in a language the font cannot draw: English
    unknown = i18n.text(lang, "caption.unknown")
    if obj.candidate is None:
        return unknown
    label, score, id_ = obj.candidate
    maybe = i18n.text(lang, "caption.maybe", label=_drawable(label, id_), score=_below(float(score), threshold))
    return f"{unknown} · {maybe}"


# --- colours -----------------------------------------------------------------------------------------
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


def dimmed(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """``rgb`` blended toward light grey: a box that is not the highlighted one."""
    r, g, b = (round(c + (grey - c) * DIM_MIX) for c, grey in zip(rgb, DIMMED_TOWARD))
    return r, g, b


# --- sizes -------------------------------------------------------------------------------------------
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


# --- laying captions out -----------------------------------------------------------------------------
Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 (x2 and y2 exclusive)


@dataclass(frozen=True)
class LabelLayout:
    """Where and how one caption is drawn: a ``rect`` (x1, y1, x2, y2; x2 and y2 exclusive)
    filled with ``fill`` and edged ``border_width`` pixels wide in ``text_color`` (so a light
    caption stands out on a white box), with ``text`` in ``text_color`` at ``font_size``, its
    top-left text corner at ``origin``; ``leader`` is a line (x1, y1, x2, y2) from the caption to
    its box when the caption had to move away from it."""

    text: str
    font_size: int
    rect: Rect
    origin: tuple[int, int]
    fill: tuple[int, int, int]
    text_color: tuple[int, int, int]
    border_width: int = 1
    leader: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class CaptionRequest:
    """One caption to place: its text, its box (in drawable pixels), the caption's colour, the
    box's outline width, and whether the box is an unknown one (cheaper to cover)."""

    text: str
    box: Rect
    fill: tuple[int, int, int]
    thickness: int
    unknown: bool = False
    fallback: str | None = None  # a shorter text (the box's number) for where the full one fits nowhere


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


def _overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _clamped_box(bbox: Sequence[float], width: int, height: int) -> Rect:
    """A box in drawable pixels: ordered corners inside the image (NaNs at the edge)."""
    xs = sorted(_clamp(float(v) if v == v else 0.0, 0, width - 1) for v in (bbox[0], bbox[2]))
    ys = sorted(_clamp(float(v) if v == v else 0.0, 0, height - 1) for v in (bbox[1], bbox[3]))
    return round(xs[0]), round(ys[0]), round(xs[1]), round(ys[1])


class _Measure:
    """A caption's text fitted to the image, and its size with padding."""

    def __init__(self, text: str, width: int, height: int, size: int | None = None):
        size = size or label_font_size(width, height)
        pad = max(1, round(size * 0.2))
        max_text = max(1, min(width - 2 * pad, MAX_LABEL_EM * size))
        self.text, self.size = _fit_text(text, size, max_text)
        self.pad = max(1, round(self.size * 0.2))
        text_w, text_h = _text_size(_font(self.size), self.text)
        self.w, self.h = text_w + 2 * self.pad, text_h + 2 * self.pad


# The places beside a box, in order of preference, with what each costs before anything is covered:
# above it at its left edge, inside its top-left corner, above at its right edge, below, beside...
ANCHOR_PREFERENCE = (0.0, 0.2, 0.1, 0.45, 0.5, 0.35, 0.4, 0.5, 0.55, 0.6)
SLID = 0.3  # a place slid along an edge, plus SHIFT per caption height slid
SHIFT = 0.1
STACKED = 0.5  # a place stacked further out, plus this much per row out
ANYWHERE = 1.0  # a place on the grid over the whole image


def _candidates(box: Rect, lw: int, lh: int, t: int, width: int, height: int) -> np.ndarray:
    """Places for a ``lw`` x ``lh`` caption of ``box`` (outline ``t`` wide): rows of (x1, y1,
    pixels moved to bring it into the image, its preference cost). Beside the box, then slid along
    its edges, then stacked further out, then a grid over the whole image (at most a few thousand
    places in all, whatever the image's size)."""
    x1, y1, x2, y2 = box
    above, below = y1 - lh, y2 + 1
    anchors = [
        (x1, above), (x1 + t, y1 + t), (x2 - lw + 1, above), (x1, below), (x2 - lw + 1, below),
        (x2 + 1, y1), (x1 - lw, y1), (x1 + t, y2 - t - lh + 1), (x2 + 1, y2 - lh + 1), (x1 - lw, y2 - lh + 1),
    ]  # fmt: skip
    places = [(x, y, cost) for (x, y), cost in zip(anchors, ANCHOR_PREFERENCE)]
    along = max(lw, x2 - x1)
    step = max(4, lh // 2, along // 24)
    for dx in range(step, along + step, step):  # slid along the top and bottom edges
        for x in (x1 - dx, x1 + dx):
            places += [(x, above, SLID + SHIFT * dx / lh), (x, below, SLID + 0.2 + SHIFT * dx / lh)]
    down = max(lh, y2 - y1)
    step = max(4, lh // 2, down // 24)
    for dy in range(step, down + step, step):  # down the sides
        places += [(x2 + 1, y1 + dy, SLID + SHIFT * dy / lh), (x1 - lw, y1 + dy, SLID + SHIFT * dy / lh)]
    for k in range(1, 6):  # stacked further out, with a leader line
        for x in (x1, x2 - lw + 1, x1 - lw // 2):
            places += [(x, above - k * lh, STACKED + 0.2 * k), (x, below + k * lh, STACKED + 0.2 * k + 0.1)]
    gx, gy = max(4, lw // 3, width // 48), max(4, lh // 2, height // 48)
    places += [(x, y, ANYWHERE) for y in range(0, max(1, height - lh + 1), gy)
               for x in range(0, max(1, width - lw + 1), gx)]  # fmt: skip
    rows = np.asarray(places, dtype=np.float64)
    xy = rows[:, :2].round()
    fitted = xy.copy()
    fitted[:, 0] = np.clip(xy[:, 0], 0, max(0, width - lw))
    fitted[:, 1] = np.clip(xy[:, 1], 0, max(0, height - lh))
    moved = np.abs(fitted - xy).sum(axis=1)
    out = np.column_stack([fitted, moved, rows[:, 2]])
    _, first = np.unique(out[:, :2], axis=0, return_index=True)
    return out[np.sort(first)]


def _intersection(rects: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Areas where each of ``rects`` (m, 4) meets each of ``others`` (n, 4): an (m, n) array."""
    if len(others) == 0:
        return np.zeros((len(rects), 0))
    w = np.minimum(rects[:, None, 2], others[None, :, 2]) - np.maximum(rects[:, None, 0], others[None, :, 0])
    h = np.minimum(rects[:, None, 3], others[None, :, 3]) - np.maximum(rects[:, None, 1], others[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _gap(rects: np.ndarray, box: Rect) -> np.ndarray:
    """How far each rect is from ``box`` (0 where they touch or overlap), in pixels."""
    dx = np.maximum(0, np.maximum(box[0] - rects[:, 2], rects[:, 0] - box[2] - 1))
    dy = np.maximum(0, np.maximum(box[1] - rects[:, 3], rects[:, 1] - box[3] - 1))
    return np.hypot(dx, dy)


def _leader(rect: Rect, box: Rect) -> tuple[int, int, int, int]:
    """A line from the caption's edge to the nearest point of its box."""
    cx = _clamp((box[0] + box[2]) / 2, rect[0], rect[2] - 1)
    cy = _clamp((box[1] + box[3]) / 2, rect[1], rect[3] - 1)
    bx, by = _clamp(cx, box[0], box[2]), _clamp(cy, box[1], box[3])
    return round(cx), round(cy), round(bx), round(by)


def _place(
    request: CaptionRequest,
    measure: _Measure,
    width: int,
    height: int,
    placed: np.ndarray,
    objects: np.ndarray,
    weights: np.ndarray,
    own: int | None,
) -> tuple[Rect, bool, float] | None:
    """The cheapest place for one caption that overlaps none of ``placed``: (rect, needs a leader, cost)."""
    lw, lh = measure.w, measure.h
    xy = _candidates(request.box, lw, lh, request.thickness, width, height)
    rects = np.column_stack([xy[:, 0], xy[:, 1], xy[:, 0] + lw, xy[:, 1] + lh]).astype(np.int64)
    free = ~(_intersection(rects, placed) > 0).any(axis=1) if len(placed) else np.ones(len(rects), bool)
    if not free.any():
        return None
    rects, moved, preference = rects[free], xy[free, 2], xy[free, 3]
    covered = _intersection(rects, objects) * weights[None, :]
    if own is not None:
        covered[:, own] = _intersection(rects, objects[own : own + 1])[:, 0] * COVER_OWN
    gap = _gap(rects, request.box)
    far = gap > max(2, lh // 4)
    cost = preference + covered.sum(axis=1) / (lw * lh) + (DISTANCE * gap + MOVED * moved) / lh + LEADER * far
    best = int(np.argmin(cost))  # the first of equals: the order of preference
    x1, y1, x2, y2 = (int(v) for v in rects[best])
    return (x1, y1, x2, y2), bool(far[best]), float(cost[best])


def layout_captions(requests: Sequence[CaptionRequest], width: int, height: int) -> list[LabelLayout | None]:
    """Place every caption, in the order given (the first gets the best place): no two overlap,
    and each covers other boxes' objects as little as it can (see the module's doc). A caption
    that fits nowhere, or only where it would cover much more than its ``fallback`` text (the box's
    number), gets the fallback; one for which even that fits nowhere is left out (``None``)."""
    boxes = np.asarray([r.box for r in requests], dtype=np.int64).reshape(-1, 4)
    objects = boxes + np.array([0, 0, 1, 1])  # a box's object: its pixels, edges included
    weights = np.asarray([COVER_UNKNOWN if r.unknown else COVER_OTHER for r in requests], dtype=float)
    placed: list[Rect] = []
    out: list[LabelLayout | None] = []
    for i, request in enumerate(requests):
        taken = np.asarray(placed, dtype=np.int64).reshape(-1, 4)
        options = []
        for text, extra in ((request.text, 0.0), (request.fallback, SHORTENED)):
            if not text or (options and options[0][1][2] <= SHORTENED):  # the full text has a good place
                continue
            measure = _Measure(text, width, height)
            spot = _place(request, measure, width, height, taken, objects, weights, i)
            if spot is not None:
                options.append((measure, spot, spot[2] + extra))
        if not options:
            out.append(None)
            continue
        measure, spot, _ = min(options, key=lambda option: option[2])
        result = measure, spot[:2]
        measure, (rect, far) = result
        placed.append(rect)
        border = max(1, round(measure.size / DISPLAY_TEXT_PX))  # one pixel once fitted to the display
        origin = (rect[0] + measure.pad, rect[1] + measure.pad)
        leader = _leader(rect, request.box) if far else None
        out.append(LabelLayout(measure.text, measure.size, rect, origin, request.fill, text_color_for(request.fill),
                               border, leader))  # fmt: skip
    return out


def layout_label(
    text: str,
    box: Rect,
    fill: tuple[int, int, int],
    width: int,
    height: int,
    *,
    thickness: int | None = None,
    avoid: Sequence[Rect] = (),
) -> LabelLayout:
    """Place one caption for ``box`` (see :func:`_clamped_box`) in a ``width`` x ``height`` image,
    clear of the ``avoid`` rects (captions already placed) where there is any room: above the box's
    top-left corner when there is room, else inside it, else the nearest free place."""
    thickness = box_thickness(width, height) if thickness is None else thickness
    measure = _Measure(text, width, height)
    spot = _place(CaptionRequest(text, box, fill, thickness), measure, width, height,
                  np.asarray(list(avoid), dtype=np.int64).reshape(-1, 4), np.zeros((0, 4), np.int64), np.zeros(0),
                  None)  # fmt: skip
    if spot is None:  # no free place at all: where it would go alone
        spot = _place(CaptionRequest(text, box, fill, thickness), measure, width, height, np.zeros((0, 4), np.int64),
                      np.zeros((0, 4), np.int64), np.zeros(0), None)  # fmt: skip
    assert spot is not None  # an empty image always has a place
    rect, far, _cost = spot
    border = max(1, round(measure.size / DISPLAY_TEXT_PX))
    return LabelLayout(measure.text, measure.size, rect, (rect[0] + measure.pad, rect[1] + measure.pad), fill,
                       text_color_for(fill), border, _leader(rect, box) if far else None)  # fmt: skip


# --- drawing -----------------------------------------------------------------------------------------
def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Rect, color: tuple[int, int, int], width: int) -> None:
    """A dashed outline (an unknown box: there, but not an answer)."""
    x1, y1, x2, y2 = box
    dash = max(4, 3 * width)
    for a, b, horizontal, at in ((x1, x2, True, y1), (x1, x2, True, y2), (y1, y2, False, x1), (y1, y2, False, x2)):
        for start in range(a, b + 1, 2 * dash):
            end = min(b, start + dash)
            if horizontal:
                draw.line((start, at, end, at), fill=color, width=width)
            else:
                draw.line((at, start, at, end), fill=color, width=width)


def _scaled(objects: Sequence[RecognizedObject], scale: float) -> list[RecognizedObject]:
    from dataclasses import replace

    return [replace(o, bbox=tuple(float(v) * scale for v in o.bbox)) for o in objects]


def caption_layouts(
    objects: Sequence[RecognizedObject],
    width: int,
    height: int,
    *,
    lang: str = "en",
    threshold: float | None = None,
    highlight: int | None = None,
    lines: dict[int, tuple[Rect, tuple[int, int, int], int]] | None = None,
) -> list[LabelLayout | None]:
    """Where :func:`draw_objects` puts each object's caption in a ``width`` x ``height`` image (one
    entry per object, in the order given; ``None``: left out, as it fits nowhere). The highlighted
    box's caption is placed first, then recognised ones by score, then the unknown ones' tags.
    ``lines``: each box's drawn rect, colour and outline width (default: as drawn without a highlight)."""
    if lines is None:
        t = box_thickness(width, height)
        lines = {i: (_clamped_box(o.bbox, width, height), color_for(o.label), t if o.recognized else max(1, t // 2))
                 for i, o in enumerate(objects)}  # fmt: skip
    first = lambda i: (i != highlight, not objects[i].recognized, -(objects[i].score or 0), i)  # noqa: E731
    placing = sorted(range(len(objects)), key=first)
    requests = [
        CaptionRequest(
            drawn_caption(objects[i], lang=lang, threshold=threshold, full=i == highlight),
            lines[i][0], lines[i][1], lines[i][2], unknown=not objects[i].recognized,
            fallback=str(i + 1) if objects[i].recognized else None,  # the box's row in the table
        )  # fmt: skip
        for i in placing
    ]
    placed = dict(zip(placing, layout_captions(requests, width, height)))
    return [placed[i] for i in range(len(objects))]


def draw_objects(
    image: np.ndarray | Image.Image,
    objects: Sequence[RecognizedObject],
    *,
    lang: str = "en",
    threshold: float | None = None,
    highlight: int | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Boxes and captions on a copy of an RGB image (see the module's doc).

    Recognised boxes are outlined in their label's colour with ``label score``; unknown boxes
    thin, dashed and grey with ``?``. ``highlight`` is an index into ``objects`` as given: that box
    is drawn thicker and on top, its caption placed first (an unknown one with its near miss
    against ``threshold``, in ``lang``), the others thinner and faded toward grey; an index
    outside ``objects`` highlights nothing. ``max_side``: draw on a copy scaled down to at most
    that many pixels on its longer side (what a screen shows; the captions are sized to it).
    """
    canvas = image.copy().convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image).convert("RGB")
    if max_side and max(canvas.size) > max_side:
        scale = max_side / max(canvas.size)
        canvas = canvas.resize((max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))),
                               Image.Resampling.LANCZOS)  # fmt: skip
        objects = _scaled(objects, scale)
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    thickness = box_thickness(width, height)
    if highlight is not None and not 0 <= highlight < len(objects):
        highlight = None
    # unrecognised boxes first so recognised ones stay on top, the highlighted one last of all;
    # all captions after all boxes, so no outline crosses a caption
    order = sorted(range(len(objects)), key=lambda i: (i == highlight, objects[i].recognized))
    drawn: dict[int, tuple[Rect, tuple[int, int, int], int]] = {}  # box, colour, line width
    for i in order:
        obj = objects[i]
        color, line = color_for(obj.label), thickness
        if not obj.recognized:
            line = max(1, thickness // 2)
        if highlight is not None:
            if i == highlight:
                line = min(MAX_THICKNESS, 2 * thickness)
            else:
                color, line = dimmed(color), max(1, line // 2)
        box = _clamped_box(obj.bbox, width, height)
        line_width = min(line, max(1, min(box[2] - box[0], box[3] - box[1])))
        if obj.recognized or i == highlight:
            draw.rectangle(box, outline=color, width=line_width)
        else:
            _dashed_rectangle(draw, box, color, line_width)
        drawn[i] = box, color, line
    layouts = caption_layouts(objects, width, height, lang=lang, threshold=threshold, highlight=highlight,
                              lines=drawn)  # fmt: skip
    for i in order:  # leader lines first: no line crosses a caption
        label = layouts[i]
        if label is not None and label.leader is not None:
            draw.line(label.leader, fill=label.fill, width=max(1, drawn[i][2] // 2))
    for i in order:
        label = layouts[i]
        if label is None:
            continue
        x1, y1, x2, y2 = label.rect
        try:
            draw.rectangle(
                (x1, y1, x2 - 1, y2 - 1), fill=label.fill, outline=label.text_color, width=label.border_width
            )
            draw.text(label.origin, label.text, fill=label.text_color, font=_font(label.font_size))
        except (OSError, ValueError) as exc:  # a font that cannot render it must not lose the boxes
            log.warning("could not draw the caption %r: %s", label.text, exc)
    return canvas
