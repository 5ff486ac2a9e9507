"""The PP-ShiTuV2 pipeline: detect main bodies → embed crops → search the gallery index.

Inference runs in PaddleX's own predictors (``paddlex.create_model``); we compose them
instead of using PaddleX's ``ShiTuV2Pipeline``, which fails as shipped in 3.7.2 (its
feature predictor hands every image the whole batch's feature matrix).

The method names and arguments follow PaddleX, so PaddleX's example scripts run with only
the import changed::

    from shitu import create_pipeline
    pipeline = create_pipeline("PP-ShiTuV2")
    index = pipeline.build_index(gallery_imgs="drinks/", gallery_label="drinks/gallery.txt")
    for res in pipeline.predict("drinks/test_images/100.jpeg", index=index):
        res.print()
        res.save_to_img("./output/")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shitu.config import PipelineConfig, Settings
from shitu.errors import ShiTuError
from shitu.gallery import (
    GalleryBatch,
    GalleryItem,
    ImageInput,
    SkippedLine,
    list_image_files,
    load_image,
    make_thumbnail,
    read_label_file,
)
from shitu.geometry import box_iou
from shitu.index import GalleryIndex
from shitu.models import ModelChoice, resolve_detection, resolve_recognition
from shitu.results import RecognizedObject, ShiTuResult

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, what)
MIN_CROP = 4  # pixels; smaller boxes cannot be embedded meaningfully
DEDUP_FACTOR = 5  # neighbours fetched per requested label, so duplicates can be folded
UNSET = object()  # "use the pipeline config's value" (None is meaningful: it disables cross-box NMS)


class ShiTuPipeline:
    """Detection + recognition models and the index operations built on them.

    Models are resolved when the pipeline is created (so it can say which are active) and
    loaded on first use, under a lock.
    """

    def __init__(
        self, config: PipelineConfig | None = None, settings: Settings | None = None, device: str | None = None
    ):
        self.settings = settings or Settings.from_env()
        self.config = (config or self._default_config()).validate()
        self.device = device or self.config.device or self.settings.device
        if self.settings.rec_model and not self.config.recognition.model_dir:
            self.config.recognition.model_name = self.settings.rec_model
        self.recognition: ModelChoice = resolve_recognition(self.config, self.settings)
        self.detection: ModelChoice = resolve_detection(self.config, self.settings)
        # Every PaddleX call runs on this one thread. Predictors keep per-call state (two
        # threads in one predictor mix up their batches), and Paddle Inference fails with
        # "std::exception" when a predictor is run from a succession of new threads, which
        # is what web servers' thread pools do.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shitu-paddle")
        self._rec_model: Any = None
        self._det_model: Any = None
        self._index_cache: dict[str, tuple[float, GalleryIndex]] = {}
        self.default_index: Any = None  # used by predict() when no index is passed
        log.info("recognition: %s", self.recognition.describe())
        log.info("detection: %s", self.detection.describe())

    def _default_config(self) -> PipelineConfig:
        if self.settings.pipeline_config:
            return PipelineConfig.load(self.settings.pipeline_config)
        return PipelineConfig()

    # --- models ----------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, dict]:
        """Which models are active and why (for UIs, logs and the API)."""
        return {
            "detection": self.detection.to_dict(),
            "recognition": self.recognition.to_dict(),
            "device": self.device or "auto",
        }

    @property
    def feature_model(self) -> str:
        return self.recognition.fingerprint

    @property
    def default_det_threshold(self) -> float:
        if self.config.det_threshold is not None:
            return self.config.det_threshold
        return self.detection.default_threshold or 0.5

    @property
    def default_rec_threshold(self) -> float:
        # a YAML that leaves rec_threshold at PaddleX's 0.5 gets the active model's default
        if self.config.rec_threshold != 0.5 or self.recognition.default_threshold is None:
            return self.config.rec_threshold
        return self.recognition.default_threshold

    def rec_threshold_for(self, index: GalleryIndex) -> float:
        """The threshold used when a call gives none: a whitened index's own suggestion (its
        similarities live on another scale), else the pipeline default."""
        if index.suggested_rec_threshold is not None and self.config.rec_threshold == 0.5:
            return index.suggested_rec_threshold
        return self.default_rec_threshold

    def _create(self, choice: ModelChoice):
        import paddlex

        kwargs = {"model_name": choice.model_name, "model_dir": choice.model_dir}
        if self.device:
            kwargs["device"] = self.device
        return paddlex.create_model(**kwargs)

    def _on_worker(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the pipeline's inference thread and wait for it."""
        return self._worker.submit(fn, *args, **kwargs).result()

    def _models(self):
        """The loaded predictors (created on first use, on the inference thread)."""
        if self._rec_model is None or (self._det_model is None and self.detection.available):
            self._on_worker(self._load)
        return self._det_model, self._rec_model

    def _load(self) -> None:
        if self._rec_model is None:
            self._rec_model = self._create(self.recognition)
        if self._det_model is None and self.detection.available:
            self._det_model = self._create(self.detection)

    # --- stages ----------------------------------------------------------------------------
    def embed(self, images: Sequence[np.ndarray], batch_size: int | None = None) -> np.ndarray:
        """L2-normalised features (N, D) for RGB images, via PaddleX's feature predictor."""
        _, rec = self._models()
        if not images:
            raise ShiTuError("no images to embed")
        bs = batch_size or self.config.recognition.batch_size
        rows: list[np.ndarray] = []
        for start in range(0, len(images), bs):
            batch = [np.ascontiguousarray(im[..., ::-1]) for im in images[start : start + bs]]  # RGB → BGR
            results = self._on_worker(lambda b=batch: list(rec.predict(b, batch_size=len(b))))
            feats = [np.asarray(r["feature"], dtype=np.float32) for r in results]
            if feats[0].ndim == 2 and feats[0].shape[0] == len(batch):
                rows.append(feats[0])  # PaddleX 3.7.2: every result carries the batch matrix
            else:
                rows.append(np.stack([f.reshape(-1) for f in feats]))
        out = np.concatenate(rows)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def detect(
        self, image: np.ndarray, threshold: float
    ) -> list[tuple[tuple[float, float, float, float], float, str | None]]:
        """Main-body boxes ``(xyxy, score, class name)`` of one RGB image (empty without a detector)."""
        det, _ = self._models()
        if det is None:
            return []
        bgr = np.ascontiguousarray(image[..., ::-1])
        (res,) = self._on_worker(lambda: list(det.predict([bgr], threshold=threshold)))
        boxes = []
        for b in res["boxes"]:
            x1, y1, x2, y2 = (float(v) for v in b["coordinate"])
            boxes.append(((x1, y1, x2, y2), float(b["score"]), b.get("label")))
        return boxes

    # --- index operations (PaddleX signatures) -----------------------------------------
    def build_index(
        self,
        gallery_imgs: Any,
        gallery_label: Any = None,
        index_type: str = "HNSW32",
        metric_type: str = "IP",
        *,
        skip_invalid: bool = False,
        progress: Progress | None = None,
        whiten: bool = False,
    ) -> GalleryIndex:
        """Embed a gallery and index it.

        ``gallery_imgs``/``gallery_label``: a root dir and a label file (PaddleX), a list of
        images and a list of labels, or a :class:`GalleryBatch`. Unusable lines raise
        :class:`ShiTuError` listing their line numbers, unless ``skip_invalid`` (then they
        are left out and reported in ``index.skipped``). ``whiten``: fit database-side
        whitening on the gallery (200+ images; see :class:`~shitu.index.Whitening`).
        """
        batch = self._as_batch(gallery_imgs, gallery_label)
        feats, items, skipped = self.embed_gallery(batch, skip_invalid, progress)
        index = GalleryIndex.build(
            feats,
            [i.label for i in items],
            index_type=index_type,
            metric_type=metric_type,
            sources=[i.source for i in items],
            thumbnails=[i.thumbnail for i in items],
            feature_model=self.feature_model,
            whiten=whiten,
        )
        index.skipped = skipped
        return index

    def append_index(
        self,
        gallery_imgs: Any,
        gallery_label: Any = None,
        index: Any = None,
        *,
        skip_invalid: bool = False,
        progress: Progress | None = None,
    ) -> GalleryIndex:
        """A new index with the gallery appended (the given one is not modified)."""
        base = self._as_index(index)
        batch = self._as_batch(gallery_imgs, gallery_label)
        feats, items, skipped = self.embed_gallery(batch, skip_invalid, progress)
        new = base.add(
            feats,
            [i.label for i in items],
            sources=[i.source for i in items],
            thumbnails=[i.thumbnail for i in items],
        )
        new.skipped = skipped
        return new

    def remove_index(self, remove_ids: Any, index: Any = None) -> GalleryIndex:
        """A new index without ``remove_ids`` (a list of ids, or a txt file with one id per line)."""
        return self._as_index(index).remove(parse_ids(remove_ids))

    # --- prediction ------------------------------------------------------------------------
    def predict(
        self,
        input: Any,
        index: Any = None,
        *,
        det_threshold: float | None = None,
        rec_threshold: float | None = None,
        rec_topk: int | None = None,
        whole_image: str | None = None,
        nms_iou: float | None | object = UNSET,
        **_ignored: Any,
    ) -> Iterator[ShiTuResult]:
        """Recognise every image of ``input``: an array (BGR, like PaddleX), a PIL image, a
        path, a URL, a directory, ``{"img": ...}`` or a list of these. Yields results.

        ``whole_image``: ``auto`` adds the whole image as a box when nothing is detected,
        ``always`` adds it always, ``never`` never. ``nms_iou``: boxes given the same label
        that overlap more than this are merged (``None`` disables it).
        """
        if index is None:
            index = self.default_index if self.default_index is not None else self.config.index
        gallery = self._as_index(index)
        self.check_compatible(gallery)
        opts = self.options(
            gallery,
            det_threshold=det_threshold,
            rec_threshold=rec_threshold,
            rec_topk=rec_topk,
            whole_image=whole_image,
            nms_iou=nms_iou,
        )
        for name, loader in iter_inputs(input, self.settings.max_image_pixels):
            yield self.recognize(loader(), gallery, input_path=name, **opts)

    def recognize(
        self,
        image: np.ndarray,
        index: GalleryIndex,
        *,
        det_threshold: float,
        rec_threshold: float,
        rec_topk: int,
        whole_image: str = "auto",
        nms_iou: float | None = 0.5,
        input_path: str | None = None,
    ) -> ShiTuResult:
        """One RGB image through detect → crop → embed → search → merge."""
        timings: dict[str, float] = {}
        h, w = image.shape[:2]
        t = time.perf_counter()
        objects = [
            RecognizedObject(bbox=_clip(b, w, h), det_score=s, det_label=lab)
            for b, s, lab in self.detect(image, det_threshold)
        ]
        timings["detect"] = time.perf_counter() - t
        objects = [o for o in objects if _box_size(o.bbox) >= MIN_CROP]
        if whole_image == "always" or not objects and (whole_image == "auto" or not self.detection.available):
            objects.append(RecognizedObject(bbox=(0.0, 0.0, float(w), float(h)), det_score=1.0, whole_image=True))
        t = time.perf_counter()
        crops = [
            image[int(y1) : int(np.ceil(y2)), int(x1) : int(np.ceil(x2))]
            for x1, y1, x2, y2 in (o.bbox for o in objects)
        ]
        feats = self.embed(crops) if crops else np.zeros((0, index.dim), np.float32)
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        if len(feats):
            scores, ids = index.search(feats, topk=rec_topk * DEDUP_FACTOR)
            for obj, row_s, row_i in zip(objects, scores, ids):
                _fill_matches(obj, row_s, row_i, index, rec_threshold, rec_topk)
        if nms_iou is not None:
            objects = merge_same_label(objects, nms_iou)
        timings["search"] = time.perf_counter() - t
        return ShiTuResult(
            input_path=input_path,
            image=image,
            objects=objects,
            timings=timings,
            models={"detection": self.detection.describe(), "recognition": self.recognition.describe()},
        )

    def options(
        self,
        index: GalleryIndex,
        *,
        det_threshold: float | None = None,
        rec_threshold: float | None = None,
        rec_topk: int | None = None,
        whole_image: str | None = None,
        nms_iou: float | None | object = UNSET,
    ) -> dict[str, Any]:
        """Per-call options for :meth:`recognize`, with the defaults filled in (``None``/unset
        means "the default"; ``nms_iou=None`` turns cross-box NMS off)."""
        opts = {
            "det_threshold": self.default_det_threshold if det_threshold is None else float(det_threshold),
            "rec_threshold": self.rec_threshold_for(index) if rec_threshold is None else float(rec_threshold),
            "rec_topk": self.config.rec_topk if rec_topk is None else int(rec_topk),
            "whole_image": whole_image or self.config.whole_image,
            "nms_iou": self.config.nms_iou if nms_iou is UNSET else nms_iou,
        }
        if opts["rec_topk"] < 1:
            raise ShiTuError("rec_topk must be at least 1")
        return opts

    # --- helpers -----------------------------------------------------------------------------
    def check_compatible(self, index: GalleryIndex, name: str | None = None) -> None:
        """Refuse an index whose vectors come from another recognition model."""
        if index.feature_model and index.feature_model != self.feature_model:
            which = f"index {name!r}" if name else "this index"
            raise ShiTuError(
                f"{which} was built with {index.feature_model}, but the active recognition model is "
                f"{self.feature_model}; rebuild it with the active model",
                status=409,
            )

    def _as_index(self, index: Any) -> GalleryIndex:
        if isinstance(index, GalleryIndex):
            return index
        if index is None:
            raise ShiTuError("no index given: build one with build_index or pass index=<dir>")
        if hasattr(index, "index") and hasattr(index, "id_map"):  # PaddleX IndexData
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                index.save(tmp)
                return GalleryIndex.load(tmp)
        path = Path(index)
        key = str(path.resolve())
        mtime = max((p.stat().st_mtime for p in path.glob("*")), default=0.0) if path.is_dir() else 0.0
        cached = self._index_cache.get(key)
        if cached and cached[0] == mtime:
            return cached[1]
        loaded = GalleryIndex.load(path)
        self._index_cache[key] = (mtime, loaded)
        return loaded

    def _as_batch(self, gallery_imgs: Any, gallery_label: Any) -> GalleryBatch:
        if isinstance(gallery_imgs, GalleryBatch):
            return gallery_imgs
        if isinstance(gallery_label, (str, Path)) and not isinstance(gallery_imgs, (list, tuple)):
            return read_label_file(gallery_label, gallery_imgs)
        if isinstance(gallery_imgs, (list, tuple)) and isinstance(gallery_label, (list, tuple)):
            if len(gallery_imgs) != len(gallery_label):
                raise ShiTuError(f"{len(gallery_imgs)} images but {len(gallery_label)} labels")
            return GalleryBatch(
                items=[
                    GalleryItem(source=_source_name(img, k), image=img, label=str(label), line_no=k + 1)
                    for k, (img, label) in enumerate(zip(gallery_imgs, gallery_label))
                ]
            )
        raise ShiTuError(
            "give gallery_imgs as a root dir with gallery_label as a label file, or two lists of equal length"
        )

    def embed_gallery(
        self, batch: GalleryBatch, skip_invalid: bool, progress: Progress | None = None
    ) -> tuple[np.ndarray, list[GalleryItem], list[SkippedLine]]:
        """Decode and embed every item: ``(features, items kept, skipped lines)``. Unusable
        images raise (listing every bad line) unless ``skip_invalid``; never silently dropped."""
        skipped = list(batch.skipped)
        decoded: list[tuple[GalleryItem, np.ndarray]] = []
        total = len(batch.items)
        for n, item in enumerate(batch.items):
            try:
                rgb = load_image(item.image, max_pixels=self.settings.max_image_pixels)
            except ShiTuError as exc:
                skipped.append(SkippedLine(item.line_no, item.source, exc.message))
                continue
            item.thumbnail = make_thumbnail(rgb)
            decoded.append((item, rgb))
            if progress and (n % 16 == 0 or n + 1 == total):
                progress(n + 1, total, "reading images")
        GalleryBatch(items=[d[0] for d in decoded], skipped=[] if skip_invalid else skipped).require_clean()
        bs = max(8, self.config.recognition.batch_size)
        feats = []
        for start in range(0, len(decoded), bs):
            chunk = decoded[start : start + bs]
            feats.append(self.embed([rgb for _, rgb in chunk], batch_size=bs))
            if progress:
                progress(min(start + bs, len(decoded)), len(decoded), "embedding")
        return np.concatenate(feats), [item for item, _ in decoded], skipped


