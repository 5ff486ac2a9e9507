"""Official weights through a model mirror, without a network: a local HTTP server on 127.0.0.1
serves ``<model>_infer.tar`` files built here in PaddleX's layout, and every failure mode leaves
the cache clean and the starter pack running with a one-line reason."""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import shitu.mirror as mirror
import shitu.models as models
from shitu import create_pipeline
from shitu.config import PipelineConfig, Settings
from shitu.engine import Engine
from shitu.gallery import read_label_file
from shitu.models import resolve_recognition, try_official
from shitu.sample import SAMPLE_SUBJECTS

from .conftest import MODEL_CACHE, tarball, wait_until

REC = "PP-ShiTuV2_rec"
DET = "PP-ShiTuV2_det"
MODEL_FILES = ("inference.yml", "inference.json", "inference.pdiparams")


# --- tars in PaddleX's layout -------------------------------------------------------------------
def make_tar(files: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    """A model tar as PaddleX's hosts serve it (uncompressed)."""
    return tarball(files, links=links)


def model_tar(model_dir: Path, model_name: str) -> bytes:
    """A converted model dir packed as PaddleX packs ``<model>_infer.tar``: one folder inside."""
    return make_tar({f"{model_name}_infer/{f}": (model_dir / f).read_bytes() for f in MODEL_FILES})


def tiny_tar(model_name: str = REC, declared: str | None = None) -> bytes:
    """A small model-shaped tar (the failure tests never run it)."""
    yml = f"Global:\n  model_name: {declared or model_name}\n".encode()
    files = {"inference.yml": yml, "inference.json": b"{}", "inference.pdiparams": os.urandom(300_000)}
    return make_tar({f"{model_name}_infer/{k}": v for k, v in files.items()})


# --- a bounded local mirror ---------------------------------------------------------------------
class Mirror:
    """``http://127.0.0.1:<port>/<mode>/<file>``: ``ok`` serves ``files``; ``drip`` sends the
    headers then a byte at a time; ``cut`` sends half the body and closes; ``short`` serves the
    first half as if it were the whole file; ``gate`` sends half and waits for :attr:`gate`.
    Anything else is a 404."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.gate = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                outer.requests.append(self.path)
                mode, _, name = self.path.lstrip("/").partition("/")
                data = outer.files.get(name)
                if data is None or mode not in ("ok", "drip", "cut", "short", "gate"):
                    self.send_error(404)
                    return
                if mode == "short":
                    data = data[: len(data) // 2]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if mode == "ok" or mode == "short":
                        self.wfile.write(data)
                    elif mode == "gate":  # half, then the rest once the test opens the gate
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        outer.gate.wait(120)
                        self.wfile.write(data[len(data) // 2 :])
                    elif mode == "cut":
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                    else:  # drip until the client gives up or the test ends (bounded either way)
                        for byte in data:
                            if outer.stop.wait(0.05):
                                break
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}"

    def close(self) -> None:
        self.stop.set()
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator:
    started: list[Mirror] = []

    def start(files: dict[str, bytes]) -> Mirror:
        started.append(Mirror(files))
        return started[-1]

    yield start
    for m in started:
        m.close()


@pytest.fixture(autouse=True)
def empty_paddlex_cache(tmp_path, monkeypatch) -> Path:
    """An empty PaddleX cache per test, and no remembered host failures from other tests."""
    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    monkeypatch.setattr(mirror, "_unreachable", {})
    monkeypatch.setattr(models, "_hub_failure", None)
    return tmp_path / "pdx" / "official_models"


def settings_for(tmp_path: Path, mirror_url: str | None, **overrides) -> Settings:
    """Never PaddleX's own host: tests only contact servers they start."""
    values = dict(
        data_dir=tmp_path / "data", model_dir=MODEL_CACHE, offline=False, model_mirror=mirror_url,
        model_mirror_only=True, model_download_deadline=10.0,
    )  # fmt: skip
    return Settings.from_env(**{**values, **overrides})


def leftovers(root: Path) -> list[str]:
    """Directories in PaddleX's cache (a failed download must leave none, not even hidden ones)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the happy path -----------------------------------------------------------------------------
def test_mirror_download_is_verified_cached_and_reused(serve, tmp_path, empty_paddlex_cache):
    tar = tiny_tar()
    served = serve({f"{REC}_infer.tar": tar, f"{REC}_infer.tar.sha256": hashlib.sha256(tar).hexdigest().encode()})
    settings = settings_for(tmp_path, served.url())
    done: list[tuple[int, int | None]] = []
    path, reason = try_official(REC, False, settings=settings, progress=lambda d, t: done.append((d, t)))
    assert path == empty_paddlex_cache / REC and reason.startswith("downloaded from mirror 127.0.0.1:")
    assert sorted(p.name for p in path.iterdir()) == sorted(MODEL_FILES)
    assert done[-1] == (len(tar), len(tar)), "progress counts bytes of the whole tar"
    assert any(r.endswith(".sha256") for r in served.requests)
    assert leftovers(empty_paddlex_cache) == [REC]
    served.close()  # a second start needs no network
    path2, reason2 = try_official(REC, False, settings=settings)
    assert path2 == path and reason2 == "official weights found in PaddleX's cache"


def test_local_directory_mirror(tmp_path, empty_paddlex_cache):
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / f"{REC}_infer.tar").write_bytes(tiny_tar())
    for spec in (str(tars), tars.as_uri()):
        shutil.rmtree(empty_paddlex_cache, ignore_errors=True)
        # a local directory involves no network, so it is used even offline
        choice = resolve_recognition(PipelineConfig(), settings_for(tmp_path, spec, offline=True))
        assert choice.source == "official" and choice.reason.startswith("downloaded from local mirror")
        assert str(tmp_path) not in choice.describe() and str(tmp_path) not in str(choice.to_dict())
        assert choice.to_dict()["model_dir"] == REC


def test_crashed_download_leftovers_are_cleaned(serve, tmp_path, empty_paddlex_cache):
    (empty_paddlex_cache / f".{REC}.tmp-0123abcd" / "x").mkdir(parents=True)
    served = serve({f"{REC}_infer.tar": tiny_tar()})
    path, _ = try_official(REC, False, settings=settings_for(tmp_path, served.url()))
    assert path is not None and leftovers(empty_paddlex_cache) == [REC]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHITU_MODEL_MIRROR", "https://mirror.example/paddle3.0.0/")
    monkeypatch.setenv("SHITU_MODEL_DOWNLOAD_DEADLINE", "3.5")
    monkeypatch.setenv("SHITU_MODEL_MIRROR_ONLY", "1")
    s = Settings.from_env(data_dir=tmp_path)
    assert (s.model_mirror, s.model_download_deadline, s.model_mirror_only) == (
        "https://mirror.example/paddle3.0.0/", 3.5, True,
    )  # fmt: skip
    source = mirror.Source.parse(s.model_mirror)
    assert source.base == "https://mirror.example/paddle3.0.0" and source.label == "mirror mirror.example"
    assert mirror.Source.parse("http://user:secret@10.0.0.1:8080/m").label == "mirror 10.0.0.1:8080"


def test_unusable_mirror_setting_is_a_reason_not_a_crash(tmp_path):
    path, reason = try_official(REC, False, settings=settings_for(tmp_path, "ftp://mirror.example/m"))
    assert path is None and reason.startswith("SHITU_MODEL_MIRROR is not usable")


def test_offline_never_contacts_an_http_mirror(serve, tmp_path):
    served = serve({f"{REC}_infer.tar": tiny_tar()})
    path, reason = try_official(REC, True, settings=settings_for(tmp_path, served.url(), offline=True))
    assert path is None and "SHITU_OFFLINE" in reason and served.requests == []


# --- failure modes: a one-line reason, a clean cache, the starter pack meanwhile -------------------
FAILURES = {
    "unreachable": ("refused", r"mirror 127\.0\.0\.1:\d+ unreachable \(connection refused\)"),
    "404": ("missing", rf"has no {REC}_infer\.tar \(HTTP 404\)"),
    "truncated tar": ("short", r"is not a readable tar"),
    "corrupt tar": ("garbage", r"is not a readable tar"),
    "stalled": ("drip", r"stalled: .* not complete by the deadline"),
    "interrupted": ("cut", r"was interrupted after 0\.\d MB of 0\.\d MB"),
    "disk full": ("enospc", r"cannot store .* \(no space left on the disk\)"),
    "unsafe member": ("evil", r"was refused: unsafe path '\.\./escape'"),
    "link outside": ("link", r"was refused: link .* leads outside"),
    "not a model": ("empty", r"is not a PaddleX model \(no inference\.pdiparams"),
    "another model": ("other", rf"holds {DET}, not {REC}"),
    "checksum": ("badsum", r"does not match its \.sha256"),
}


@pytest.mark.parametrize("case", list(FAILURES), ids=list(FAILURES))
@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_failure_leaves_no_partial_dir_and_starter_runs(case, serve, tmp_path, monkeypatch, empty_paddlex_cache):
    how, expected = FAILURES[case]
    tar = tiny_tar()
    name = f"{REC}_infer.tar"
    files = {
        "garbage": {name: os.urandom(200_000)},
        "evil": {name: make_tar({"../escape": b"x", f"{REC}_infer/inference.yml": b"Global: {}\n"})},
        "link": {name: make_tar({f"{REC}_infer/inference.yml": b"{}"}, links={f"{REC}_infer/p": "../../etc/passwd"})},
        "empty": {name: make_tar({f"{REC}_infer/inference.yml": b"{}", f"{REC}_infer/inference.json": b"{}"})},
        "other": {name: tiny_tar(declared=DET)},
        "badsum": {name: tar, f"{name}.sha256": b"0" * 64 + b"  " + name.encode()},
    }.get(how, {name: tar})
    served = serve(files)
    mode = {"short": "short", "drip": "drip", "cut": "cut", "missing": "missing"}.get(how, "ok")
    url = f"http://127.0.0.1:{closed_port()}/ok" if how == "refused" else served.url(mode)
    if how == "enospc":

        def full_disk(fh, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(mirror, "_write", full_disk)
    deadline = 1.0 if how == "drip" else 10.0
    settings = settings_for(tmp_path, url, model_download_deadline=deadline)

    path, reason = try_official(REC, False, settings=settings)
    assert path is None
    first = reason.split("; ")[0]
    assert "\n" not in reason
    assert re.search(expected, first), first
    assert str(tmp_path) not in reason, "no server paths in reasons"
    assert leftovers(empty_paddlex_cache) == [], "no partial dir in the cache"

    choice = resolve_recognition(PipelineConfig(), settings)
    assert choice.source == "starter" and re.search(expected, choice.reason)
    assert leftovers(empty_paddlex_cache) == []


def test_silent_host_is_given_up_at_the_deadline(tmp_path, empty_paddlex_cache):
    """A host that accepts the connection but never answers (a black hole behind a proxy)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # never accepted, never answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/ok"
        settings = settings_for(tmp_path, url, model_download_deadline=0.5)
        choice = resolve_recognition(PipelineConfig(), settings)
    assert choice.source == "starter" and "unreachable (no answer" in choice.reason
    assert leftovers(empty_paddlex_cache) == []


def test_unreachable_mirror_is_asked_once_per_start(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/ok"
    settings = settings_for(tmp_path, url)
    _, first = try_official(REC, False, settings=settings)
    _, second = try_official(DET, False, settings=settings)  # detection right after recognition
    assert "unreachable" in first and second.split("; ")[0] == first.split("; ")[0]


# --- end to end: official-named models from the mirror, run by PaddleX ---------------------------
@pytest.fixture(scope="module")
def official_tars(runtime) -> dict[str, bytes]:
    """Our converted starter models, packed and named as PaddleX's official tars."""
    return {
        f"{REC}_infer.tar": model_tar(Path(runtime.recognition.model_dir), REC),
        f"{DET}_infer.tar": model_tar(Path(runtime.detection.model_dir), DET),
    }


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_official_models_from_mirror_end_to_end(
    official_tars, serve, tmp_path, empty_paddlex_cache, sample_gallery, sample_queries
):
    served = serve(official_tars)
    options = dict(
        data_dir=tmp_path / "data", model_dir=MODEL_CACHE, offline=False, model_mirror=served.url(),
        model_mirror_only=True,
    )  # fmt: skip
    pipeline = create_pipeline("PP-ShiTuV2", **options)
    try:
        models_now = pipeline.models
        for stage, name in (("recognition", REC), ("detection", DET)):
            assert models_now[stage]["source"] == "official", models_now[stage]["description"]
            assert models_now[stage]["model_name"] == name and models_now[stage]["model_dir"] == name
            assert models_now[stage]["reason"].startswith("downloaded from mirror 127.0.0.1:")
        assert sorted(leftovers(empty_paddlex_cache)) == [DET, REC]
        root, label_file = sample_gallery
        index = pipeline.build_index(gallery_imgs=str(root), gallery_label=str(label_file), index_type="Flat")
        assert len(index) == 24 and index.feature_model == f"official:{REC}"
        labels = list(SAMPLE_SUBJECTS)
        for label, query in zip(labels, sample_queries[1:]):
            (res,) = pipeline.predict(str(query), index=index, whole_image="always", rec_threshold=0.0)
            assert next(o for o in res.objects if o.whole_image).label == label
        (res,) = pipeline.predict(str(sample_queries[0]), index=index, det_threshold=0.05, whole_image="never")
        assert res["boxes"], "the official-named detector finds objects through PaddleX"
    finally:
        pipeline.close()

    served.close()
    requests_before = len(served.requests)
    again = create_pipeline("PP-ShiTuV2", **options)  # the server is gone: the cache serves
    try:
        assert again.models["recognition"]["source"] == "official"
        assert again.models["recognition"]["reason"] == "official weights found in PaddleX's cache"
        (res,) = again.predict(str(sample_queries[1]), index=index, whole_image="always", rec_threshold=0.0)
        assert next(o for o in res.objects if o.whole_image).label == labels[0]
        assert len(served.requests) == requests_before
    finally:
        again.close()


# --- background preparation ---------------------------------------------------------------------


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_background_download_switches_when_ready(official_tars, serve, tmp_path, sample_gallery, sample_queries):
    served = serve({})  # nothing there at start-up: the starter pack serves
    engine = Engine(settings_for(tmp_path, served.url("gate")), isolate=False)
    try:
        assert engine.models()["recognition"]["source"] == "starter"
        assert "HTTP 404" in engine.models()["recognition"]["reason"]
        root, label_file = sample_gallery
        engine.build("mine", read_label_file(label_file, root))
        served.files.update(official_tars)  # the mirror has them now

        assert engine.prepare_official_in_background()
        assert not engine.prepare_official_in_background(), "one preparation at a time"
        # the server holds the tar half-sent: progress shows while the starter pack still serves
        status = wait_until(
            lambda: (s := engine.model_download_status())["models"][REC]["done"] and s, "download progress"
        )
        rec = status["models"][REC]
        assert status["state"] == "downloading" and rec["state"] == "downloading" and rec["stage"] == "recognition"
        assert 0 < rec["done"] < rec["total"] == len(official_tars[f"{REC}_infer.tar"])
        assert status["models"][DET]["state"] == "waiting"
        assert engine.recognize(sample_queries[1], "mine", whole_image="always").objects
        assert engine.models()["recognition"]["source"] == "starter"

        served.gate.set()
        assert engine.wait_for_model_downloads(300)
        status = engine.model_download_status()
        assert status["state"] == "switched", status
        assert {m["state"] for m in status["models"].values()} == {"ready"}
        assert status["models"][REC]["done"] == status["models"][REC]["total"]
        models_now = engine.models()
        assert models_now["recognition"]["source"] == models_now["detection"]["source"] == "official"
        assert engine.feature_model == f"official:{REC}"
        # the index built on the starter pack must be re-embedded; the sample index was rebuilt
        assert status["indices"] == {"mine": False, "sample": True}
        res = engine.recognize(sample_queries[1], "sample", whole_image="always", rec_threshold=0.0)
        assert next(o for o in res.objects if o.whole_image).label == list(SAMPLE_SUBJECTS)[0]
    finally:
        engine.close()


def test_background_download_failure_keeps_the_starter(serve, tmp_path):
    served = serve({})
    engine = Engine(settings_for(tmp_path, served.url()), isolate=False)
    try:
        assert engine.prepare_official_in_background(rebuild_sample=False)
        assert engine.wait_for_model_downloads(120)
        status = engine.model_download_status()
        assert status["state"] == "failed" and status["models"][REC]["state"] == "failed"
        assert "HTTP 404" in status["models"][REC]["reason"]
        assert engine.models()["recognition"]["source"] == "starter"
    finally:
        engine.close()
    offline = Engine(settings_for(tmp_path, served.url(), offline=True), isolate=False)
    try:
        assert not offline.prepare_official_in_background()
        assert offline.model_download_status()["state"] == "nothing to do"
    finally:
        offline.close()
