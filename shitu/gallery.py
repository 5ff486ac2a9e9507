"""Gallery input: label files, zip uploads, image decoding and validation.

Everything that turns user files into ``(image, label)`` pairs lives here, so the Python
API, the CLI, the UI and the HTTP API reject bad input with the same messages.
"""

from __future__ import annotations

import io
import lzma
import math
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shitu.errors import NotFound, ShiTuError, TooLarge
from shitu.i18n import text as say

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 40_000_000
# Past these the rest of the pipeline breaks (JPEG cannot encode a side over 65,500 px) or the
# detector sees only a sliver; nobody photographs a product at 100:1.
DEFAULT_MAX_SIDE = 30_000
DEFAULT_MAX_ASPECT = 100.0

# .zip galleries: limits on what members may unpack to (zip bombs)
ZIP_MAX_TOTAL = 2 << 30
ZIP_MAX_MEMBER = 64 << 20
ZIP_MAX_RATIO = 200.0  # unpacked / packed size; photos barely compress, bombs reach 1000+
ZIP_RATIO_FLOOR = 1 << 20  # members smaller than this may compress arbitrarily well
ZIP_MAX_MEMBERS = 100_000
ZIP_CHUNK = 1 << 20
LABEL_FILE_MAX = 16 << 20
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)

# Entry thumbnails (stored base64 in the index metadata): the whole image fitted in a square,
# sharp enough to tell products apart in the UI's gallery, small enough to keep metadata modest.
THUMBNAIL_SIDE = 224
THUMBNAIL_QUALITIES = (88, 80, 70)  # JPEG qualities, tried in turn while over THUMBNAIL_MAX_BYTES
THUMBNAIL_MAX_BYTES = 15 << 10

ImageInput = str | Path | bytes | np.ndarray | Image.Image
# load_image refuses images over its own pixel limit from the header, before decoding: PIL's warning
# about the same (printed to the server's log for every large upload) says nothing more
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


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


def in_line_order(skipped: Iterable[SkippedLine]) -> list[SkippedLine]:
    """Skipped lines by line number; those without one (zip members, uploads) after them, in
    the order given."""
    return sorted(skipped, key=lambda s: (s.line_no is None, s.line_no or 0))


@dataclass
class GalleryBatch:
    items: list[GalleryItem] = field(default_factory=list)
    skipped: list[SkippedLine] = field(default_factory=list)

    def require_clean(self) -> "GalleryBatch":
        """Raise if any line was bad: the index must never be built from part of a file."""
        if self.skipped:
            shown = "; ".join(str(s) for s in in_line_order(self.skipped)[:10])
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
    batch.skipped = in_line_order(batch.skipped)
    return batch


def read_zip_gallery(
    zip_file: str | Path | bytes,
    label_text: str | bytes | None = None,
    *,
    max_total: int = ZIP_MAX_TOTAL,
    max_member: int = ZIP_MAX_MEMBER,
    max_ratio: float = ZIP_MAX_RATIO,
    folder_labels: bool = False,
) -> GalleryBatch:
    """A gallery from a .zip: with a label file (given, or a ``*.txt`` at the zip's top level)
    its paths are looked up in the zip; without one, each image's folder name is its label.

    Folder names that are only digits (``0``, ``109``: a dataset's class numbers, not product
    names) are refused as labels unless ``folder_labels`` confirms that they are the labels.

    Members are unpacked in chunks and refused once one passes ``max_member`` bytes, all of
    them together pass ``max_total``, or one unpacks to more than ``max_ratio`` times its packed
    size (zip bombs), whatever the headers claim.
    """
    with _open_zip(zip_file) as archive:
        reader = _ZipReader(archive, max_total=max_total, max_member=max_member, max_ratio=max_ratio)
        files: dict[str, zipfile.ZipInfo] = {}
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or "__MACOSX" in name.parts:
                continue
            files[str(name)] = info
        if label_text is None:
            txts = [n for n in files if n.lower().endswith(".txt")]
            top = sorted(txts, key=lambda n: (n.count("/"), n))
            if top:
                label_text = reader.read(files[top[0]], limit=LABEL_FILE_MAX)
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
                    GalleryItem(source=path, image=reader.read(files[key]), label=label, line_no=line_no)
                )
            batch.skipped = in_line_order(batch.skipped)
        else:
            labelled: list[tuple[str, str]] = []  # (member, its folder's name)
            for name in sorted(files):
                parts = PurePosixPath(name).parts
                if not name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if len(parts) < 2:
                    batch.skipped.append(SkippedLine(None, name, "no folder name to use as label"))
                    continue
                labelled.append((name, parts[-2]))
            if not folder_labels:
                _refuse_numbered_folders({label for _, label in labelled})  # before unpacking anything
            for name, label in labelled:
                batch.items.append(GalleryItem(source=name, image=reader.read(files[name]), label=label))
    return batch


