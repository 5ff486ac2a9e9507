"""High-performance inference (PaddleX's ``use_hpip``): PaddleX's models on OpenVINO or ONNX Runtime.

PaddleX's own plugin needs ``ultra-infer``, which no package index serves; this is the same idea
built from PyPI packages (the ``hpi`` extra: ``pip install "shitu-studio[hpi]"``). For each model,
when the models load (:func:`accelerate`):

1. **Engine.** ``hpi_config["backend"]`` or, by default, OpenVINO on CPU and ONNX Runtime (CUDA) on
   a GPU; ``"paddle"`` keeps Paddle Inference.
2. **Conversion, cached.** ``paddle2onnx`` (opset 11, no optimizer step) converts the model dir once,
   in a child process (:mod:`shitu.hpi.export`: paddle2onnx aborts the process on an operator it
   cannot map). The result lives in ``<models dir>/hpi/<model dir name>-<stage>-<hash>/``; the hash
   covers the model's files, the paddle2onnx and Paddle versions and our export format, so a changed
   model converts again. A failed conversion is remembered there too, with its reason. Detectors are
   converted without their in-graph NMS (see :mod:`shitu.hpi.export`), which
   :mod:`shitu.hpi.postprocess` reproduces in NumPy.
3. **Verification.** The fast model must reproduce Paddle's own outputs on a probe batch
   (scikit-image's bundled photos, through PaddleX's own preprocessing): features at cosine
   ≥ ``MIN_COSINE``; detector boxes with the same classes and counts, coordinates within
   ``BOX_TOLERANCE_PX`` and scores within ``SCORE_TOLERANCE`` (a box scored at the NMS floor itself,
   within ``FLOOR_MARGIN``, may be kept by one engine only: see :func:`compare_boxes`).
4. **Swap.** The PaddleX predictor keeps its pre- and post-processing; only its ``runner`` (the model
   call) is replaced (:class:`shitu.hpi.runners.FastRunner`), with Paddle's runner kept as the
   fallback should the fast engine ever fail on an input. An engine that kills the process while it
   loads or checks a model is not tried on it again (:class:`_CrashGuard`).

Any step that fails keeps Paddle and says why in one line (:class:`EngineChoice`), which
``Runtime.models`` / ``Engine.models()`` / ``/health`` report per model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.config import parse_hpi_config

log = logging.getLogger(__name__)

ENGINE_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "paddle": "Paddle Inference"}
EXPORT_FORMAT = 1  # bumped when shitu.hpi.export changes what it writes: cached conversions are redone
MIN_COSINE = 0.99999  # per probe image, L2-normalised features
BOX_TOLERANCE_PX = 0.5  # per coordinate, original-image pixels
SCORE_TOLERANCE = 1e-4
FLOOR_MARGIN = 1e-5  # a box scored this close to the NMS floor may be kept by one engine only (see compare_boxes)
CONVERT_TIMEOUT = 600.0
INSTALL_HINT = 'pip install "shitu-studio[hpi]" (or -r requirements-hpi.txt)'


@dataclass(frozen=True)
class HpiSpec:
    """One model's high-performance inference request (picklable: it travels to the model worker)."""

    enabled: bool = False
    backend: str | None = None  # None: OpenVINO on CPU, ONNX Runtime on GPU
    cpu_threads: int | None = None  # hpi_config.backend_config.cpu_num_threads (default: the runtime's)
    cache_dir: str | None = None  # where conversions are kept (<models dir>/hpi)
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers, if hpi_config names them

    @classmethod
    def from_config(cls, enabled: bool, hpi_config: dict[str, Any] | None, cache_dir: Path | str) -> "HpiSpec":
        cfg = parse_hpi_config(hpi_config)
        backend_config = cfg.get("backend_config") or {}
        providers = backend_config.get("providers")
        return cls(
            enabled=bool(enabled), backend=cfg.get("backend"), cpu_threads=backend_config.get("cpu_num_threads"),
            cache_dir=str(cache_dir), providers=tuple(providers) if providers else None,
        )  # fmt: skip


@dataclass
class EngineChoice:
    """Which engine runs one model, and why (for ``Runtime.models`` and ``/health``)."""

    engine: str  # openvino | onnxruntime | paddle
    reason: str
    requested: str | None = None  # what use_hpip / hpi_config asked for (None: HPI off)
    check: dict[str, Any] = field(default_factory=dict)  # the verification's numbers

    def describe(self) -> str:
        return f"{ENGINE_NAMES.get(self.engine, self.engine)}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "name": ENGINE_NAMES.get(self.engine, self.engine), "description": self.describe()}


