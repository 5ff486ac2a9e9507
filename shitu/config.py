"""Settings (environment) and the PaddleX-compatible pipeline YAML.

Every knob lives here: one :class:`Settings` read from ``SHITU_*`` environment variables,
and :class:`PipelineConfig`, which reads and writes the same YAML that
``paddlex --get_pipeline_config PP-ShiTuV2`` produces (plus a few optional keys of ours
that PaddleX ignores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shitu.errors import ShiTuError

REC_MODELS = ("PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base", "PP-ShiTuV2_rec_CLIP_vit_large")
# What PaddleX's model list publishes for the three official recognisers (PaddleX 3.0 docs:
# AliProducts recall@1; inference time on an NVIDIA T4 (FP32) and on a Xeon Gold 5117 with 8 threads).
REC_MODEL_FACTS: dict[str, dict[str, float]] = {
    "PP-ShiTuV2_rec": {"size_mb": 16.3, "recall_at_1": 84.2, "gpu_ms": 5.2, "cpu_ms": 19.6},
    "PP-ShiTuV2_rec_CLIP_vit_base": {"size_mb": 306.6, "recall_at_1": 88.69, "gpu_ms": 13.2, "cpu_ms": 285.5},
    "PP-ShiTuV2_rec_CLIP_vit_large": {"size_mb": 1050.0, "recall_at_1": 91.03, "gpu_ms": 51.1, "cpu_ms": 1131.3},
}
DET_MODELS = ("PP-ShiTuV2_det",)
INDEX_TYPES = ("HNSW32", "IVF", "Flat")
METRIC_TYPES = ("IP", "L2")
WHOLE_IMAGE_MODES = ("auto", "always", "never")


def default_data_dir() -> Path:
    """``/data/shitu`` where Hugging Face Spaces mounts persistent storage, else ``~/.cache/shitu``
    (``$SHITU_DATA_DIR`` overrides both)."""
    spaces = Path("/data")
    if spaces.is_dir() and os.access(spaces, os.W_OK):
        return spaces / "shitu"
    return Path.home() / ".cache" / "shitu"


class SettingsError(ShiTuError):
    """A ``SHITU_*`` environment variable (or setting) has a value that cannot be used."""


class Settings(BaseSettings):
    """Process-wide settings, read from ``SHITU_*`` environment variables.

    ``Settings.from_env(data_dir=...)`` overrides single values; a bad value raises
    :class:`SettingsError` with one line naming the variable, e.g.
    ``SHITU_MAX_IMAGE_PIXELS='abc': must be a whole number``.
    """

    model_config = SettingsConfigDict(env_prefix="SHITU_", extra="forbid", validate_default=True)

    data_dir: Path = Field(default_factory=default_data_dir, description="indices, sample gallery, model cache")
    model_dir: Path | None = Field(None, description="model cache (default: <data_dir>/models)")
    pipeline_config: Path | None = Field(None, description="a PaddleX PP-ShiTuV2 pipeline YAML")
    device: str | None = Field(None, description="cpu, gpu:0, ... (default: PaddleX's choice)")
    offline: bool = Field(False, description="never try a model hub")
    rec_model: str | None = Field(None, description="override the YAML's recognition model")
    api_token: str | None = Field(None, description="bearer token / UI password for changing indices")
    read_only: bool | None = Field(
        None, description="refuse index changes without the token (default: only on a public server)"
    )
    url_allowlist: Annotated[tuple[str, ...], NoDecode] = Field((), description="hosts allowed even if private")
    max_image_pixels: int = Field(40_000_000, gt=0, description="decompression-bomb guard")
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest HTTP API request body")
    max_event_bytes: int = Field(1024 * 1024, gt=0, description="largest body of a Gradio event call (JSON)")
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="addresses or networks whose X-Forwarded-For is believed (default: none; a Space's network)"
    )
    max_upload_bytes_per_client: int = Field(
        512 * 1024 * 1024, gt=0, description="bytes one address may upload to the studio per 15 minutes"
    )
    max_gallery_jobs: int = Field(2, gt=0, description="galleries embedded at once (builds, adds); more are 'busy'")
    max_waiting_requests: int = Field(
        32, gt=0, description="requests that may use or wait for the models at once; more are answered 'busy'"
    )
    default_index: str = Field("sample", description="the index used when a call names none")
    model_mirror: str | None = Field(
        None,
        description="official-model mirror tried before PaddleX's own host: a base URL or a directory "
        "holding <model>_infer.tar files in PaddleX's layout",
    )
    model_mirror_only: bool = Field(False, description="never contact PaddleX's own model host (behind a firewall)")
    model_download_deadline: float = Field(
        5.0, gt=0, le=600, description="seconds start-up waits for one official model download in all"
    )
    model_background_deadline: float = Field(
        1800.0, gt=0, description="seconds a background download of official models may take in all"
    )
    model_max_bytes: int = Field(4 * 1024**3, gt=0, description="largest official model tar accepted")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Paddle Inference CPU math threads per model (default: PaddleX's 10, or fewer "
        "when this process may use fewer cores: more threads than cores only adds contention)",
    )
    build_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="processes that decode and embed a large gallery (a build or an add of hundreds of "
        "images) side by side; default: one per core, at most 4; 1: only the models' own process",
    )
    use_hpip: bool | None = Field(
        None,
        description="high-performance inference: run the models on OpenVINO (CPU) or ONNX Runtime, converted "
        "and verified against Paddle at first use (needs the hpi extra); overrides the pipeline YAML's use_hpip",
    )
    isolate_models: bool = Field(
        True, description="run PaddleX in a supervised worker process, so a native crash cannot kill the server"
    )
    history_versions: int = Field(
        10, ge=0, le=10_000,
        description="previous versions kept per named index, to list, compare and restore (0: keep none)",
    )  # fmt: skip

    vector_store: Literal["faiss", "milvus"] = Field(
        "faiss", description="where named indices live and are searched: faiss files in the data dir, or Milvus"
    )
    milvus_uri: str | None = Field(
        None, description="Milvus: a Milvus Lite path (…/x.db) or http(s)://host:port (default: <data_dir>/milvus.db)"
    )
    milvus_token: str | None = Field(None, description="Milvus: 'user:password' or an API key")
    milvus_prefix: str = Field("shitu_", description="Milvus: the prefix of our collections")
    milvus_state: Path | None = Field(
        None,
        description="Milvus: the SQLite file with version records and projections (default: beside a Milvus Lite "
        "file, else <data_dir>/milvus_state.sqlite); replicas sharing a Milvus server must share it",
    )

    @field_validator("url_allowlist", "trusted_proxies", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(h.strip() for h in value.split(",") if h.strip())
        return value

    @field_validator("data_dir", "model_dir", "pipeline_config", "milvus_state", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """The environment's settings, with ``overrides`` (``None`` values are ignored)."""
        known = set(cls.model_fields)
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err.get("loc") else "?"
            value = err.get("input")
            raise SettingsError(f"SHITU_{name.upper()}={value!r}: {err['msg']}") from None

    @property
    def models_dir(self) -> Path:
        return Path(self.model_dir) if self.model_dir else self.data_dir / "models"

    @property
    def indices_dir(self) -> Path:
        return self.data_dir / "indices"

    @property
    def milvus_target(self) -> str:
        """Where the Milvus backend connects (``SHITU_MILVUS_URI``, else a Milvus Lite file in the data dir)."""
        return self.milvus_uri or str(self.data_dir / "milvus.db")


