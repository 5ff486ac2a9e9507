"""Query-like views of a gallery photo: what a real photo of the same product changes.

A gallery photo is usually a clean, centred shot; the crops the detector cuts from a real
photo are framed loosely or tightly, seen at an angle, blurred, lit differently, compressed
and set against another background. :func:`query_view` makes one such view (each change at
a random strength, most of them at once), so that a gallery can be scored as real queries
would score it (:mod:`shitu.calibrate`): a view against the gallery without its own photo
(a genuine query), and against the gallery without its whole label (an unknown one).

Pure image operations (OpenCV, imported on first use, and NumPy) on RGB ``uint8`` arrays, deterministic for a given
``numpy.random.Generator``; ~2 ms a view on one core (the view is made at the model's scale).
"""

from __future__ import annotations

import numpy as np

WORK_SIDE = 320  # views are made at about this size: the recognition model sees 224 px
CROP_KEEP = (0.6, 1.0)  # share of each side a re-framed view keeps ...
PAD = (0.0, 0.35)  # ... or the share of each side added around it (a loose detector box)
PERSPECTIVE = 0.12  # corners move by up to this share of the side (a product seen at an angle)
ROTATION = 12.0  # degrees
BLUR_SIGMA = (0.0, 2.0)  # at WORK_SIDE
BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.7, 1.3)
COLOR_CAST = 0.12  # per-channel gain change (white balance)
JPEG_QUALITY = (25, 90)
NOISE = 6.0  # sensor noise, grey levels (std)


def _fit(rgb: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _background(h: int, w: int, rng: np.random.Generator, photo: np.ndarray) -> np.ndarray:
    """A plausible surrounding: a smooth colour gradient, a blurred texture, or the photo's own
    colours shuffled (a shelf, a table, a wall: never another product)."""
    import cv2

    kind = rng.integers(3)
    if kind == 0:
        a, b = rng.uniform(0, 255, size=(2, 3))
        t = np.linspace(0, 1, h if rng.random() < 0.5 else w)[:, None]
        ramp = (a + (b - a) * t).astype(np.float32)
        out = np.broadcast_to(ramp[:, None, :], (h, w, 3)) if len(t) == h else np.broadcast_to(ramp[None], (h, w, 3))
        return np.ascontiguousarray(out).astype(np.uint8)
    if kind == 1:
        base = rng.uniform(30, 225, size=3)
        small = base + rng.uniform(-40, 40, size=(int(rng.integers(2, 9)), int(rng.integers(2, 9)), 1))
        return cv2.resize(small.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
    tiles = photo.reshape(-1, 3)[rng.integers(0, photo.shape[0] * photo.shape[1], size=64)].astype(np.float32)
    small = tiles.reshape(8, 8, 3)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), (0, 0), 3).astype(np.uint8)


def _reframe(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A tighter crop (part of the product cut off) or a looser one on a new background."""
    h, w = rgb.shape[:2]
    if rng.random() < 0.5:
        kw, kh = (rng.uniform(*CROP_KEEP, size=2) * (w, h)).astype(int).clip(8)
        x0, y0 = int(rng.integers(0, w - kw + 1)), int(rng.integers(0, h - kh + 1))
        return rgb[y0 : y0 + kh, x0 : x0 + kw]
    left, right, top, bottom = rng.uniform(*PAD, size=4)
    pw, ph = int(w * left), int(h * top)
    out = _background(h + ph + int(h * bottom), w + pw + int(w * right), rng, rgb)
    out[ph : ph + h, pw : pw + w] = rgb
    return out


def _warp(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Perspective and in-plane rotation; the corners uncovered are filled from the border."""
    import cv2

    h, w = rgb.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = (src + rng.uniform(-PERSPECTIVE, PERSPECTIVE, size=(4, 2)) * (w, h)).astype(np.float32)
    matrix = cv2.getPerspectiveTransform(src, dst)
    turn = np.vstack([cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-ROTATION, ROTATION)), 1.0),
                      [0, 0, 1]])  # fmt: skip
    return cv2.warpPerspective(rgb, turn @ matrix, (w, h), borderMode=cv2.BORDER_REPLICATE)


def _photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    x = rgb.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(*CONTRAST) + mean * rng.uniform(*BRIGHTNESS)
    x *= 1 + rng.uniform(-COLOR_CAST, COLOR_CAST, size=3)
    sigma = rng.uniform(*BLUR_SIGMA)
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    x += rng.normal(0, rng.uniform(0, NOISE), size=x.shape).astype(np.float32)
    return x.clip(0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(*JPEG_QUALITY))])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1] if ok else rgb


def query_view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One query-like view of an RGB photo (re-framed, warped, relit, blurred, compressed).

    >>> view = query_view(np.zeros((480, 640, 3), np.uint8), np.random.default_rng(0))
    >>> view.dtype, view.ndim
    (dtype('uint8'), 3)
    """
    x = _fit(np.ascontiguousarray(rgb), WORK_SIDE)
    x = _reframe(x, rng)
    x = _warp(x, rng)
    x = _photometric(x, rng)
    return np.ascontiguousarray(_jpeg(x, rng))


VIEWS_PER_PHOTO = 4  # at most this many views of one photo ...
VIEW_BUDGET = 128  # ... and this many in all: a build embeds at most this many images more (~13 % of 987)
VIEW_SEED = 29


def view_plan(photos: int, budget: int = VIEW_BUDGET) -> np.ndarray:
    """How many query-like views each of ``photos`` gallery photos gets at build time: all get
    :data:`VIEWS_PER_PHOTO` on a small gallery; on a large one the ``budget`` is spread over
    photos picked at random (fixed seed: the same gallery gets the same plan).

    >>> view_plan(3).tolist(), int(view_plan(1000).sum())
    ([4, 4, 4], 128)
    """
    counts = np.zeros(photos, dtype=np.int64)
    total = min(VIEWS_PER_PHOTO * photos, budget)
    order = np.random.default_rng(VIEW_SEED).permutation(photos)
    for k in range(total):
        counts[order[k % photos]] += 1
    return counts


def make_views(rgb: np.ndarray, position: int, count: int) -> list[np.ndarray]:
    """The first ``count`` query-like views of the photo at ``position`` in its gallery (a seed of
    its own: the same photo at the same place always gets the same views)."""
    rng = np.random.default_rng([VIEW_SEED, int(position)])
    return [query_view(rgb, rng) for _ in range(count)]
