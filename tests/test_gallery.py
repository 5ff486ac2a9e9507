"""Label files, zip galleries and image decoding: every bad line is reported, never dropped."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from shitu.errors import ShiTuError, TooLarge
from shitu.gallery import (
    GalleryBatch,
    SkippedLine,
    check_image_bytes,
    in_line_order,
    load_image,
    make_thumbnail,
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


def numbered_zip(*folders: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, folder in enumerate(folders):
            zf.writestr(f"{folder}/{n}.jpg", jpeg())
    return buf.getvalue()


def test_zip_with_numbered_folders_and_no_label_file_is_refused():
    with pytest.raises(ShiTuError) as info:
        read_zip_gallery(numbered_zip("109", "0", "1", "2", "10"))
    assert info.value.message == (
        "the .zip has no label file, and its folders are numbered (0, 1, 2, …), not named: add a label file "
        '(one "path label" per line) or confirm that the folder numbers are the labels'
    )
    with pytest.raises(ShiTuError, match=r"folders are numbered \(7\), not named"):
        read_zip_gallery(numbered_zip("cola", "7"))  # one numbered folder among named ones is enough


def test_zip_numbered_folders_are_labels_when_confirmed():
    batch = read_zip_gallery(numbered_zip("0", "109", "cola"), folder_labels=True)
    assert sorted((i.source, i.label) for i in batch.items) == [
        ("0/0.jpg", "0"),
        ("109/1.jpg", "109"),
        ("cola/2.jpg", "cola"),
    ]


def test_zip_named_folders_need_no_confirmation():
    batch = read_zip_gallery(numbered_zip("可乐", "green tea", "7up", "100plus"))
    assert sorted(i.label for i in batch.items) == ["100plus", "7up", "green tea", "可乐"]


def test_zip_numbered_folders_with_a_label_file_are_fine():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("gallery.txt", "0/a.jpg cola\n")
        zf.writestr("0/a.jpg", jpeg())
    assert [i.label for i in read_zip_gallery(buf.getvalue()).items] == ["cola"]


def test_skipped_lines_are_in_line_order(tmp_path):
    """Lines without a label are found while parsing, missing images later: listed by line."""
    text = "missing1.jpg cola\nnolabel.jpg\nmissing3.jpg tea\n#\nnolabel5.jpg\n"
    (tmp_path / "g.txt").write_text(text, "utf-8")
    assert [s.line_no for s in read_label_file(tmp_path / "g.txt").skipped] == [1, 2, 3, 5]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("g.txt", text)
    assert [s.line_no for s in read_zip_gallery(buf.getvalue()).skipped] == [1, 2, 3, 5]
    assert [s.line_no for s in pairs_from_uploads([], text).skipped] == [1, 2, 3, 5]
    batch = GalleryBatch(skipped=[SkippedLine(3, "c", "x"), SkippedLine(None, "z", "y"), SkippedLine(1, "a", "x")])
    with pytest.raises(ShiTuError, match=r"line 1: x; line 3: x; z: y"):
        batch.require_clean()
    assert [s.line_no for s in in_line_order(batch.skipped)] == [1, 3, None]


@pytest.mark.parametrize("size", [(640, 480), (300, 1200), (150, 100), (4032, 3024)])
def test_thumbnails_show_the_whole_image_fitted_in_a_square(size):
    """Never cropped: the aspect ratio is kept; shrunk to fit 224 px, small images not enlarged."""
    width, height = size
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, :] = (40, 90, 200)
    f = max(4, max(width, height) // 40)  # a frame a few thumbnail pixels wide: all of it only if uncropped
    rgb[:f, :] = rgb[-f:, :] = rgb[:, :f] = rgb[:, -f:] = (250, 250, 0)
    data = make_thumbnail(rgb)
    thumb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    th, tw = thumb.shape[:2]
    scale = min(224 / max(width, height), 1)
    assert max(tw, th) == round(max(width, height) * scale)
    assert abs(tw / th - width / height) < 0.02 * width / height + 1 / min(tw, th)
    for edge in (thumb[0], thumb[-1], thumb[:, 0], thumb[:, -1]):
        assert edge[:, :2].mean() > 150 and edge[:, 2].mean() < 130, "the frame survives on every side"
    assert len(data) <= 15 << 10


def test_busy_thumbnails_stay_modest():
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)  # worst case for JPEG
    data = make_thumbnail(noise)
    assert Image.open(io.BytesIO(data)).size == (224, 224) and len(data) < 40 << 10


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
        (b"", r"is empty \(0 bytes\)"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "is a HEIC photo, which cannot be read here: save"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "not a readable image"),
        (np.zeros((0, 5, 3), np.uint8), "HxWx3"),
        (np.zeros((4, 5, 7), np.uint8), "HxWx3"),
    ],
)
def test_bad_images(src, raises):
    with pytest.raises(ShiTuError, match=raises):
        load_image(src)


def test_a_photo_cut_short_says_so(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), np.uint8)).save(buf, format="JPEG")
    cut = tmp_path / "holiday.jpg"
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ShiTuError, match="^holiday.jpg is damaged or cut short"):
        load_image(cut)
    (tmp_path / "notes.jpg").write_text("a text file named .jpg", encoding="utf-8")
    with pytest.raises(ShiTuError, match="^notes.jpg is not an image"):
        load_image(tmp_path / "notes.jpg")


def test_decompression_bomb_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # tiny file, 25 Mpx
    with pytest.raises(TooLarge, match="limit"):
        load_image(buf.getvalue(), max_pixels=1_000_000)


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


# --- zip bombs and damaged archives ------------------------------------------------------------


def raw_zip(members: list[dict]) -> bytes:
    """A .zip written by hand, so headers can claim what a test needs. Each member: ``name``,
    ``payload`` (bytes as stored), ``size`` (unpacked), ``crc``, ``method`` (0 stored, 8
    deflate), ``flags``."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m["name"].encode()
        method, flags, crc, size, payload = m.get("method", 0), m.get("flags", 0), m["crc"], m["size"], m["payload"]
        offset = len(out)
        dostime, dosdate = 0, 0x21  # 1980-01-01 00:00
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, method, dostime, dosdate,
                           crc, len(payload), size, len(name), 0) + name + payload  # fmt: skip
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, flags, method, dostime, dosdate,
                               crc, len(payload), size, len(name), 0, 0, 0, 0, 0, offset) + name  # fmt: skip
    start = len(out)
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), start, 0)
    return bytes(out)


