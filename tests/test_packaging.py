"""The project installs as a package: ``pip install .`` gives a ``shitu`` command and an importable
``shitu`` from any directory (checked in a throwaway venv that borrows the running interpreter's
dependencies); the lock files pin what the sources ask for."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_install_gives_a_console_script_and_an_importable_package(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # borrow the dependencies this interpreter has (a venv itself, in CI), after the venv's own packages
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    borrowed = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(purelib) / "borrowed.pth").write_text("\n".join(borrowed) + "\n", encoding="utf-8")
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
    # package data: the report's templates are installed with it, and load
    templates = subprocess.run(
        [str(python), "-c", "from shitu.report.templating import environment; from shitu.report import curve_svg; "
         "print(sorted(environment().list_templates())); print(curve_svg(None))"],
        capture_output=True, text=True, cwd=elsewhere,
    )  # fmt: skip
    assert templates.returncode == 0, templates.stderr[-2000:]
    assert "['curve.svg', 'map.svg', 'page.css', 'page.html']" in templates.stdout
    assert "No threshold curve" in templates.stdout


# --- the lock: the tested install is the install ------------------------------------------------
def _locked(lock: str) -> dict[str, set[str]]:
    pins: dict[str, set[str]] = {}
    for line in (ROOT / lock).read_text(encoding="utf-8").splitlines():
        found = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?: ;.*)? \\$", line)
        if found:
            pins.setdefault(_canonical(found[1]), set()).add(found[2])
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize(
    "lock, sources",
    [("requirements.lock", ["requirements.in"]),
     ("requirements-milvus.lock", ["requirements.in", "requirements-milvus.in"]),
     ("requirements-hpi.lock", ["requirements.in", "requirements-hpi.in"]),
     ("requirements-dev.lock", ["requirements.in", "requirements-milvus.in", "requirements-hpi.in",
                                "requirements-dev.in"])],
)  # fmt: skip
def test_each_lock_pins_what_its_sources_ask_for_with_hashes(lock, sources):
    """Editing a .in file without `bash .ci/lock` is caught here, not on a user's machine."""
    from packaging.requirements import Requirement

    pins = _locked(lock)
    text = (ROOT / lock).read_text(encoding="utf-8")
    for source in sources:
        for line in (ROOT / source).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            req = Requirement(line)
            versions = pins.get(_canonical(req.name))
            assert versions, f"{req.name} ({source}) is not in {lock}: run `bash .ci/lock`"
            assert any(req.specifier.contains(v, prereleases=True) for v in versions), (source, line, versions)
    # every pinned distribution is followed by its hashes (pip's hash-checking mode needs all of them)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            assert line.endswith(" \\") and lines[i + 1].strip().startswith("--hash=sha256:"), (lock, line)


def test_the_package_ranges_admit_the_locked_versions():
    """pyproject.toml's loose ranges (for library users) include what the app is tested with."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = _locked("requirements-dev.lock")
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *extras["milvus"], *extras["hpi"]]
    for text in declared:
        req = Requirement(text)
        versions = pins.get(_canonical(req.name))
        assert versions, f"{req.name} is declared in pyproject.toml but not locked"
        assert all(req.specifier.contains(v, prereleases=True) for v in versions), (text, versions)
    # and every direct dependency of the app is declared for library users too
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.in").read_text(encoding="utf-8").splitlines()]
    app = {_canonical(Requirement(line).name) for line in lines if line}
    assert app == {_canonical(Requirement(t).name) for t in project["dependencies"]}
