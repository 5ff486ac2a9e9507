"""PaddleX's PP-ShiTuV2 Python API, on top of the engine like every other front end.

PaddleX scripts run with only the import changed::

    from shitu import create_pipeline
    pipeline = create_pipeline("PP-ShiTuV2")
    index = pipeline.build_index(gallery_imgs="drinks/", gallery_label="drinks/gallery.txt")
    for res in pipeline.predict("drinks/test_images/100.jpeg", index=index):
        res.print()
        print(res["boxes"][0]["labels"][0], res["boxes"][0]["coordinate"])
        res.save_to_img("./output/")

As in PaddleX, ``build_index`` / ``append_index`` / ``remove_index`` return index objects
(:class:`IndexData`, over a :class:`~shitu.index.GalleryIndex`) and never write to disk:
``index.save(dir)`` does. ``index=`` takes such an object, a PaddleX index directory, or a
PaddleX ``IndexData``. Arrays are BGR, as in PaddleX; results are PaddleX's result dicts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shitu.config import PipelineConfig, Settings, parse_hpi_config
from shitu.engine import UNSET, Engine, Progress
from shitu.errors import ShiTuError
from shitu.gallery import GalleryBatch, GalleryItem, read_label_file
from shitu.ids import parse_ids, read_id_file
from shitu.report import GalleryReport
from shitu.results import ShiTuResult

if TYPE_CHECKING:  # IndexData holds one (PaddleX's IndexData holds its faiss index); the engine makes them
    from shitu.index import GalleryIndex


class IndexData:
    """PaddleX's ``IndexData``: an index in memory that ``save`` writes to a directory in PaddleX's
    layout. Everything else — ``index`` (the faiss index), ``id_map``, ``metric_type``,
    ``index_type``, ``index_info``, ``len()``, ``calibration``, ``skipped``, ``summary()`` ... — is
    the :class:`~shitu.index.GalleryIndex` it holds (``.gallery``)."""

    def __init__(self, gallery: GalleryIndex, engine: Engine):
        self.gallery = gallery
        self._engine = engine

    def save(self, save_dir: str | Path) -> Path:
        return self._engine.save_index_dir(self.gallery, save_dir)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.gallery, name)

    def __len__(self) -> int:
        return len(self.gallery)

    def __contains__(self, id_: object) -> bool:
        return id_ in self.gallery

    def __repr__(self) -> str:
        return f"IndexData({len(self.gallery)} entries, {self.gallery.index_type}/{self.gallery.metric_type})"


class ShiTuPipeline:
    """PaddleX's ``ShiTuV2Pipeline`` surface over an :class:`Engine` (in-process models by default)."""

    def __init__(self, engine: Engine, index: Any = None):
        self.engine = engine
        self.default_index = index  # used by predict() when no index is passed

    @property
    def models(self) -> dict[str, Any]:
        """Which models are active and why."""
        return self.engine.models()

    @property
    def config(self) -> PipelineConfig:
        return self.engine.config

    # --- index operations (PaddleX's signatures and argument order) -----------------------------
    def build_index(
        self,
        gallery_imgs: Any,
        gallery_label: Any = None,
        metric_type: str = "IP",
        index_type: str = "HNSW32",
        *,
        skip_invalid: bool = False,
        progress: Progress | None = None,
        whiten: bool = False,
        adapt: str = "auto",
    ) -> IndexData:
        """Embed a gallery and index it: a root dir and a PaddleX label file, or a list of
        images and a list of labels. Unusable lines raise :class:`ShiTuError` listing their
        line numbers, unless ``skip_invalid`` (then they are reported in ``index.skipped``).
        ``adapt`` (``auto``/``on``/``off``): fit the features to the gallery's labels where
        cross-validation says it helps; the index carries its own calibrated threshold
        (``index.calibration``), which :meth:`predict` uses unless given ``rec_threshold``."""
        return IndexData(self.engine.build_index(
            as_batch(gallery_imgs, gallery_label), index_type=index_type, metric_type=metric_type,
            skip_invalid=skip_invalid, progress=progress, whiten=whiten, adapt=adapt,
        ), self.engine)  # fmt: skip

    def append_index(
        self,
        gallery_imgs: Any,
        gallery_label: Any = None,
        index: Any = None,
        *,
        skip_invalid: bool = False,
        progress: Progress | None = None,
    ) -> IndexData:
        """A new index with the gallery appended (the given one is not modified)."""
        base = self._index(index)
        return IndexData(self.engine.extend_index(
            base, as_batch(gallery_imgs, gallery_label), skip_invalid=skip_invalid, progress=progress
        ), self.engine)  # fmt: skip

    def remove_index(self, remove_ids: Any, index: Any = None) -> IndexData:
        """A new index without ``remove_ids`` (a list of ids, or a .txt file with one id per line)."""
        if isinstance(remove_ids, Path) or (isinstance(remove_ids, str) and Path(remove_ids).suffix == ".txt"):
            ids = read_id_file(remove_ids)
        else:
            ids = parse_ids(remove_ids)
        return IndexData(self._index(index).remove(ids), self.engine)

    # --- evaluation (not in PaddleX) -----------------------------------------------------------
    def evaluate(self, index: Any = None, *, progress: Progress | None = None) -> GalleryReport:
        """A quality report of an index, from its stored vectors (no model runs): leave-one-out
        recall@1/@5 overall and per label, confused label pairs, suspected mislabelled entries,
        near duplicates, labels with too few images, the threshold curve and a 2-D map.
        ``index``: an index object, a directory or a PaddleX ``IndexData`` (default: the one
        ``predict`` would use). Export with ``.to_html()``, ``.to_csv(kind)`` or ``.to_dict()``."""
        chosen = index if index is not None else self.default_index
        if chosen is None and self.engine.config.index is not None:
            chosen = self.engine.config.index
        return self.engine.report(self._index(chosen), progress=progress)

    # --- prediction -----------------------------------------------------------------------------
    def predict(
        self,
        input: Any,
        index: Any = None,
        *,
        det_threshold: float | None = None,
        rec_threshold: float | None = None,
        rec_topk: int | None = None,
        hamming_radius: float | None = None,
        whole_image: str | None = None,
        nms_iou: float | None = UNSET,
    ) -> Iterator[ShiTuResult]:
        """Recognise every image of ``input`` — an array (BGR, like PaddleX), a PIL image, a
        path, a URL, a directory, ``{"img": ...}`` or a list of these — and yield PaddleX
        result dicts. Everything is checked before the generator is returned.

        ``whole_image``: ``auto`` adds the whole image as a box when nothing is detected,
        ``always`` adds it always, ``never`` never. ``nms_iou``: boxes given the same label that
        overlap more than this are merged (``None`` turns it off). ``hamming_radius`` is
        accepted for PaddleX compatibility (binary indices only) and ignored.
        """
        chosen = index if index is not None else self.default_index
        if chosen is None and self.engine.config.index is not None:
            chosen = self.engine.config.index
        if chosen is None:
            raise ShiTuError("no index given: build one with build_index, or pass index=<dir>")
        results = self.engine.recognize_many(
            input, self._index(chosen), bgr_arrays=True, det_threshold=det_threshold, rec_threshold=rec_threshold,
            rec_topk=rec_topk, whole_image=whole_image, nms_iou=nms_iou,
        )  # fmt: skip
        return (ShiTuResult(r) for r in results)

    __call__ = predict

    def close(self) -> None:
        self.engine.close()

    def _index(self, index: Any) -> GalleryIndex:
        if isinstance(index, IndexData):
            return index.gallery
        if index is None:
            raise ShiTuError("no index given: build one with build_index, or pass index=<dir>")
        if hasattr(index, "index") and hasattr(index, "id_map") and hasattr(index, "save"):  # PaddleX IndexData
            with tempfile.TemporaryDirectory() as tmp:
                index.save(tmp)
                return self.engine.load_index_dir(tmp)
        if isinstance(index, (str, Path)):
            return self.engine.index(Path(index))  # PaddleX: a string is always a directory
        return self.engine.index(index)  # one of the engine's index objects, as it is; anything else is refused