def _refuse_numbered_folders(labels: set[str]) -> None:
    """Folder names made of digits only are class numbers, not product names: recognising a
    product as "109" helps nobody, so they need a label file or an explicit confirmation."""
    numbered = sorted((label for label in labels if label.isdecimal()), key=lambda n: (len(n), n))
    if not numbered:
        return
    shown = ", ".join(numbered[:3]) + (", …" if len(numbered) > 3 else "")
    raise ShiTuError(
        f"the .zip has no label file, and its folders are numbered ({shown}), not named: add a label file "
        '(one "path label" per line) or confirm that the folder numbers are the labels'
    )


def _size(n: float) -> str:
    """A byte count for messages: ``2 GiB``, ``64 MiB``, ``1,000 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n):,} bytes"


def _open_zip(zip_file: str | Path | bytes) -> zipfile.ZipFile:
    """Open an archive, with one clear message per way it can be unreadable."""
    try:
        if isinstance(zip_file, (bytes, bytearray, memoryview)):
            data = bytes(zip_file)
            head = data[:4]
            archive = zipfile.ZipFile(io.BytesIO(data))
        else:
            with open(zip_file, "rb") as fh:
                head = fh.read(4)
            archive = zipfile.ZipFile(zip_file)
    except FileNotFoundError:
        raise NotFound("the .zip file was not found") from None
    except zipfile.BadZipFile:
        if head.startswith(b"PK"):
            # starts like a zip but its table of contents (at the end) is missing or broken
            raise ShiTuError("the .zip is damaged: it is cut short or its table of contents is broken") from None
        raise ShiTuError("not a .zip file: it could not be opened as a zip archive") from None
    except (OSError, EOFError, ValueError, struct.error, NotImplementedError, zipfile.LargeZipFile):
        raise ShiTuError("the .zip is damaged: its table of contents cannot be read") from None
    if len(archive.infolist()) > ZIP_MAX_MEMBERS:
        archive.close()
        raise TooLarge(f"the .zip holds more than {ZIP_MAX_MEMBERS:,} files")
    return archive


class _ZipReader:
    """Reads members of one archive within a shared budget (see :func:`read_zip_gallery`)."""

    def __init__(self, archive: zipfile.ZipFile, *, max_total: int, max_member: int, max_ratio: float):
        self.archive = archive
        self.left = max_total
        self.max_total = max_total
        self.max_member = max_member
        self.max_ratio = max_ratio

    def _check(self, name: str, size: int, limit: int, packed: int) -> None:
        if size > limit:
            raise TooLarge(f"{name} in the .zip unpacks to more than {_size(limit)}, the limit per file")
        if size > self.left:
            raise TooLarge(f"the .zip unpacks to more than {_size(self.max_total)}, the limit for a whole .zip")
        # small members may legitimately compress very well (text, flat images); past the
        # floor, a huge ratio is what zip bombs are made of
        if size > ZIP_RATIO_FLOOR and size > self.max_ratio * max(packed, 1):
            raise TooLarge(
                f"{name} in the .zip unpacks to over {self.max_ratio:g} times its packed size; "
                "refused as a possible zip bomb"
            )

    def read(self, info: zipfile.ZipInfo, limit: int | None = None) -> bytes:
        """One member's bytes, unpacked in chunks and stopped at the first limit passed."""
        name = info.filename
        limit = self.max_member if limit is None else min(limit, self.max_member)
        if info.flag_bits & 0x41:  # traditional or strong encryption
            raise ShiTuError(f"{name} in the .zip is encrypted; zip the gallery again without a password")
        if info.compress_type not in ZIP_METHODS:
            raise ShiTuError(
                f"{name} in the .zip uses an unsupported compression method (#{info.compress_type}); "
                "zip the gallery again with the standard (deflate) method"
            )
        # what the headers claim, before any work; then what it really unpacks to, as it goes
        self._check(name, info.file_size, limit, info.compress_size)
        body = bytearray()
        member = None
        try:
            with self.archive.open(info) as member:
                while chunk := member.read(ZIP_CHUNK):
                    body += chunk
                    self._check(name, len(body), limit, info.compress_size)
        except zipfile.BadZipFile as exc:
            # when the packed data runs out early zipfile reports a CRC error; its count of the
            # bytes still expected tells the two apart
            if getattr(member, "_left", 0) > 0:
                raise ShiTuError(f"the .zip is damaged: {name} is cut short") from None
            if "CRC" in str(exc):
                raise ShiTuError(f"the .zip is damaged: {name} fails its checksum (CRC)") from None
            raise ShiTuError(f"the .zip is damaged: {name} cannot be unpacked") from None
        except EOFError:
            raise ShiTuError(f"the .zip is damaged: {name} is cut short") from None
        except (NotImplementedError, RuntimeError):
            # zipfile's words for encrypted members and compression modules missing from Python
            raise ShiTuError(
                f"{name} in the .zip cannot be unpacked here (encrypted, or an unusual compression method)"
            ) from None
        except (OSError, ValueError, zlib.error, struct.error, lzma.LZMAError):
            raise ShiTuError(f"the .zip is damaged: {name} cannot be unpacked") from None
        self.left -= len(body)
        return bytes(body)


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
    batch.skipped = in_line_order(batch.skipped)
    return batch