def paddle_choice(reason: str, requested: str | None = None) -> EngineChoice:
    return EngineChoice("paddle", reason, requested)


def pending_choice(spec: HpiSpec | None, device: str | None) -> EngineChoice:
    """What is known before the models load."""
    if spec is None or not spec.enabled:
        return paddle_choice("use_hpip is off")
    backend = resolve_backend(spec, device)
    return EngineChoice(backend, "requested with use_hpip; converted and verified when the models load", backend)


def _is_gpu(device: str | None) -> bool:
    return bool(device) and str(device).split(":")[0].lower() in ("gpu", "cuda")


def resolve_backend(spec: HpiSpec, device: str | None) -> str:
    """The engine asked for: ``hpi_config.backend``, else OpenVINO on CPU, ONNX Runtime on a GPU."""
    if spec.backend:
        return spec.backend
    return "onnxruntime" if _is_gpu(device) else "openvino"


# --- the conversion cache -----------------------------------------------------------------------------
def _model_files(model_dir: Path) -> list[Path]:
    names = ("inference.json", "inference.pdmodel", "inference.pdiparams", "inference.yml", "starter.json")
    return [model_dir / n for n in names if (model_dir / n).is_file()]


def cache_key(model_dir: Path, stage: str) -> str:
    """A hash of everything the conversion reads: the model's files, paddle2onnx's and Paddle's
    versions and our export format."""
    digest = hashlib.sha256(f"shitu-hpi {EXPORT_FORMAT} {stage}\n".encode())
    for dist in ("paddle2onnx", "paddlepaddle"):
        digest.update(f"{dist} {_version(dist)}\n".encode())
    for path in _model_files(model_dir):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def cache_entry(model_dir: Path, stage: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{Path(model_dir).name}-{stage}-{cache_key(Path(model_dir), stage)}"


FAILED_NOTE = "failed.json"


def _reason_from_output(output: str, returncode: int) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    refused = [ln.removeprefix("REFUSED: ") for ln in lines if ln.startswith("REFUSED: ")]
    if refused:
        return refused[-1]
    paddle2onnx_errors = [ln for ln in lines if "[ERROR]" in ln]  # e.g. "... unsupported operators ..."
    errors = [ln for ln in lines if "Error" in ln.split(":")[0]]
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    detail = (paddle2onnx_errors or errors or lines or ["no output"])[-1]
    detail = detail.replace("[ERROR][Paddle2ONNX] ", "")
    return f"paddle2onnx could not convert it ({how}): {detail[:240]}"


def convert(model_dir: Path, stage: str, cache_dir: Path, timeout: float = CONVERT_TIMEOUT) -> tuple[Path, bool]:
    """The cached conversion of ``model_dir`` (made now, in a child process, if missing):
    ``(entry dir, made now)``. Raises :class:`ConversionFailed` with a one-line reason, also when an
    earlier attempt at the same inputs failed (remembered in the cache)."""
    entry = cache_entry(model_dir, stage, cache_dir)
    if (entry / "inference.onnx").is_file() and (entry / "hpi.json").is_file():
        return entry, False
    note = entry.with_name(entry.name + "." + FAILED_NOTE)
    if note.is_file():
        try:
            reason = json.loads(note.read_text(encoding="utf-8"))["reason"]
            raise ConversionFailed(f"{reason} (remembered from an earlier attempt; delete {note.name} to retry)")
        except (OSError, ValueError, KeyError):
            pass
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        env = {**os.environ, "GLOG_minloglevel": "2", "TMPDIR": str(tmp)}
        code = "import sys; from shitu.hpi.export import main; sys.exit(main(sys.argv[1:]))"
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, str(model_dir), str(tmp), stage], capture_output=True, text=True,
                timeout=timeout, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"paddle2onnx did not finish within {timeout:.0f} s") from None
        if done.returncode != 0 or not (tmp / "inference.onnx").is_file():
            reason = _reason_from_output(done.stdout + "\n" + done.stderr, done.returncode)
            _remember_failure(note, reason)
            raise ConversionFailed(reason)
        for leftover in tmp.iterdir():
            if leftover.name not in ("inference.onnx", "hpi.json", "anchors.npy"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
        tmp.chmod(0o755)
        try:
            tmp.replace(entry)
        except OSError:  # another process made it first
            if not (entry / "inference.onnx").is_file():
                raise
        return entry, True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remember_failure(note: Path, reason: str) -> None:
    try:
        note.write_text(json.dumps({"reason": reason, "at": time.time()}) + "\n", encoding="utf-8")
    except OSError:  # a read-only cache: the next start tries again
        pass


class ConversionFailed(Exception):
    """paddle2onnx could not convert a model (``args[0]``: the one-line reason)."""


# --- loading and verifying ----------------------------------------------------------------------------
def load_fast_model(entry: Path, backend: str, threads: int | None, device: str | None,
                    providers: tuple[str, ...] | None = None, split_batches: bool = False) -> Any:  # fmt: skip
    from shitu.hpi.runners import OnnxRuntimeModel, OpenVinoModel

    onnx = entry / "inference.onnx"
    if backend == "openvino":
        return OpenVinoModel(onnx, threads, split_batches=split_batches)
    if providers is None:
        if _is_gpu(device):
            index = str(device).split(":")[1] if ":" in str(device) else "0"
            providers = (("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider")  # type: ignore[assignment]
        else:
            providers = ("CPUExecutionProvider",)
    return OnnxRuntimeModel(onnx, threads, providers)  # type: ignore[arg-type]


def _missing(backend: str) -> str | None:
    needed = ["paddle2onnx", backend]
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
        return f"{' and '.join(absent)} not installed ({INSTALL_HINT})"
    return None


def probe_images() -> list[np.ndarray]:
    """Photos to check the fast engine on (BGR, as PaddleX takes arrays): scikit-image's bundled
    photos — people, an animal, objects, a small and a flat image (the detector's empty case)."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    bgr = [np.ascontiguousarray(p[..., ::-1]) for p in photos]
    bgr.append(np.ascontiguousarray(bgr[1][::3, ::3]))
    bgr.append(np.full((120, 160, 3), 127, np.uint8))
    return bgr


class _Recorder:
    """Stands in for a predictor's runner while PaddleX's own predict runs: records inputs and outputs."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[tuple[list[np.ndarray], list[np.ndarray]]] = []

    def __call__(self, x: Any = None, **kwargs: Any) -> Any:
        if x is None:
            x = kwargs.get("x")
        x = [x] if isinstance(x, np.ndarray) else list(x)
        out = self.inner(x)
        self.calls.append(([np.array(a) for a in x], [np.array(o) for o in out]))
        return out


def paddle_probe(predictor: Any, stage: str, images: list[np.ndarray]) -> list[tuple[list[np.ndarray], list]]:
    """Paddle's own model-call inputs and outputs on ``images``, through PaddleX's preprocessing."""
    target = _unwrap(predictor)
    recorder = _Recorder(target.runner)
    target.runner = recorder
    try:
        if stage == "recognition":
            batch = images[:4]
            list(predictor.predict(batch, batch_size=len(batch)))
            list(predictor.predict(images[4:5], batch_size=1))
        else:
            for image in images:
                list(predictor.predict([image], threshold=0.0))
    finally:
        target.runner = recorder.inner
    return recorder.calls


def _unwrap(predictor: Any) -> Any:
    """The predictor that holds the runner: ``paddlex.create_model`` returns a wrapper around it."""
    return getattr(predictor, "_predictor", predictor)


def compare_features(paddle_out: np.ndarray, fast_out: np.ndarray) -> dict[str, Any]:
    a = np.asarray(paddle_out, np.float64).reshape(len(paddle_out), -1)
    b = np.asarray(fast_out, np.float64).reshape(len(fast_out), -1)
    if a.shape != b.shape:
        return {"ok": False, "why": f"feature shapes differ: {a.shape} vs {b.shape}"}
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = float(np.min(np.sum(a * b, axis=1)))
    ok = cos >= MIN_COSINE
    return {"ok": ok, "min_cosine": cos, "why": None if ok else f"feature cosine {cos:.7f} < {MIN_COSINE}"}


def _above(boxes: np.ndarray, counts: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The rows (and per-image counts) scored clearly above ``floor``."""
    image = np.repeat(np.arange(len(counts)), counts)
    keep = boxes[:, 1] > floor
    return boxes[keep], np.bincount(image[keep], minlength=len(counts)).astype(counts.dtype)


def compare_boxes(paddle_out: list[np.ndarray], fast_out: list[np.ndarray], floor: float | None = None
                  ) -> dict[str, Any]:  # fmt: skip
    """Same boxes, classes and counts per image, coordinates within ``BOX_TOLERANCE_PX``. ``floor``:
    the NMS score threshold; a box scored within ``FLOOR_MARGIN`` of it may be kept by one
    engine and not by the other (110.jpeg has one at 0.05000005 that ONNX Runtime scores a hair
    lower), so only boxes clearly above it are compared — far below any threshold a user picks."""
    pb, pc = np.asarray(paddle_out[0]).reshape(-1, 6), np.asarray(paddle_out[1]).reshape(-1)
    fb, fc = np.asarray(fast_out[0]).reshape(-1, 6), np.asarray(fast_out[1]).reshape(-1)
    if len(pc) != len(fc) or pc.sum() != len(pb) or fc.sum() != len(fb):
        return {"ok": False, "why": f"box counts differ: Paddle {pc.tolist()}, fast {fc.tolist()}"}
    at_floor = 0
    if floor is not None:
        before = len(pb) + len(fb)
        (pb, pc), (fb, fc) = _above(pb, pc, floor + FLOOR_MARGIN), _above(fb, fc, floor + FLOOR_MARGIN)
        at_floor = before - len(pb) - len(fb)
    if not np.array_equal(pc, fc):
        return {"ok": False, "why": f"box counts differ: Paddle {pc.tolist()}, fast {fc.tolist()}"}
    if not len(pb):
        return {"ok": True, "boxes": 0, "max_box_px": 0.0, "max_score": 0.0, "at_floor": at_floor}
    if not np.array_equal(pb[:, 0], fb[:, 0]):
        return {"ok": False, "why": "box classes differ"}
    px = float(np.max(np.abs(pb[:, 2:] - fb[:, 2:])))
    score = float(np.max(np.abs(pb[:, 1] - fb[:, 1])))
    ok = px <= BOX_TOLERANCE_PX and score <= SCORE_TOLERANCE
    why = None if ok else f"boxes differ by up to {px:.3f} px and scores by {score:.2e}"
    return {"ok": ok, "boxes": int(len(pb)), "max_box_px": px, "max_score": score, "why": why, "at_floor": at_floor}


def verify(predictor: Any, stage: str, runner: Any, images: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Run the probe through Paddle (recorded) and through ``runner`` on the same inputs; the
    worst case over the probe, ``ok`` when every call is within the tolerances."""
    calls = paddle_probe(predictor, stage, images if images is not None else probe_images())
    worst: dict[str, Any] = {"ok": True, "calls": len(calls)}
    if calls:  # one model input, for warming the engine up afterwards
        worst["example"] = {n: v for n, v in zip(runner.feed_names, calls[0][0]) if n in runner.model.input_names}
    for inputs, outputs in calls:
        fast = runner.run(inputs)
        if stage == "recognition":
            found = compare_features(outputs[0], fast[0])
        else:
            found = compare_boxes(outputs, fast, (runner.meta.get("nms") or {}).get("score_threshold"))
        if not found["ok"]:
            return {**found, "calls": len(calls)}
        for key in ("min_cosine",):
            if key in found:
                worst[key] = min(worst.get(key, 1.0), found[key])
        for key in ("max_box_px", "max_score", "at_floor"):
            if key in found:
                worst[key] = max(worst.get(key, 0.0), found[key])
        if "boxes" in found:
            worst["boxes"] = worst.get("boxes", 0) + found["boxes"]
    return worst


def _summary(check: dict[str, Any]) -> str:
    if "min_cosine" in check:
        return f"cosine gap ≤ {max(0.0, 1 - check['min_cosine']):.1e} on {check['calls']} probe batches"
    return (
        f"{check.get('boxes', 0)} boxes on {check['calls']} probe images equal within "
        f"{check.get('max_box_px', 0.0):.2e} px"
    )


def accelerate(predictor: Any, stage: str, model_dir: str | None, spec: HpiSpec | None, device: str | None,
               default_threads: int | None) -> EngineChoice:  # fmt: skip
    """Put ``predictor``'s model call on the fast engine ``spec`` asks for, or keep Paddle and say why."""
    if spec is None or not spec.enabled:
        return paddle_choice("use_hpip is off")
    backend = resolve_backend(spec, device)
    if backend == "paddle":
        return paddle_choice("hpi_config backend: paddle", backend)
    if not hasattr(_unwrap(predictor), "runner") or model_dir is None:
        return paddle_choice("this predictor has no model call to replace", backend)
    missing = _missing(backend)
    if missing:
        return paddle_choice(missing, backend)
    if _is_gpu(device) and backend == "openvino":
        return paddle_choice("OpenVINO's GPU plugin is not supported here; use backend onnxruntime on a GPU", backend)
    started = time.perf_counter()
    try:
        entry, made = convert(Path(model_dir), stage, Path(spec.cache_dir or tempfile.gettempdir()))
    except ConversionFailed as exc:
        log.warning("%s model stays on Paddle: %s", stage, exc.args[0])
        return paddle_choice(exc.args[0], backend)
    from shitu.hpi.runners import FastRunner

    guard = _CrashGuard(entry, backend)
    crashed = guard.crashed_before()
    if crashed:
        log.warning("%s model stays on Paddle: %s", stage, crashed)
        return paddle_choice(crashed, backend)
    try:
        guard.arm()
        meta = json.loads((entry / "hpi.json").read_text(encoding="utf-8"))
        anchors = np.load(entry / "anchors.npy") if (entry / "anchors.npy").is_file() else None
        # batch on axis 0 of every input and output: the recogniser and the detectors cut before NMS
        per_image = stage == "recognition" or meta.get("variant") in ("ssd-raw", "nms-cut")
        model = load_fast_model(entry, backend, spec.cpu_threads or default_threads, device, spec.providers, per_image)
        if _is_gpu(device) and "CUDAExecutionProvider" not in getattr(model, "providers", ()):
            return paddle_choice("ONNX Runtime has no CUDA provider here (install onnxruntime-gpu)", backend)
        feed_names = _paddle_feed_names(_unwrap(predictor), model)
        runner = FastRunner(model, feed_names, meta, anchors=anchors, fallback=_unwrap(predictor).runner)
        check = verify(predictor, stage, runner)
        if check["ok"] and stage == "recognition" and hasattr(model, "warm_up"):  # a query's crops: 1, 2, 3 ...
            model.warm_up(check["example"])
    except Exception as exc:  # noqa: BLE001 - an engine that cannot load or run the model: Paddle keeps it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        reason = f"{ENGINE_NAMES[backend]} could not run the converted model ({type(exc).__name__}: {first})"
        log.warning("%s model stays on Paddle: %s", stage, reason)
        return paddle_choice(reason, backend)
    finally:
        guard.disarm()
    if not check["ok"]:
        reason = f"refused: the converted model does not reproduce Paddle's outputs ({check['why']})"
        log.warning("%s model stays on Paddle: %s", stage, reason)
        return paddle_choice(reason, backend)
    variant = {"ssd-raw": ", NMS in NumPy", "nms-cut": ", NMS in NumPy"}.get(meta.get("variant"), "")
    numbers = {k: v for k, v in check.items() if k not in ("ok", "why", "example")}
    numbers["seconds"] = round(time.perf_counter() - started, 1)
    how = "converted now" if made else "cached conversion"
    choice = EngineChoice(
        backend,
        f"paddle2onnx {meta.get('paddle2onnx', '?')} ({how}{variant}), {ENGINE_NAMES[backend]} {model.version}; "
        f"verified against Paddle: {_summary(check)}",
        backend,
        numbers,
    )  # fmt: skip

    def fell_back(reason: str, choice: EngineChoice = choice) -> None:
        choice.engine, choice.reason = "paddle", reason

    runner.on_fallback = fell_back
    _unwrap(predictor).runner = runner
    return choice


class _CrashGuard:
    """A native crash of the engine while it loads or checks a model (the worker process dies) must not
    repeat at every restart: a marker naming this process lies in the cache entry meanwhile; a marker
    left by a process that no longer exists means it died there, and that engine is not tried again on
    this model (until ``<backend>.crashed`` is deleted)."""

    def __init__(self, entry: Path, backend: str):
        self.entry, self.backend = entry, backend
        self.marker = entry / f".{backend}.loading.{os.getpid()}"
        self.note = entry / f"{backend}.crashed"

    def crashed_before(self) -> str | None:
        try:
            if self.note.is_file():
                return self.note.read_text(encoding="utf-8").strip()
            for marker in self.entry.glob(f".{self.backend}.loading.*"):
                pid = int(marker.name.rsplit(".", 1)[1])
                if pid != os.getpid() and not _alive(pid):
                    reason = (
                        f"{ENGINE_NAMES[self.backend]} ended the process (pid {pid}) while loading or checking this "
                        f"model; Paddle keeps it (delete {self.note.name} in the conversion cache to try again)"
                    )
                    self.note.write_text(reason + "\n", encoding="utf-8")
                    marker.unlink(missing_ok=True)
                    return reason
        except (OSError, ValueError):  # a read-only or odd cache: no memory of crashes
            return None
        return None

    def arm(self) -> None:
        try:
            self.marker.write_text("", encoding="utf-8")
        except OSError:
            pass

    def disarm(self) -> None:
        try:
            self.marker.unlink(missing_ok=True)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _paddle_feed_names(predictor: Any, model: Any) -> list[str]:
    """The input names PaddleX sorts its inputs by: Paddle's own predictor's, else the ONNX model's."""
    inner = getattr(predictor.runner, "predictor", None)
    if inner is not None and hasattr(inner, "get_input_names"):
        return list(inner.get_input_names())
    return list(model.input_names)
