"""Model execution: where PaddleX's predictors live and run.

:class:`Runtime` is the one object that calls PaddleX. It resolves which weights run (see
:mod:`shitu.models`), then serves three calls — :meth:`Runtime.detect`, :meth:`Runtime.embed`
and :meth:`Runtime.analyze` (detect → crop → embed in one round trip) — from a
:class:`ModelHost` that holds the predictors. The host runs in one of two places:

* ``isolate=True`` (servers): a supervised worker **process**. A native crash there (a segfault
  in Paddle's kernels) costs one request a :class:`~shitu.errors.ModelCrashed` naming the
  stage; the worker is started again for the next request and the web process never dies.
  Images travel through a shared-memory block, so the isolation costs a memcpy, not a pickle.
* ``isolate=False`` (library use, tests of the host itself): one inference **thread** in this
  process. PaddleX predictors keep per-call state, and Paddle Inference fails with
  "std::exception" when one predictor is driven from a succession of new threads, which is
  what web servers' thread pools do — so every call goes through that one thread.

Either way calls are serialised: one model call at a time per runtime.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from shitu.config import PipelineConfig, Settings
from shitu.errors import ModelCrashed, ShiTuError, Unavailable
from shitu.gallery import load_image, make_thumbnail, swap_red_blue
from shitu.hpi import EngineChoice, HpiSpec, accelerate, paddle_choice, pending_choice
from shitu.models import ModelChoice, resolve_detection, resolve_recognition
from shitu.native_output import PADDLE_NOISE

log = logging.getLogger(__name__)

MIN_CROP = 4  # pixels; smaller boxes cannot be embedded meaningfully
SHARED_BYTES = 64 * 1024 * 1024  # images up to ~21 MP (RGB) travel by shared memory
STAGES = ("idle", "loading models", "detection", "recognition", "decoding")
DEFAULT_FACTORY = "shitu.runtime:create_paddlex_predictors"

Box = tuple[tuple[float, float, float, float], float, "str | None"]  # xyxy, score, detector class
Region = tuple[tuple[float, float, float, float], float, "str | None", bool]  # a Box + "is the whole image"


@dataclass(frozen=True)
class ModelSpec:
    """Everything a host needs to create the predictors (picklable, for the worker)."""

    detection: tuple[str, str] | None  # (PaddleX model name, model dir); None: no detector
    recognition: tuple[str, str]
    device: str | None
    rec_batch_size: int = 4
    factory: str = DEFAULT_FACTORY  # "module:function" that creates the two predictors
    cpu_threads: int | None = None  # Paddle Inference math threads on CPU (None: PaddleX's default, 10)
    hpi_detection: HpiSpec | None = None  # use_hpip for each model (shitu.hpi); None: Paddle Inference
    hpi_recognition: HpiSpec | None = None


# --- Paddle's and PaddleX's own output: kept to what a person can act on -------------------------
# Printed on every start by Paddle 3.x / PaddleX 3.7 and actionable by no one: a Python warning at
# import, glog INFO/WARNING lines from the C++ side, a debug print in a oneDNN kernel, PaddleX's
# INFO lines and its model-hoster check (which explains nothing our own "models:" line does not).
_NOISY_WARNINGS = (r"No ccache found", r"Tensor do not have 'place' interface")
_HOSTER_CHECK = re.compile(r"model host(?:er|ing)", re.IGNORECASE)


class _PaddleXNoise(logging.Filter):
    """On PaddleX's logger: warnings and errors pass, except its model-hoster check."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not _HOSTER_CHECK.search(str(record.msg))


