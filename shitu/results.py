"""What one prediction found: typed objects inside, PaddleX's result ``dict`` outside.

* :class:`RecognizedObject` and :class:`Recognition` are what the engine, the UI and the HTTP
  API work with.
* :class:`ShiTuResult` is what the Python API returns: a ``dict`` in PaddleX's PP-ShiTuV2 schema
  (``input_path``, ``input_img`` (BGR), ``boxes: [{labels, rec_scores, det_score, coordinate}]``;
  an unrecognised box has ``labels: [None], rec_scores: [None]`` as in PaddleX), with PaddleX's
  ``print`` / ``save_to_json`` / ``save_to_img`` / ``json`` / ``img`` / ``str``. Our extras live
  under keys PaddleX does not use (``entry_ids``, ``det_label``, ``whole_image``,
  ``best_candidate`` per box; ``index``, ``timings_ms``, ``models``, ``image_size`` per image).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import mimetypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.geometry import box_iou
from shitu.render import draw_objects
from shitu.threshold import accepts


@dataclass
class RecognizedObject:
    """One box and what the gallery says it is.

    ``labels``/``scores``/``ids`` hold the top-k distinct gallery labels at or above the
    recognition threshold, best first; all empty when nothing is similar enough (the box is
    *unknown*). ``candidate`` is the best match whatever the threshold — the near miss of an
    unknown box — as ``(label, score, id)``, or ``None`` for an empty gallery. ``candidates``
    holds the top-k distinct labels *whatever* the threshold, best first, as ``(label, score,
    id)``: what a person needs to judge an answer or a near miss, and what :meth:`decide` reads
    the answers from again at another threshold.
    """

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    det_score: float
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    det_label: str | None = None  # the detector's own class name, if any (internal, not an answer)
    whole_image: bool = False  # the box is the whole image, not a detection
    candidate: tuple[str, float, int] | None = None
    candidates: list[tuple[str, float, int]] = field(default_factory=list)
    # each candidate's similarity in the model's own space (NaN: not measured), for a calibration floor
    candidate_raw: list[float] = field(default_factory=list, repr=False, compare=False)
    # the box's query feature (unprojected), so teaching it needs no second embedding (not serialised)
    feature: np.ndarray | None = field(default=None, repr=False, compare=False)

    def decide(self, threshold: float, floor: float | None = None) -> None:
        """The answers at ``threshold``: the longest prefix of the candidates (best first) that
        :func:`shitu.threshold.accepts`; the best candidate is kept either way (the near miss)."""
        self.labels, self.scores, self.ids = [], [], []
        for k, (label, score, id_) in enumerate(self.candidates):
            raw = self.candidate_raw[k] if k < len(self.candidate_raw) else None
            if not accepts(score, threshold, raw, floor):
                break
            self.labels.append(label)
            self.scores.append(score)
            self.ids.append(id_)
        self.candidate = self.candidates[0] if self.candidates else None

    @property
    def label(self) -> str | None:
        return self.labels[0] if self.labels else None

    @property
    def score(self) -> float | None:
        return self.scores[0] if self.scores else None

    @property
    def recognized(self) -> bool:
        return bool(self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The box in PaddleX's schema, plus our extra keys."""
        return {
            "labels": list(self.labels) if self.labels else [None],
            "rec_scores": [round(float(s), 4) for s in self.scores] if self.scores else [None],
            "det_score": round(float(self.det_score), 4),
            "coordinate": [round(float(v), 2) for v in self.bbox],
            "entry_ids": [int(i) for i in self.ids],
            "det_label": self.det_label,
            "whole_image": self.whole_image,
            "best_candidate": (
                {"label": self.candidate[0], "score": round(float(self.candidate[1]), 4), "id": int(self.candidate[2])}
                if self.candidate
                else None
            ),
            "candidates": [
                {"label": label, "score": round(float(score), 4), "id": int(id_)}
                for label, score, id_ in self.candidates
            ],
        }


