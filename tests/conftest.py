"""Shared fixtures: real starter models (prepared once per machine), tiny real-photo galleries.

The test run is hermetic: before anything is imported, every cache and scratch place that a
library or the app would find from the environment (``HOME``, ``XDG_CACHE_HOME``, PaddleX's
``PADDLE_PDX_CACHE_HOME``, Gradio's temp dir, ``TMPDIR``, the data dir) points into one
temporary directory of this run, and the developer's own ``SHITU_*`` settings are dropped. So
a real PaddleX cache with official (or foreign) model dirs, or a stray setting, cannot change
what the tests see, and nothing is written outside it.

The one thing shared between runs, read-only once made, is the starter pack built from the
registry weights: ``$SHITU_TEST_MODEL_DIR`` (default ``<system temp>/shitu-test-models-<uid>``),
so only the first run on a machine downloads and converts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

_SYSTEM_TMP = Path(tempfile.gettempdir())
MODEL_CACHE = Path(os.environ.get("SHITU_TEST_MODEL_DIR") or _SYSTEM_TMP / f"shitu-test-models-{os.getuid()}")
SANDBOX = Path(tempfile.mkdtemp(prefix="shitu-test-env-"))


def _hermetic_environment() -> None:
    for key in [k for k in os.environ if k.startswith(("SHITU_", "PADDLE_PDX_", "GRADIO_")) and not k.startswith(
            "SHITU_TEST_")]:  # fmt: skip
        del os.environ[key]
    places = {"HOME": "home", "XDG_CACHE_HOME": "home/.cache", "XDG_CONFIG_HOME": "home/.config",
              "PADDLE_PDX_CACHE_HOME": "paddlex", "GRADIO_TEMP_DIR": "gradio", "MPLCONFIGDIR": "matplotlib",
              "TMPDIR": "tmp", "SHITU_DATA_DIR": "data"}  # fmt: skip
    for key, rel in places.items():
        (SANDBOX / rel).mkdir(parents=True, exist_ok=True)
        os.environ[key] = str(SANDBOX / rel)
    os.environ["SHITU_TEST_MODEL_DIR"] = str(MODEL_CACHE)  # child processes (a child pytest too) share it
    tempfile.tempdir = None  # re-read TMPDIR


_hermetic_environment()

import pytest  # noqa: E402  (after the environment is set: imports may read it)

from shitu.config import PipelineConfig, Settings  # noqa: E402
from shitu.engine import Engine  # noqa: E402
from shitu.paddlex_api import ShiTuPipeline  # noqa: E402
from shitu.runtime import Runtime  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full", action="store_true", help="also run the slow and browser tests (CI and README's test command do)"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run's sandbox goes away after a green run; a red one keeps it for a look."""
    if exitstatus == 0:
        shutil.rmtree(SANDBOX, ignore_errors=True)
    else:
        print(f"\ntest sandbox kept for inspection: {SANDBOX}")


FULL_ONLY = ("slow", "browser", "milvus")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without ``--full``, a fast subset: tests marked ``slow``, ``browser`` or ``milvus`` are skipped."""
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow/browser/milvus test: run with --full")
    for item in items:
        if any(item.get_closest_marker(mark) for mark in FULL_ONLY):
            item.add_marker(skip)


def wait_until(check, what: str, limit: float = 120.0):
    """Poll ``check`` until it returns something truthy (a bounded wait, not a timing assertion)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


# For scripts run in a child process that must die like a SIGKILL at one chosen point of a
# save: they set ``nth`` and ``crash_on`` ("replace" or "unlink") first; the ``nth`` call of
# that function ends the process before it returns.
CRASH_AT_NTH_CALL = r"""
calls = [0]

def crashing(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            os._exit(17)  # like a kill: no finally block, no clean-up
        return real(*args, **kwargs)
    return call

if crash_on == "replace":
    os.replace = crashing(os.replace)
else:
    pathlib.Path.unlink = crashing(pathlib.Path.unlink)
"""


# SHITU_TEST_VECTOR_STORE=milvus runs the same tests with every named index in Milvus (Lite),
# which is how tests/test_backend_parity.py proves both backends behave the same
VECTOR_STORE = os.environ.get("SHITU_TEST_VECTOR_STORE", "faiss")


def stored_state(engine) -> dict[str, str]:
    """A fingerprint of everything stored for the engine's named indices: every file under
    the data dir's indices (faiss), or each gallery's rows, vectors and version (Milvus)."""
    import hashlib

    store = engine._store
    if engine.settings.vector_store == "faiss":
        root = engine.settings.indices_dir
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
        }
    out = {}
    for name in store.names():
        digest = hashlib.sha256(repr(sorted(store.rows.get_meta(name).items())).encode())
        ids, labels = store.rows.id_labels(name)
        digest.update(ids.tobytes() + "\0".join(labels).encode())
        for part in (store.rows, store.searched):
            if part.exists(name):
                vid, vecs = part.vectors(name)
                digest.update(vid.tobytes() + vecs.tobytes())
        out[name] = digest.hexdigest()
    return out


