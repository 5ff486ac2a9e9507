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
from pathlib import Path
from typing import Any

import numpy as np

from shitu import fonts
from shitu.config import (
    INDEX_TYPES,
    METRIC_TYPES,
    PipelineConfig,
    Settings,
)
from shitu.embedding import embed_gallery
from shitu.errors import Conflict, NotFound, ShiTuError
from shitu.gallery import (
    GalleryBatch,
    GalleryItem,
    ImageInput,
    SkippedLine,
    crop_box,
    load_image,
    make_thumbnail,
    plain_share,
)
from shitu.i18n import text as say
from shitu.ids import parse_ids
from shitu.index import GalleryIndex
from shitu.matching import index_floor, search_regions
from shitu.model_control import ModelControl
from shitu.options import UNSET, Options, resolve_options
from shitu.report import GalleryReport, gallery_report
from shitu.results import Recognition, merge_same_label
from shitu.runtime import Runtime
from shitu.serving import ModelSlot
from shitu.stores.base import GalleryStore, check_name, open_store
from shitu.stores.files import FileStore
from shitu.stores.layout import load_index
from shitu.threshold import ThresholdPolicy
from shitu.views import (
    CalibrationView,
    ChangeReport,
    EntryPage,
    EntryView,
    IndexInfo,
    VersionDiff,
    VersionInfo,
    calibration_view,
    entry_page,
    entry_views,
    index_info,
)

__all__ = ["ChangeReport", "Engine", "Options", "Progress", "UNSET"]

log = logging.getLogger(__name__)

SAMPLE_INDEX = "sample"
TEACH_RECALIBRATE_MAX = 5000  # teaching refits an adapted index's projection up to this size
TEACH_DUPLICATE_SIMILARITY = 0.995  # a taught box this similar to an entry is that entry again (the same picture)
Progress = Callable[[int, int, str], None]  # (done, total, what)
IndexRef = str | Path | GalleryIndex | None  # a name in the data dir, a directory, or an index object


class Engine(ModelControl):
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
        self._slot = ModelSlot(self.settings, self._new_runtime, runtime)
        self._lock = threading.Lock()  # the directory stores and the report cache
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

    def close(self) -> None:
        """Stop the model worker (if this engine started it)."""
        self._slot.close()
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

        return resolve_options(
            self.config, self.thresholds, index.suggested_rec_threshold, det_default=self.default_det_threshold,
            det_threshold=det_threshold, rec_threshold=rec_threshold, rec_topk=rec_topk, whole_image=whole_image,
            nms_iou=nms_iou,
        )  # fmt: skip

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
        with self._lock:
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
        return index_info(self.display_name(ref), index, self.rec_threshold_for(index), self.compatible(index))

    def calibration(self, ref: str | Path | None = None) -> CalibrationView | None:
        """The index's own threshold and its curve (``None``: too few labels to measure one)."""
        return calibration_view(self.index(ref))

    def entries(
        self, ref: str | Path | None = None, offset: int = 0, limit: int = 100, *, labels: Any = None,
        thumbnails: bool = False,
    ) -> EntryPage:  # fmt: skip
        """Entries ``offset`` to ``offset + limit`` in id order (only those under ``labels`` if
        given), with sources (and thumbnails if asked for) read for the page alone."""
        return entry_page(self.display_name(ref), self.index(ref), offset, limit, labels=labels, thumbnails=thumbnails)

    def lookup(self, ref: str | Path | None, ids: Any, *, thumbnails: bool = False) -> tuple[EntryView, ...]:
        """The entries of ``ids`` that the index holds, in the order asked (sources and thumbnails
        read for them alone); ids it does not hold are left out."""
        return entry_views(self.index(ref), ids, thumbnails=thumbnails)

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
        """Decode and embed every item: ``(features, items kept, skipped lines[, views])``
        (:func:`shitu.embedding.embed_gallery`), with this engine's models (``runtime``: the one a
        request already holds)."""
        with contextlib.ExitStack() as stack:
            rt = runtime or stack.enter_context(self._models())
            return embed_gallery(rt, batch, batch_size=self.config.recognition.batch_size,
                                 max_pixels=self.settings.max_image_pixels, skip_invalid=skip_invalid,
                                 progress=progress, views=views)  # fmt: skip

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
            plain=plain_share(i.thumbnail for i in items),
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
        with self._lock:
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
                # the same picture in the model's own space: a projection fitted to the gallery pulls a
                # label's photos together, so its similarities say "same product", not "same picture"
                scores, ids = latest.search(feats, topk=5)
                raw = latest.raw_similarity(feats, ids)
                sims = scores if raw is None else np.where(np.isnan(raw), scores, raw)
                best = int(np.argmax(np.where(ids >= 0, sims, -np.inf)[0]))
                if ids[0, best] >= 0 and sims[0, best] >= TEACH_DUPLICATE_SIMILARITY:
                    same = int(ids[0, best])
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


def _append(index: GalleryIndex, feats: np.ndarray, items: list[GalleryItem], *, taught: bool = False) -> GalleryIndex:
    return index.add(
        feats,
        [i.label for i in items],
        sources=[i.source for i in items],
        thumbnails=[i.thumbnail for i in items],
        taught=taught,
    )
