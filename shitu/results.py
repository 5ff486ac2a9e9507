"""Result value objects: what one prediction found, with PaddleX-style print/save methods."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RecognizedObject:
    """One detected box and what the gallery says it is.

    ``labels``/``scores`` hold the top-k gallery matches above the recognition threshold,
    best first; both are empty when nothing in the gallery is similar enough (the box is
    then *unrecognised* — never labelled ``"None"``).
    """

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    det_score: float
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # gallery entry ids of the matches
    det_label: str | None = None  # detector's own class name (e.g. Open Images), if any
    whole_image: bool = False  # the box is the whole image, not a detection

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
        return {
            "bbox": [round(float(v), 2) for v in self.bbox],
            "det_score": round(float(self.det_score), 4),
            "det_label": self.det_label,
            "whole_image": self.whole_image,
            "rec_results": [
                {"label": lab, "score": round(float(s), 4), "id": int(i)}
                for lab, s, i in zip(self.labels, self.scores, self.ids)
            ],
        }


@dataclass
class ShiTuResult:
    """Everything one image produced. ``image`` is RGB uint8."""

    input_path: str | None
    image: np.ndarray
    objects: list[RecognizedObject]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    models: dict[str, str] = field(default_factory=dict)  # stage → active model description
    index_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        h, w = self.image.shape[:2]
        return {
            "input_path": self.input_path,
            "image_size": [int(w), int(h)],
            "boxes": [o.to_dict() for o in self.objects],
            "timings_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
            "models": self.models,
            "index": self.index_name,
        }

    @property
    def json(self) -> dict[str, Any]:
        return self.to_dict()

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def print(self) -> None:
        print(self)

    def _target(self, save_path: str | Path, suffix: str) -> Path:
        path = Path(save_path)
        if path.suffix.lower() != suffix and not (suffix == ".jpg" and path.suffix.lower() in (".jpeg", ".png")):
            stem = Path(self.input_path).stem if self.input_path else "result"
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{stem}_res{suffix}"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def save_to_json(self, save_path: str | Path) -> Path:
        """Write the result as JSON; a directory gets ``<input stem>_res.json``."""
        path = self._target(save_path, ".json")
        path.write_text(str(self), encoding="utf-8")
        return path

    def render(self):
        """The image with boxes and labels drawn (PIL.Image)."""
        from shitu.render import draw_objects

        return draw_objects(self.image, self.objects)

    def save_to_img(self, save_path: str | Path) -> Path:
        """Write the drawn image; a directory gets ``<input stem>_res.jpg``."""
        path = self._target(save_path, ".jpg")
        self.render().save(path, quality=92)
        return path