def _fill_matches(
    obj: RecognizedObject, scores: np.ndarray, ids: np.ndarray, index: GalleryIndex, threshold: float, topk: int
) -> None:
    """Top-k distinct labels at or above the threshold, best first."""
    seen: set[str] = set()
    for score, id_ in zip(scores, ids):
        if id_ < 0 or score < threshold:
            continue
        label = index.entry(int(id_)).label
        if label in seen:
            continue
        seen.add(label)
        obj.labels.append(label)
        obj.scores.append(float(score))
        obj.ids.append(int(id_))
        if len(obj.labels) == topk:
            break


def merge_same_label(objects: list[RecognizedObject], iou: float) -> list[RecognizedObject]:
    """Cross-box NMS: of boxes recognised as the same label that overlap more than ``iou``,
    keep the one with the best recognition score. Unrecognised boxes are kept as they are."""
    recognised = sorted((o for o in objects if o.recognized), key=lambda o: -o.scores[0])
    kept: list[RecognizedObject] = []
    for obj in recognised:
        same = [k for k in kept if k.label == obj.label]
        if same and box_iou(np.array([obj.bbox]), np.array([k.bbox for k in same])).max() > iou:
            continue
        kept.append(obj)
    return kept + [o for o in objects if not o.recognized]


def parse_ids(remove_ids: Any) -> list[int]:
    """Ids from a list, a single id, or a text file with one id per line (first column)."""
    if isinstance(remove_ids, (str, Path)) and Path(remove_ids).is_file():
        lines = Path(remove_ids).read_text(encoding="utf-8-sig").splitlines()
        values: Iterable[Any] = [ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    elif isinstance(remove_ids, (int, np.integer)):
        values = [remove_ids]
    elif isinstance(remove_ids, str):
        values = [v for v in remove_ids.replace(",", " ").split()]
    else:
        values = list(remove_ids)
    ids = []
    for v in values:
        try:
            ids.append(int(v))
        except (TypeError, ValueError):
            raise ShiTuError(f"{v!r} is not an entry id (ids are whole numbers)") from None
    if not ids:
        raise ShiTuError("no ids to remove were given")
    return ids


def iter_inputs(input: Any, max_pixels: int) -> Iterator[tuple[str | None, Callable[[], np.ndarray]]]:
    """Flatten PaddleX-style inputs into ``(name, load_rgb)`` pairs, lazily."""
    from shitu.net import fetch_url

    if isinstance(input, dict):
        if "img" not in input:
            raise ShiTuError('a dict input needs an "img" key')
        yield from iter_inputs(input["img"], max_pixels)
    elif isinstance(input, (list, tuple)):
        for item in input:
            yield from iter_inputs(item, max_pixels)
    elif isinstance(input, np.ndarray):
        yield None, lambda: load_image(input, max_pixels=max_pixels)
    elif isinstance(input, Image.Image):
        yield None, lambda: load_image(input, max_pixels=max_pixels)
    elif isinstance(input, (bytes, bytearray)):
        yield None, lambda: load_image(bytes(input), max_pixels=max_pixels)
    elif isinstance(input, (str, Path)):
        text = str(input)
        if text.startswith(("http://", "https://")):
            yield text, lambda: load_image(fetch_url(text), max_pixels=max_pixels)
        elif Path(text).is_dir():
            files = list_image_files(text)
            if not files:
                raise ShiTuError(f"no images in directory {text}")
            for f in files:
                yield str(f), (lambda f=f: load_image(f, max_pixels=max_pixels))
        else:
            yield text, lambda: load_image(text, max_pixels=max_pixels)
    else:
        raise ShiTuError(f"unsupported input type {type(input).__name__}")


def _source_name(img: ImageInput, k: int) -> str:
    return Path(img).name if isinstance(img, (str, Path)) else f"image {k + 1}"


def _clip(box: tuple[float, float, float, float], w: int, h: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def _box_size(box: tuple[float, float, float, float]) -> float:
    return min(box[2] - box[0], box[3] - box[1])


def create_pipeline(
    pipeline: str | Path = "PP-ShiTuV2",
    config: dict | None = None,
    device: str | None = None,
    index: Any = None,
    **settings: Any,
) -> ShiTuPipeline:
    """``paddlex.create_pipeline``'s signature: a pipeline name or a pipeline YAML path, or a
    config dict; ``device`` like ``"cpu"`` or ``"gpu:0"``; ``index``: the index ``predict`` uses
    when none is passed (a :class:`GalleryIndex` or a directory). Extra keywords set :class:`Settings`."""
    settings_obj = Settings.from_env(**settings)
    if config is not None:
        cfg = PipelineConfig.from_dict(config)
    elif str(pipeline) in ("PP-ShiTuV2", "PP-ShiTuV2.yaml") and not Path(str(pipeline)).is_file():
        cfg = PipelineConfig.load(settings_obj.pipeline_config) if settings_obj.pipeline_config else PipelineConfig()
    elif Path(str(pipeline)).is_file():
        cfg = PipelineConfig.load(pipeline)
    else:
        raise ShiTuError(f"unknown pipeline {pipeline!r}: only PP-ShiTuV2 (or a path to its YAML) is supported")
    pipeline_obj = ShiTuPipeline(cfg, settings_obj, device=device)
    pipeline_obj.default_index = index
    return pipeline_obj
