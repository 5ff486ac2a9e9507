"""PaddleX-style prediction inputs → a list of ``(name, load_rgb)`` pairs.

The list is made eagerly, so a bad input (a missing file, an empty directory, an unsupported
type, a dict without ``"img"``) is reported when ``predict`` is called, not when its generator
is first advanced; the images themselves are read one at a time, when their turn comes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shitu.config import Settings
from shitu.errors import NotFound, ShiTuError
from shitu.gallery import list_image_files, load_image

Loader = Callable[[], np.ndarray]


def iter_inputs(input: Any, settings: Settings, *, bgr_arrays: bool = True) -> list[tuple[str | None, Loader]]:
    """Flatten arrays (BGR when ``bgr_arrays``, as PaddleX), PIL images, bytes, paths, http(s)
    URLs, directories, ``{"img": ...}`` dicts and lists of these."""
    from shitu.net import fetch_url

    limit = settings.max_image_pixels
    out: list[tuple[str | None, Loader]] = []

    def visit(item: Any) -> None:
        if isinstance(item, dict):
            if "img" not in item:
                raise ShiTuError('a dict input needs an "img" key')
            visit(item["img"])
        elif isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        elif isinstance(item, np.ndarray):
            out.append((None, lambda: load_image(item, max_pixels=limit, ndarray_bgr=bgr_arrays)))
        elif isinstance(item, (Image.Image, bytes, bytearray)):
            data = bytes(item) if isinstance(item, bytearray) else item
            out.append((None, lambda: load_image(data, max_pixels=limit)))
        elif isinstance(item, (str, Path)):
            text = str(item)
            if text.startswith(("http://", "https://")):
                out.append((text, lambda: load_image(fetch_url(text), max_pixels=limit)))
            elif Path(text).is_dir():
                files = list_image_files(text)
                if not files:
                    raise ShiTuError(f"no images in directory {text}")
                out.extend((str(f), (lambda f=f: load_image(f, max_pixels=limit))) for f in files)
            elif Path(text).is_file():
                out.append((text, lambda: load_image(text, max_pixels=limit)))
            else:
                raise NotFound(f"no such image file or directory: {text}")
        else:
            raise ShiTuError(f"unsupported input type {type(item).__name__}")

    visit(input)
    if not out:
        raise ShiTuError("no input images were given")
    return out
