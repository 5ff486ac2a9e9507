"""Gallery uploads (Build, and Manage's Add entries) as a :class:`GalleryBatch`."""

from __future__ import annotations

import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from shitu.errors import ShiTuError
from shitu.gallery import GalleryBatch, decode_text, pairs_from_uploads, parse_label_lines, read_zip_gallery
from shitu.i18n import TEXT
from shitu.i18n import text as say
from shitu.ui.events import I18N

if TYPE_CHECKING:
    from shitu.engine import Engine
    from shitu.ui.events import Wiring


def upload_paths(files: Any) -> list[Path]:
    """The paths of what a ``gr.File`` sent: one file, many, or none."""
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(getattr(f, "name", f)) for f in files if f]


def gallery_files_input(height: int, elem_id: str | None = None) -> gr.File:
    """Where a gallery is uploaded (Build, Add entries): many images, a label file, or one .zip."""
    return gr.File(label=I18N("gallery_files"), file_count="multiple", file_types=["image", ".zip", ".txt"],
                   height=height, elem_id=elem_id)  # fmt: skip


def read_upload(path: Path) -> bytes:
    """An uploaded file's bytes; a file that went missing is a user error."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShiTuError(f"cannot read the uploaded file {path.name}: {exc.strerror}") from exc


def gallery_from_uploads(files: Any, label_file: Any = None, folder_labels: bool = False) -> GalleryBatch:
    """Uploaded images + label file, or one .zip (with or without a label file), as a batch.

    A ``.txt`` among the images is taken as the label file when none is given separately.
    Browsers upload files without their folders, so two files with one name are refused. A
    .zip without a label file takes its folder names as labels, numbered folders only when
    ``folder_labels`` confirms it.
    """
    paths = upload_paths(files)
    label_path = upload_paths(label_file)[0] if upload_paths(label_file) else None
    if label_path is None:
        texts = [p for p in paths if p.suffix.lower() == ".txt"]
        if len(texts) == 1:
            label_path = texts[0]
    paths = [p for p in paths if p != label_path]
    if not paths:
        raise ShiTuError(TEXT["en"]["err_no_gallery"])
    label_bytes = read_upload(label_path) if label_path else None
    if label_bytes is not None and label_path is not None:
        entries, bad = parse_label_lines(decode_text(label_bytes))
        if not entries and not bad:
            raise ShiTuError(say("en", "msg_empty_label_file", name=label_path.name))
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        if len(paths) > 1:
            raise ShiTuError("upload either one .zip or image files, not both")
        batch = read_zip_gallery(str(zips[0]), label_bytes, folder_labels=bool(folder_labels))
    else:
        if label_bytes is None:
            raise ShiTuError("the label file is missing: upload gallery.txt (one `path label` per line)")
        repeated = sorted(name for name, count in Counter(p.name for p in paths).items() if count > 1)
        if repeated:
            raise ShiTuError(
                f"{len(repeated)} file name(s) were uploaded more than once ({', '.join(repeated[:5])}); uploads lose "
                "their folders, so upload the gallery as one .zip instead"
            )
        batch = pairs_from_uploads([(p.name, p) for p in paths], label_bytes)
    if not batch.items:
        reasons = "; ".join(str(s) for s in batch.skipped[:5])
        raise ShiTuError("no image/label pairs could be used" + (f": {reasons}" if reasons else ""))
    return batch


def expect_gallery(engine: Engine, files: Any) -> None:
    """On a gallery upload: count its images (a .zip's from its directory) so the engine can start
    the gallery workers while the user fills in the rest; says nothing, changes nothing."""
    images = 0
    for path in upload_paths(files):
        if path.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    images += sum(not info.is_dir() for info in zf.infolist())
            except (OSError, zipfile.BadZipFile):
                continue  # the build says what is wrong with it
        elif path.suffix.lower() != ".txt":
            images += 1
    if images:
        engine.expect_gallery(images)


def gallery_uploader(w: Wiring) -> Callable[[Any, Any], None]:
    """The handler of a gallery upload (Build, Add entries): starts the gallery workers for a large
    one (see :func:`expect_gallery`), unless the visitor may not change indices."""

    def gallery_uploaded(files: Any, request: gr.Request) -> None:
        if w.access.allowed(request):  # strangers on a read-only Space start nothing
            expect_gallery(w.engine, files)

    return gallery_uploaded
