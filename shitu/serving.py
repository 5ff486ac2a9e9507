"""The models that serve requests: one :class:`~shitu.runtime.Runtime` at a time, who may use it,
and replacing it without dropping a request.

A request holds the runtime it started with from its start to its end (:meth:`ModelSlot.using`),
even when another one replaces it meanwhile (a switch of recognition model, the official weights
arriving): the replaced runtime is closed when its last request ends. Requests that use or wait
for the models are admitted up to ``SHITU_MAX_WAITING_REQUESTS``, and large galleries are embedded
up to ``SHITU_MAX_GALLERY_JOBS`` at once; past either limit the answer is :class:`~shitu.errors.Busy`
at once, never an ever longer queue.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from shitu.config import Settings
from shitu.errors import Busy
from shitu.runtime import Runtime

GALLERY_JOB_MIN_IMAGES = 32  # a gallery of at least this many images counts as a job (SHITU_MAX_GALLERY_JOBS)


class ModelSlot:
    """The serving runtime, made on first use by ``make`` (or the one given, which is then not
    closed here: tests share one)."""

    def __init__(self, settings: Settings, make: Callable[[], Runtime], runtime: Runtime | None = None):
        self._settings = settings
        self._make = make
        self._runtime = runtime
        self._owns = runtime is None
        self._lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(settings.max_waiting_requests)
        self._depth = threading.local()
        self._gallery_jobs = threading.BoundedSemaphore(settings.max_gallery_jobs)
        self._in_flight: dict[int, int] = {}
        self._retired: dict[int, Runtime] = {}

    @property
    def held(self) -> Runtime | None:
        """The serving runtime if one was made (``None`` before the first use and after :meth:`close`)."""
        return self._runtime

    def current(self) -> Runtime:
        """The serving runtime, made now if there is none yet."""
        if self._runtime is None:
            with self._lock:
                if self._runtime is None:
                    self._runtime = self._make()
        return self._runtime

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """A place among the requests that use or wait for the models, or :class:`Busy` at once: a
        full queue answers "retry in a moment" instead of growing."""
        depth = getattr(self._depth, "n", 0)  # a request's own nested calls count once
        if depth == 0 and not self._admission.acquire(blocking=False):
            limit = self._settings.max_waiting_requests
            raise Busy(f"the models are busy ({limit} requests are being answered); retry in a moment")
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                self._admission.release()

    @contextlib.contextmanager
    def gallery_job(self, images: int) -> Iterator[None]:
        """A place among the large galleries being embedded at once (a build of hundreds of images
        takes minutes and the models' whole attention), or :class:`Busy` at once. Small ones (adding a
        few photos, teaching a box) are not counted."""
        if images < GALLERY_JOB_MIN_IMAGES:
            yield
            return
        if not self._gallery_jobs.acquire(blocking=False):
            jobs = self._settings.max_gallery_jobs
            raise Busy(f"{jobs} galleries are being embedded already; try again when one has finished",
                       retry_after=30)  # fmt: skip
        try:
            yield
        finally:
            self._gallery_jobs.release()

    @contextlib.contextmanager
    def using(self) -> Iterator[Runtime]:
        """The runtime for one request (admitted): the same from its start to its end, even across
        a :meth:`replace`."""
        with self.admitted():
            runtime = self.current()
            with self._lock:
                runtime = self._runtime or runtime
                self._in_flight[id(runtime)] = self._in_flight.get(id(runtime), 0) + 1
            try:
                yield runtime
            finally:
                with self._lock:
                    self._in_flight[id(runtime)] -= 1
                    done = self._in_flight[id(runtime)] == 0 and id(runtime) in self._retired
                    if done:
                        self._retired.pop(id(runtime))
                        del self._in_flight[id(runtime)]
                if done:
                    runtime.close()

    def replace(self, new: Runtime, then: Callable[[], None] = lambda: None) -> None:
        """Serve ``new`` from now on (``then`` runs under the same lock, e.g. to switch the config
        with it); the old runtime is closed now if no request holds it, else when its last one ends."""
        with self._lock:
            old, self._runtime = self._runtime, new
            then()
            close_now = old is not None and self._owns and self._in_flight.get(id(old), 0) == 0
            if old is not None and self._owns and not close_now:
                self._retired[id(old)] = old
            self._owns = True
        if close_now and old is not None:
            old.close()

    def close(self) -> None:
        """Close the serving runtime if this slot made it."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None and self._owns:
            runtime.close()
