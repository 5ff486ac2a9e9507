"""Drawing boxes and labels, with a font that can show Chinese labels offline."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
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


@functools.lru_cache(maxsize=16)
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


def draw_objects(image: np.ndarray | Image.Image, objects: Sequence[RecognizedObject]) -> Image.Image:
    """Boxes and top-1 captions on a copy of an RGB image."""
    canvas = image.copy().convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    thickness = max(2, round(min(width, height) / 250))
    # wide images are shown scaled to their width, so the long side also sets a minimum text size
    font = _font(max(12, round(min(width, height) / 30), round(max(width, height) / 45)))
    # draw unrecognised boxes first so recognised ones stay on top
    for obj in sorted(objects, key=lambda o: o.recognized):
        color = color_for(obj.label)
        x1, y1, x2, y2 = (float(v) for v in obj.bbox)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=thickness)
        text = caption(obj)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * thickness if y1 - th - 2 * thickness >= 0 else y1
        tx = min(max(0.0, x1), max(0.0, width - tw - 2 * thickness))
        draw.rectangle([tx, ty, tx + tw + 2 * thickness, ty + th + 2 * thickness], fill=color)
        draw.text((tx + thickness - left, ty + thickness - top), text, fill=(255, 255, 255), font=font)
    return canvas