def quiet_paddle() -> None:
    """Keep Paddle's and PaddleX's start-up noise out of the log (idempotent; call before Paddle is
    imported). ``GLOG_minloglevel`` keeps glog's errors; set it yourself to see more."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    pdx = logging.getLogger("paddlex")
    if not any(isinstance(f, _PaddleXNoise) for f in pdx.filters):
        pdx.addFilter(_PaddleXNoise())


def _forward_output(stream: Any, pid: int) -> None:
    """The worker's stdout and stderr, line by line, into this process's log without the noise;
    a native crash's C++ stack (Paddle prints dozens of frames) is left out, its summary kept."""
    in_stack = False
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if "C++ Traceback (most recent call last)" in line:
                in_stack = True
            elif "Error Message Summary" in line:
                in_stack = False
                continue
            if in_stack or not line.strip() or set(line.strip()) <= {"-", "="} or PADDLE_NOISE.match(line):
                continue
            log.warning("model worker %d: %s", pid, line)
    except (OSError, ValueError):  # the pipe closed under us
        pass
    finally:
        stream.close()


PADDLEX_CPU_THREADS = 10  # what PaddleX gives Paddle Inference on CPU unless told otherwise
MAX_DEFAULT_WORKERS = 4  # processes embedding a large gallery, by default (each holds a model)
# Gallery workers take ~4 s to start and load a model, on the cores the build itself needs.
LANE_MIN_IMAGES = 400  # an upload this large starts them ahead of its build (the studio)
# A build that would start them itself: only from here on does it gain (987 drink images on 2
# cores: 9.1 s without, 11.0 s starting them, 7.8 s with them up; 2961 images: 32.6 / 28.0 / 22.6 s)
LANE_MIN_COLD_IMAGES = 2000
LANE_MIN_WARM_IMAGES = 32  # a gallery this large uses them while they are up
LANE_IDLE_SECONDS = 120.0  # how long the extra processes wait for the next large gallery


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def create_paddlex_predictors(spec: ModelSpec) -> tuple[Any, Any]:
    """PaddleX's own predictors for the spec: ``(detector or None, feature extractor)``."""
    import paddlex

    def create(name_dir: tuple[str, str]) -> Any:
        kwargs: dict[str, Any] = {"model_name": name_dir[0], "model_dir": name_dir[1]}
        if spec.device:
            kwargs["device"] = spec.device
        if spec.cpu_threads:  # only read on CPU; GPU runs ignore it
            kwargs["engine_config"] = {"cpu_threads": int(spec.cpu_threads)}
        return paddlex.create_model(**kwargs)

    return (create(spec.detection) if spec.detection else None), create(spec.recognition)


