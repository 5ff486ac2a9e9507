"""The one in-process object behind every front end.

The web UI, the HTTP API, the CLI and the PaddleX-compatible Python API (:mod:`shitu.paddlex_api`)
are thin shells over :class:`Engine`; none of them touches the model runtime, the stores or
an index file directly. The engine owns:

* the models (:class:`~shitu.runtime.Runtime`), swapped under a lock — a request in flight
  keeps the runtime it started with, and a replaced runtime is closed when its last request ends;
* the indices: named ones in the vector store (files in the data dir, or Milvus), and
  PaddleX-layout directories given by path — all :class:`~shitu.stores.base.GalleryStore` s,
  so there is one code path;
* export/import, and the defaults of every per-call option (thresholds included).

Data flows one way: image → :meth:`Runtime.analyze` (detect → crop → embed) →
:func:`~shitu.matching.match_objects` (search → top-k → cross-box NMS) → :class:`Recognition`.

Colour order: arrays given to the engine are **RGB** unless ``bgr=True``; the PaddleX API's
``predict`` takes BGR arrays like PaddleX and says so (``bgr=True``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu import fonts
from shitu.augment import view_plan
from shitu.config import (
    INDEX_TYPES,
    METRIC_TYPES,
    REC_MODEL_FACTS,
    REC_MODELS,
    WHOLE_IMAGE_MODES,
    PipelineConfig,
    Settings,
)
from shitu.errors import Busy, Conflict, NotFound, ShiTuError, Unavailable
from shitu.gallery import (
    GalleryBatch,
    GalleryItem,
    ImageInput,
    SkippedLine,
    crop_box,
    in_line_order,
    load_image,
    make_thumbnail,
)
from shitu.i18n import text as say
from shitu.ids import parse_ids
from shitu.index import GalleryIndex
from shitu.matching import index_floor, search_regions
from shitu.report import GalleryReport, gallery_report
from shitu.results import Recognition, merge_same_label
from shitu.runtime import Runtime
from shitu.stores.base import GalleryStore, check_name, open_store
from shitu.stores.files import FileStore
from shitu.stores.layout import load_index
from shitu.threshold import ThresholdPolicy
from shitu.views import (
    CalibrationView,
    EntryPage,
    EntryView,
    IndexInfo,
    OperatingPoint,
    VersionDiff,
    VersionInfo,
)

__all__ = ["ChangeReport", "Engine", "Options", "Progress", "UNSET"]

log = logging.getLogger(__name__)

SAMPLE_INDEX = "sample"
TEACH_RECALIBRATE_MAX = 5000  # teaching refits an adapted index's projection up to this size
GALLERY_JOB_MIN_IMAGES = 32  # a gallery of at least this many images counts as a job (SHITU_MAX_GALLERY_JOBS)
TEACH_DUPLICATE_SIMILARITY = 0.995  # a taught box this similar to an entry is that entry again (the same picture)
Progress = Callable[[int, int, str], None]  # (done, total, what)
IndexRef = str | Path | GalleryIndex | None  # a name in the data dir, a directory, or an index object


@dataclass
class ChangeReport:
    """What a change did, for summaries in the UI, API and CLI: the ids it gave new entries (none
    for a remove, relabel, calibration or import), the lines it skipped, the index's summary after
    it. The index itself stays with the engine (``gallery``: for the engine and the Python API's
    ``IndexData``); front ends read ``id_map`` and ``image_count``, or ask the engine."""

    index: str
    added_ids: list[int]
    skipped: list[SkippedLine] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    gallery: GalleryIndex | None = field(default=None, repr=False)  # the index after the change

    @property
    def id_map(self) -> dict[int, str]:
        """``id → label`` of the whole index after the change (built on demand: O(entries))."""
        return self.gallery.id_map if self.gallery is not None else {}

    @property
    def image_count(self) -> int:
        return len(self.gallery) if self.gallery is not None else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "added": len(self.added_ids),
            "skipped": [{"line": s.line_no, "source": s.source, "reason": s.reason} for s in self.skipped],
            **self.summary,
        }


@dataclass(frozen=True)
class Options:
    """Per-call recognition options with every default filled in."""

    det_threshold: float
    rec_threshold: float
    rec_topk: int
    whole_image: str
    nms_iou: float | None


UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # "not given" where None means "off"


class Engine:
    """Models + indices. Thread-safe; create one per process and :meth:`close` it at the end.

    ``config``: the pipeline YAML (default: ``settings.pipeline_config`` or PaddleX's defaults);
    ``runtime``: share already-loaded models (tests); ``isolate``: run PaddleX in a worker
    process (default: ``settings.isolate_models``).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        config: PipelineConfig | None = None,
        runtime: Runtime | None = None,
        device: str | None = None,
        isolate: bool | None = None,
    ):
        self.settings = settings or Settings.from_env()
        if config is None:
            config = PipelineConfig.load(self.settings.pipeline_config) if self.settings.pipeline_config else None
        self.config = (config or PipelineConfig()).validate()
        if self.settings.rec_model and not self.config.recognition.model_dir:
            self.config.recognition.model_name = self.settings.rec_model
        self._device = device
        self._isolate = isolate
        fonts.use(self.settings.models_dir, offline=self.settings.offline)  # drawn labels find the CJK font there
        self._store = self._named_store()
        self._dir_stores: dict[Path, GalleryStore] = {}
        self._runtime = runtime
        self._owns_runtime = runtime is None
        self._rt_lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(self.settings.max_waiting_requests)
        self._admission_depth = threading.local()
        self._gallery_jobs = threading.BoundedSemaphore(self.settings.max_gallery_jobs)
        self._in_flight: dict[int, int] = {}
        self._retired: dict[int, Runtime] = {}
        # the last few gallery reports: {(name, id(index)): (weakref to that index version, report)}
        self._report_cache: dict[tuple[str | None, int], tuple[weakref.ref, GalleryReport]] = {}

    def _named_store(self) -> GalleryStore:
        """Where named indices live: ``SHITU_VECTOR_STORE`` (faiss files in the data dir, or Milvus)."""
        return open_store(self.settings.vector_store, self.settings)

    @property
    def vector_store(self) -> str:
        """Where named indices live and are searched: ``faiss`` (files in the data dir),
        ``milvus_lite`` (a Milvus Lite file, one process) or ``milvus_server``."""
        if self.settings.vector_store == "faiss":
            return "faiss"
        return "milvus_server" if "://" in self.settings.milvus_target else "milvus_lite"

    # --- models -----------------------------------------------------------------------------
    def _current_runtime(self) -> Runtime:
        if self._runtime is None:
            with self._rt_lock:
                if self._runtime is None:
                    self._runtime = Runtime(self.config, self.settings, device=self._device, isolate=self._isolate)
        return self._runtime

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """A place among the requests that use or wait for the models (``SHITU_MAX_WAITING_REQUESTS``),
        or :class:`Busy` at once: a full queue answers "retry in a moment" instead of growing."""
        depth = getattr(self._admission_depth, "n", 0)  # a request's own nested calls count once
        if depth == 0 and not self._admission.acquire(blocking=False):
            limit = self.settings.max_waiting_requests
            raise Busy(f"the models are busy ({limit} requests are being answered); retry in a moment")
        self._admission_depth.n = depth + 1
        try:
            yield
        finally:
            self._admission_depth.n = depth
            if depth == 0:
                self._admission.release()

    @contextlib.contextmanager
    def _gallery_job(self, images: int) -> Iterator[None]:
        """A place among the large galleries being embedded at once (``SHITU_MAX_GALLERY_JOBS``: a
        build of hundreds of images takes minutes and the models' whole attention), or :class:`Busy`
        at once. Small ones (adding a few photos, teaching a box) are not counted."""
        if images < GALLERY_JOB_MIN_IMAGES:
            yield
            return
        if not self._gallery_jobs.acquire(blocking=False):
            jobs = self.settings.max_gallery_jobs
            raise Busy(f"{jobs} galleries are being embedded already; try again when one has finished",
                       retry_after=30)  # fmt: skip
        try:
            yield
        finally:
            self._gallery_jobs.release()

    @contextlib.contextmanager
    def _models(self) -> Iterator[Runtime]:
        """The runtime for one request: the same from its start to its end, even across a switch."""
        with self._admitted():
            yield from self._same_runtime()

    def _same_runtime(self) -> Iterator[Runtime]:
        runtime = self._current_runtime()
        with self._rt_lock:
            runtime = self._runtime or runtime
            self._in_flight[id(runtime)] = self._in_flight.get(id(runtime), 0) + 1
        try:
            yield runtime
        finally:
            with self._rt_lock:
                self._in_flight[id(runtime)] -= 1
                done = self._in_flight[id(runtime)] == 0 and id(runtime) in self._retired
                if done:
                    self._retired.pop(id(runtime))
                    del self._in_flight[id(runtime)]
            if done:
                runtime.close()

    def models(self) -> dict[str, Any]:
        """Which models are active and why."""
        return self._current_runtime().models

    def prepare_models(self) -> None:
        """Load the predictors now (otherwise on first use)."""
        with self._models() as runtime:
            runtime.load()

    def expect_gallery(self, images: int) -> bool:
        """A gallery of ``images`` is on its way (e.g. uploading): when it is large enough to be
        embedded by worker processes of its own (``SHITU_BUILD_WORKERS``), start them now in the
        background so the build finds them up. ``True`` when they start or run already."""
        with self._models() as runtime:
            return runtime.start_gallery_lanes(images)

    @property
    def feature_model(self) -> str:
        return self._current_runtime().feature_model

    def recognition_models(self) -> list[dict[str, Any]]:
        """The three official recognisers with PaddleX's published size, accuracy and speed, and
        whether each is active or can be switched to here (its weights cached, mirrored or
        downloadable; otherwise only the starter pack can stand in)."""
        active = self.models()["recognition"]
        return [
            {
                "name": name,
                **REC_MODEL_FACTS[name],
                "active": active["model_name"] == name and active["source"] != "starter",
            }  # fmt: skip
            for name in REC_MODELS
        ]

    def switch_recognition_model(self, model_name: str) -> dict[str, Any]:
        """Use another recognition model. The new one is loaded first; if it is not available,
        nothing changes. Requests in flight finish on the old one, which is then closed."""
        if model_name not in REC_MODELS:
            raise ShiTuError(f"unknown recognition model {model_name!r}; choose one of {', '.join(REC_MODELS)}")
        current = self._current_runtime()
        config = PipelineConfig.from_dict(self.config.to_dict())
        config.recognition.model_name = model_name
        config.recognition.model_dir = None
        new = Runtime(config, self.settings, device=current.device, isolate=current.isolated)
        if new.recognition.source == "starter" and model_name != "PP-ShiTuV2_rec":
            new.close()
            raise Unavailable(f"{model_name} is not available here: {new.recognition.reason}")
        try:
            new.load()
        except Exception:
            new.close()
            raise
        with self._rt_lock:
            old = self._runtime
            self._runtime = new
            self.config = config
            close_now = old is not None and self._owns_runtime and self._in_flight.get(id(old), 0) == 0
            if old is not None and self._owns_runtime and not close_now:
                self._retired[id(old)] = old
            self._owns_runtime = True
        if close_now and old is not None:
            old.close()
        return new.models

    # --- official weights in the background (shitu.background) ---------------------------------
    _official_downloads: Any = None  # an OfficialDownloads, created on first use
    _official_guard = threading.Lock()

    def _downloads(self) -> Any:
        from shitu.background import OfficialDownloads

        with Engine._official_guard:
            if self._official_downloads is None:
                self._official_downloads = OfficialDownloads()
            return self._official_downloads

    def prepare_official_in_background(self, *, switch: bool = True, rebuild_sample: bool = True) -> bool:
        """Download the official weights the config names (for each stage now on the starter pack)
        on a thread while the current models serve, then switch to them (requests in flight
        finish on the old ones) and rebuild the sample index. ``False`` when nothing is missing,
        the hub may not be tried (``SHITU_OFFLINE``), or a preparation is already running."""
        return self._downloads().start(self, switch=switch, rebuild_sample=rebuild_sample)

    def model_download_status(self) -> dict[str, Any]:
        """The background preparation: ``state`` (idle, downloading, switching, switched, ready,
        failed, nothing to do), ``reason``, per model ``{stage, state, done, total, reason}`` (bytes)
        and, once switched, per stored index whether its vectors came from the active model."""
        return self._downloads().status()

    def wait_for_model_downloads(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the background preparation; ``True`` if it ended."""
        return self._downloads().wait(timeout)

    def close(self) -> None:
        """Stop the model worker (if this engine started it)."""
        with self._rt_lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None and self._owns_runtime:
            runtime.close()
        self._store.close()

    # --- thresholds and options ---------------------------------------------------------------
    @property
    def default_det_threshold(self) -> float:
        return self._current_runtime().default_det_threshold

    @property
    def thresholds(self) -> ThresholdPolicy:
        """Which recognition threshold a query gets (:mod:`shitu.threshold`): the call's, the
        YAML's, the index's own (a projected index's similarities live on another scale), the
        active model's default."""
        return ThresholdPolicy(self.config.rec_threshold, self._current_runtime().model_rec_threshold)

    @property
    def default_rec_threshold(self) -> float:
        """The threshold of a query of an uncalibrated index: the YAML's, else the model's."""
        return self.thresholds.for_index(None)

    def rec_threshold_for(self, index: GalleryIndex) -> float:
        """The threshold used when a call gives none."""
        return self.thresholds.for_index(index.suggested_rec_threshold)

    def options(
        self,
        index: GalleryIndex,
        *,
        det_threshold: float | None = None,
        rec_threshold: float | None = None,
        rec_topk: int | None = None,
        whole_image: str | None = None,
        nms_iou: float | None = UNSET,
    ) -> Options:
        """Per-call options with the defaults filled in. ``None`` (or not given) means "the
        default"; only ``nms_iou=None`` means "off" (cross-box NMS disabled)."""

        def number(name: str, value: Any, lo: float, hi: float) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ShiTuError(f"{name} must be a number, not {value!r}")
            if not lo <= float(value) <= hi:
                raise ShiTuError(f"{name} must be between {lo} and {hi}, not {value}")
            return float(value)

        if rec_topk is not None and (isinstance(rec_topk, bool) or int(rec_topk) != rec_topk or rec_topk < 1):
            raise ShiTuError(f"rec_topk must be a whole number of at least 1, not {rec_topk!r}")
        mode = whole_image or self.config.whole_image
        if mode not in WHOLE_IMAGE_MODES:
            raise ShiTuError(f"whole_image must be one of {', '.join(WHOLE_IMAGE_MODES)}, not {mode!r}")
        nms = self.config.nms_iou if nms_iou is UNSET else nms_iou
        return Options(
            det_threshold=self.default_det_threshold
            if det_threshold is None
            else number("det_threshold", det_threshold, 0, 1),
            rec_threshold=self.thresholds.resolve(
                None if rec_threshold is None else number("rec_threshold", rec_threshold, -1, 1),
                index.suggested_rec_threshold,
            ),
            rec_topk=self.config.rec_topk if rec_topk is None else int(rec_topk),
            whole_image=mode,
            nms_iou=None if nms is None else number("nms_iou", nms, 0, 1),
        )

    # --- where indices live -------------------------------------------------------------------
    def locate(self, ref: str | Path | None) -> tuple[GalleryStore, str]:
        """Which store holds an index: a ``str`` is a *name* in the data dir (letters, digits,
        ``_.-``; anything else is refused, so a name typed by a visitor can never reach another
        path); a ``pathlib.Path`` is a PaddleX-layout directory anywhere (the CLI and the Python
        API make one on purpose). ``None`` is the default index (``SHITU_DEFAULT_INDEX``)."""
        if ref is None:
            return self._store, check_name(self.settings.default_index)
        if isinstance(ref, str):
            return self._store, check_name(ref)
        path = Path(ref).expanduser().resolve()
        with self._rt_lock:
            store = self._dir_stores.get(path.parent)
            if store is None:
                store = FileStore(path.parent, strict_names=False, lock_dir=self.settings.data_dir / "locks")
                self._dir_stores[path.parent] = store
        return store, path.name

    def display_name(self, ref: str | Path | None) -> str:
        store, name = self.locate(ref)
        return name if store is self._store else str(store.path(name))

    def index(self, ref: IndexRef = None) -> GalleryIndex:
        """The latest committed version of an index (an index object is returned as it is)."""
        if isinstance(ref, GalleryIndex):
            return ref
        if ref is not None and not isinstance(ref, (str, Path)):
            raise ShiTuError(f"index must be an index object, a name or a directory, not {type(ref).__name__}")
        store, name = self.locate(ref)
        return store.get(name)

    def index_names(self) -> list[str]:
        return self._store.names()

    def require(self, ref: str | Path | None) -> None:
        """:class:`NotFound` unless the index exists (and can be read): a front end checks this
        before it fetches or decodes anything for a change or a query."""
        self.index(ref)

    def exists(self, ref: str | Path | None) -> bool:
        store, name = self.locate(ref)
        return store.exists(name)

    def compatible(self, index: GalleryIndex) -> bool:
        return not index.feature_model or index.feature_model == self.feature_model

    def _check_compatible(self, index: GalleryIndex, runtime: Runtime, name: str | None) -> None:
        if index.feature_model and index.feature_model != runtime.feature_model:
            which = f"index {name!r}" if name else "this index"
            raise Conflict(
                f"{which} was built with {index.feature_model}, but the active recognition model is "
                f"{runtime.feature_model}; rebuild it with the active model"
            )

    # --- what the front ends read (shitu.views) ---------------------------------------------------
    def info(self, ref: str | Path | None = None) -> IndexInfo:
        """A stored index at a glance: counts, types, the threshold a query gets, its calibration."""
        index = self.index(ref)
        summary = index.summary()
        return IndexInfo(
            name=self.display_name(ref), entries=len(index), labels=index.label_count, index_type=index.index_type,
            metric_type=index.metric_type, dim=index.dim, feature_model=index.feature_model, next_id=index.next_id,
            threshold=self.rec_threshold_for(index), calibration=_calibration_view(index),
            adaptation=summary["adaptation"], search_params=dict(index.search_params),
            search_shortfall=index.search_shortfall, projection=summary["projection"],
            changes_since_calibration=index.changes_since_calibration, compatible=self.compatible(index),
            summary=summary,
        )  # fmt: skip

    def calibration(self, ref: str | Path | None = None) -> CalibrationView | None:
        """The index's own threshold and its curve (``None``: too few labels to measure one)."""
        return _calibration_view(self.index(ref))

    def entries(
        self, ref: str | Path | None = None, offset: int = 0, limit: int = 100, *, labels: Any = None,
        thumbnails: bool = False,
    ) -> EntryPage:  # fmt: skip
        """Entries ``offset`` to ``offset + limit`` in id order (only those under ``labels`` if
        given), with sources (and thumbnails if asked for) read for the page alone."""
        matching, rows = self.index(ref).page(offset, limit, labels=labels, thumbnails=thumbnails)
        views = tuple(EntryView(e.id, e.label, e.source, e.thumbnail) for e in rows)
        return EntryPage(self.display_name(ref), matching, max(0, int(offset)), max(0, int(limit)), views)

    def lookup(self, ref: str | Path | None, ids: Any, *, thumbnails: bool = False) -> tuple[EntryView, ...]:
        """The entries of ``ids`` that the index holds, in the order asked (sources and thumbnails
        read for them alone); ids it does not hold are left out."""
        index = self.index(ref)
        wanted = [i for i in dict.fromkeys(int(i) for i in ids) if i in index]
        found = index.sources(wanted, thumbnails=thumbnails)
        return tuple(EntryView(i, index.label(i), *found.get(i, ("", None))) for i in wanted)

    def first_of_each_label(self, ref: str | Path | None = None) -> list[int]:
        """The lowest id of each label, ascending (one example per label)."""
        return self.index(ref).one_per_label().tolist()

    def label_counts(self, ref: str | Path | None = None) -> dict[str, int]:
        """How many entries each label has."""
        return dict(self.index(ref).label_counts())

    def thumbnails(self, ref: str | Path | None, ids: Any) -> dict[int, bytes]:
        """``id → thumbnail JPEG`` of the entries that have one."""
        return self.index(ref).thumbnails([int(i) for i in ids])

    def threshold(self, ref: str | Path | None = None) -> float:
        """The recognition threshold a query of this index gets when it names none."""
        return self.rec_threshold_for(self.index(ref))

    # --- gallery → vectors ----------------------------------------------------------------------
    def embed_gallery(
        self, batch: GalleryBatch, *, skip_invalid: bool = False, progress: Progress | None = None,
        runtime: Runtime | None = None, views: bool = False,
    ) -> tuple[Any, ...]:  # fmt: skip
        """Decode and embed every item: ``(features, items kept, skipped lines)``. Unusable
        images raise (listing every bad line) unless ``skip_invalid``; never silently dropped.
        ``views``: also embed the query-like views the calibration measures the capture gap with
        (:func:`shitu.augment.view_plan`: up to 4 a photo, 128 in all, in the same batches); a
        fourth item comes back, ``(row of each view's photo among the items kept, features)``.

        One pass over each image, where the models run: chunks of a few images go to the
        runtime's host or, for a large gallery, to worker processes of their own, one per core
        (``SHITU_BUILD_WORKERS``; the host works until the first of them is up), each decoding,
        thumbnailing and embedding its chunk while the others do theirs. Memory holds a few
        chunks, not the whole decoded gallery. Progress counts images done; features come back
        in line order."""
        items = list(batch.items)
        total = len(items)
        bs = self.config.recognition.batch_size
        chunks = [items[i : i + bs] for i in range(0, total, bs)]
        plan = view_plan(total).tolist() if views else None
        results: list[tuple[np.ndarray | None, list[bytes | None], list[str | None]] | None] = [None] * len(chunks)
        lock = threading.Lock()
        state = {"next": 0, "done": 0, "bad": False, "lanes_up": False}
        failure: list[BaseException] = []
        max_pixels = self.settings.max_image_pixels

        def drive(call: Callable[..., Any], lane: int) -> None:
            while True:
                with lock:
                    if failure or state["next"] >= len(chunks) or (lane == 0 and state["lanes_up"]):
                        return
                    n = state["next"]
                    state["next"] += 1
                    embed = skip_invalid or not state["bad"]  # a bad image stops the work, not the scan
                try:
                    extra = () if plan is None else ([(p, plan[p]) for p in range(n * bs, n * bs + len(chunks[n]))],)
                    result = call([i.image for i in chunks[n]], max_pixels, bs, embed, *extra)
                except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                    with lock:
                        failure.append(exc)
                    return
                with lock:
                    results[n] = result
                    state["done"] += len(chunks[n])
                    state["bad"] = state["bad"] or any(result[2])
                    state["lanes_up"] = state["lanes_up"] or lane > 0
                    done = state["done"]
                if progress:
                    progress(done, total, "embedding")

        if progress:
            progress(0, total, "embedding")
        with contextlib.ExitStack() as stack:
            rt = runtime or stack.enter_context(self._models())
            lanes = stack.enter_context(rt.gallery_lanes(total))
            threads = [
                threading.Thread(target=drive, args=(call, k), name=f"shitu-lane-{k}", daemon=True)
                for k, call in enumerate(lanes[1:], 1)
            ]
            for t in threads:
                t.start()
            drive(lanes[0], 0)  # the models' own host works until a lane is up
            for t in threads:
                t.join()
        if failure:
            raise failure[0]
        skipped = list(batch.skipped)
        kept: list[GalleryItem] = []
        feats: list[np.ndarray] = []
        row_of: dict[int, int] = {}  # position in the batch -> row among the kept items
        view_at: list[int] = []
        view_feats: list[np.ndarray] = []
        for n, (chunk, result) in enumerate(zip(chunks, results)):
            assert result is not None
            chunk_feats, thumbnails, errors = result[:3]
            for k, (item, thumbnail, error) in enumerate(zip(chunk, thumbnails, errors)):
                if error is not None:
                    skipped.append(SkippedLine(item.line_no, item.source, error))
                else:
                    item.thumbnail = thumbnail
                    row_of[n * bs + k] = len(kept)
                    kept.append(item)
            if chunk_feats is not None:
                feats.append(chunk_feats)
            if plan is not None and result[3][1] is not None:
                view_at += result[3][0]
                view_feats.append(result[3][1])
        GalleryBatch(items=kept, skipped=[] if skip_invalid else skipped).require_clean()
        if not feats:
            raise ShiTuError(f"none of the {total} image(s) could be used")
        if plan is None:
            return np.concatenate(feats), kept, in_line_order(skipped)
        rows = np.array([row_of[p] for p in view_at], dtype=np.int64)
        made = np.concatenate(view_feats) if view_feats else np.zeros((0, feats[0].shape[1]), np.float32)
        return np.concatenate(feats), kept, in_line_order(skipped), (rows, made)

    def build_index(
        self,
        batch: GalleryBatch,
        *,
        index_type: str = "Flat",
        metric_type: str = "IP",
        skip_invalid: bool = False,
        progress: Progress | None = None,
        whiten: bool = False,
        adapt: str = "auto",
    ) -> GalleryIndex:
        """A new, unsaved index of ``batch`` (see :meth:`build` to store it under a name).

        ``adapt``: fit the features to the gallery's labels (``auto``: where cross-validation
        on the gallery says it helps; ``on``; ``off``); the index is calibrated either way
        (:mod:`shitu.adapt`, :mod:`shitu.calibrate`). ``whiten``: PCA whitening instead."""
        if index_type not in INDEX_TYPES:
            raise ShiTuError(f"index_type must be one of {', '.join(INDEX_TYPES)}, not {index_type!r}")
        if metric_type not in METRIC_TYPES:
            raise ShiTuError(f"metric_type must be one of {', '.join(METRIC_TYPES)}, not {metric_type!r}")
        with self._gallery_job(len(batch.items)), self._models() as runtime:
            feats, items, skipped, views = self.embed_gallery(
                batch, skip_invalid=skip_invalid, progress=progress, runtime=runtime, views=True
            )
            feature_model = runtime.feature_model
        index = GalleryIndex.build(
            feats,
            [i.label for i in items],
            index_type=index_type,
            metric_type=metric_type,
            sources=[i.source for i in items],
            thumbnails=[i.thumbnail for i in items],
            feature_model=feature_model,
            whiten=whiten,
            adapt=adapt,
            progress=progress,
            views=views,
        )
        index.skipped = skipped
        return index

    def extend_index(
        self, index: GalleryIndex, batch: GalleryBatch, *, skip_invalid: bool = False,
        progress: Progress | None = None,
    ) -> GalleryIndex:  # fmt: skip
        """A new, unsaved index: ``index`` with ``batch`` appended (``index`` is not changed)."""
        with self._gallery_job(len(batch.items)), self._models() as runtime:
            self._check_compatible(index, runtime, None)
            feats, items, skipped = self.embed_gallery(
                batch, skip_invalid=skip_invalid, progress=progress, runtime=runtime
            )
        new = _append(index, feats, items)
        new.skipped = skipped
        return new

    def load_index_dir(self, path: str | Path) -> GalleryIndex:
        """The index in the directory ``path`` (PaddleX's layout or ours), read whole into memory:
        usable after the directory is gone."""
        index = load_index(path)
        index.rows = index.rows.in_memory(index.ids.tolist())
        return index

    def save_index_dir(self, index: GalleryIndex, path: str | Path) -> Path:
        """Write ``index`` to the directory ``path`` in PaddleX's layout (every change folded in,
        atomically; files of others in it stay) — PaddleX's ``IndexData.save``."""
        store, key = self.locate(Path(path))
        store.put(key, index)
        return store.path(key)

    # --- versions -------------------------------------------------------------------------------
    # Every committed change of a stored index is a version (shitu.stores keeps the replaced copy,
    # at most settings.history_versions of them); a restore is itself a new version.
    def versions(self, ref: str | Path | None = None) -> list[VersionInfo]:
        """The versions of a stored index, newest first, the current one included and marked
        (what made each: ``build``, ``import``, ``add 3``, ``remove 2``, ``relabel 1``,
        ``restore v4``; ``None`` when unknown). A directory given by path keeps no history: only
        its current version."""
        store, key = self.locate(ref)
        return [VersionInfo.of(v) for v in store.versions(key)]

    def version_changes(
        self, ref: str | Path | None, version: int | str, against: int | str | None = None, *, limit: int = 100
    ) -> VersionDiff:
        """What changed from version ``against`` (default: the one just before; ``0``: an empty
        index) to ``version`` (numbers, or text like ``"v3"``), read from the id maps: entries
        added, removed and relabelled, each kind counted and its first ``limit`` listed in id
        order. ``against`` may be newer: ``version_changes(ref, 3, against=<current>)`` is what
        restoring version 3 would do. :class:`NotFound` for a version that does not exist or is no
        longer kept."""
        store, key = self.locate(ref)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ShiTuError(f"limit must be a whole number of at least 0, not {limit!r}")
        return VersionDiff.of(self.display_name(ref), store.changes(key, version, against, limit=limit))

    def restore(self, ref: str | Path | None, version: int | str) -> ChangeReport:
        """Make an earlier version current again, as a new version (``restore vN``, so it can be
        undone the same way). Readers in every process see it at once; ids handed out since are
        never reused. Nothing is embedded (``added_ids`` is empty); ``summary`` has the index's
        summary plus ``version`` (the new number) and ``restored_from``. A version built with
        another recognition model can be restored; searching it then raises :class:`Conflict`
        until the active model matches or it is rebuilt. :class:`NotFound` for an unknown version."""
        store, key = self.locate(ref)
        index, record = store.restore(key, version)
        summary = {**index.summary(), "version": record["version"], "restored_from": record["restored_from"]}
        return ChangeReport(self.display_name(ref), [], [], summary, index)

    # --- evaluation -----------------------------------------------------------------------------
    # A report on a gallery from its stored vectors and labels (shitu.report); no model runs.
    _REPORTS_KEPT = 4

    def report(self, ref: IndexRef = None, *, progress: Progress | None = None) -> GalleryReport:
        """The quality report of an index (a name, a directory or an index object): leave-one-out
        recall@1/@5 overall and per label, confused label pairs, suspected mislabelled entries,
        near duplicates, labels with too few images, the threshold curve and a 2-D map. Export
        it with ``.to_dict()``, ``.to_csv(kind)`` or ``.to_html(lang)``. The last few reports are
        kept per index version, so asking again for an unchanged index costs nothing."""
        if isinstance(ref, GalleryIndex):
            index, name = ref, None
        else:
            store, key = self.locate(ref)
            index, name = store.get(key), self.display_name(ref)
        cache = self._report_cache
        cached = cache.get((name, id(index)))
        if cached is not None and cached[0]() is index:
            return cached[1]
        report = gallery_report(index, name=name, progress=progress)
        with self._rt_lock:
            for stale in [k for k, (ref_, _) in cache.items() if ref_() is None or k[0] == name]:
                cache.pop(stale, None)
            while len(cache) >= self._REPORTS_KEPT:
                cache.pop(next(iter(cache)))
            cache[(name, id(index))] = (weakref.ref(index), report)
        return report

    # --- stored indices -------------------------------------------------------------------------
    def build(
        self,
        name: str | Path,
        batch: GalleryBatch,
        *,
        index_type: str = "Flat",
        metric_type: str = "IP",
        overwrite: bool = False,
        skip_invalid: bool = True,
        progress: Progress | None = None,
        whiten: bool = False,
        adapt: str = "auto",
    ) -> ChangeReport:
        """Build an index and store it under ``name`` (a data-dir name or a directory)."""
        store, key = self.locate(name)
        if not overwrite and store.exists(key):
            raise Conflict(f"an index named {key!r} already exists; choose another name or overwrite it")
        index = self.build_index(
            batch, index_type=index_type, metric_type=metric_type, skip_invalid=skip_invalid,
            progress=progress, whiten=whiten, adapt=adapt,
        )  # fmt: skip
        store.put(key, index, overwrite=overwrite)
        return self._report(self.display_name(name), index, index.ids.tolist(), index.skipped)

    def add(
        self, ref: str | Path | None, batch: GalleryBatch, *, skip_invalid: bool = True,
        progress: Progress | None = None, taught: bool = False,
    ) -> ChangeReport:  # fmt: skip
        """Embed ``batch`` and append it to a stored index; ids are never reused. ``taught``: the
        images are crops of real queries a user labelled (:meth:`teach`)."""
        store, key = self.locate(ref)
        with self._gallery_job(len(batch.items)), self._models() as runtime:
            self._check_compatible(store.get(key), runtime, key)
            # embedding is the slow part and needs no lock; the append itself is serialised
            feats, items, skipped = self.embed_gallery(
                batch, skip_invalid=skip_invalid, progress=progress, runtime=runtime
            )
        first: list[int] = []

        def change(latest: GalleryIndex) -> GalleryIndex:
            first[:] = [latest.next_id]
            return _append(latest, feats, items, taught=taught)

        index = store.mutate(key, change)
        return self._report(self.display_name(ref), index, list(range(first[0], index.next_id)), skipped)

    def remove(self, ref: str | Path | None, ids: Any) -> ChangeReport:
        """Remove entries by id (a list, or text like ``"3, 7 192-197"``); unknown ids change nothing."""
        store, key = self.locate(ref)
        wanted = parse_ids(ids)
        return self._changed(ref, store.mutate(key, lambda latest: latest.remove(wanted)))

    def relabel(self, ref: str | Path | None, ids: Any, label: str) -> ChangeReport:
        """Give entries (one id, a list, or a range text) a new label."""
        store, key = self.locate(ref)
        wanted = parse_ids(ids)
        label = (label or "").strip()
        if not label:
            raise ShiTuError("the new label is empty")

        def change(latest: GalleryIndex) -> GalleryIndex:
            missing = [i for i in wanted if i not in latest.id_map]
            if missing:
                raise NotFound(f"no entries with ids {', '.join(map(str, missing[:20]))}")
            return latest.relabel(wanted, label)

        return self._changed(ref, store.mutate(key, change))

    def teach(
        self,
        ref: str | Path | None,
        image: ImageInput,
        bbox: Any,
        label: str,
        *,
        bgr: bool = False,
        source: str | None = None,
        recalibrate: bool = True,
        feature: np.ndarray | None = None,
        feature_model: str | None = None,
    ) -> ChangeReport:
        """Learn from use: add the part of ``image`` inside ``bbox`` (a box of a recognition
        result, (x1, y1, x2, y2) in its pixels) under ``label`` — the predicted one to confirm
        it, or a corrected one. The calibration follows: a raw-feature index is recalibrated
        by the add itself, an adapted one of up to :data:`TEACH_RECALIBRATE_MAX` entries is
        refitted here (~2 s for 1k entries), larger ones count the change (``calibrate``).
        The crop is a real query: its calibration keeps it as a confirmed answer (how real
        queries score, next to the gallery's own photos and their views), and says how many
        it has.
        ``feature``: the box's feature that its query already computed
        (:attr:`RecognizedObject.feature`), by ``feature_model`` (:attr:`Recognition.feature_model`):
        then nothing is embedded again (about one query's time in all), unless another model runs
        now. A box already in the index (the same picture: similarity at least
        :data:`TEACH_DUPLICATE_SIMILARITY`) is refused with :class:`Conflict` naming its entry."""
        label = (label or "").strip()
        if not label:
            raise ShiTuError("say which label this box shows: the label is empty")
        crop = crop_box(image, bbox, ndarray_bgr=bgr)
        box = ", ".join(f"{float(v):.0f}" for v in bbox)
        source = source or f"taught box ({box})"
        store, key = self.locate(ref)
        with self._models() as runtime:
            self._check_compatible(store.get(key), runtime, key)
            if feature is not None and feature_model in (None, runtime.feature_model):
                feats = np.asarray(feature, dtype=np.float32).reshape(1, -1)
                thumbnail = make_thumbnail(np.asarray(crop))
            else:  # no feature, or one from a model that no longer runs: embed the crop
                feats, items, _ = self.embed_gallery(GalleryBatch(items=[GalleryItem(source, crop, label)]),
                                                     runtime=runtime)  # fmt: skip
                thumbnail = items[0].thumbnail
        name = self.display_name(ref)
        added: list[int] = []

        def change(latest: GalleryIndex) -> GalleryIndex:
            if len(latest):
                scores, ids = latest.search(feats, topk=1)
                if ids[0, 0] >= 0 and scores[0, 0] >= TEACH_DUPLICATE_SIMILARITY:
                    same = int(ids[0, 0])
                    raise Conflict(say("en", "msg_already_entry", id=same, label=latest.label(same), index=name))
            added[:] = [latest.next_id]
            return latest.add(feats, [label], sources=[source], thumbnails=[thumbnail], taught=True)

        index = store.mutate(key, change)
        if recalibrate:
            index = self.keep_calibrated(ref).gallery
        report = self._report(name, index, added, [])
        report.summary = {**report.summary, "taught_id": added[0]}
        return report

    def keep_calibrated(self, ref: str | Path | None) -> ChangeReport:
        """After a small change: refit and recalibrate an index whose calibration is out of
        date, if it has at most :data:`TEACH_RECALIBRATE_MAX` entries; else leave it (its
        summary counts the changes)."""
        index = self.index(ref)
        if index.changes_since_calibration and len(index) <= TEACH_RECALIBRATE_MAX:
            return self.calibrate(ref)
        return self._changed(ref, index)

    def calibrate(
        self, ref: str | Path | None = None, *, adapt: str | None = None, progress: Progress | None = None
    ) -> ChangeReport:
        """Refit the index's projection (``adapt``: ``auto``/``on``/``off``; default: as it was
        built) and remeasure its threshold curve on its current entries. No image is embedded
        again. A threshold the user picked is replaced by the new default."""
        store, key = self.locate(ref)
        index = store.get(key)
        # the fit is the slow part: run it outside the lock, then commit only if nothing changed meanwhile
        fitted = index.recalibrated(adapt, progress=progress)

        def change(latest: GalleryIndex) -> GalleryIndex:
            if latest is not index:
                return latest.recalibrated(adapt)
            return fitted

        mode = adapt or (fitted.adaptation.mode if fitted.adaptation else "auto")
        return self._changed(ref, store.mutate(key, change, action=f"calibrate (adapt {mode})"))

    def set_threshold(self, ref: str | Path | None, threshold: float) -> ChangeReport:
        """Make ``threshold`` (a point on the index's calibration curve) the index's own
        recognition threshold: :meth:`predict` and the API use it unless a call passes one."""
        store, key = self.locate(ref)
        value = float(threshold)
        changed = store.mutate(key, lambda latest: latest.with_threshold(value), action=f"threshold {value:.3f}")
        return self._changed(ref, changed)

    def delete(self, name: str) -> None:
        store, key = self.locate(name)
        store.delete(key)

    def rename(self, old: str, new: str) -> None:
        store, key = self.locate(old)
        if store is not self._store:
            raise ShiTuError("only indices in the data dir can be renamed here")
        store.rename(key, check_name(new))

    def export_zip(self, name: str | None) -> bytes:
        store, key = self.locate(name)
        return store.export_zip(key)

    def import_zip(self, name: str, data: bytes, *, overwrite: bool = False) -> ChangeReport:
        store, key = self.locate(name)
        return self._changed(name, store.import_zip(key, data, overwrite=overwrite))

    def export_to_milvus(
        self, ref: str | Path | None, uri: str, gallery: str, *, token: str | None = None, prefix: str = "shitu_",
        overwrite: bool = False,
    ) -> int:  # fmt: skip
        """Copy an index into the Milvus gallery ``gallery`` at ``uri`` (``shitu milvus-export``:
        unprojected vectors, labels, sources, thumbnails); the entries written."""
        from shitu.stores.milvus_collections import MilvusCollections
        from shitu.transfer import to_milvus

        index = self.index(ref)
        with MilvusCollections(uri, token, prefix) as milvus:
            return to_milvus(index, milvus, gallery, overwrite=overwrite)

    def import_from_milvus(
        self, ref: str | Path | None, uri: str, gallery: str, *, token: str | None = None, prefix: str = "shitu_",
        overwrite: bool = False,
    ) -> ChangeReport:  # fmt: skip
        """Store the Milvus gallery ``gallery`` at ``uri`` as an index here (``shitu milvus-import``:
        the projection refitted and the curve remeasured from its vectors; ids kept)."""
        from shitu.stores.milvus_collections import MilvusCollections
        from shitu.transfer import from_milvus

        store, key = self.locate(ref)
        if not overwrite and store.exists(key):
            raise Conflict(f"an index named {key!r} already exists; choose another name or overwrite it")
        with MilvusCollections(uri, token, prefix) as milvus:
            index = from_milvus(milvus, gallery)
        return self._changed(ref, store.put(key, index, overwrite=overwrite, action="import"))

    def _report(self, name: str, index: GalleryIndex, ids: list[int], skipped: list[SkippedLine]) -> ChangeReport:
        return ChangeReport(name, ids, list(skipped), index.summary(), index)

    def _changed(self, ref: str | Path | None, index: GalleryIndex) -> ChangeReport:
        """A change that embedded nothing (remove, relabel, calibrate, import, ...)."""
        return ChangeReport(self.display_name(ref), [], [], index.summary(), index)

    # --- recognition ---------------------------------------------------------------------------
    def recognize(
        self,
        image: ImageInput,
        index: IndexRef = None,
        *,
        bgr: bool = False,
        input_path: str | None = None,
        **options: Any,
    ) -> Recognition:
        """Recognise one image against an index (default: ``SHITU_DEFAULT_INDEX``).

        ``image``: file bytes, a path, a PIL image or an array (**RGB** unless ``bgr=True``).
        ``options``: ``det_threshold``, ``rec_threshold``, ``rec_topk``, ``whole_image``,
        ``nms_iou`` (see :meth:`options`).
        """
        name = None if isinstance(index, GalleryIndex) else self.display_name(index)
        gallery = self.index(index)
        opts = self.options(gallery, **options)
        rgb = load_image(image, max_pixels=self.settings.max_image_pixels, ndarray_bgr=bgr)
        return self._recognize(rgb, gallery, name, opts, input_path)

    def _recognize(
        self, rgb: np.ndarray, gallery: GalleryIndex, name: str | None, opts: Options, input_path: str | None
    ) -> Recognition:
        with self._models() as runtime:
            self._check_compatible(gallery, runtime, name)
            regions, feats, timings = runtime.analyze(rgb, opts.det_threshold, opts.whole_image)
            models = {"detection": runtime.detection.describe(), "recognition": runtime.recognition.describe()}
            feature_model = runtime.feature_model
        t = time.perf_counter()
        boxes = search_regions(regions, feats, gallery, rec_threshold=opts.rec_threshold, rec_topk=opts.rec_topk)
        objects = merge_same_label(boxes, opts.nms_iou) if opts.nms_iou is not None else boxes
        timings["search"] = time.perf_counter() - t
        return Recognition(
            input_path=input_path, image=rgb, objects=objects, timings=timings, models=models,
            index_name=name, rec_threshold=opts.rec_threshold, nms_iou=opts.nms_iou, boxes=boxes,
            feature_model=feature_model, floor=index_floor(gallery),
        )  # fmt: skip

    def recognize_many(
        self, inputs: Any, index: IndexRef = None, *, bgr_arrays: bool = True, **options: Any
    ) -> Iterator[Recognition]:
        """Recognise every image of PaddleX-style ``inputs`` (arrays, PIL images, paths, URLs,
        directories, ``{"img": ...}`` dicts, lists of these). Arguments, the index and the
        options are checked *now*; images are read one at a time as the iterator is consumed."""
        from shitu.inputs import iter_inputs

        name = None if isinstance(index, GalleryIndex) else self.display_name(index)
        gallery = self.index(index)
        opts = self.options(gallery, **options)
        with self._models() as runtime:
            self._check_compatible(gallery, runtime, name)
        sources = iter_inputs(inputs, self.settings, bgr_arrays=bgr_arrays)  # validates the input's shape now
        return (self._recognize(load(), gallery, name, opts, src) for src, load in sources)

    # --- first start ---------------------------------------------------------------------------
    def ensure_sample_index(self, progress: Progress | None = None) -> str | None:
        """Build the sample gallery's index if it is missing or was made by another model."""
        from shitu.gallery import read_label_file
        from shitu.sample import ensure_sample_files

        with contextlib.suppress(ShiTuError):
            if self._store.exists(SAMPLE_INDEX) and self.compatible(self._store.get(SAMPLE_INDEX)):
                return SAMPLE_INDEX
        root, label_file, _queries = ensure_sample_files(self.settings)
        try:
            self.build(SAMPLE_INDEX, read_label_file(label_file, root), index_type="Flat", overwrite=True,
                       skip_invalid=False, progress=progress)  # fmt: skip
        except ShiTuError as exc:
            log.warning("could not build the sample index: %s", exc)
            return None
        return SAMPLE_INDEX

    def sample_queries(self) -> list[Path]:
        """Example query photos of the sample gallery."""
        from shitu.sample import ensure_sample_files

        return ensure_sample_files(self.settings)[2]


def _calibration_view(index: GalleryIndex) -> CalibrationView | None:
    c = index.calibration
    if c is None:
        return None
    points = tuple(OperatingPoint(p.threshold, p.correct_accepted, p.wrong_accepted, p.unknown_rejected)
                   for p in c.points)  # fmt: skip
    chosen = c.chosen
    extra = {k: v for k, v in (index.calibration_summary() or {}).items() if k not in _CALIBRATION_FIELDS}
    return CalibrationView(
        threshold=c.threshold, chosen_by=c.chosen_by,
        expected=OperatingPoint(chosen.threshold, chosen.correct_accepted, chosen.wrong_accepted,
                                chosen.unknown_rejected),
        top1=c.top1, protocol=c.protocol, known_queries=c.known, unknown_queries=c.unknown,
        changes_since=index.changes_since_calibration, curve=points, uncertainty=c.uncertainty,
        confirmed_answers=len(c.taught), summary=c.describe(), evidence=c.evidence, details=extra,
    )  # fmt: skip


_CALIBRATION_FIELDS = {"threshold", "chosen_by", "correct_accepted", "wrong_accepted", "unknown_rejected", "top1",
                       "protocol", "known_queries", "unknown_queries", "changes_since", "uncertainty",
                       "confirmed_answers", "evidence", "text"}  # fmt: skip


def _append(index: GalleryIndex, feats: np.ndarray, items: list[GalleryItem], *, taught: bool = False) -> GalleryIndex:
    return index.add(
        feats, [i.label for i in items], sources=[i.source for i in items], thumbnails=[i.thumbnail for i in items],
        taught=taught,
    )
