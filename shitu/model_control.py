"""Which models serve an :class:`~shitu.engine.Engine`, and switching them.

:class:`ModelControl` is the model half of the engine (a mixin: the engine is the one object front
ends hold): the runtime of each request (:class:`~shitu.serving.ModelSlot`), what is active and why,
the recognition-model switch, the ``use_hpip`` switch and the official weights fetched in the
background (:mod:`shitu.background`). A switch loads the new runtime first and changes nothing if
that fails; requests in flight finish on the runtime they started with.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from shitu.config import REC_MODEL_FACTS, REC_MODELS, PipelineConfig, Settings
from shitu.errors import ShiTuError, Unavailable
from shitu.runtime import Runtime
from shitu.serving import ModelSlot


class ModelControl:
    """The models of an engine. Expects ``settings``, ``config``, ``_slot``, ``_device`` and
    ``_isolate`` set by the engine's constructor."""

    settings: Settings
    config: PipelineConfig
    _slot: ModelSlot
    _device: str | None
    _isolate: bool | None

    def _new_runtime(self) -> Runtime:
        return Runtime(self.config, self.settings, device=self._device, isolate=self._isolate)

    @property
    def _runtime(self) -> Runtime | None:
        """The serving runtime, if one was made yet."""
        return self._slot.held

    def _current_runtime(self) -> Runtime:
        return self._slot.current()

    def _gallery_job(self, images: int) -> contextlib.AbstractContextManager[None]:
        return self._slot.gallery_job(images)

    def _models(self) -> contextlib.AbstractContextManager[Runtime]:
        """The runtime for one request: the same from its start to its end, even across a switch."""
        return self._slot.using()

    def models(self) -> dict[str, Any]:
        """Which models are active and why."""
        return self._current_runtime().models

    def prepare_models(self) -> None:
        """Load the predictors now (otherwise on first use)."""
        with self._models() as runtime:
            runtime.load()

    def expect_gallery(self, images: int) -> bool:
        """A gallery of ``images`` is on its way (e.g. uploading): when it is large enough to be
        embedded by worker processes of its own (``SHITU_BUILD_WORKERS``), start them now in the
        background so the build finds them up. ``True`` when they start or run already."""
        with self._models() as runtime:
            return runtime.start_gallery_lanes(images)

    @property
    def feature_model(self) -> str:
        return self._current_runtime().feature_model

    def recognition_models(self) -> list[dict[str, Any]]:
        """The three official recognisers with PaddleX's published size, accuracy and speed, and
        whether each is active or can be switched to here (its weights cached, mirrored or
        downloadable; otherwise only the starter pack can stand in)."""
        active = self.models()["recognition"]
        return [
            {
                "name": name,
                **REC_MODEL_FACTS[name],
                "active": active["model_name"] == name and active["source"] != "starter",
            }  # fmt: skip
            for name in REC_MODELS
        ]

    def switch_recognition_model(self, model_name: str) -> dict[str, Any]:
        """Use another recognition model. The new one is loaded first; if it is not available,
        nothing changes. Requests in flight finish on the old one, which is then closed."""
        if model_name not in REC_MODELS:
            raise ShiTuError(f"unknown recognition model {model_name!r}; choose one of {', '.join(REC_MODELS)}")
        current = self._current_runtime()
        config = PipelineConfig.from_dict(self.config.to_dict())
        config.recognition.model_name = model_name
        config.recognition.model_dir = None
        new = Runtime(config, self.settings, device=current.device, isolate=current.isolated)
        if new.recognition.source == "starter" and model_name != "PP-ShiTuV2_rec":
            new.close()
            raise Unavailable(f"{model_name} is not available here: {new.recognition.reason}")
        return self._serve(new, config, self.settings)

    def use_high_performance(self, enabled: bool) -> dict[str, Any]:
        """Switch PaddleX's high-performance inference (``use_hpip``, :mod:`shitu.hpi`) on or off for
        both models, over the YAML and ``SHITU_USE_HPIP``. The new runtime is loaded (and on, each
        model converted and verified) before it serves; if loading fails nothing changes, and a model
        the fast engine cannot run stays on Paddle with the reason (``models()[stage]["engine"]``)."""
        current = self._current_runtime()
        config = PipelineConfig.from_dict(self.config.to_dict())
        config.use_hpip = bool(enabled)
        config.detection.use_hpip = config.recognition.use_hpip = None  # the pipeline-wide switch decides
        settings = self.settings.model_copy(update={"use_hpip": bool(enabled)})
        return self._serve(Runtime(config, settings, device=current.device, isolate=current.isolated), config, settings)

    def _serve(self, new: Runtime, config: PipelineConfig, settings: Settings) -> dict[str, Any]:
        """Load ``new`` and serve with it (and its config and settings) from now on; if it does not
        load, it is closed and nothing changes. Requests in flight finish on the old runtime."""
        try:
            new.load()
        except Exception:
            new.close()
            raise

        def switch_config() -> None:
            self.config, self.settings = config, settings

        self._slot.replace(new, then=switch_config)
        return new.models

    # --- official weights in the background (shitu.background) ---------------------------------
    _official_downloads: Any = None  # an OfficialDownloads, created on first use
    _official_guard = threading.Lock()

    def _downloads(self) -> Any:
        from shitu.background import OfficialDownloads

        with ModelControl._official_guard:
            if self._official_downloads is None:
                self._official_downloads = OfficialDownloads()
            return self._official_downloads

    def prepare_official_in_background(self, *, switch: bool = True, rebuild_sample: bool = True) -> bool:
        """Download the official weights the config names (for each stage now on the starter pack)
        on a thread while the current models serve, then switch to them (requests in flight
        finish on the old ones) and rebuild the sample index. ``False`` when nothing is missing,
        the hub may not be tried (``SHITU_OFFLINE``), or a preparation is already running."""
        return self._downloads().start(self, switch=switch, rebuild_sample=rebuild_sample)

    def model_download_status(self) -> dict[str, Any]:
        """The background preparation: ``state`` (idle, downloading, switching, switched, ready,
        failed, nothing to do), ``reason``, per model ``{stage, state, done, total, reason}`` (bytes)
        and, once switched, per stored index whether its vectors came from the active model."""
        return self._downloads().status()

    def wait_for_model_downloads(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the background preparation; ``True`` if it ended."""
        return self._downloads().wait(timeout)
