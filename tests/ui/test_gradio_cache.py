"""/gradio_api/file= responses keep their length: Gradio's image cache is never rewritten under a
response (shitu.ui.gradio_cache). It used to truncate and rewrite a cached thumbnail each time a
handler returned it again, so a browser reading it got less than the declared Content-Length
(h11 LocalProtocolError in the log, net::ERR_CONTENT_LENGTH_MISMATCH in the browser)."""

from __future__ import annotations

import logging
import os
import threading

import gradio as gr
import httpx
import numpy as np
from fastapi import FastAPI
from gradio import processing_utils
from PIL import Image

from shitu.api import serving
from shitu.ui import gradio_cache


def picture(seed: int = 0, side: int = 600) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype("uint8"))


def test_a_cached_image_is_kept_and_a_new_one_written_whole(tmp_path, monkeypatch):
    writes = []
    real = gradio_cache.write_bytes_atomic
    monkeypatch.setattr(gradio_cache, "write_bytes_atomic", lambda path, data: writes.append(path) or real(path, data))
    first = gradio_cache.save_pil_to_cache(picture(), str(tmp_path))
    inode = os.stat(first).st_ino
    again = gradio_cache.save_pil_to_cache(picture(), str(tmp_path))
    assert again == first and os.stat(again).st_ino == inode and len(writes) == 1, "the same file, untouched"
    other = gradio_cache.save_pil_to_cache(picture(1), str(tmp_path))
    assert other != first and len(writes) == 2
    assert not [p for p in tmp_path.rglob(".*")], "no temp file left behind"


def test_the_studio_installs_it(engine):
    from shitu.ui import build_demo

    build_demo(engine)
    assert processing_utils.save_pil_to_cache is gradio_cache.save_pil_to_cache


def test_file_responses_keep_their_length_while_the_image_is_returned_again(caplog):
    gradio_cache.install()
    image = picture(side=200)  # a thumbnail: rewritten often enough that an unfixed cache fails ~1 in 3
    with gr.Blocks() as demo:
        gr.Gallery()
    app = gr.mount_gradio_app(FastAPI(), demo, path="/")
    path = processing_utils.save_pil_to_cache(image, demo.GRADIO_CACHE)
    size = os.path.getsize(path)
    stop = threading.Event()

    def returned_again() -> None:  # what the Manage tab's refreshes did with the same thumbnails
        while not stop.is_set():
            processing_utils.save_pil_to_cache(image, demo.GRADIO_CACHE)

    caplog.set_level(logging.ERROR)
    with serving(app) as url:
        thread = threading.Thread(target=returned_again)
        thread.start()
        try:
            with httpx.Client() as client:
                lengths = [len(client.get(f"{url}gradio_api/file={path}").content) for _ in range(150)]
        finally:
            stop.set()
            thread.join()
    assert lengths == [size] * 150
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
