"""Start-up: the app answers from its first second, says what it is preparing, serves the studio
once the engine is ready (no restart, no second app), reports a failure once; the model-hub check
is cheap; the log keeps to lines a person can act on.

The app is the real one (``build_app`` with a :class:`Readiness`, as ``main`` serves it) over a real
engine whose preparation is replaced by a fake, slow one; one slow test runs ``python app.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import requests
from fastapi.testclient import TestClient

import app as studio
import shitu.models as models
from shitu import mirror, runtime
from shitu.config import Settings
from shitu.errors import ShiTuError
from shitu.models import try_official
from shitu.startup import Readiness

from .conftest import MODEL_CACHE, wait_until
from .test_security import gradio_call

ROOT = Path(__file__).resolve().parents[1]


def assert_503_envelope(resp, fragment: str, retry: bool = True) -> None:
    body = resp.json()
    assert resp.status_code == 503 and body["errorCode"] == 503, body
    assert uuid.UUID(body["logId"]) and "result" not in body
    assert fragment in body["errorMsg"], body["errorMsg"]
    assert ("retry-after" in resp.headers) is retry


class SettingsOnly:
    """An engine that has settings and fails any other read: what building the app may touch."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __getattr__(self, name: str):
        raise AssertionError(f"engine.{name} was read before the engine was ready")


@pytest.fixture
def slow_preparation(monkeypatch):
    """Replaces app.prepare_engine: reports two steps, then waits for the test to release it (and
    raises ``outcome["error"]`` if the test put one there)."""
    release = threading.Event()
    outcome: dict = {}

    def prepare_engine(engine, *, prepare_sample=True, on_step=None):
        on_step("preparing models: official weights if a model hub answers, else the offline starter pack")
        assert release.wait(30)
        on_step("preparing the sample gallery: embedding 3/24")
        if "error" in outcome:
            raise outcome["error"]

    monkeypatch.setattr(studio, "prepare_engine", prepare_engine)
    return release, outcome


@pytest.fixture
def starting(engine, slow_preparation, monkeypatch):
    """What ``main`` serves, over a fresh engine (the session's models), prepared on a thread by the
    slow fake: ``app``, ``readiness``, ``release`` (lets the preparation go on), ``outcome``,
    ``models_loaded`` (set when the models would be loaded, once the studio is ready), ``start()``."""
    release, outcome = slow_preparation
    models_loaded = threading.Event()
    monkeypatch.setattr(engine, "prepare_models", models_loaded.set)
    readiness = Readiness()

    def start() -> threading.Thread:
        return studio.prepare_in_background(readiness, engine, "http://127.0.0.1:1", threading.Event())

    app = studio.build_app(engine, readiness=readiness)
    return SimpleNamespace(app=app, readiness=readiness, release=release, outcome=outcome,
                           models_loaded=models_loaded, start=start)  # fmt: skip


# --- the starting page, and the studio once ready ---------------------------------------------------
def test_the_app_is_built_and_answers_before_the_engine_is_asked_anything(tmp_path):
    from .conftest import make_settings

    app = studio.build_app(SettingsOnly(make_settings(tmp_path / "data")), readiness=Readiness())
    client = TestClient(app)  # (no lifespan: the gate answers without one)
    assert "ShiTu Studio is starting" in client.get("/").text
    assert_503_envelope(client.get("/health"), "ShiTu Studio is starting (starting)")


def test_starting_page_and_503_until_ready_then_the_studio(starting):
    with TestClient(starting.app) as client:  # runs the lifespan, as uvicorn does: Gradio's queue starts at once
        starting.start()
        wait_until(lambda: "preparing models" in starting.readiness.step, "the first step")
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "ShiTu Studio is starting" in page.text and "preparing models / sample gallery" in page.text.lower()
        assert "preparing models: official weights" in page.text  # the current step
        assert '<meta http-equiv="refresh" content="2">' in page.text and page.headers["cache-control"] == "no-store"
        assert "<script" not in page.text and "http" not in page.text.split("<body>")[1]  # self-contained
        assert "ShiTu Studio is starting" in client.get("/some/ui/path").text
        assert_503_envelope(client.get("/health"), "ShiTu Studio is starting (preparing models")
        assert_503_envelope(client.post("/shitu-infer", json={"image": "x"}), "retry in a few seconds")
        assert_503_envelope(client.get("/shitu-index/sample"), "starting")
        assert_503_envelope(client.post("/gradio_api/queue/join", json={}), "starting")
        assert_503_envelope(client.get("/docs"), "starting")
        assert client.get("/health").headers["retry-after"] == "2"
        assert not starting.models_loaded.is_set()

        starting.release.set()
        wait_until(lambda: starting.readiness.ready, "the studio to be ready")
        page = client.get("/")
        assert page.status_code == 200 and "gradio" in page.text.lower() and "is starting" not in page.text
        assert client.get("/health").json()["result"]["status"] == "ok"
        kind, payload = gradio_call(client, "open_index", [None])  # the UI's events run: its queue started
        assert kind == "complete" and "No indices yet" in payload[0]
        assert starting.models_loaded.wait(10), "the models are loaded once the studio serves"


