"""Gallery input: label files, zip uploads, image decoding and validation.

Everything that turns user files into ``(image, label)`` pairs lives here, so the Python
API, the CLI, the UI and the HTTP API reject bad input with the same messages.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shitu.errors import ShiTuError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 40_000_000

ImageInput = str | Path | bytes | np.ndarray | Image.Image


@dataclass
class GalleryItem:
    """One gallery entry before embedding: where it came from, the image and its label."""

    source: str  # shown to users: the path as written in the label file, or a file name
    image: ImageInput
    label: str
    line_no: int | None = None
    thumbnail: bytes | None = None  # filled in once the image is decoded


@dataclass
class SkippedLine:
    line_no: int | None
    source: str
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line_no}" if self.line_no is not None else self.source
        return f"{where}: {self.reason}"


@dataclass
class GalleryBatch:
    items: list[GalleryItem] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)

    def require_clean(self) -> "GalleryBatch":
        """Raise if any line was bad: the index must never be built from part of a file."""
        if self.skipped:
            shown = "; ".join(str(s) for s in self.skipped[:10])
            more = f" (and {len(self.skipped) - 10} more)" if len(self.skipped) > 10 else ""
            raise ShiTuError(f"{len(self.skipped)} gallery line(s) are unusable: {shown}{more}")
        if not self.items:
            raise ShiTuError("the gallery is empty: no image/label pairs were given")
        return self


def decode_text(data: bytes | str) -> str:
    """UTF-8 with or without BOM; a clear error for other encodings."""
    if isinstance(data, str):
        return data.lstrip("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ShiTuError(f"label file is not UTF-8 text (byte {exc.start})") from exc


def parse_label_lines(text: str) -> tuple[list[tuple[int, str, str]], list[SkippedLine]]:
    """Parse PaddleX label lines: ``path label`` or ``path<TAB>label``.

    Labels may contain spaces (everything after the first separator is the label); blank
    lines and ``#`` comments are ignored. Returns ``(line_no, path, label)`` triples and
    the lines that could not be parsed.

    >>> parse_label_lines("a.jpg cola zero\\r\\nb.jpg\\tgreen tea\\n")[0]
    [(1, 'a.jpg', 'cola zero'), (2, 'b.jpg', 'green tea')]
    """
    entries: list[tuple[int, str, str]] = []
    skipped: list[SkippedLine] = []
    for line_no, raw in enumerate(decode_text(text).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sep = "\t" if "\t" in line else " "
        path, _, label = line.partition(sep)
        path, label = path.strip(), label.strip()
        if not label:
            skipped.append(SkippedLine(line_no, path, "no label after the image path"))
            continue
        entries.append((line_no, path, label))
    return entries, skipped


def read_label_file(label_file: str | Path, root: str | Path | None = None) -> GalleryBatch:
    """Read a PaddleX ``gallery.txt`` whose paths are relative to ``root``.

    Paths with spaces work in space-separated files too: if ``a b.jpg label`` does not
    name an existing ``a``, the longest existing prefix is used as the path.
    """
    label_file = Path(label_file)
    try:
        text = decode_text(label_file.read_bytes())
    except OSError as exc:
        raise ShiTuError(f"cannot read label file {label_file}: {exc.strerror}") from exc
    root = Path(root) if root is not None else label_file.parent
    entries, skipped = parse_label_lines(text)
    batch = GalleryBatch(skipped=skipped)
    for line_no, path, label in entries:
        file = root / path
        if not file.is_file() and " " in label:
            # maybe the path itself contains spaces: grow it word by word
            words = label.split(" ")
            for k in range(1, len(words)):
                candidate = root / " ".join([path, *words[:k]])
                if candidate.is_file():
                    file, path, label = candidate, " ".join([path, *words[:k]]), " ".join(words[k:])
                    break
        if not file.is_file():
            batch.skipped.append(SkippedLine(line_no, path, f"image not found: {file}"))
            continue
        batch.items.append(GalleryItem(source=path, image=str(file), label=label, line_no=line_no))
    return batch


def read_zip_gallery(
    zip_file: str | Path | bytes, label_text: str | bytes | None = None, *, max_total: int = 2 << 30
) -> GalleryBatch:
    """A gallery from a .zip: with a label file (given, or a ``*.txt`` at the zip's top level)
    its paths are looked up in the zip; without one, each image's folder name is its label."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(zip_file) if isinstance(zip_file, bytes) else zip_file)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ShiTuError(f"not a readable .zip file: {exc}") from exc
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if sum(i.file_size for i in infos) > max_total:
            raise ShiTuError("the .zip unpacks to more than 2 GiB")
        files: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or "__MACOSX" in name.parts:
                continue
            files[str(name)] = info
        if label_text is None:
            txts = [n for n in files if n.lower().endswith(".txt")]
            top = sorted(txts, key=lambda n: (n.count("/"), n))
            if top:
                label_text = archive.read(files[top[0]])
                # label paths are relative to the label file's folder
                prefix = str(PurePosixPath(top[0]).parent)
                prefix = "" if prefix == "." else prefix + "/"
            else:
                prefix = ""
        else:
            prefix = _common_prefix(files)
        batch = GalleryBatch()
        if label_text is not None:
            entries, batch.skipped = parse_label_lines(decode_text(label_text))
            for line_no, path, label in entries:
                key = _find_member(files, prefix, path)
                if key is None:
                    batch.skipped.append(SkippedLine(line_no, path, "image not found in the .zip"))
                    continue
                batch.items.append(
                    GalleryItem(source=path, image=archive.read(files[key]), label=label, line_no=line_no)
                )
        else:
            for name in sorted(files):
                parts = PurePosixPath(name).parts
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if len(parts) < 2:
                    batch.skipped.append(SkippedLine(None, name, "no folder name to use as label"))
                    continue
                batch.items.append(GalleryItem(source=name, image=archive.read(files[name]), label=parts[-2]))
    return batch


def _common_prefix(files: dict[str, zipfile.ZipInfo]) -> str:
    """A single top folder wrapping everything (as zipping a folder produces) is skipped."""
    tops = {PurePosixPath(n).parts[0] for n in files}
    if len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in files):
        return tops.pop() + "/"
    return ""


