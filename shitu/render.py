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

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
UNRECOGNISED_TEXT = "unknown"
BLACK, WHITE = (0, 0, 0), (255, 255, 255)

# Results are mostly looked at shrunk to fit a phone or the UI's 420-px box: captions are sized
# so their text is still about DISPLAY_TEXT_PX high there.
DISPLAY_SIDE = 400
DISPLAY_TEXT_PX = 13
MIN_FONT_SIZE = 12
MAX_FONT_SIZE = 1000  # FreeType fails on glyphs tens of thousands of pixels high
MAX_THICKNESS = 200
MAX_LABEL_EM = 40  # longer captions are cut with "..." (unreadable anyway, and slow to render)
# Gradio puts the image's name in a badge over its top-left corner: about 9 x 2.2 caption heights.
BADGE_WIDTH_EM = 9
BADGE_HEIGHT_EM = 2.2


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


def caption(obj: RecognizedObject) -> str:
    if obj.recognized:
        return f"{obj.label} {obj.score:.2f}"
    return UNRECOGNISED_TEXT


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
    """Caption size in image pixels: about ``DISPLAY_TEXT_PX`` once the image is shrunk to fit
    ``DISPLAY_SIDE`` pixels, at most a quarter of the short side (strips), clamped to what
    fonts can render."""
    size = max(width, height) * DISPLAY_TEXT_PX / DISPLAY_SIDE
    size = min(size, min(width, height) / 4)
    return int(min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, round(size))))


def box_thickness(width: int, height: int) -> int:
    """Outline width: visible once shrunk to fit the display, thin next to a strip's short side."""
    t = min(max(width, height) / 300, min(width, height) / 40)
    return int(min(MAX_THICKNESS, max(2, round(t))))


def corner_badge(width: int, height: int) -> tuple[int, int, int, int]:
    """The top-left area that viewers cover with their own badge (Gradio's image label):
    captions are kept out of it."""
    size = label_font_size(width, height)
    return 0, 0, min(width, round(BADGE_WIDTH_EM * size)), min(height, round(BADGE_HEIGHT_EM * size))


@dataclass(frozen=True)
class LabelLayout:
    """Where and how one caption is drawn: a filled ``rect`` (x1, y1, x2, y2) with ``text`` in
    ``text_color`` at ``font_size``, its top-left text corner at ``origin``."""

    text: str
    font_size: int
    rect: tuple[int, int, int, int]
    origin: tuple[int, int]
    fill: tuple[int, int, int]
    text_color: tuple[int, int, int]


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
    text: str, box: tuple[int, int, int, int], fill: tuple[int, int, int], width: int, height: int
) -> LabelLayout:
    """Place one caption for ``box`` (see :func:`_clamped_box`) in a ``width`` x ``height`` image.

    Above the box's top-left corner when there is room, else inside the box just below/right
    of its corner; never in the viewer's corner badge, and never outside the image.
    """
    thickness = box_thickness(width, height)
    size = label_font_size(width, height)
    pad = max(1, round(size * 0.2))
    max_text = max(1, min(width - 2 * pad, MAX_LABEL_EM * size))
    text, size = _fit_text(text, size, max_text)
    pad = max(1, round(size * 0.2))
    text_w, text_h = _text_size(_font(size), text)
    lw, lh = text_w + 2 * pad, text_h + 2 * pad
    badge = corner_badge(width, height)
    x1, y1, x2, y2 = box

    def at(x: float, y: float) -> tuple[int, int, int, int]:
        x, y = round(_clamp(x, 0, max(0, width - lw))), round(_clamp(y, 0, max(0, height - lh)))
        return x, y, x + lw, y + lh

    candidates = [
        (x1, y1 - lh),  # on top of the box, outside it
        (x1 + thickness, y1 + thickness),  # inside, in its corner
        (x1 + thickness, badge[3] + thickness),  # inside, below the viewer's badge
        (badge[2] + thickness, y1 + thickness),  # inside, right of the viewer's badge
    ]
    rect = None
    for x, y in candidates:
        if x < 0 or y < 0 or x + lw > width or y + lh > height:
            continue  # would have to be moved, which may put it over another box's text
        candidate = at(x, y)
        if not _overlaps(candidate, badge):
            rect = candidate
            break
    if rect is None:  # a tiny image or box: inside the image is all that can be promised
        rect = at(x1 + thickness, max(y1 + thickness, badge[3]))
    return LabelLayout(text, size, rect, (rect[0] + pad, rect[1] + pad), fill, text_color_for(fill))


def draw_objects(image: np.ndarray | Image.Image, objects: Sequence[RecognizedObject]) -> Image.Image:
    """Boxes and top-1 captions on a copy of an RGB image."""
    canvas = image.copy().convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    thickness = box_thickness(width, height)
    # unrecognised boxes first so recognised ones stay on top; all captions after all boxes,
    # so no outline crosses a caption
    ordered = sorted(objects, key=lambda o: o.recognized)
    labels: list[LabelLayout] = []
    for obj in ordered:
        color = color_for(obj.label)
        box = _clamped_box(obj.bbox, width, height)
        draw.rectangle(box, outline=color, width=min(thickness, max(1, min(box[2] - box[0], box[3] - box[1]))))
        labels.append(layout_label(caption(obj), box, color, width, height))
    for label in labels:
        try:
            draw.rectangle(label.rect, fill=label.fill)
            draw.text(label.origin, label.text, fill=label.text_color, font=_font(label.font_size))
        except (OSError, ValueError) as exc:  # a font that cannot render it must not lose the boxes
            log.warning("could not draw the caption %r: %s", label.text, exc)
    return canvas