def as_batch(gallery_imgs: Any, gallery_label: Any) -> GalleryBatch:
    """PaddleX's gallery arguments: a root dir + a label file, or two equally long lists."""
    if isinstance(gallery_imgs, GalleryBatch):
        return gallery_imgs
    if isinstance(gallery_label, (str, Path)) and not isinstance(gallery_imgs, (list, tuple)):
        return read_label_file(gallery_label, gallery_imgs)
    if isinstance(gallery_imgs, (list, tuple)) and isinstance(gallery_label, (list, tuple)):
        if len(gallery_imgs) != len(gallery_label):
            raise ShiTuError(f"{len(gallery_imgs)} images but {len(gallery_label)} labels")
        return GalleryBatch(
            items=[
                GalleryItem(
                    source=Path(img).name if isinstance(img, (str, Path)) else f"image {k + 1}",
                    image=img, label=str(label), line_no=k + 1,
                )  # fmt: skip
                for k, (img, label) in enumerate(zip(gallery_imgs, gallery_label))
            ]
        )
    raise ShiTuError("give gallery_imgs as a root dir with gallery_label as a label file, or two lists of equal length")


def create_pipeline(
    pipeline: str | Path = "PP-ShiTuV2",
    config: dict | None = None,
    device: str | None = None,
    index: Any = None,
    *,
    use_hpip: bool | None = None,
    hpi_config: dict[str, Any] | None = None,
    isolate: bool = False,
    **settings: Any,
) -> ShiTuPipeline:
    """``paddlex.create_pipeline``'s signature: a pipeline name or a pipeline YAML path, or a
    config dict; ``device`` like ``"cpu"`` or ``"gpu:0"``; ``index``: what ``predict`` uses when
    none is passed. ``use_hpip=True``: high-performance inference — the models run on OpenVINO
    (CPU) or ONNX Runtime, converted and verified against Paddle at first use, Paddle kept with a
    reason wherever that fails (``pipeline.models`` says which engine runs each); ``hpi_config``
    like PaddleX's, e.g. ``{"backend": "onnxruntime"}`` (the YAML's own ``hpi_config`` keys win).
    ``isolate=True`` runs PaddleX in a worker process (a native crash then
    raises :class:`~shitu.errors.ModelCrashed` instead of ending Python). Other keywords set
    :class:`~shitu.config.Settings` fields (``data_dir=...``, ``offline=True``)."""
    settings_obj = Settings.from_env(use_hpip=use_hpip, **settings)
    if config is not None:
        cfg = PipelineConfig.from_dict(config)
    elif Path(str(pipeline)).is_file():
        cfg = PipelineConfig.load(pipeline)
    elif str(pipeline) in ("PP-ShiTuV2", "PP-ShiTuV2.yaml"):
        cfg = PipelineConfig.load(settings_obj.pipeline_config) if settings_obj.pipeline_config else PipelineConfig()
    else:
        raise ShiTuError(f"unknown pipeline {pipeline!r}: only PP-ShiTuV2 (or a path to its YAML) is supported")
    if hpi_config is not None:
        cfg.hpi_config = {**parse_hpi_config(hpi_config), **(cfg.hpi_config or {})}
    engine = Engine(settings_obj, config=cfg, device=device, isolate=isolate)
    engine.models()  # decide which weights run now: a bad model_dir fails here, as in PaddleX
    return ShiTuPipeline(engine, index=index)
