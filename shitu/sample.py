"""The sample gallery, generated at first start from photos that ship with scikit-image.

No image is copied into this repository: each gallery entry is a random crop/flip/colour
change of one of scikit-image's bundled photos, made with a fixed seed, and the example
queries are other crops of the same photos plus a two-object composite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from shitu.config import Settings

# label → (skimage.data function, subject box as fractions x1, y1, x2, y2 of the photo)
SAMPLE_SUBJECTS: dict[str, tuple[str, tuple[float, float, float, float]]] = {
    "猫 cat": ("chelsea", (0.15, 0.0, 0.85, 1.0)),
    "咖啡 coffee": ("coffee", (0.05, 0.0, 0.95, 0.85)),
    "火箭 rocket": ("rocket", (0.3, 0.0, 0.7, 1.0)),
    "宇航员 astronaut": ("astronaut", (0.15, 0.0, 0.85, 1.0)),
    "摩托车 motorcycle": ("motorcycle", (0.0, 0.1, 1.0, 1.0)),
    "星系 galaxies": ("hubble_deep_field", (0.0, 0.0, 1.0, 1.0)),
}
PER_CLASS = 4
SEED = 20261126


def _photo(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle":
        array = data.stereo_motorcycle()[0]
    else:
        array = getattr(data, name)()
    return Image.fromarray(np.asarray(array)).convert("RGB")


def _subject(label: str) -> Image.Image:
    name, (fx1, fy1, fx2, fy2) = SAMPLE_SUBJECTS[label]
    im = _photo(name)
    w, h = im.size
    return im.crop((int(fx1 * w), int(fy1 * h), int(fx2 * w), int(fy2 * h)))


def augment(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random view of a photo: crop keeping 70–95% of each side, maybe mirrored, colour-shifted."""
    w, h = im.size
    sx, sy = rng.uniform(0.7, 0.95, size=2)
    cw, ch = int(w * sx), int(h * sy)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = im.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.8, 1.2))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.8, 1.2))
    return out.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, expand=False)


def write_gallery(root: Path, per_class: int = PER_CLASS, labels: list[str] | None = None, seed: int = SEED) -> Path:
    """Write ``root/<n>/<k>.jpg`` images and ``root/gallery.txt`` (PaddleX format, tab-separated
    because the labels contain spaces). Returns the label file."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, label in enumerate(labels or list(SAMPLE_SUBJECTS)):
        subject = _subject(label)
        (root / str(n)).mkdir(exist_ok=True)
        for k in range(per_class):
            rel = f"{n}/{k}.jpg"
            augment(subject, rng).save(root / rel, quality=90)
            lines.append(f"{rel}\t{label}")
    label_file = root / "gallery.txt"
    label_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return label_file


def write_queries(target: Path, seed: int = SEED + 1) -> list[Path]:
    """One new view per subject plus a composite with two subjects side by side."""
    rng = np.random.default_rng(seed)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, label in enumerate(SAMPLE_SUBJECTS):
        path = target / f"query_{n}_{SAMPLE_SUBJECTS[label][0]}.jpg"
        augment(_subject(label), rng).save(path, quality=90)
        paths.append(path)
    left, right = _subject("猫 cat"), _subject("咖啡 coffee")
    height = 360
    left = left.resize((int(left.width * height / left.height), height))
    right = right.resize((int(right.width * height / right.height), height))
    canvas = Image.new("RGB", (left.width + right.width + 60, height + 40), (245, 245, 240))
    canvas.paste(left, (20, 20))
    canvas.paste(right, (left.width + 40, 20))
    composite = target / "query_two_objects.jpg"
    canvas.save(composite, quality=90)
    return [composite, *paths]


def sample_dirs(settings: Settings) -> tuple[Path, Path]:
    """Where the generated sample gallery and queries live: the data dir (never the checkout or
    the installed package, which may be read-only and must stay clean)."""
    return settings.data_dir / "sample" / "gallery", settings.data_dir / "sample" / "queries"


def ensure_sample_files(settings: Settings) -> tuple[Path, Path, list[Path]]:
    """Generate the sample gallery and queries once; return (gallery root, label file, queries)."""
    gallery, queries = sample_dirs(settings)
    label_file = gallery / "gallery.txt"
    if not label_file.exists():
        write_gallery(gallery)
    existing = sorted(queries.glob("query_*.jpg")) if queries.exists() else []
    if len(existing) < len(SAMPLE_SUBJECTS) + 1:
        existing = write_queries(queries)
    return gallery, label_file, sorted(existing)