@pytest.mark.parametrize(
    "error, message",
    [(ShiTuError("recognition model_dir x is not a PaddleX model dir"), "recognition model_dir x is not a PaddleX "
      "model dir"), (RuntimeError("boom"), "RuntimeError: boom")],
    ids=["bad-input", "unexpected"],
)  # fmt: skip
def test_a_failed_start_is_shown_on_the_page_and_the_api_and_logged_once(starting, caplog, error, message):
    starting.outcome["error"] = error
    caplog.set_level(logging.INFO)
    with TestClient(starting.app) as client:
        starting.start()
        starting.release.set()
        wait_until(lambda: starting.readiness.error is not None, "the failure")
        page = client.get("/")
        assert page.status_code == 503 and "ShiTu Studio could not start" in page.text
        assert message in page.text and "http-equiv" not in page.text  # nothing to wait for
        assert_503_envelope(client.get("/health"), f"ShiTu Studio could not start: {message}", retry=False)
        assert_503_envelope(client.post("/shitu-index-remove", json={"ids": [1]}), message, retry=False)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, [r.getMessage() for r in said]
    assert said[0].getMessage() == f"could not start: {message}"
    assert not starting.models_loaded.is_set()


def test_a_failing_start_up_of_the_app_is_a_failed_start(starting, caplog, monkeypatch):
    """Gradio starts its queue in the app's lifespan; if that fails, the server still answers and
    says why (rather than exiting with a traceback the browser never sees), even once the engine
    is ready."""

    def fails(self):
        raise RuntimeError("queue did not start")

    monkeypatch.setattr(gr.Blocks, "run_startup_events", fails)
    caplog.set_level(logging.INFO)
    with TestClient(starting.app) as client:
        assert_503_envelope(client.get("/health"), "queue did not start", retry=False)
        starting.release.set()
        starting.start().join(30)
        assert not starting.readiness.ready
        assert_503_envelope(client.get("/health"), "the app's start-up failed: RuntimeError: queue did not start",
                            retry=False)  # fmt: skip
        assert "could not start" in client.get("/").text
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["could not start: the app's start-up failed: RuntimeError: queue did not start"]
    assert not any("ready in" in r.getMessage() for r in caplog.records)


def test_websockets_are_asked_to_come_back_later(starting):
    from starlette.websockets import WebSocketDisconnect

    client = TestClient(starting.app)
    with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/gradio_api/queue/ws"):
        pass
    assert closed.value.code == 1013


# --- the CJK font is provided at start, without holding the start up --------------------------------
@pytest.fixture
def no_font(monkeypatch):
    """No CJK font anywhere yet, and no warning said yet in this process."""
    from shitu import fonts

    monkeypatch.setattr(fonts, "cjk_font", lambda: None)
    monkeypatch.setattr(fonts, "_places", fonts._Places())
    return fonts


def test_offline_without_a_font_is_one_warning_at_start(no_font, tmp_path, caplog):
    from .conftest import make_settings

    settings = make_settings(tmp_path / "data")  # offline
    caplog.set_level(logging.INFO)
    assert studio.provide_cjk_font(settings) is None and studio.provide_cjk_font(settings) is None
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "SHITU_FONT" in said[0] and "apt-get install" in said[0] and "#12" in said[0], said


def test_the_font_is_fetched_on_a_thread_and_a_failure_said_once(no_font, tmp_path, monkeypatch, caplog):
    from .conftest import make_settings

    release, asked = threading.Event(), []

    def fetch(models_dir):
        asked.append(models_dir)
        release.wait(30)  # the registry is slow: nothing waits for it
        raise no_font.FontUnavailable("cannot reach the npm registry for @expo-google-fonts/noto-sans-sc@0.4.3")

    monkeypatch.setattr(no_font, "fetch", fetch)
    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path / "data").model_copy(update={"offline": False})
    thread = studio.provide_cjk_font(settings)
    assert thread is not None and thread.is_alive(), "the start-up goes on while the font is fetched"
    assert studio.provide_cjk_font(settings) is thread, "one fetch per process"
    release.set()
    thread.join(30)
    assert asked == [settings.models_dir]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "cannot reach the npm registry" in said[0]