def _find_member(files: dict[str, zipfile.ZipInfo], prefix: str, path: str) -> str | None:
    path = path.replace("\\", "/")
    path = path[2:] if path.startswith("./") else path
    for key in (prefix + path, path):
        if key in files:
            return key
    return None


def pairs_from_uploads(images: list[tuple[str, bytes | str | Path]], label_text: str | bytes) -> GalleryBatch:
    """Match uploaded files to label lines by relative path, else by file name."""
    by_name: dict[str, tuple[str, bytes | str | Path]] = {}
    for name, data in images:
        by_name.setdefault(name.replace("\\", "/"), (name, data))
        by_name.setdefault(PurePosixPath(name.replace("\\", "/")).name, (name, data))
    entries, skipped = parse_label_lines(decode_text(label_text))
    batch = GalleryBatch(skipped=skipped)
    for line_no, path, label in entries:
        key = path.replace("\\", "/")
        hit = by_name.get(key) or by_name.get(PurePosixPath(key).name)
        if hit is None:
            batch.skipped.append(SkippedLine(line_no, path, "no uploaded file has this name"))
            continue
        batch.items.append(GalleryItem(source=path, image=hit[1], label=label, line_no=line_no))
    return batch


def load_image(src: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS, ndarray_bgr: bool = True) -> np.ndarray:
    """Decode any supported input to an RGB ``uint8`` array of shape (H, W, 3).

    ``ndarray`` inputs follow PaddleX's convention (BGR, as from ``cv2.imread``) unless
    ``ndarray_bgr=False``. EXIF orientation is applied; images over ``max_pixels`` are
    refused before decoding (decompression bombs).
    """
    if isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
            raise ShiTuError(f"an image array must be HxWx3, got shape {src.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        arr = arr[..., :3]
        return np.ascontiguousarray(arr[..., ::-1] if ndarray_bgr else arr)
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src, max_pixels, "image")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "uploaded data"
    else:
        path = Path(src)
        try:
            data, name = path.read_bytes(), path.name
        except FileNotFoundError as exc:
            raise ShiTuError(f"image not found: {path}", status=404) from exc
        except OSError as exc:
            raise ShiTuError(f"cannot read image {path}: {exc.strerror}") from exc
    with _reading(name), Image.open(io.BytesIO(data)) as im:
        return _pil_to_rgb(im, max_pixels, name)


def check_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse bytes that are not an image, or whose header claims more than ``max_pixels``,
    from the header alone (nothing is decoded)."""
    with _reading(name), Image.open(io.BytesIO(data)) as im:
        _check_size(im, max_pixels, name)


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """PIL's many ways of saying "cannot read this" become one clear :class:`ShiTuError`."""
    try:
        yield
    except Image.DecompressionBombError:
        raise ShiTuError(f"{name} claims too many pixels to decode safely", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ShiTuError(f"{name} is not an image, or not a readable image format") from None


def _check_size(im: Image.Image, max_pixels: int, name: str) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise ShiTuError(f"{name} is {width}x{height} pixels; the limit is {max_pixels:,} pixels", status=413)
    if width < 1 or height < 1:
        raise ShiTuError(f"{name} is empty")


def _pil_to_rgb(im: Image.Image, max_pixels: int, name: str) -> np.ndarray:
    _check_size(im, max_pixels, name)
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def list_image_files(directory: str | Path) -> list[Path]:
    """Image files in a directory (not recursive), sorted by name."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def make_thumbnail(rgb: np.ndarray, size: int = 96) -> bytes:
    """A small JPEG used as each entry's preview in the index metadata."""
    im = Image.fromarray(rgb)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
