"""Label files, zip galleries and image decoding: every bad line is reported, never dropped."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from shitu.errors import ShiTuError
from shitu.gallery import (
    load_image,
    pairs_from_uploads,
    parse_label_lines,
    read_label_file,
    read_zip_gallery,
)


def jpeg(color=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.jpg cola\n", [(1, "a.jpg", "cola")]),
        ("a.jpg\tgreen tea\n", [(1, "a.jpg", "green tea")]),  # tab, label with a space
        ("a.jpg coca cola zero\n", [(1, "a.jpg", "coca cola zero")]),  # PaddleX crashes on this
        ("\ufeffa.jpg 脉动\r\nb.jpg 红牛\r\n", [(1, "a.jpg", "脉动"), (2, "b.jpg", "红牛")]),  # BOM + CRLF
        ("# comment\n\n  a.jpg   x  \n", [(3, "a.jpg", "x")]),
    ],
)
def test_parse_label_lines(text, expected):
    entries, skipped = parse_label_lines(text)
    assert entries == expected and skipped == []


def test_line_without_label_is_reported():
    entries, skipped = parse_label_lines("a.jpg x\nb.jpg\n")
    assert entries == [(1, "a.jpg", "x")]
    assert [(s.line_no, s.source) for s in skipped] == [(2, "b.jpg")]


def test_non_utf8_label_file(tmp_path):
    (tmp_path / "g.txt").write_bytes("a.jpg 可乐\n".encode("gbk"))
    with pytest.raises(ShiTuError, match="not UTF-8"):
        read_label_file(tmp_path / "g.txt")


def test_read_label_file_reports_missing_by_line(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "img" / "my photo.jpg").write_bytes(jpeg())
    (tmp_path / "g.txt").write_text("img/a.jpg cola\nimg/missing.jpg tea\nimg/my photo.jpg milk tea\n", "utf-8")
    batch = read_label_file(tmp_path / "g.txt", tmp_path)
    assert [(i.source, i.label) for i in batch.items] == [("img/a.jpg", "cola"), ("img/my photo.jpg", "milk tea")]
    assert [(s.line_no, s.source) for s in batch.skipped] == [(2, "img/missing.jpg")]
    with pytest.raises(ShiTuError, match="line 2"):
        batch.require_clean()


def test_zip_with_label_file_and_wrapping_folder():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("drinks/gallery.txt", "0/a.jpg\tcola zero\n1/b.jpg tea\n1/c.jpg gone\n")
        zf.writestr("drinks/0/a.jpg", jpeg())
        zf.writestr("drinks/1/b.jpg", jpeg((0, 200, 0)))
        zf.writestr("../evil.jpg", jpeg())  # zip-slip entries are ignored
    batch = read_zip_gallery(buf.getvalue())
    assert [(i.source, i.label) for i in batch.items] == [("0/a.jpg", "cola zero"), ("1/b.jpg", "tea")]
    assert [(s.line_no, s.reason) for s in batch.skipped] == [(3, "image not found in the .zip")]


def test_zip_folders_as_labels():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cola/1.jpg", jpeg())
        zf.writestr("tea/2.png", jpeg())
        zf.writestr("loose.jpg", jpeg())
    batch = read_zip_gallery(buf.getvalue())
    assert sorted((i.source, i.label) for i in batch.items) == [("cola/1.jpg", "cola"), ("tea/2.png", "tea")]
    assert [s.source for s in batch.skipped] == ["loose.jpg"]


def test_not_a_zip():
    with pytest.raises(ShiTuError, match="zip"):
        read_zip_gallery(b"PK\x03\x04 broken")


def test_uploads_matched_by_name():
    batch = pairs_from_uploads([("/tmp/x/a.jpg", jpeg()), ("b.jpg", jpeg())], "sub/a.jpg cola\nb.jpg tea\nc.jpg x\n")
    assert [(i.source, i.label) for i in batch.items] == [("sub/a.jpg", "cola"), ("b.jpg", "tea")]
    assert [s.line_no for s in batch.skipped] == [3]


@pytest.mark.parametrize(
    ("src", "raises"),
    [
        (b"not an image", "not a readable image"),
        (b"", "not a readable image"),
        (np.zeros((0, 5, 3), np.uint8), "HxWx3"),
        (np.zeros((4, 5, 7), np.uint8), "HxWx3"),
    ],
)
def test_bad_images(src, raises):
    with pytest.raises(ShiTuError, match=raises):
        load_image(src)


def test_decompression_bomb_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # tiny file, 25 Mpx
    with pytest.raises(ShiTuError, match="limit") as info:
        load_image(buf.getvalue(), max_pixels=1_000_000)
    assert info.value.status == 413


def test_color_order_and_exif():
    bgr = np.zeros((2, 3, 3), np.uint8)
    bgr[..., 0] = 255  # blue in BGR
    assert load_image(bgr)[0, 0].tolist() == [0, 0, 255]
    assert load_image(bgr, ndarray_bgr=False)[0, 0].tolist() == [255, 0, 0]
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90°
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).shape == (40, 20, 3)