def stored(name: str, data: bytes, **overrides) -> dict:
    return {"name": name, "payload": data, "size": len(data), "crc": zlib.crc32(data)} | overrides


def deflated_zeros(name: str, mib: int) -> dict:
    """``mib`` MiB of zeros, deflated to about 1 KiB per MiB without compressing them all:
    a fully flushed deflate segment does not refer back, so it can be repeated."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = comp.compress(bytes(1 << 20)) + comp.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return {"name": name, "payload": segment * mib + comp.flush(), "size": mib << 20, "crc": crc, "method": 8}


def test_hand_written_zips_are_valid():
    data = raw_zip([stored("cola/a.jpg", jpeg()), deflated_zeros("cola/z.bmp", 2)])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None and zf.read("cola/a.jpg") == jpeg()


def test_zip_bomb_is_refused_without_unpacking_it():
    """1 GiB of zeros packed into about 1 MiB: refused with memory use far below its size."""
    bomb = raw_zip([stored("cola/a.jpg", jpeg()), deflated_zeros("cola/bomb.bmp", 1024)])
    assert len(bomb) < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="bomb.bmp in the .zip unpacks to more than 64 MiB"):
            read_zip_gallery(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"reading the bomb allocated {peak / 2**20:.0f} MiB"


def test_zip_caps_are_parameters_and_checked_while_unpacking():
    bomb = raw_zip([deflated_zeros("cola/bomb.bmp", 8)])
    with pytest.raises(TooLarge, match="possible zip bomb"):  # under the size caps, but 1000:1
        read_zip_gallery(bomb)
    with pytest.raises(TooLarge, match="more than 1 MiB, the limit per file"):
        read_zip_gallery(bomb, max_member=1 << 20, max_ratio=10_000)
    rng = np.random.default_rng(0)
    photos = [stored(f"cola/{i}.jpg", rng.bytes(1 << 20)) for i in range(3)]  # incompressible
    with pytest.raises(TooLarge, match="limit for a whole .zip"):
        read_zip_gallery(raw_zip(photos), max_total=(5 << 20) // 2)
    batch = read_zip_gallery(raw_zip(photos), max_total=3 << 20)
    assert len(batch.items) == 3


def test_zip_header_claiming_less_than_the_data_is_damaged_not_trusted():
    member = deflated_zeros("cola/bomb.bmp", 64)
    member["size"] = 1000  # the real stream unpacks to 64 MiB
    tracemalloc.start()
    try:
        with pytest.raises(ShiTuError, match="the .zip is damaged: cola/bomb.bmp fails its checksum"):
            read_zip_gallery(raw_zip([member]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


def _truncated_stream() -> dict:
    data = bytes(range(256)) * 4096
    packed = zlib.compress(data)[2:-4]  # raw deflate
    return {"name": "cola/a.bmp", "payload": packed[: len(packed) // 2], "size": len(data),
            "crc": zlib.crc32(data), "method": 8}  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (raw_zip([stored("cola/a.jpg", jpeg(), crc=1)]), "the .zip is damaged: cola/a.jpg fails its checksum"),
        (raw_zip([stored("cola/a.jpg", jpeg(), flags=0x1)]), "cola/a.jpg in the .zip is encrypted"),
        (raw_zip([stored("cola/a.jpg", jpeg(), method=99)]), "unsupported compression method"),
        (raw_zip([_truncated_stream()]), "the .zip is damaged: cola/a.bmp is cut short"),
        (raw_zip([stored("cola/a.jpg", jpeg())])[:-30], "the .zip is damaged"),
        (raw_zip([stored("cola/a.jpg", jpeg())])[:40], "the .zip is damaged"),
        (b"GIF89a not a zip", "not a .zip file"),
    ],
    ids=["bad-crc", "encrypted", "unknown-method", "truncated-member", "no-end-record", "truncated", "not-a-zip"],
)  # fmt: skip
def test_damaged_zips_get_clear_messages(data, message):
    with pytest.raises(ShiTuError) as info:
        read_zip_gallery(data)
    assert message in info.value.message
    assert "Error" not in info.value.message and "/" not in info.value.message.replace("cola/", "")


def test_zip_path_errors_do_not_show_server_paths(tmp_path):
    with pytest.raises(ShiTuError) as info:
        read_zip_gallery(tmp_path / "missing.zip")
    assert str(tmp_path) not in info.value.message


# --- image depth, modes and shapes --------------------------------------------------------------


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


GRADIENT = np.arange(256, dtype=np.uint8)[None, :].repeat(4, axis=0)  # 0..255 left to right


def assert_gradient(rgb: np.ndarray) -> None:
    row = rgb[0, :, 0].astype(int)
    assert np.abs(row - np.arange(256)).max() <= 1, f"not the 0..255 gradient: {row[::32]}"
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_keeps_its_gradient(fmt):
    im = Image.fromarray(GRADIENT.astype(np.uint16) * 257)  # mode I;16, 0..65535
    assert Image.open(io.BytesIO(encoded(im, fmt))).mode == "I;16"
    assert_gradient(load_image(encoded(im, fmt)))


def test_16_bit_big_endian_and_32_bit_integer_greyscale():
    big = Image.frombytes("I;16B", (256, 4), (GRADIENT.astype(">u2") * 257).tobytes())
    assert_gradient(load_image(encoded(big, "TIFF")))
    assert_gradient(load_image(Image.fromarray(GRADIENT.astype(np.int32) * 257)))  # mode I, 16-bit values
    assert_gradient(load_image(GRADIENT.astype(np.uint16) * 257))  # cv2.IMREAD_UNCHANGED of a 16-bit PNG


@pytest.mark.parametrize(
    "values",
    [GRADIENT / 255.0, GRADIENT * 1.0, (GRADIENT - 128.0) * 0.01],  # 0..1, 0..255, -1.28..1.27
)
def test_float_images_keep_their_gradient(values):
    im = Image.fromarray(values.astype(np.float32))
    assert im.mode == "F"
    assert_gradient(load_image(encoded(im, "TIFF")))
    assert_gradient(load_image(values.astype(np.float32)))


def test_float_nan_and_constant_images_do_not_crash():
    values = (GRADIENT / 255.0).astype(np.float32)
    values[0, 0] = np.nan
    assert load_image(Image.fromarray(values))[0, 0].tolist() == [0, 0, 0]
    assert load_image(Image.fromarray(np.full((4, 4), 7.5e6, np.float32))).shape == (4, 4, 3)


def test_transparency_goes_on_white_and_other_modes_decode():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (200, 10, 10, 255))
    out = load_image(encoded(rgba, "PNG"))
    assert out[0, 0].tolist() == [200, 10, 10] and out[3, 3].tolist() == [255, 255, 255]
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(encoded(la, "PNG"))[0, 0].tolist() == [255, 255, 255]
    palette = rgba.convert("P")
    assert load_image(encoded(palette, "PNG"))[3, 3].tolist() == [255, 255, 255]
    bits = Image.fromarray(np.eye(4, dtype=bool))
    assert bits.mode == "1"
    assert load_image(encoded(bits, "PNG"))[..., 0].tolist() == (np.eye(4) * 255).tolist()
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    for fmt in ("JPEG", "TIFF"):
        r, g, b = load_image(encoded(cmyk, fmt))[4, 4].tolist()
        assert r > 200 and g < 50 and b < 50, fmt


@pytest.mark.parametrize("size", [(66000, 10), (30001, 400), (10, 1001)])
def test_absurd_shapes_are_refused_from_the_header(size):
    data = encoded(Image.new("L", size), "PNG")
    with pytest.raises(ShiTuError, match=f"{size[0]}x{size[1]} pixels") as info:
        load_image(data)
    assert "is over 100 times" in info.value.message or isinstance(info.value, TooLarge)
    with pytest.raises(ShiTuError):
        check_image_bytes(data, "image")
    with pytest.raises(ShiTuError):
        load_image(np.zeros((size[1], size[0]), np.uint8))


@pytest.mark.parametrize("size", [(4000, 200), (200, 4000), (30000, 300)])
def test_long_images_within_limits_are_accepted(size):
    assert load_image(encoded(Image.new("L", size), "PNG")).shape == (size[1], size[0], 3)


def test_red_and_blue_swap_like_numpy_for_photos_crops_and_odd_arrays():
    import numpy as np

    from shitu.gallery import swap_red_blue

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    for arr in (photo, photo[5:30, 11:40], photo[::2, ::3], rgba[..., :3], photo.astype(np.float32)):
        out = swap_red_blue(arr)
        assert np.array_equal(out, arr[..., ::-1]) and out.flags["C_CONTIGUOUS"]
