"""The project installs as a package: ``pip install .`` gives a ``shitu`` command and an importable
``shitu`` from any directory (checked in a throwaway venv that borrows the installed dependencies)."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_gives_a_console_script_and_an_importable_package(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # a copy, so the build leaves nothing in the checkout
    src = tmp_path / "src"
    subprocess.run(
        [sys.executable, "-c", "import shutil,sys; shutil.copytree(sys.argv[1], sys.argv[2], "
         "ignore=shutil.ignore_patterns('.git', '__pycache__', 'build', '*.egg-info', '.venv'))", str(ROOT), str(src)],
        check=True,
    )  # fmt: skip
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    helped = subprocess.run([str(env_dir / "bin" / "shitu"), "--help"], capture_output=True, text=True, cwd=elsewhere)
    assert helped.returncode == 0 and "build" in helped.stdout and "predict" in helped.stdout
    imported = subprocess.run(
        [str(python), "-c", "import shitu; from shitu import create_pipeline; print(shitu.__file__)"],
        capture_output=True, text=True, cwd=elsewhere,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert str(env_dir) in imported.stdout, "imported from the installed package, not the checkout"