@dataclass
class SubModule:
    model_name: str
    model_dir: str | None = None
    batch_size: int = 1
    use_hpip: bool | None = None  # None: the pipeline's
    hpi_config: dict[str, Any] | None = None  # merged over the pipeline's


@dataclass
class PipelineConfig:
    """The PP-ShiTuV2 pipeline YAML, as PaddleX reads and writes it.

    ``whole_image``, ``nms_iou`` and ``device`` are our additions (PaddleX ignores unknown
    keys); a ``None`` (YAML ``null``) threshold means "the active model's / the index's own".
    ``use_hpip`` and ``hpi_config`` are PaddleX's (also per sub-module): see :mod:`shitu.hpi`.
    """

    detection: SubModule = field(default_factory=lambda: SubModule("PP-ShiTuV2_det"))
    recognition: SubModule = field(default_factory=lambda: SubModule("PP-ShiTuV2_rec", batch_size=4))
    det_threshold: float | None = None
    rec_threshold: float | None = None
    rec_topk: int = 5
    index: str | None = None
    whole_image: str = "auto"
    nms_iou: float | None = 0.5
    device: str | None = None
    use_hpip: bool = False
    hpi_config: dict[str, Any] | None = None

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
        for name in ("det_threshold", "rec_threshold", "nms_iou"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ShiTuError(f"{name} must be between 0 and 1, not {value}")
        parse_hpi_config(self.hpi_config)
        for key, sub in (("Detection", self.detection), ("Recognition", self.recognition)):
            parse_hpi_config(sub.hpi_config, f"SubModules.{key}.hpi_config")
        return self

    def hpi_request(self, stage: str) -> tuple[bool, dict[str, Any]]:
        """``(use_hpip, hpi_config)`` for ``stage`` (detection / recognition): the sub-module's
        own settings over the pipeline's, as PaddleX merges them."""
        sub = self.detection if stage == "detection" else self.recognition
        enabled = self.use_hpip if sub.use_hpip is None else sub.use_hpip
        return bool(enabled), {**(self.hpi_config or {}), **(sub.hpi_config or {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        subs = data.get("SubModules") or {}

        def sub(key: str, default: SubModule) -> SubModule:
            raw = subs.get(key) or {}
            return SubModule(
                model_name=raw.get("model_name") or default.model_name,
                model_dir=raw.get("model_dir") or None,
                batch_size=int(raw.get("batch_size") or default.batch_size),
                use_hpip=_opt_bool(raw.get("use_hpip"), f"SubModules.{key}.use_hpip"),
                hpi_config=raw.get("hpi_config") or None,
            )

        base = cls()
        index = data.get("index")
        return cls(
            detection=sub("Detection", base.detection),
            recognition=sub("Recognition", base.recognition),
            det_threshold=_opt_float(data.get("det_threshold")),
            rec_threshold=_opt_float(data.get("rec_threshold")),
            rec_topk=int(data.get("rec_topk", base.rec_topk)),
            index=None if index in (None, "None", "") else str(index),
            whole_image=str(data.get("whole_image", base.whole_image)),
            nms_iou=_opt_float(data.get("nms_iou", base.nms_iou)),
            device=data.get("device") or None,
            use_hpip=bool(_opt_bool(data.get("use_hpip"), "use_hpip")),
            hpi_config=data.get("hpi_config") or None,
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
        def sub(module_name: str, s: SubModule) -> dict[str, Any]:
            out = {"module_name": module_name, "model_name": s.model_name, "model_dir": s.model_dir,
                   "batch_size": s.batch_size}  # fmt: skip
            if s.use_hpip is not None:
                out["use_hpip"] = s.use_hpip
            if s.hpi_config:
                out["hpi_config"] = s.hpi_config
            return out

        return {
            "pipeline_name": "PP-ShiTuV2",
            "use_hpip": self.use_hpip,
            **({"hpi_config": self.hpi_config} if self.hpi_config else {}),
            "index": self.index,
            # null = the detector's own default (PaddleX passes None through to the predictor)
            "det_threshold": self.det_threshold,
            # null = the active model's or the index's own threshold (PaddleX's default YAML says 0.5)
            "rec_threshold": self.rec_threshold,
            "rec_topk": self.rec_topk,
            "SubModules": {
                "Detection": sub("object_detection", self.detection),
                "Recognition": sub("image_feature", self.recognition),
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


def _opt_bool(value: Any, name: str) -> bool | None:
    """A YAML boolean (``true``/``false``, or the strings PaddleX's YAMLs sometimes carry)."""
    if value in (None, "", "None"):
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ShiTuError(f"{name} must be true or false, not {value!r}")


def _opt_float(value: Any) -> float | None:
    return None if value in (None, "None", "") else float(value)


HPI_BACKENDS = ("openvino", "onnxruntime", "paddle")
_HPI_KEYS = {"backend", "backend_config", "auto_config", "auto_paddle2onnx", "device_type", "device_id", "hpi_info",
             "model_name"}  # fmt: skip


def parse_hpi_config(raw: Any, where: str = "hpi_config") -> dict[str, Any]:
    """PaddleX's ``hpi_config`` (a dict, or its pydantic ``HPIConfig``), checked: ``backend``
    (openvino, onnxruntime, paddle; default: chosen per device), ``backend_config``
    (``cpu_num_threads``; ONNX Runtime also ``providers``). PaddleX's other keys are accepted and unused."""
    if raw is None:
        return {}
    if hasattr(raw, "model_dump"):
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, dict):
        raise ShiTuError(f"{where} must be a mapping like {{'backend': 'openvino'}}, not {type(raw).__name__}")
    unknown = set(raw) - _HPI_KEYS
    if unknown:
        raise ShiTuError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_HPI_KEYS))}")
    backend = raw.get("backend")
    if backend is not None and backend not in HPI_BACKENDS:
        raise ShiTuError(f"{where}.backend must be one of {', '.join(HPI_BACKENDS)} on this build, not {backend!r}")
    backend_config = raw.get("backend_config") or {}
    if not isinstance(backend_config, dict):
        raise ShiTuError(f"{where}.backend_config must be a mapping")
    threads = backend_config.get("cpu_num_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 512):
        raise ShiTuError(f"{where}.backend_config.cpu_num_threads must be a whole number from 1 to 512")
    return dict(raw)