def tarball(files: dict[str, bytes], *, links: dict[str, str] | None = None, gzip: bool = False) -> bytes:
    """A tar archive of ``files`` (name -> bytes) and symbolic ``links`` (name -> target)."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return out.getvalue()


def npm_tarball(members: dict[str, bytes]) -> bytes:
    """An npm package tarball (``.tgz``) holding ``members`` (name -> bytes), for a fake registry."""
    return tarball(members, gzip=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def milvus_lite_server(data_dir: Path):
    """``milvus-lite server`` on ``data_dir`` in a child process (what several replicas share);
    yields its ``http://127.0.0.1:<port>`` URI."""
    import socket
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline, "milvus-lite server did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def make_settings(data_dir: Path, **overrides) -> Settings:
    overrides.setdefault("vector_store", VECTOR_STORE)
    return Settings.from_env(data_dir=data_dir, model_dir=MODEL_CACHE, offline=True, **overrides)


@pytest.fixture(scope="session")
def cjk_font() -> Path:
    """The CJK font the app provisions (:mod:`shitu.fonts`), fetched the way the app fetches it, into
    the shared model cache (once per machine). Skipped when the npm registry cannot be reached;
    ``SHITU_TEST_REQUIRE_FONT=1`` (CI) makes that a failure, so CI really draws with it."""
    from shitu import fonts

    try:
        path = fonts.fetch(MODEL_CACHE)
    except fonts.FontUnavailable as exc:
        if os.environ.get("SHITU_TEST_REQUIRE_FONT"):
            raise
        pytest.skip(f"the CJK font could not be fetched: {exc}")
    fonts.use(MODEL_CACHE, offline=True)
    return path


@pytest.fixture(scope="session")
def runtime(tmp_path_factory):
    """The real offline starter pack run by PaddleX's predictors in a supervised worker process,
    as the server runs them; loaded once per session."""
    rt = Runtime(PipelineConfig(), make_settings(tmp_path_factory.mktemp("runtime-data")), isolate=True)
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, runtime) -> ShiTuPipeline:
    """The PaddleX-compatible API over an engine that shares the session's models."""
    return ShiTuPipeline(Engine(make_settings(tmp_path_factory.mktemp("pipeline-data")), runtime=runtime))


@pytest.fixture
def engine(tmp_path, runtime) -> Engine:
    """A fresh engine (empty data dir) sharing the session's loaded models."""
    return Engine(make_settings(tmp_path / "data"), runtime=runtime)


@pytest.fixture(scope="session")
def sample_gallery(tmp_path_factory) -> tuple[Path, Path]:
    """(root, label file): 6 labels × 4 real-photo views, generated from scikit-image photos."""
    from shitu.sample import write_gallery

    root = tmp_path_factory.mktemp("gallery")
    return root, write_gallery(root)


@pytest.fixture(scope="session")
def sample_queries(tmp_path_factory) -> list[Path]:
    """[two-object composite, one new view per sample label (in SAMPLE_SUBJECTS order)]."""
    from shitu.sample import write_queries

    return write_queries(tmp_path_factory.mktemp("queries"))


def install_index(engine: Engine, name: str, stored: Path) -> None:
    """A copy of the stored index directory ``stored`` under ``name`` in the engine's data dir, as
    if it had been built there (its files, its version record): what a test starts from without
    embedding the gallery again. Files store only."""
    shutil.copytree(stored, engine.settings.indices_dir / name)


def sample_index(engine: Engine, name: str, template: Path, sample_gallery: tuple[Path, Path]) -> Engine:
    """The sample gallery's index (``Engine.build`` with its defaults) under ``name``: a copy of the
    session's ``template`` where indices are files, else built in the store under test."""
    if engine.settings.vector_store == "faiss":
        install_index(engine, name, template)
    else:
        from shitu.gallery import read_label_file

        root, labels = sample_gallery
        engine.build(name, read_label_file(labels, root))
    return engine


@pytest.fixture(scope="session")
def template(tmp_path_factory, runtime, sample_gallery) -> Path:
    """A real 24-entry index of the sample gallery (embedded once per session), to copy into a
    test's data dir; never changed in place."""
    from shitu.gallery import read_label_file

    root, labels = sample_gallery
    builder = Engine(make_settings(tmp_path_factory.mktemp("template") / "data", vector_store="faiss"), runtime=runtime)
    builder.build("tpl", read_label_file(labels, root))
    return builder.settings.indices_dir / "tpl"
