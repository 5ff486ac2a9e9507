"""What Paddle's native code prints on its own, and keeping it out of a command's output.

Paddle 3.x and PaddleX 3.7 print lines no one can act on: glog INFO/WARNING lines from the C++
side, a debug print in a oneDNN kernel, IR pass banners, a Python warning at import. The model
worker's log drops them (:mod:`shitu.runtime`) and the CLI keeps them off its stdout
(:func:`native_stdout_filtered`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from collections.abc import Iterator

PADDLE_NOISE = re.compile(
    r"(?:\x1b\[[0-9;]*m)*(?:"
    r"[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] "  # glog INFO / WARNING
    r"|\w+CheckIfOneDNNSupport\s*$"
    r"|--- Running (?:analysis|IR pass)"
    r"|.*(?:UserWarning: No ccache found|Tensor do not have 'place' interface)"
    r"|\s+warnings\.warn\("  # the source line Python prints under a warning
    r"|\s*\[(?:TimeInfo|SignalInfo): \*\*\*"  # under Paddle's crash summary (we say which signal)
    r")"
)


@contextlib.contextmanager
def native_stdout_filtered() -> Iterator[None]:
    """Keep stdout for the command's own output: Paddle's C++ side, which runs in this process,
    prints straight to file descriptor 1 (a oneDNN kernel's ``ReduceMeanCheckIfOneDNNSupport``),
    which would land among ``--json`` lines. Here descriptor 1 goes to a pipe whose lines reach
    stderr unless they are the noise the model worker's log leaves out too; Python's own
    ``sys.stdout`` keeps writing to the real stdout. Does nothing when ``sys.stdout`` is not
    descriptor 1 (a test's capture)."""
    try:
        if sys.stdout.fileno() != 1:
            raise ValueError
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    real = os.dup(1)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.close(write)

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for raw in iter(pipe.readline, b""):
                if raw.strip() and not PADDLE_NOISE.match(raw.decode("utf-8", "replace")):
                    os.write(2, raw)

    thread = threading.Thread(target=forward, name="shitu-native-stdout", daemon=True)
    thread.start()
    python_stdout = sys.stdout
    sys.stdout = io.TextIOWrapper(os.fdopen(real, "wb", closefd=False), encoding=python_stdout.encoding,
                                  errors=python_stdout.errors, line_buffering=True)  # fmt: skip
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = python_stdout
        os.dup2(real, 1)  # closes the pipe's last writer: the forwarder reads to the end and stops
        os.close(real)
        thread.join(timeout=5)
