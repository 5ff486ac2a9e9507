"""The model worker process starts from any kind of parent: a script without a main guard, stdin,
a notebook — it is a fresh interpreter, never a re-run of the parent's ``__main__``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MODEL_CACHE

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = f"""
import numpy as np
from shitu.config import PipelineConfig, Settings
from shitu.runtime import Runtime
print("top-level code ran")  # a spawn-based worker would run this again
rt = Runtime(PipelineConfig(), Settings.from_env(data_dir={{data!r}}, model_dir={str(MODEL_CACHE)!r}, offline=True),
             isolate=True)
regions, feats, _ = rt.analyze(np.full((80, 60, 3), 90, np.uint8), 0.25, "always")
print("features", feats.shape, "restarts", rt.restarts)
rt.close()
"""


@pytest.mark.slow
def test_worker_starts_from_stdin_and_from_an_unguarded_script(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(SCRIPT.format(data=str(tmp_path / "a")), encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    runs = [([sys.executable, str(script)], None), ([sys.executable, "-"], SCRIPT.format(data=str(tmp_path / "b")))]
    for argv, stdin in runs:
        done = subprocess.run(argv, input=stdin, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-1500:]
        assert done.stdout.count("top-level code ran") == 1, "the worker must not re-run the parent's script"
        assert "features (1, 1280) restarts 0" in done.stdout
        assert "leaked shared_memory" not in done.stderr


def test_a_closed_worker_never_starts_again(tmp_path):
    """A request racing a shutdown must not start a new worker whose shared memory nobody frees."""
    import numpy as np

    from shitu.config import PipelineConfig
    from shitu.errors import Unavailable
    from shitu.runtime import Runtime
    from tests.conftest import make_settings

    rt = Runtime(PipelineConfig(), make_settings(tmp_path), isolate=True)
    executor = rt._executor  # a call that got past the runtime's own check just before close()
    rt.close()
    with pytest.raises(Unavailable, match="shutting down"):
        executor.call("embed", [np.zeros((32, 32, 3), np.uint8)], None)
    assert executor._proc is None and executor._shm is None