def load_image(
    src: ImageInput,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ndarray_bgr: bool = True,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> np.ndarray:
    """Decode any supported input to an RGB ``uint8`` array of shape (H, W, 3).

    ``ndarray`` inputs follow PaddleX's convention (BGR, as from ``cv2.imread``) unless
    ``ndarray_bgr=False``. EXIF orientation is applied; 16-bit and float images are scaled to
    8 bits, transparent ones are put on white. Images over ``max_pixels`` are refused before
    decoding (decompression bombs), as are images with a side over ``max_side`` or an aspect
    ratio over ``max_aspect``:1.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, ndarray_bgr, max_side, max_aspect)
    if isinstance(src, Image.Image):
        with _reading("image"):
            return _pil_to_rgb(src, max_pixels, "image", max_side, max_aspect)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "uploaded data"
    else:
        path = Path(src)
        try:
            data, name = path.read_bytes(), path.name
        except FileNotFoundError as exc:
            raise NotFound(f"image not found: {path}") from exc
        except OSError as exc:
            raise ShiTuError(f"cannot read image {path}: {exc.strerror}") from exc
    with _reading(name, data):
        im = Image.open(io.BytesIO(data))
    with im, _decoding(name):
        return _pil_to_rgb(im, max_pixels, name, max_side, max_aspect)


def check_image_bytes(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> None:
    """Refuse bytes that are not an image, or whose header claims more than ``max_pixels``
    (or a shape :func:`load_image` refuses), from the header alone (nothing is decoded)."""
    with _reading(name, data), Image.open(io.BytesIO(data)) as im:
        _check_size(im.size, max_pixels, name, max_side, max_aspect)


# ISO base media files (HEIF, AVIF) say what they hold in their first box: "ftyp" and a brand
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def _unreadable_kind(data: bytes) -> str | None:
    """``"HEIC"`` or ``"AVIF"`` for a photo in a format this Pillow cannot open (by its header)."""
    if len(data) < 12 or data[4:8] != b"ftyp":
        return None
    brand = data[8:12]
    if brand in _AVIF_BRANDS:
        from PIL import features

        return None if features.check("avif") else "AVIF"
    return "HEIC" if brand in _HEIF_BRANDS else None


@contextmanager
def _reading(name: str, data: bytes | None = None) -> Iterator[None]:
    """PIL's many ways of saying "cannot read this" become one clear :class:`ShiTuError`."""
    if data is not None and not data:
        raise ShiTuError(say("en", "msg_image_empty", name=name))
    try:
        yield
    except Image.DecompressionBombError:
        raise TooLarge(say("en", "msg_image_bomb", name=name)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error, EOFError):
        kind = _unreadable_kind(data) if data is not None else None
        if kind is not None:
            raise ShiTuError(say("en", "msg_image_format", name=name, kind=kind)) from None
        raise ShiTuError(say("en", "msg_not_image", name=name)) from None


@contextmanager
def _decoding(name: str) -> Iterator[None]:
    """An image whose header was read but whose pixels cannot be: cut short, or damaged."""
    try:
        yield
    except Image.DecompressionBombError:
        raise TooLarge(say("en", "msg_image_bomb", name=name)) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError):
        raise ShiTuError(say("en", "msg_image_damaged", name=name)) from None


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str, max_side: int, max_aspect: float) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise TooLarge(say("en", "msg_image_pixels", name=name, size=f"{width}x{height}", limit=f"{max_pixels:,}"))
    if width < 1 or height < 1:
        raise ShiTuError(f"{name} is empty")
    if max(width, height) > max_side:
        raise TooLarge(f"{name} is {width}x{height} pixels; a side may be at most {max_side:,} pixels")
    if max(width, height) > max_aspect * min(width, height):
        raise ShiTuError(
            f"{name} is {width}x{height} pixels: one side is over {max_aspect:g} times the other; "
            "crop it to the object (strips this thin cannot be recognised)"
        )


