"""Gradio's image cache, written so that a file being served is never rewritten under it.

Every PIL image or array a handler returns (result images, evidence, previews, examples) goes
through ``gradio.processing_utils.save_pil_to_cache``, which names the file after its content and
rewrites it in place (truncate, then write) each time the same picture is returned again. The
Manage tab returns the same thumbnails on every refresh, so the browser was often reading
``/gradio_api/file=…/image.webp`` while another event truncated it: the response declared the old
length, found less, and uvicorn logged ``h11 LocalProtocolError: Too little data for declared
Content-Length`` (the browser: ``net::ERR_CONTENT_LENGTH_MISMATCH``, a broken thumbnail).

:func:`install` replaces it with a version that keeps an existing file (same name, same content)
and writes a new one to a temp name first, then renames it into place, as Gradio's own
``save_file_to_cache`` already does for files.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradio import processing_utils
from PIL import Image

from shitu.fsutil import write_bytes_atomic


def save_pil_to_cache(img: Image.Image, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """Gradio's ``save_pil_to_cache`` (same arguments, same content-addressed path), but never
    rewriting a file a response may be reading."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    path = (Path(cache_dir) / processing_utils.hash_bytes(data) / f"{name}.{format}").resolve()
    if path.is_file() and path.stat().st_size == len(data):  # the name is the content's hash: it is this image
        try:
            os.utime(path)  # Gradio's delete_cache ages files by time: this is a fresh reference
        except OSError:
            pass
        return str(path)
    write_bytes_atomic(path, data)
    return str(path)



def install() -> None:
    """Use :func:`save_pil_to_cache` for every component (idempotent). Gradio's components and
    ``save_img_array_to_cache`` look it up on ``gradio.processing_utils`` at each call."""
    processing_utils.save_pil_to_cache = save_pil_to_cache