def test_a_font_there_is_used_without_a_word(tmp_path, monkeypatch, caplog):
    from shitu import fonts

    from .conftest import make_settings

    monkeypatch.setattr(fonts, "cjk_font", lambda: "/usr/share/fonts/wqy.ttc")
    caplog.set_level(logging.INFO)
    assert studio.provide_cjk_font(make_settings(tmp_path / "data").model_copy(update={"offline": False})) is None
    assert not caplog.records


def test_preparing_the_engine_overlaps_its_steps(monkeypatch, tmp_path):
    """The sample photos are drawn while the models are chosen; the font is asked for once the models
    are there (the starter pack's own npm download is over), before the sample index is built."""
    from .conftest import make_settings

    said: list[str] = []

    class Recording:
        settings = make_settings(tmp_path / "data")

        def models(self):
            said.append("models")

        def ensure_sample_index(self, progress):
            said.append("sample index")
            return "sample"

        def prepare_official_in_background(self):
            said.append("official")

    def files(settings):
        said.append("sample photos")

    monkeypatch.setattr(studio, "sample_files", files)
    monkeypatch.setattr(studio, "provide_cjk_font", lambda settings: said.append("font"))
    studio.prepare_engine(Recording())
    assert said.index("font") == said.index("models") + 1 and said[-2:] == ["sample index", "official"]
    assert said.index("sample photos") < said.index("sample index")


# --- the model-hub check ---------------------------------------------------------------------------
@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty PaddleX cache, no remembered failures, and PaddleX's host replaced by ``set_hub(url)``."""
    monkeypatch.setenv("PADDLE_PDX_CACHE_HOME", str(tmp_path / "pdx"))
    monkeypatch.setattr(mirror, "_unreachable", {})
    monkeypatch.setattr(models, "_hub_failure", None)

    def set_hub(url: str) -> Settings:
        monkeypatch.setattr(mirror, "PADDLEX_BASE_URL", url)
        monkeypatch.setattr(models, "_hub_failure", None)
        return Settings.from_env(data_dir=tmp_path / "data", offline=False, model_download_deadline=10.0)

    return set_hub


class SilentHost:
    """Accepts connections and never answers: a black hole behind a proxy. ``asked`` counts the
    connections made to it, so a test sees whether a check asked the host, not how long it took."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/models"
        self.asked = 0
        self.held: list[socket.socket] = []
        self.hanging_up = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.asked += 1
            if self.hanging_up:
                conn.close()
            else:
                self.held.append(conn)

    def hang_up(self) -> None:
        """Drop the connections held (and any new one), until the fetches on them have ended."""
        self.hanging_up = True
        for conn in self.held:
            conn.close()
        self.held.clear()
        wait_until(lambda: not any(t.name.startswith("shitu-fetch-") for t in threading.enumerate()), "fetches")
        self.hanging_up = False

    def close(self) -> None:
        self.sock.close()
        self.hang_up()


@pytest.fixture
def silent_host():
    host = SilentHost()
    yield host
    host.close()


def asked_after(host: SilentHost, before: int) -> bool:
    """Whether the host got a new connection (waited for briefly: the fetch thread connects at
    once); then hangs up, so the next check does not wait behind this one's fetch."""
    with contextlib.suppress(AssertionError):
        wait_until(lambda: host.asked > before, "a connection", limit=5)
    host.hang_up()
    return host.asked > before


def test_the_start_up_check_waits_about_two_seconds_for_a_silent_hub_not_the_deadline(no_hub, silent_host):
    assert inspect.signature(try_official).parameters["answer_within"].default == mirror.ANSWER_TIMEOUT <= 2.0
    settings = no_hub(silent_host.url)  # its download deadline is 10 s
    path, reason = try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.5)
    host = silent_host.url.split("/")[2]
    # gave up after the answer timeout: the deadline would say "within 10 s"
    assert path is None and asked_after(silent_host, 0)
    assert reason == f"no model hub reachable (PaddleX's host {host} unreachable (no answer within 0.5 s))"
    # detection right after: not asked again in this process
    assert try_official("PP-ShiTuV2_det", False, settings=settings)[1] == reason
    assert silent_host.asked == 1