def _oriented(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a malformed EXIF block must not make a readable photo fail."""
    try:
        return ImageOps.exif_transpose(im)
    except (SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return im


def _pil_to_rgb(
    im: Image.Image,
    max_pixels: int,
    name: str,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> np.ndarray:
    _check_size(im.size, max_pixels, name, max_side, max_aspect)
    im = _oriented(im)
    mode = im.mode
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # convert("RGB") clips these to 0..255: 16-bit greys turn white, 0..1 floats black
        grey = _scale_to_uint8(np.asarray(im))
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in ("RGBa", "La"):  # premultiplied alpha: over white is colour + (255 - alpha)
        arr = np.asarray(im).astype(np.int16)
        colour = arr[..., :-1] + (255 - arr[..., -1:])
        return np.ascontiguousarray(np.broadcast_to(colour, (*colour.shape[:2], 3)).clip(0, 255).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        # transparent areas (cut-out product shots) go on white, not on whatever colour
        # the invisible pixels happen to hold (often black)
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return np.asarray(canvas.convert("RGB"))
    if mode == "1":
        im = im.convert("L")  # 0/1 bits → 0/255
    return np.asarray(im.convert("RGB"))  # P, L, CMYK (Adobe's inverted kind included), YCbCr, LAB, ...


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """One channel of any integer or float depth → ``uint8``, keeping relative brightness.

    Integers: 16-bit types are divided by 257 (65535 → 255); wider types holding 8-bit values
    are kept, holding 16-bit values divided by 257, anything else is stretched over its
    actual range. Floats: 0..1 is scaled by 255, 0..255 kept,
    any other range stretched over its actual range; NaN and infinities become black.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # 16-bit, any byte order
            return _from_16bit(arr)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)  # 8-bit data in a wider type
        if lo >= 0 and hi <= 65535:
            return _from_16bit(arr)  # PIL's 32-bit "I" mode holding a 16-bit image
        return _stretch(arr.astype(np.float32), lo, hi)
    values = arr.astype(np.float32)  # plenty for an 8-bit result, half float64's memory
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    values = np.where(finite, values, 0.0)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if lo >= 0 and hi <= 1:
        return np.round(values * 255).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.round(values).astype(np.uint8)
    return _stretch(values, lo, hi, nonfinite=~finite)


