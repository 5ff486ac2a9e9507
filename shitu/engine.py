"""The one in-process object behind the web UI, the HTTP API and the CLI.

It owns the pipeline (models) and the named indices; UI handlers and API routes are thin
calls into these methods, so all three front ends behave the same.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from shitu.config import PipelineConfig, Settings
from shitu.errors import NotFound, ShiTuError
from shitu.gallery import GalleryBatch, ImageInput, SkippedLine, load_image
from shitu.index import GalleryIndex
from shitu.pipeline import Progress, ShiTuPipeline, parse_ids
from shitu.results import ShiTuResult
from shitu.store import IndexStore, check_name

log = logging.getLogger(__name__)

SAMPLE_INDEX = "sample"


@dataclass
class ChangeReport:
    """What a build or add did, for summaries in the UI, API and CLI."""

    index: str
    added_ids: list[int]
    skipped: list[SkippedLine] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    id_map: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "added": len(self.added_ids),
            "skipped": [{"line": s.line_no, "source": s.source, "reason": s.reason} for s in self.skipped],
            **self.summary,
        }


class Engine:
    """Models + named indices. Thread-safe; create one per process."""

    def __init__(self, settings: Settings | None = None, pipeline: ShiTuPipeline | None = None):
        self.settings = settings or Settings.from_env()
        self.store = IndexStore(self.settings.indices_dir)
        self.active_index = self.settings.default_index
        self._pipeline = pipeline
        self._pipeline_lock = threading.Lock()

    # --- models -----------------------------------------------------------------------------
    @property
    def pipeline(self) -> ShiTuPipeline:
        if self._pipeline is None:
            with self._pipeline_lock:
                if self._pipeline is None:
                    self._pipeline = ShiTuPipeline(settings=self.settings)
        return self._pipeline

    def models(self) -> dict[str, Any]:
        return self.pipeline.models

    def switch_recognition_model(self, model_name: str) -> dict[str, Any]:
        """Use another recognition model (indices built with the old one must be rebuilt)."""
        old = self.pipeline
        config = PipelineConfig.from_dict(old.config.to_dict())
        config.recognition.model_name = model_name
        config.recognition.model_dir = None
        new = ShiTuPipeline(config, self.settings, device=old.device)
        if new.recognition.source == "starter" and model_name != "PP-ShiTuV2_rec":
            raise ShiTuError(f"{model_name} is not available here: {new.recognition.reason}", status=409)
        with self._pipeline_lock:
            self._pipeline = new
        return new.models

    # --- indices ----------------------------------------------------------------------------
    def index_names(self) -> list[str]:
        return self.store.names()

    def resolve_name(self, name: str | None) -> str:
        return check_name(name or self.active_index)

    def index(self, name: str | None = None) -> GalleryIndex:
        return self.store.get(self.resolve_name(name))

    def set_active(self, name: str) -> None:
        self.store.get(check_name(name))  # must exist
        self.active_index = name

    def compatible(self, index: GalleryIndex) -> bool:
        return not index.feature_model or index.feature_model == self.pipeline.feature_model

    def build(
        self,
        name: str,
        batch: GalleryBatch,
        *,
        index_type: str = "HNSW32",
        metric_type: str = "IP",
        overwrite: bool = False,
        skip_invalid: bool = True,
        progress: Progress | None = None,
        whiten: bool = False,
    ) -> ChangeReport:
        name = check_name(name)
        if not overwrite and self.store.exists(name):
            raise ShiTuError(f"an index named {name!r} already exists; choose another name or overwrite it", status=409)
        index = self.pipeline.build_index(
            batch,
            index_type=index_type,
            metric_type=metric_type,
            skip_invalid=skip_invalid,
            progress=progress,
            whiten=whiten,
        )
        self.store.put(name, index, overwrite=overwrite)
        return self._report(name, index, [e.id for e in index.entries], index.skipped)

    def add(
        self, name: str | None, batch: GalleryBatch, *, skip_invalid: bool = True, progress: Progress | None = None
    ) -> ChangeReport:
        name = self.resolve_name(name)
        current = self.store.get(name)
        self.pipeline.check_compatible(current, name)
        # Embedding is the slow part and needs no lock; the append itself is serialised.
        feats, items, skipped = self.pipeline.embed_gallery(batch, skip_invalid, progress)
        holder: dict[str, list[int]] = {}

        def change(latest: GalleryIndex) -> GalleryIndex:
            first = latest.next_id
            new = latest.add(
                feats,
                [i.label for i in items],
                sources=[i.source for i in items],
                thumbnails=[i.thumbnail for i in items],
            )
            holder["ids"] = list(range(first, new.next_id))
            return new

        index = self.store.mutate(name, change)
        return self._report(name, index, holder["ids"], skipped)

    def remove(self, name: str | None, ids: Any) -> GalleryIndex:
        name = self.resolve_name(name)
        wanted = parse_ids(ids)
        return self.store.mutate(name, lambda latest: latest.remove(wanted))

    def relabel(self, name: str | None, id_: int, label: str) -> GalleryIndex:
        name = self.resolve_name(name)
        return self.store.mutate(name, lambda latest: latest.relabel(int(id_), label))

    def delete(self, name: str) -> None:
        self.store.delete(name)
        if self.active_index == name:
            self.active_index = self.settings.default_index

    def rename(self, old: str, new: str) -> None:
        self.store.rename(old, new)
        if self.active_index == old:
            self.active_index = new

    def _report(self, name: str, index: GalleryIndex, ids: list[int], skipped: list[SkippedLine]) -> ChangeReport:
        return ChangeReport(name, ids, list(skipped), index.summary(), index.id_map)

    # --- recognition ------------------------------------------------------------------------
    def recognize(
        self, image: ImageInput, index: str | None = None, *, rgb: bool = True, **options: Any
    ) -> ShiTuResult:
        """Recognise one image against a named index (default: the active one).

        ``image``: bytes, a path, a PIL image or an array (RGB unless ``rgb=False``).
        ``options``: det_threshold, rec_threshold, rec_topk, whole_image, nms_iou (see
        :meth:`ShiTuPipeline.options`).
        """
        name = self.resolve_name(index)
        gallery = self.store.get(name)
        self.pipeline.check_compatible(gallery, name)
        opts = self.pipeline.options(gallery, **options)
        arr = load_image(image, max_pixels=self.settings.max_image_pixels, ndarray_bgr=not rgb)
        result = self.pipeline.recognize(arr, gallery, **opts)
        result.index_name = name
        return result

    # --- first start ------------------------------------------------------------------------
    def ensure_sample_index(self, progress: Progress | None = None) -> str | None:
        """Build the sample gallery's index if it is missing or was made by another model."""
        from shitu.sample import ensure_sample_files

        try:
            if self.store.exists(SAMPLE_INDEX) and self.compatible(self.store.get(SAMPLE_INDEX)):
                return SAMPLE_INDEX
        except ShiTuError:
            pass  # damaged: rebuild below
        root, label_file, _queries = ensure_sample_files(self.settings)
        from shitu.gallery import read_label_file

        try:
            self.build(SAMPLE_INDEX, read_label_file(label_file, root), index_type="Flat", overwrite=True,
                       skip_invalid=False, progress=progress)  # fmt: skip
        except (ShiTuError, NotFound) as exc:
            log.warning("could not build the sample index: %s", exc)
            return None
        return SAMPLE_INDEX