def test_a_hanging_name_lookup_is_given_up_after_the_answer_timeout(no_hub, monkeypatch):
    real = socket.getaddrinfo
    lookups: list[str] = []

    def hanging(host, *args, **kwargs):
        if str(host).endswith(".invalid"):
            lookups.append(host)
            time.sleep(5)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    settings = no_hub("https://hub.invalid/models")
    path, reason = try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.5)
    # answered while the lookup still hangs (it takes 5 s), with the answer timeout as the reason
    assert path is None and lookups == ["hub.invalid"]
    assert "hub.invalid unreachable (no answer within 0.5 s)" in reason


@pytest.mark.slow  # over ~1.5 s on 2 cores: --full (CI) runs it
def test_a_failed_check_is_remembered_per_data_dir_for_a_while(no_hub, silent_host, tmp_path, monkeypatch):
    settings = no_hub(silent_host.url)
    _, first = try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.3)
    assert asked_after(silent_host, 0)
    memo = json.loads((tmp_path / "data" / models.HUB_CHECK_FILE).read_text(encoding="utf-8"))
    assert memo["base"] == silent_host.url and memo["reason"] == first
    # a restart (a new process: nothing remembered in memory) from the same data dir does not ask
    monkeypatch.setattr(models, "_hub_failure", None)
    asked = silent_host.asked
    path, again = try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.3)
    assert path is None and silent_host.asked == asked
    assert again == f"{first} at the last check, less than a minute ago (start-ups check again after 10 min)"
    # ... except the background download, which always asks
    monkeypatch.setattr(models, "_hub_failure", None)
    try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.3, remember_failures=False)
    assert asked_after(silent_host, asked)
    # an old memo, one for another host, or an unreadable one is not used
    memo_path = tmp_path / "data" / models.HUB_CHECK_FILE
    for stale in (
        {**memo, "at": time.time() - models.HUB_RECHECK_AFTER - 1},
        {**memo, "base": "https://other.example/models"},
        "not json",
    ):
        memo_path.write_text(stale if isinstance(stale, str) else json.dumps(stale), encoding="utf-8")
        monkeypatch.setattr(models, "_hub_failure", None)
        asked = silent_host.asked
        try_official("PP-ShiTuV2_rec", False, settings=settings, answer_within=0.3)
        assert asked_after(silent_host, asked), stale


def test_a_successful_download_clears_the_memo(no_hub, tmp_path):
    from .test_mirror import Mirror, tiny_tar

    served = Mirror({"PP-ShiTuV2_rec_infer.tar": tiny_tar()})
    try:
        settings = no_hub(served.url())
        memo = tmp_path / "data" / models.HUB_CHECK_FILE
        memo.parent.mkdir(parents=True)
        memo.write_text(json.dumps({"base": "elsewhere", "at": time.time(), "reason": "x"}), encoding="utf-8")
        path, reason = try_official("PP-ShiTuV2_rec", False, settings=settings)
        assert path is not None and "downloaded from PaddleX's host" in reason
        assert not memo.exists()
    finally:
        served.close()


# --- the log ---------------------------------------------------------------------------------------
WORKER_OUTPUT = """\
/usr/lib/python3/site-packages/paddle/utils/cpp_extension/extension_utils.py:712: UserWarning: No ccache found. \
Please be aware that recompiling all source files may be required.
  warnings.warn(warning_message)
W1127 17:17:20.122947   839 eager_utils.cc:3584] Paddle static graph(PIR) not support input out tensor for now!!!!!
I1127 17:17:21.000001   839 analysis_predictor.cc:100] ir_optim is turned off
ReduceMeanCheckIfOneDNNSupport
\x1b[1m\x1b[35m--- Running analysis [ir_graph_build_pass]\x1b[0m

E1127 17:17:22.000001   839 something.cc:1] a real error
Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: bad input
--------------------------------------
C++ Traceback (most recent call last):
--------------------------------------
0   paddle::AnalysisPredictor::Run()
1   phi::SomeKernel()

----------------------
Error Message Summary:
----------------------
FatalError: `Segmentation fault` is detected by the operating system.
  [TimeInfo: *** Aborted at 1795801286 (unix time) try "date -d @1795801286" if you are using GNU date ***]
  [SignalInfo: *** SIGSEGV (@0x4e5) received by PID 1253 (TID 0x7f785d621b80) from PID 1253 ***]
"""


