"""Official weights fetched in the background while the starter pack serves.

Start-up waits only ``SHITU_MODEL_DOWNLOAD_DEADLINE`` seconds per model (see
:func:`shitu.models.try_official`); when that was not enough, :class:`OfficialDownloads` keeps
downloading (up to ``SHITU_MODEL_BACKGROUND_DEADLINE``) on one thread, counts the bytes for the
UI, and when the files are cached switches the engine to them with the engine's own model swap
(requests in flight finish on the old models). Afterwards it says, per stored index, whether
its vectors came from the active model — an index built with the starter pack must be
re-embedded — and rebuilds the generated sample index itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from shitu import mirror
from shitu.errors import ShiTuError
from shitu.models import try_official

if TYPE_CHECKING:
    from shitu.engine import Engine

log = logging.getLogger(__name__)

STAGES = ("recognition", "detection")


class OfficialDownloads:
    """The state of one engine's background preparation; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.state = "idle"  # idle | downloading | switching | switched | ready | failed | nothing to do
        self.reason = ""
        self.models: dict[str, dict[str, Any]] = {}
        self.indices: dict[str, bool] = {}
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def status(self) -> dict[str, Any]:
        """A copy for UIs and ``/health``: overall state, per-model bytes, per-index compatibility."""
        with self._lock:
            return {
                "state": self.state,
                "reason": self.reason,
                "running": self._thread is not None and self._thread.is_alive(),
                "models": {k: dict(v) for k, v in self.models.items()},
                "indices": dict(self.indices),
            }

    def _set(self, model: str, **values: Any) -> None:
        with self._lock:
            self.models[model].update(values)

    def wanted(self, engine: Engine) -> list[tuple[str, str]]:
        """``(stage, official model name)`` for each stage not yet on official or local weights."""
        active = engine.models()
        subs = {"recognition": engine.config.recognition, "detection": engine.config.detection}
        return [
            (stage, subs[stage].model_name)
            for stage in STAGES
            if active[stage]["source"] not in ("official", "local") and not subs[stage].model_dir
        ]

    def start(self, engine: Engine, *, switch: bool = True, rebuild_sample: bool = True) -> bool:
        """Begin downloading on a thread; ``False`` when one runs already or nothing is missing."""
        wanted = self.wanted(engine)
        settings = engine.settings
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            if not wanted:
                self.state, self.reason = "nothing to do", "the official (or local) models are active"
                return False
            try:
                local_mirror = bool(settings.model_mirror) and mirror.Source.parse(settings.model_mirror).local
            except ValueError:
                local_mirror = False
            if settings.offline and not local_mirror:
                self.state, self.reason = "nothing to do", "SHITU_OFFLINE is set, so no model hub is tried"
                return False
            self.models = {
                name: {"stage": stage, "state": "waiting", "done": 0, "total": None, "reason": ""}
                for stage, name in wanted
            }
            self.indices = {}
            self.state, self.reason = "downloading", ""
            self.started_at, self.finished_at = time.time(), None
            self._thread = threading.Thread(
                target=self._run, args=(engine, wanted, switch, rebuild_sample), name="shitu-official-models",
                daemon=True,
            )  # fmt: skip
            self._thread.start()
        return True

    def wait(self, timeout: float) -> bool:
        """Wait (bounded) for the preparation to end; ``True`` if it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self, engine: Engine, wanted: list[tuple[str, str]], switch: bool, rebuild_sample: bool) -> None:
        settings = engine.settings
        ready = []
        for _stage, name in wanted:
            self._set(name, state="downloading")
            said = []

            def progress(done: int, total: int | None, name: str = name, said: list = said) -> None:
                self._set(name, done=done, total=total)
                if not said:  # the host answered: worth a line (an unreachable one is said once, at the end)
                    said.append(True)
                    size = f" ({total / 1e6:.1f} MB)" if total else ""
                    log.info("official weights: downloading %s%s in the background; the Models tab shows progress",
                             name, size)  # fmt: skip

            path, reason = try_official(
                name, settings.offline, settings=settings, deadline=settings.model_background_deadline,
                progress=progress, remember_failures=False, answer_within=mirror.BACKGROUND_ANSWER_TIMEOUT,
            )  # fmt: skip
            self._set(name, state="ready" if path else "failed", reason=reason)
            if path:
                ready.append(name)
        if not ready:
            self._finish("failed", "no official model could be downloaded")
            return
        if not switch or engine.config.recognition.model_dir:
            # a local recogniser stays; the cached official files are used from the next start
            self._finish("ready", "downloaded; used from the next start")
            return
        with self._lock:
            self.state = "switching"
        try:
            engine.switch_recognition_model(engine.config.recognition.model_name)
        except Exception as exc:  # noqa: BLE001 - reported in the status; the old models keep serving
            log.warning("switching to the downloaded official models failed: %s", exc)
            self._finish("failed", f"downloaded, but switching failed: {getattr(exc, 'message', exc)}")
            return
        if rebuild_sample:
            try:
                engine.ensure_sample_index()  # ours, generated: re-embedded with the new model
            except ShiTuError as exc:
                log.warning("could not rebuild the sample index: %s", exc)
        self._finish("switched", f"now running {', '.join(ready)} (official)", engine)

    def _finish(self, state: str, reason: str, engine: Engine | None = None) -> None:
        indices: dict[str, bool] = {}
        if engine is not None:
            for name in engine.index_names():
                try:
                    indices[name] = engine.compatible(engine.index(name))
                except ShiTuError:  # a damaged or vanished index is reported by the index views
                    continue
        with self._lock:
            self.state, self.reason, self.indices = state, reason, indices
            self.finished_at = time.time()
            why = list(dict.fromkeys(m["reason"] for m in self.models.values() if m["state"] == "failed"))
        if state == "failed":
            # calm: the starter pack serves; say why once and what would change it
            log.info(
                "official weights: not downloaded (%s); the starter pack keeps serving. Set SHITU_MODEL_MIRROR "
                "to a reachable mirror, or SHITU_OFFLINE=1 to stop trying", "; ".join(why) or reason,
            )  # fmt: skip
        else:
            log.info("official weights: %s (%s)", state, reason)