@dataclass
class Recognition:
    """Everything one image produced. ``image`` is RGB uint8."""

    input_path: str | None
    image: np.ndarray
    objects: list[RecognizedObject]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    models: dict[str, str] = field(default_factory=dict)  # stage → active model description
    index_name: str | None = None
    rec_threshold: float | None = None
    floor: float | None = None  # the index calibration's floor in the model's own space, if it keeps one
    nms_iou: float | None = None  # cross-box NMS of this query (None: off)
    # every box before cross-box NMS, with its candidates: what at_threshold decides again
    boxes: list[RecognizedObject] | None = field(default=None, repr=False, compare=False)
    feature_model: str | None = None  # the model that computed the objects' features

    def at_threshold(self, threshold: float) -> Recognition:
        """The same query decided at another threshold, without running a model or searching
        again: each box's candidates were kept whatever their score, and boxes that cross-box NMS
        merges at the new threshold are merged again (the studio's slider redraws with this)."""
        every = [copy.copy(o) for o in (self.boxes if self.boxes is not None else self.objects)]
        for obj in every:
            obj.decide(float(threshold), self.floor)
        objects = merge_same_label(every, self.nms_iou) if self.nms_iou is not None else every
        return dataclasses.replace(self, objects=objects, rec_threshold=float(threshold), boxes=every)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in PaddleX's schema without ``input_img``."""
        h, w = self.image.shape[:2]
        return {
            "input_path": self.input_path,
            "boxes": [o.to_dict() for o in self.objects],
            "index": self.index_name,
            "rec_threshold": self.rec_threshold,
            "image_size": [int(w), int(h)],
            "timings_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
            "models": self.models,
        }

    def render(self, lang: str = "en", highlight: int | None = None, max_side: int | None = None):
        """The image with boxes and labels drawn (PIL.Image), unknown boxes with their near miss
        against :attr:`rec_threshold`, captions in ``lang``, ``highlight`` (an index into
        :attr:`objects`) emphasised, at most ``max_side`` pixels on its longer side (the photo's own
        size by default); see :func:`shitu.render.draw_objects`."""
        return draw_objects(self.image, self.objects, lang=lang, threshold=self.rec_threshold, highlight=highlight,
                            max_side=max_side)  # fmt: skip


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


class ShiTuResult(dict):
    """PaddleX's PP-ShiTuV2 result: a ``dict`` with PaddleX's keys and methods.

    >>> res["boxes"][0]["labels"][0], res["boxes"][0]["coordinate"]  # doctest: +SKIP
    >>> res.print(); res.save_to_json("out/"); res.save_to_img("out/")  # doctest: +SKIP

    :attr:`recognition` keeps the typed :class:`Recognition` it was made from.
    """

    def __init__(self, recognition: Recognition):
        data = recognition.to_dict()
        super().__init__(
            {"input_path": data.pop("input_path"), "input_img": recognition.image[..., ::-1], **data}
        )  # PaddleX's input_img is BGR
        self.recognition = recognition
        self._fallback_stem: str | None = None

    # --- PaddleX's accessors ------------------------------------------------------------------
    def _plain(self) -> dict[str, Any]:
        return {k: v for k, v in self.items() if k != "input_img"}

    @property
    def json(self) -> dict[str, Any]:
        """``{"res": <the result without input_img>}``, as PaddleX's ``.json``."""
        return {"res": json.loads(json.dumps(self._plain(), ensure_ascii=False))}

    @property
    def str(self) -> dict[str, Any]:
        return {"res": self._plain()}

    @property
    def img(self) -> dict[str, Any]:
        """``{"res": PIL image with boxes and labels}``, as PaddleX's ``.img``."""
        return {"res": self.recognition.render()}

    def _to_str(self, json_format: bool = False, indent: int = 4, ensure_ascii: bool = False) -> str:
        return json.dumps({"res": self._plain()}, indent=indent, ensure_ascii=ensure_ascii)

    def print(
        self, format_json: bool = False, indent: int = 4, ensure_ascii: bool = False, *, json_format: bool | None = None
    ) -> None:
        """Print the result, pretty-printed as JSON with ``format_json=True`` (as PaddleX's
        pipeline docs spell it; ``json_format``, PaddleX's own parameter name, is accepted too)."""
        print(self._to_str(format_json if json_format is None else json_format, indent, ensure_ascii))

    # --- saving ---------------------------------------------------------------------------------
    def _stem(self) -> str:
        if self.get("input_path"):
            return Path(str(self["input_path"])).stem
        if self._fallback_stem is None:
            self._fallback_stem = f"{int(time.time())}_{np.random.randint(1000, 9999)}"
        return self._fallback_stem

    def save_to_json(self, save_path: str | Path, indent: int = 4, ensure_ascii: bool = False) -> Path:
        """Write the JSON; a path that is not a ``.json`` file is a dir that gets ``<stem>_res.json``."""
        path = Path(save_path)
        if mimetypes.guess_type(str(path))[0] != "application/json":
            path = path / f"{self._stem()}_res.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._plain(), indent=indent, ensure_ascii=ensure_ascii), encoding="utf-8")
        return path

    def save_to_img(self, save_path: str | Path) -> Path:
        """Write the drawn image; a path without an image suffix is a dir that gets ``<stem>_res.jpg``."""
        path = Path(save_path)
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
            path = path / f"{self._stem()}_res.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = self.recognition.render()
        image.convert("RGB").save(path, quality=92) if path.suffix.lower() in (".jpg", ".jpeg") else image.save(path)
        return path

    # typed helpers
    @property
    def objects(self) -> list[RecognizedObject]:
        return self.recognition.objects