def test_worker_output_keeps_only_what_a_person_can_act_on(caplog):
    caplog.set_level(logging.INFO)
    runtime._forward_output(io.BytesIO(WORKER_OUTPUT.encode()), 4321)
    assert [r.getMessage() for r in caplog.records] == [
        "model worker 4321: E1127 17:17:22.000001   839 something.cc:1] a real error",
        "model worker 4321: Traceback (most recent call last):",
        'model worker 4321:   File "x.py", line 1, in <module>',
        "model worker 4321: ValueError: bad input",
        "model worker 4321: FatalError: `Segmentation fault` is detected by the operating system.",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_paddlex_logger_keeps_warnings_but_not_its_hoster_check(monkeypatch):
    pdx = logging.getLogger("paddlex")
    monkeypatch.setattr(pdx, "filters", [])
    monkeypatch.delenv("GLOG_minloglevel", raising=False)
    runtime.quiet_paddle()
    runtime.quiet_paddle()
    assert len(pdx.filters) == 1 and os.environ["GLOG_minloglevel"] == "2"

    def passes(level: int, msg: str) -> bool:
        return pdx.filter(logging.LogRecord("paddlex", level, "x.py", 1, msg, None, None))

    assert not passes(logging.INFO, "Creating model: ('PP-ShiTuV2_det', None)")
    assert not passes(logging.ERROR, "No available model hosting platforms detected. Please check your network.")
    assert not passes(logging.WARNING, "Checking connectivity to the model hosters, this may take a while.")
    assert passes(logging.WARNING, "The model is large; consider a GPU")
    assert passes(logging.ERROR, "inference.json is broken")


def test_one_models_line_says_which_and_why():
    from shitu.models import ModelChoice

    hub = "no model hub reachable (PaddleX's host h unreachable (host name not resolved))"
    rec = ModelChoice("recognition", "PP-ShiTuV2_rec", "/m/rec", "starter", f"{hub}; using ImageNet MobileNetV2")
    det = ModelChoice("detection", "PP-ShiTuV2_det", "/m/det", "starter", f"{hub}; using MediaPipe's SSD")
    assert runtime.models_line(rec, det) == (
        f"models: the offline starter pack for recognition (PP-ShiTuV2_rec) and detection (PP-ShiTuV2_det) — {hub}"
    )
    official = ModelChoice("recognition", "PP-ShiTuV2_rec", "/c/rec", "official", "official weights found in cache")
    line = runtime.models_line(official, det)
    assert line.startswith("models: recognition PP-ShiTuV2_rec — official") and "| detection" in line
    assert "\n" not in line and "/m/" not in line and "/c/" not in line  # no server paths


# --- the real thing --------------------------------------------------------------------------------
NOISE = ("ccache", "PIR", "!!!!", "ReduceMean", "hosting platform", "hoster", "warnings.warn", "Traceback",
         "leaked shared_memory", "FatalError", "Uvicorn running", "Waiting for application")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_python_app_py_serves_a_starting_page_at_once_then_the_studio(tmp_path):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "SHITU_DATA_DIR": str(tmp_path / "data"),
           "SHITU_MODEL_DIR": str(MODEL_CACHE), "SHITU_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("HOST", None)
    log_path = tmp_path / "app.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            t0 = time.monotonic()
            seen: list[str] = []
            while time.monotonic() - t0 < 240:
                assert proc.poll() is None, log_path.read_text(errors="replace")
                try:
                    page = requests.get(f"{base}/", timeout=5)
                    health = requests.get(f"{base}/health", timeout=5)
                except (requests.ConnectionError, requests.Timeout):  # bound, the app still being built
                    time.sleep(0.1)
                    continue
                if "ShiTu Studio is starting" in page.text:
                    seen.append("starting")
                    if health.status_code == 200 and health.json()["result"]["status"] == "ok":
                        continue  # it became ready between the two requests: the next page is the studio
                    assert health.status_code == 503 and health.headers["retry-after"] == "2"
                    assert health.json()["errorCode"] == 503
                elif "gradio" in page.text.lower():
                    seen.append("ready")
                    break
                time.sleep(0.2)
            first_answer = seen and seen[0]
            assert first_answer == "starting" and seen[-1] == "ready", seen
            assert health.status_code == 200 and health.json()["result"]["status"] == "ok"
            assert requests.get(f"{base}/shitu-index/sample", timeout=10).json()["result"]["imageCount"] > 0
            # the UI's events run: Gradio's queue started with the server
            from gradio_client import Client

            ui = Client(f"{base}/", verbose=False)
            names = list(ui.view_api(return_format="dict", print_info=False)["named_endpoints"])
            if "/open_index" in names:
                assert "24 entries" in str(ui.predict("sample", api_name="/open_index"))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log = log_path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert not [ln for ln in lines if any(n in ln for n in NOISE)], log
    assert any("serving on http://127.0.0.1" in ln for ln in lines) and any("ready in" in ln for ln in lines), log
    assert any("models: the offline starter pack for recognition" in ln for ln in lines), log
    assert not [ln for ln in lines if " ERROR " in ln], log
    assert len(lines) <= 6, log
