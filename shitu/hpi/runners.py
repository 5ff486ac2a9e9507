"""ONNX models run by OpenVINO or ONNX Runtime behind PaddleX's runner contract.

A PaddleX predictor calls ``predictor.runner(inputs)`` with its inputs in alphabetical order of
their names and reads a list of output arrays. :class:`FastRunner` keeps that contract, so PaddleX's
own pre- and post-processing run unchanged around a faster model call; a detector converted without
its NMS gets the rest of its graph back from :mod:`shitu.hpi.postprocess`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shitu.hpi import postprocess

log = logging.getLogger(__name__)

MAX_SHAPES = 8  # OpenVINO compiles one static-shape model per input shape; this many are kept
BATCH_SIZES = (8, 4, 2, 1)  # a batch of another size runs as these (7 = 4 + 2 + 1): no compile per new size


class OpenVinoModel:
    """An ONNX file on OpenVINO's CPU plugin, compiled for each static input shape it meets (a
    static shape ran the recogniser ~2× faster than a dynamic one, FACTS.md)."""

    engine = "openvino"

    def __init__(self, path: Path, threads: int | None, device: str = "CPU", *, split_batches: bool = False):
        """``split_batches``: every input and output has the batch on axis 0, so a batch of any size
        runs as batches of ``BATCH_SIZES`` — a query's 1-18 crops then never wait for a compile."""
        import openvino as ov

        self._ov = ov
        self._core = ov.Core()
        self._path = str(path)
        self._device = device
        # f32 always: on CPUs with bf16 units OpenVINO otherwise computes in bf16 (cosine ~0.997 to Paddle)
        self._config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        probe = self._core.read_model(self._path)
        self.input_names = [p.get_any_name() for p in probe.inputs]
        self.output_names = [p.get_any_name() for p in probe.outputs]
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.split_batches = split_batches
        self.version = ov.get_version().split("-")[0]

    def _for(self, feeds: dict[str, np.ndarray]) -> Any:
        key = tuple((name, feeds[name].shape) for name in self.input_names)
        compiled = self._compiled.get(key)
        if compiled is None:
            model = self._core.read_model(self._path)
            model.reshape({name: self._ov.PartialShape(list(shape)) for name, shape in key})
            compiled = self._core.compile_model(model, self._device, self._config)
            self._compiled[key] = compiled
            while len(self._compiled) > MAX_SHAPES:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled

    def _run_static(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        compiled = self._for(feeds)
        results = compiled(feeds)
        return [np.array(results[out]) for out in compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            n = len(next(iter(feeds.values())))
            if not self.split_batches or n in BATCH_SIZES or n == 0:
                return self._run_static(feeds)
            parts, start = [], 0
            while start < n:
                size = next(b for b in BATCH_SIZES if b <= n - start)
                parts.append(self._run_static({k: v[start : start + size] for k, v in feeds.items()}))
                start += size
            return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def warm_up(self, feeds: dict[str, np.ndarray]) -> None:
        """Compile now for each batch size (from one example batch), not at the first query."""
        if self.split_batches:
            for size in BATCH_SIZES:
                self.run({k: np.repeat(v[:1], size, axis=0) for k, v in feeds.items()})


class OnnxRuntimeModel:
    """An ONNX file on ONNX Runtime: the CPU provider (no thread spinning: it competes with the
    other process's threads on a small machine, FACTS.md) or CUDA on a GPU."""

    engine = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.version = ort.__version__
        self.providers = self._session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(self.output_names, {n: feeds[n] for n in self.input_names}))


class FastRunner:
    """PaddleX's runner contract over an ONNX model (+ the detector's NumPy tail).

    ``fallback``: Paddle's own runner; if the fast model ever fails on an input, that call and every
    later one go to Paddle, and ``on_fallback`` is told the one-line reason."""

    def __init__(
        self, model: Any, feed_names: Sequence[str], meta: dict[str, Any], *, anchors: np.ndarray | None = None,
        fallback: Callable[..., Any] | None = None, on_fallback: Callable[[str], None] | None = None,
    ):  # fmt: skip
        self.model = model
        self.feed_names = sorted(feed_names)  # PaddleX hands inputs over sorted by name
        self.meta = meta
        self.variant = meta.get("variant", "full")
        self.anchors = anchors
        self.fallback = fallback
        self.on_fallback = on_fallback
        self.failed: str | None = None

    def run(self, x: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(value) for name, value in zip(self.feed_names, x)}
        outputs = self.model.run({n: feeds[n] for n in self.model.input_names})
        if self.variant == "ssd-raw":
            return postprocess.ssd_raw(outputs[0], outputs[1], feeds["scale_factor"], self.meta, self.anchors)
        if self.variant == "nms-cut":
            return postprocess.nms_cut(outputs[0], outputs[1], self.meta["nms"])
        return outputs

    def __call__(self, x: Any = None, **kwargs: Any) -> list[np.ndarray]:
        if x is None:
            x = kwargs.get("x")
        if isinstance(x, np.ndarray):
            x = [x]
        if self.failed is None:
            try:
                return self.run(x)
            except Exception as exc:  # noqa: BLE001 - any engine error: Paddle takes over
                if self.fallback is None:
                    raise
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                self.failed = f"{self.model.engine} failed on an input ({type(exc).__name__}: {first}); Paddle runs it"
                log.warning("%s", self.failed)
                if self.on_fallback:
                    self.on_fallback(self.failed)
        assert self.fallback is not None
        return self.fallback(x)

    def close(self) -> None:
        pass