def _load_factory(path: str) -> Callable[[ModelSpec], tuple[Any, Any]]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# --- the pure geometry between detection and embedding ------------------------------------------
def clip_box(box: Sequence[float], w: int, h: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def select_regions(boxes: list[Box], w: int, h: int, whole_image: str, has_detector: bool) -> list[Region]:
    """Clip detections to the image, drop ones too small to embed, and add the whole image as a
    region (score 1) when ``whole_image`` asks for it: ``always``; ``auto`` when nothing usable
    was detected; ``never`` only when there is no detector at all."""
    kept: list[Region] = [(clip_box(b, w, h), s, lab, False) for b, s, lab in boxes]
    kept = [r for r in kept if min(r[0][2] - r[0][0], r[0][3] - r[0][1]) >= MIN_CROP]
    if whole_image == "always" or (not kept and (whole_image == "auto" or not has_detector)):
        kept.append(((0.0, 0.0, float(w), float(h)), 1.0, None, True))
    return kept


def crop(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return image[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]


# --- the host: predictors and the three calls ----------------------------------------------------
class ModelHost:
    """Holds the predictors; runs on the inference thread or in the worker process."""

    def __init__(self, spec: ModelSpec, stage: Any = None):
        self.spec = spec
        self._stage = stage  # a shared int naming the running stage (worker mode), else None
        self._det: Any = None
        self._rec: Any = None
        self.engines: dict[str, EngineChoice] = {}

    def _enter(self, stage: str) -> None:
        if self._stage is not None:
            self._stage.value = STAGES.index(stage)

    def load(self) -> dict[str, dict[str, Any]]:
        """Create the predictors (once) and put each on its engine (:mod:`shitu.hpi`); returns which
        engine runs each model and why."""
        if self._rec is None:
            self._enter("loading models")
            self._det, self._rec = _load_factory(self.spec.factory)(self.spec)
            threads = self.spec.cpu_threads
            if self._det is not None and self.spec.detection is not None:
                self.engines["detection"] = accelerate(
                    self._det, "detection", self.spec.detection[1], self.spec.hpi_detection, self.spec.device, threads
                )
            self.engines["recognition"] = accelerate(
                self._rec, "recognition", self.spec.recognition[1], self.spec.hpi_recognition, self.spec.device, threads
            )
            self._enter("idle")
        return {stage: choice.to_dict() for stage, choice in self.engines.items()}

    def detect(self, image: np.ndarray, threshold: float) -> list[Box]:
        """Main-body boxes of one RGB image (empty without a detector)."""
        self.load()
        if self._det is None:
            return []
        self._enter("detection")
        bgr = swap_red_blue(image)
        (res,) = list(self._det.predict([bgr], threshold=threshold))
        self._enter("idle")
        return [
            (tuple(float(v) for v in b["coordinate"]), float(b["score"]), b.get("label"))  # type: ignore[misc]
            for b in res["boxes"]
        ]

    def embed(self, images: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """L2-normalised features (N, D) of RGB images."""
        self.load()
        self._enter("recognition")
        bs = batch_size or self.spec.rec_batch_size
        rows: list[np.ndarray] = []
        for start in range(0, len(images), bs):
            batch = [swap_red_blue(im) for im in images[start : start + bs]]
            results = list(self._rec.predict(batch, batch_size=len(batch)))
            feats = [np.asarray(r["feature"], dtype=np.float32) for r in results]
            if feats[0].ndim == 2 and feats[0].shape[0] == len(batch):
                rows.append(feats[0])  # PaddleX 3.7.2 gives every result the whole batch's matrix
            else:
                rows.append(np.stack([f.reshape(-1) for f in feats]))
        self._enter("idle")
        out = np.concatenate(rows)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def embed_sources(
        self, sources: Sequence[Any], max_pixels: int, batch_size: int | None, embed: bool,
        views: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[Any, ...]:  # fmt: skip
        """Decode, thumbnail and (if ``embed``) embed gallery images given as paths, bytes or
        arrays: ``(features of the decodable ones or None, thumbnails, errors)`` — one thumbnail
        or one error per source. Decoding here, next to the models, sends each image through the
        pipe as its file (or its path), never as a decoded array.

        ``views``: per source ``(its position in the gallery, how many query-like views)``
        (:func:`shitu.augment.make_views`, for the calibration); they are embedded in the same
        batches, and a fourth item comes back: ``(position of each view's photo, view features
        or None)``."""
        self._enter("decoding")
        rgbs: list[np.ndarray] = []
        extra: list[np.ndarray] = []
        extra_at: list[int] = []
        thumbnails: list[bytes | None] = []
        errors: list[str | None] = []
        for k, src in enumerate(sources):
            try:
                rgb = load_image(src, max_pixels=max_pixels)
            except ShiTuError as exc:
                thumbnails.append(None)
                errors.append(exc.message)
                continue
            thumbnails.append(make_thumbnail(rgb))
            errors.append(None)
            if embed:
                rgbs.append(rgb)
                if views is not None and views[k][1] > 0:
                    from shitu.augment import make_views  # OpenCV: imported only when views are made

                    made = make_views(rgb, views[k][0], views[k][1])
                    extra += made
                    extra_at += [views[k][0]] * len(made)
        self._enter("idle")
        # a chunk's few views ride in its batch (a batch of 5 costs far less than one of 4 and one of 1)
        size = (batch_size or len(rgbs)) + len(extra) if len(extra) <= len(rgbs) else batch_size
        feats = self.embed(rgbs + extra, size) if rgbs else None
        if views is None:
            return feats, thumbnails, errors
        view_feats = feats[len(rgbs) :] if feats is not None and extra else None
        return (feats[: len(rgbs)] if feats is not None else None), thumbnails, errors, (extra_at, view_feats)

    def analyze(
        self, image: np.ndarray, det_threshold: float, whole_image: str
    ) -> tuple[list[Region], np.ndarray, dict[str, float]]:
        """Detect → select regions → embed their crops: ``(regions, features, timings in s)``."""
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        regions = select_regions(self.detect(image, det_threshold), w, h, whole_image, self.spec.detection is not None)
        t1 = time.perf_counter()
        feats = self.embed([crop(image, r[0]) for r in regions])
        t2 = time.perf_counter()
        return regions, feats, {"detect": t1 - t0, "embed": t2 - t1}


# --- where the host runs ---------------------------------------------------------------------------
class _ThreadExecutor:
    """The host on one inference thread of this process."""

    def __init__(self, spec: ModelSpec):
        self._host = ModelHost(spec)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shitu-paddle")

    def call(self, op: str, *args: Any) -> Any:
        return self._pool.submit(getattr(self._host, op), *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._host = None  # type: ignore[assignment] - frees the predictors


HEADER = 64  # bytes at the start of the shared block: the running stage (int64), then padding


class _Stage:
    """The running stage, kept in the shared block so the parent can name it after a crash."""

    def __init__(self, shm: shared_memory.SharedMemory):
        self._cell = np.ndarray((1,), dtype=np.int64, buffer=shm.buf)

    @property
    def value(self) -> int:
        return int(self._cell[0])

    @value.setter
    def value(self, code: int) -> None:
        self._cell[0] = code


def _pack(value: Any, shm: shared_memory.SharedMemory | None) -> Any:
    """Put the (first) image into shared memory when it fits; the pipe carries only its shape."""
    if shm is not None and isinstance(value, np.ndarray) and value.nbytes <= shm.size - HEADER:
        view = np.ndarray(value.shape, dtype=value.dtype, buffer=shm.buf, offset=HEADER)
        view[...] = value
        return ("__shm__", value.shape, value.dtype.str)
    return value


def _unpack(value: Any, shm: shared_memory.SharedMemory | None) -> Any:
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "__shm__" and shm is not None:
        return np.ndarray(value[1], dtype=np.dtype(value[2]), buffer=shm.buf, offset=HEADER).copy()
    return value


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map the parent's block without adopting it: the parent unlinks it, and a resource tracker
    of this process must not (it would, at this worker's exit, pulling it from under the next one)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        from multiprocessing import resource_tracker

        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


def _worker_entry(fd: int) -> None:
    """The worker process (started by :class:`_ProcessExecutor` as ``python -c``): receive the spec
    on the inherited socket, then serve calls until the parent closes it."""
    logging.basicConfig(level=logging.WARNING)
    quiet_paddle()
    conn = Connection(fd)
    spec, shm_name = conn.recv()
    shm = _attach(shm_name)
    host = ModelHost(spec, _Stage(shm))
    try:
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                return
            try:
                args = [_unpack(a, shm) for a in args]
                conn.send(("ok", getattr(host, op)(*args)))
            except ShiTuError as exc:
                conn.send(("user", type(exc).__name__, exc.message))
            except Exception as exc:  # noqa: BLE001 - reported to the caller, the worker lives on
                conn.send(("error", type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc) else ""))
    finally:
        shm.close()


class _ProcessExecutor:
    """The host in a supervised worker process, restarted after a crash.

    The worker is a fresh ``python -c`` process joined by a private socket pair — not a
    ``multiprocessing`` child, which would re-run the parent's ``__main__`` (a script without a
    main guard, a notebook, stdin) and inherit nothing useful anyway.
    """

    def __init__(self, spec: ModelSpec):
        self._spec = spec
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._shm: shared_memory.SharedMemory | None = None
        self._stage: _Stage | None = None
        self._closed = False
        self.restarts = 0

    def _start(self) -> None:
        if self._shm is None:
            self._shm = shared_memory.SharedMemory(create=True, size=SHARED_BYTES)
            self._stage = _Stage(self._shm)
        assert self._stage is not None
        self._stage.value = 0
        ours, theirs = socket.socketpair()
        code = (
            f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
            f"from shitu.runtime import _worker_entry; _worker_entry({theirs.fileno()})"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(theirs.fileno(),), close_fds=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        theirs.close()
        threading.Thread(
            target=_forward_output, args=(self._proc.stdout, self._proc.pid), name="shitu-worker-output", daemon=True
        ).start()
        self._conn = Connection(ours.detach())
        self._conn.send((self._spec, self._shm.name))

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def call(self, op: str, *args: Any) -> Any:
        with self._lock:
            if self._closed:  # shutting down: never start a worker (and a memory block) nobody will free
                raise Unavailable("the models are shutting down")
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._conn is not None and self._proc is not None and self._stage is not None
            packed = [_pack(args[0], self._shm), *args[1:]] if args else []
            try:
                self._conn.send((op, packed))
                reply = self._conn.recv()
            except (EOFError, OSError):
                code = self._stage.value
                stage = STAGES[code] if 0 <= code < len(STAGES) else "model"
                try:
                    exit_code = self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    exit_code = self._proc.wait()
                self._conn.close()
                self._proc, self._conn = None, None
                self.restarts += 1
                how = f"signal {-exit_code}" if exit_code < 0 else f"exit code {exit_code}"
                log.error("the model worker died in %s (%s); it restarts on the next request", stage, how)
                what = "the image decoder" if stage == "decoding" else f"the {stage} model"
                raise ModelCrashed(
                    f"{what} crashed on this image ({how}); the service restarted it — try another image",
                    stage=stage,
                ) from None
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "user":
            raise ShiTuError(reply[2])
        raise Unavailable(f"the models failed on this input ({reply[1]}: {reply[2]})")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = self._conn = None
            if self._shm is not None:
                self._stage = None
                self._shm.close()
                self._shm.unlink()
                self._shm = None


class _Lanes:
    """Extra worker processes that decode and embed a large gallery beside the runtime's own host.

    On CPU, Paddle's math threads speed one small batch up by less than the number of threads
    (MobileNetV2 at batch 4 here: 1.5x on 2 threads), so a second single-threaded process on the
    other core embeds more images per second, and decoding happens in each lane instead of
    waiting its turn. A lane takes ~4 s to start (Python, Paddle, the model), so lanes start only
    for a gallery big enough to repay it, and stay up ``idle_seconds`` after their last use so a
    following build or add finds them warm."""

    def __init__(self, spec: ModelSpec, count: int, idle_seconds: float):
        self._spec = spec
        self.count = count
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._executors: list[_ProcessExecutor] = []
        self._users = 0
        self._timer: threading.Timer | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        with self._lock:
            return any(e.running for e in self._executors)

    def start(self, wait: bool = False) -> None:
        """Start the lanes and load their model now, in the background (e.g. while a gallery
        uploads) unless ``wait``, so the build that follows finds them up."""
        executors = self.acquire()
        if not executors:
            return

        def load(e: _ProcessExecutor) -> None:
            try:
                e.call("load")
            except ShiTuError as exc:  # the build will say it again, with the image
                log.warning("a gallery worker could not start: %s", exc)

        def run() -> None:
            try:
                threads = [threading.Thread(target=load, args=(e,), daemon=True) for e in executors]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            finally:
                self.release()

        starter = threading.Thread(target=run, name="shitu-lanes-start", daemon=True)
        starter.start()
        if wait:
            starter.join()

    def acquire(self) -> list[_ProcessExecutor]:
        with self._lock:
            if self._closed:
                return []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not self._executors:
                self._executors = [_ProcessExecutor(self._spec) for _ in range(self.count)]
            self._users += 1
            return list(self._executors)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and not self._closed:
                self._timer = threading.Timer(self.idle_seconds, self.retire)
                self._timer.daemon = True
                self._timer.start()

    def retire(self) -> None:
        with self._lock:
            if self._users or self._closed:
                return
            if self._timer is not None:
                self._timer.cancel()
            executors, self._executors, self._timer = self._executors, [], None
        for e in executors:
            e.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            executors, self._executors = self._executors, []
        for e in executors:
            e.close()


_SOURCES = {"local": "a local model dir", "official": "official PaddleX weights",
            "starter": "the offline starter pack", "none": "no model"}  # fmt: skip


def models_line(recognition: ModelChoice, detection: ModelChoice) -> str:
    """One log line: which models run and why, the shared reason said once."""
    rec_why, det_why = recognition.reason.split("; "), detection.reason.split("; ")
    shared: list[str] = []
    for a, b in zip(rec_why, det_why):
        if a != b:
            break
        shared.append(a)
    if recognition.source == detection.source and shared:
        return (
            f"models: {_SOURCES[recognition.source]} for recognition ({recognition.model_name}) and detection "
            f"({detection.model_name}) — {'; '.join(shared)}"
        )
    return f"models: recognition {recognition.describe()} | detection {detection.describe()}"


class Runtime:
    """The active detection and recognition models, and the one place they run.

    Create it with a :class:`PipelineConfig`; it decides which weights run (local dir →
    official → starter pack, see :mod:`shitu.models`) and says why in :attr:`models`.
    Predictors load on first use. :meth:`close` stops the worker/thread and frees the models.
    """

    def __init__(
        self,
        config: PipelineConfig,
        settings: Settings,
        *,
        device: str | None = None,
        isolate: bool | None = None,
        factory: str = DEFAULT_FACTORY,
    ):
        self.config = config.validate()
        self.settings = settings
        self.device = device or config.device or settings.device
        quiet_paddle()  # the starter pack may be converted (by Paddle) right here
        self.recognition: ModelChoice = resolve_recognition(config, settings)
        self.detection: ModelChoice = resolve_detection(config, settings)
        self.isolated = settings.isolate_models if isolate is None else isolate
        self.hpi = {stage: self._hpi_spec(stage) for stage in ("detection", "recognition")}
        spec = ModelSpec(
            detection=(self.detection.model_name, self.detection.model_dir) if self.detection.available else None,
            recognition=(self.recognition.model_name, str(self.recognition.model_dir)),
            device=self.device,
            rec_batch_size=config.recognition.batch_size,
            factory=factory,
            cpu_threads=settings.cpu_threads or min(usable_cores(), PADDLEX_CPU_THREADS),
            hpi_detection=self.hpi["detection"],
            hpi_recognition=self.hpi["recognition"],
        )
        self._engines: dict[str, dict[str, Any]] | None = None  # known once the models have loaded
        self._executor: _ThreadExecutor | _ProcessExecutor = (
            _ProcessExecutor(spec) if self.isolated else _ThreadExecutor(spec)
        )
        workers = settings.build_workers or min(usable_cores(), MAX_DEFAULT_WORKERS)
        self._lanes = _Lanes(
            replace(spec, detection=None, cpu_threads=settings.cpu_threads or max(1, usable_cores() // workers)),
            count=workers if workers > 1 else 0,
            idle_seconds=LANE_IDLE_SECONDS,
        )
        self._closed = False
        log.info("%s", models_line(self.recognition, self.detection))

    def _hpi_spec(self, stage: str) -> HpiSpec | None:
        """``use_hpip`` for one model: ``SHITU_USE_HPIP`` over the pipeline YAML (sub-module over pipeline)."""
        enabled, hpi_config = self.config.hpi_request(stage)
        if self.settings.use_hpip is not None:
            enabled = self.settings.use_hpip
        if not enabled:
            return None
        return HpiSpec.from_config(True, hpi_config, self.settings.models_dir / "hpi")

    # --- what runs ---------------------------------------------------------------------------
    def _engine(self, stage: str) -> dict[str, Any]:
        if self._engines is not None and stage in self._engines:
            return self._engines[stage]
        if stage == "detection" and not self.detection.available:
            return paddle_choice("no detector").to_dict()
        return pending_choice(self.hpi[stage], self.device).to_dict()

    @property
    def models(self) -> dict[str, Any]:
        """Which models are active and why, and which engine runs each (for UIs, logs and the API)."""
        return {
            "detection": {**self.detection.to_dict(), "engine": self._engine("detection")},
            "recognition": {**self.recognition.to_dict(), "engine": self._engine("recognition")},
            "device": self.device or "auto",
            "isolated": self.isolated,
            "use_hpip": any(spec is not None for spec in self.hpi.values()),
        }

    @property
    def feature_model(self) -> str:
        """Identifies the feature space; an index only matches queries from the same one."""
        return self.recognition.fingerprint

    @property
    def default_det_threshold(self) -> float:
        if self.config.det_threshold is not None:
            return self.config.det_threshold
        return self.detection.default_threshold or 0.5

    @property
    def model_rec_threshold(self) -> float:
        """The active recognition model's own default threshold (the YAML's and an index's own
        come first: :class:`shitu.threshold.ThresholdPolicy`)."""
        return self.recognition.default_threshold or 0.5

    # --- calls ---------------------------------------------------------------------------------
    def _call(self, op: str, *args: Any) -> Any:
        if self._closed:
            raise Unavailable("these models were replaced; retry the request")
        if self._engines is None and op != "load":
            self.load()  # first: so which engine runs each model is known (and logged) from the start
        return self._executor.call(op, *args)

    def load(self) -> None:
        """Create the predictors now (otherwise on first use)."""
        if self._closed:
            raise Unavailable("these models were replaced; retry the request")
        engines = self._executor.call("load")
        if self._engines is None and isinstance(engines, dict):
            for stage, choice in engines.items():
                # said when use_hpip was asked for (which engine it got, or why not); Paddle by default is no news
                level = logging.INFO if self.hpi.get(stage) is not None else logging.DEBUG
                log.log(level, "%s engine: %s", stage, choice.get("description"))
        self._engines = engines if isinstance(engines, dict) else {}

    def detect(self, image: np.ndarray, threshold: float) -> list[Box]:
        return self._call("detect", image, float(threshold))

    def embed(self, images: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        if not len(images):
            raise ShiTuError("no images to embed")
        return self._call("embed", list(images), batch_size)

    def analyze(
        self, image: np.ndarray, det_threshold: float, whole_image: str
    ) -> tuple[list[Region], np.ndarray, dict[str, float]]:
        return self._call("analyze", image, float(det_threshold), whole_image)

    def start_gallery_lanes(self, images: int | None = None, *, wait: bool = False) -> bool:
        """Start the gallery workers now, in the background (``wait``: until their model is
        loaded), when a gallery of ``images`` (None: any size) will use them; ``True`` when they
        start (or run already)."""
        if self._closed or not self._lanes.count or (images is not None and images < LANE_MIN_IMAGES):
            return False
        self._lanes.start(wait)
        return True

    def stop_gallery_lanes(self) -> None:
        """Stop the gallery workers now if no gallery is using them (otherwise: when idle)."""
        self._lanes.retire()

    @contextlib.contextmanager
    def gallery_lanes(self, images: int) -> Iterator[list[Callable[..., Any]]]:
        """Where ``images`` gallery images get decoded and embedded: a list of ``embed_sources``
        calls (see :meth:`ModelHost.embed_sources`), each to be driven by its own thread. This
        runtime's host first, then the worker processes of :class:`_Lanes` (``build_workers``)
        when they are up already (or starting), or the gallery is large enough to repay starting
        them (``LANE_MIN_COLD_IMAGES``). The
        host is meant to work only until a lane has answered: it runs with all the cores'
        threads, and lanes with one core's share each."""
        calls: list[Callable[..., Any]] = [lambda *a: self._call("embed_sources", *a)]
        wanted = self._lanes.count > 0 and (
            images >= LANE_MIN_COLD_IMAGES or (self._lanes.running and images >= LANE_MIN_WARM_IMAGES)
        )
        extra = self._lanes.acquire() if wanted and not self._closed else []
        try:
            yield calls + [lambda *a, e=e: e.call("embed_sources", *a) for e in extra]
        finally:
            if extra:
                self._lanes.release()

    @property
    def restarts(self) -> int:
        """How often the worker process had to be restarted after a crash."""
        return getattr(self._executor, "restarts", 0)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._lanes.close()
            self._executor.close()

    def __del__(self) -> None:  # a forgotten runtime must not leak a worker or shared memory
        try:
            if not getattr(self, "_closed", True) and os.getpid() == _PID:
                self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


_PID = os.getpid()