def _from_16bit(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _stretch(values: np.ndarray, lo: float, hi: float, nonfinite: np.ndarray | None = None) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255 (a constant image becomes mid-grey)."""
    if hi <= lo:
        out = np.full(values.shape, 128, np.uint8)
    else:
        out = np.round((values - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
    if nonfinite is not None:
        out[nonfinite] = 0
    return out


def swap_red_blue(arr: np.ndarray) -> np.ndarray:
    """RGB ↔ BGR of an HxWx3 ``uint8`` array (a view or a crop is fine), as a new contiguous array.

    OpenCV's channel swap where it applies: NumPy's copy of a reversed last axis is 30-50x slower
    (5 ms for a 1200x1200 photo), which a query pays once for the detector and once per crop."""
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.strides[1:] == (3, 1) and arr.size:
        import cv2

        return cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(arr[..., ::-1])


def _array_to_rgb(src: np.ndarray, bgr: bool, max_side: int, max_aspect: float) -> np.ndarray:
    """An HxW, HxWx3 or HxWx4 array (BGR order when ``bgr``) → RGB ``uint8``."""
    arr = src
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
        raise ShiTuError(f"an image array must be HxWx3, got shape {src.shape}")
    _check_size((arr.shape[1], arr.shape[0]), None, "the image array", max_side, max_aspect)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
            raise ShiTuError(f"an image array must hold numbers, got {arr.dtype}")
        arr = _scale_to_uint8(arr)  # uint16 from cv2.IMREAD_UNCHANGED, floats from 0..1 pipelines
    return swap_red_blue(arr) if bgr else np.ascontiguousarray(arr)


def crop_box(image: ImageInput, bbox: Sequence[float], *, ndarray_bgr: bool = False) -> Image.Image:
    """The part of ``image`` inside ``bbox`` = (x1, y1, x2, y2) in its pixels, as a PIL image:
    what a box found by the detector becomes when it is taught to the gallery. The box is
    clipped to the image; one with no area left (or not four finite numbers) is refused."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ShiTuError("a box is four numbers: x1, y1, x2, y2 in image pixels") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ShiTuError("a box is four finite numbers: x1, y1, x2, y2 in image pixels")
    rgb = load_image(image, ndarray_bgr=ndarray_bgr)
    h, w = rgb.shape[:2]
    left, top = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
    right, bottom = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
    if right - left < 2 or bottom - top < 2:
        raise ShiTuError(f"the box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has no area inside the {w}×{h} image")
    return Image.fromarray(np.ascontiguousarray(rgb[top:bottom, left:right]))


def list_image_files(directory: str | Path) -> list[Path]:
    """Image files in a directory (not recursive), sorted by name."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def make_thumbnail(rgb: np.ndarray, size: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG preview of an entry for the index metadata: the whole image (never cropped),
    shrunk to fit a ``size`` x ``size`` square, keeping its aspect ratio; smaller images keep
    their size.

    Shrunk by OpenCV's pixel-area averaging: no ringing, and 2-3x cheaper than PIL's Lanczos
    (~1 ms a gallery image on one core where Lanczos took 2-3 ms, a fifth of a worker's time
    per image besides the model); the two differ by ~1.4 grey levels on average over the drink
    gallery. No sharpening: next to Lanczos alone, an unsharp mask made no visible difference
    there (most images shrink by 2x or less) and cost ~8 % more bytes. Busy photos that pass
    ``THUMBNAIL_MAX_BYTES`` are saved again at a lower quality.
    """
    h, w = rgb.shape[:2]
    if max(h, w) > size:
        import cv2

        scale = size / max(h, w)
        fitted = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
        rgb = cv2.resize(np.ascontiguousarray(rgb), fitted, interpolation=cv2.INTER_AREA)
    im = Image.fromarray(rgb)
    data = b""
    for quality in THUMBNAIL_QUALITIES:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality, optimize=True)
        data = buf.getvalue()
        if len(data) <= THUMBNAIL_MAX_BYTES:
            break
    return data


# A photo is on a plain background when nearly all of its border is one colour: a studio shot, a
# cut-out product, a logo on white. Real queries of such a gallery are not, and score lower
# against it than its photos and their views do (:mod:`shitu.calibrate`: the ``plain`` prior).
PLAIN_STRIP = 0.04  # the border: the outer 4 % of each side
PLAIN_TOLERANCE = 12  # grey levels, per channel, from the border's median colour (JPEG noise, soft shadows)
PLAIN_SHARE = 0.8  # of the border's pixels within it


def plain_background(rgb: np.ndarray) -> bool:
    """Whether a photo's border is one plain colour (see :data:`PLAIN_SHARE`).

    >>> plain_background(np.full((100, 80, 3), 250, np.uint8))
    True
    >>> plain_background(np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8))
    False
    """
    a = np.asarray(rgb, dtype=np.int16)
    if a.ndim != 3 or min(a.shape[:2]) < 8:
        return False
    k = max(2, round(PLAIN_STRIP * min(a.shape[:2])))
    border = np.concatenate([a[:k].reshape(-1, 3), a[-k:].reshape(-1, 3), a[:, :k].reshape(-1, 3),
                             a[:, -k:].reshape(-1, 3)])  # fmt: skip
    near = np.abs(border - np.median(border, axis=0)).max(axis=1) <= PLAIN_TOLERANCE
    return bool(near.mean() >= PLAIN_SHARE)


def plain_share(thumbnails: Iterable[bytes | None]) -> float | None:
    """The share of photos on a plain background, read off their thumbnails (``None``: none readable)."""
    flags = []
    for data in thumbnails:
        if not data:
            continue
        try:
            with Image.open(io.BytesIO(data)) as im:
                flags.append(plain_background(np.asarray(im.convert("RGB"))))
        except (OSError, ValueError):
            continue
    return float(np.mean(flags)) if flags else None
