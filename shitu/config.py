"""Settings (environment) and the PaddleX-compatible pipeline YAML.

Every knob lives here: one :class:`Settings` read from ``SHITU_*`` environment variables,
and :class:`PipelineConfig`, which reads and writes the same YAML that
``paddlex --get_pipeline_config PP-ShiTuV2`` produces (plus a few optional keys of ours
that PaddleX ignores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from shitu.errors import ShiTuError

REC_MODELS = ("PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base", "PP-ShiTuV2_rec_CLIP_vit_large")
DET_MODELS = ("PP-ShiTuV2_det",)
INDEX_TYPES = ("HNSW32", "IVF", "Flat")
METRIC_TYPES = ("IP", "L2")
WHOLE_IMAGE_MODES = ("auto", "always", "never")


def default_data_dir() -> Path:
    """``$SHITU_DATA_DIR``; else ``/data/shitu`` where Spaces mounts persistent storage;
    else ``~/.cache/shitu``."""
    env = os.environ.get("SHITU_DATA_DIR")
    if env:
        return Path(env).expanduser()
    spaces = Path("/data")
    if spaces.is_dir() and os.access(spaces, os.W_OK):
        return spaces / "shitu"
    return Path.home() / ".cache" / "shitu"


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    """Process-wide settings, from the environment (``SHITU_*``)."""

    data_dir: Path = field(default_factory=default_data_dir)
    model_dir: Path | None = None  # SHITU_MODEL_DIR: model cache (default: <data_dir>/models)
    pipeline_config: Path | None = None  # SHITU_PIPELINE_CONFIG: a PaddleX pipeline YAML
    device: str | None = None  # SHITU_DEVICE: cpu, gpu:0, ...
    offline: bool = False  # SHITU_OFFLINE=1: never try a model hub
    rec_model: str | None = None  # SHITU_REC_MODEL: override the YAML's recognition model
    api_token: str | None = None  # SHITU_API_TOKEN: bearer token for mutating endpoints
    url_allowlist: tuple[str, ...] = ()  # SHITU_URL_ALLOWLIST: hosts allowed even if private
    max_image_pixels: int = 40_000_000  # SHITU_MAX_IMAGE_PIXELS: decompression-bomb guard
    max_request_bytes: int = 64 * 1024 * 1024  # SHITU_MAX_REQUEST_BYTES
    default_index: str = "sample"  # SHITU_DEFAULT_INDEX

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        env = os.environ
        values: dict[str, Any] = {}
        if env.get("SHITU_MODEL_DIR"):
            values["model_dir"] = Path(env["SHITU_MODEL_DIR"]).expanduser()
        if env.get("SHITU_PIPELINE_CONFIG"):
            values["pipeline_config"] = Path(env["SHITU_PIPELINE_CONFIG"])
        if env.get("SHITU_DEVICE"):
            values["device"] = env["SHITU_DEVICE"]
        values["offline"] = _env_bool("SHITU_OFFLINE")
        if env.get("SHITU_REC_MODEL"):
            values["rec_model"] = env["SHITU_REC_MODEL"]
        if env.get("SHITU_API_TOKEN"):
            values["api_token"] = env["SHITU_API_TOKEN"]
        if env.get("SHITU_URL_ALLOWLIST"):
            values["url_allowlist"] = tuple(h.strip() for h in env["SHITU_URL_ALLOWLIST"].split(",") if h.strip())
        for name in ("max_image_pixels", "max_request_bytes"):
            key = f"SHITU_{name.upper()}"
            if env.get(key):
                values[name] = int(env[key])
        if env.get("SHITU_DEFAULT_INDEX"):
            values["default_index"] = env["SHITU_DEFAULT_INDEX"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        settings = cls(**values)
        settings.data_dir = Path(settings.data_dir).expanduser()
        return settings

    @property
    def models_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir else self.data_dir / "models"

    @property
    def indices_dir(self) -> Path:
        return self.data_dir / "indices"


@dataclass
class SubModule:
    model_name: str
    model_dir: str | None = None
    batch_size: int = 1


@dataclass
class PipelineConfig:
    """The PP-ShiTuV2 pipeline YAML, as PaddleX reads and writes it.

    ``whole_image``, ``nms_iou`` and ``device`` are our additions (PaddleX ignores unknown
    keys); ``None`` thresholds mean "the default of the active models".
    """

    detection: SubModule = field(default_factory=lambda: SubModule("PP-ShiTuV2_det"))
    recognition: SubModule = field(default_factory=lambda: SubModule("PP-ShiTuV2_rec", batch_size=8))
    det_threshold: float | None = None
    rec_threshold: float = 0.5
    rec_topk: int = 5
    index: str | None = None
    whole_image: str = "auto"
    nms_iou: float | None = 0.5
    device: str | None = None

    def validate(self) -> "PipelineConfig":
        if self.recognition.model_name not in REC_MODELS and not self.recognition.model_dir:
            raise ShiTuError(
                f"unknown recognition model {self.recognition.model_name!r}; "
                f"choose one of {', '.join(REC_MODELS)} or set SubModules.Recognition.model_dir"
            )
        if self.whole_image not in WHOLE_IMAGE_MODES:
            raise ShiTuError(f"whole_image must be one of {WHOLE_IMAGE_MODES}")
        if self.rec_topk < 1:
            raise ShiTuError("rec_topk must be at least 1")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        subs = data.get("SubModules") or {}

        def sub(key: str, default: SubModule) -> SubModule:
            raw = subs.get(key) or {}
            return SubModule(
                model_name=raw.get("model_name") or default.model_name,
                model_dir=raw.get("model_dir") or None,
                batch_size=int(raw.get("batch_size") or default.batch_size),
            )

        base = cls()
        index = data.get("index")
        return cls(
            detection=sub("Detection", base.detection),
            recognition=sub("Recognition", base.recognition),
            det_threshold=_opt_float(data.get("det_threshold")),
            rec_threshold=float(data.get("rec_threshold", base.rec_threshold)),
            rec_topk=int(data.get("rec_topk", base.rec_topk)),
            index=None if index in (None, "None", "") else str(index),
            whole_image=str(data.get("whole_image", base.whole_image)),
            nms_iou=_opt_float(data.get("nms_iou", base.nms_iou)),
            device=data.get("device") or None,
        ).validate()

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ShiTuError(f"cannot read pipeline config {path}: {exc}") from exc
        if data.get("pipeline_name", "PP-ShiTuV2") != "PP-ShiTuV2":
            raise ShiTuError(f"{path} is a {data.get('pipeline_name')} config, not PP-ShiTuV2")
        config = cls.from_dict(data)
        # Relative model dirs are relative to the YAML file, like PaddleX users expect.
        for sub in (config.detection, config.recognition):
            if sub.model_dir and not Path(sub.model_dir).is_absolute():
                sub.model_dir = str((Path(path).parent / sub.model_dir).resolve())
        return config

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline_name": "PP-ShiTuV2",
            "index": self.index,
            # null = the detector's own default (PaddleX passes None through to the predictor)
            "det_threshold": self.det_threshold,
            "rec_threshold": self.rec_threshold,
            "rec_topk": self.rec_topk,
            "SubModules": {
                "Detection": {
                    "module_name": "object_detection",
                    "model_name": self.detection.model_name,
                    "model_dir": self.detection.model_dir,
                    "batch_size": self.detection.batch_size,
                },
                "Recognition": {
                    "module_name": "image_feature",
                    "model_name": self.recognition.model_name,
                    "model_dir": self.recognition.model_dir,
                    "batch_size": self.recognition.batch_size,
                },
            },
            "whole_image": self.whole_image,
            "nms_iou": self.nms_iou,
            "device": self.device,
        }

    def save(self, path: str | Path) -> Path:
        """Write the YAML (a directory gets ``PP-ShiTuV2.yaml`` inside it, like PaddleX)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "PP-ShiTuV2.yaml"
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
        return path


def _opt_float(value: Any) -> float | None:
    return None if value in (None, "None", "") else float(value)
