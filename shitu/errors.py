"""The project's exceptions: one family, one subclass per kind of problem.

Nothing here knows about HTTP. Each front end maps the kinds once: ``api.py`` to a status code
in PaddleX's error envelope, the UI to a toast, the CLI to a message and an exit code. When a
:class:`ShiTuError` is raised, nothing was changed.
"""

from __future__ import annotations


class ShiTuError(Exception):
    """A problem with what the caller asked for (bad file, bad argument, ...): fix the input.
    ``retry_after``: seconds after which the same request may succeed (``None``: it will not)."""

    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class NotFound(ShiTuError):
    """An index, entry or file that does not exist."""


class Conflict(ShiTuError):
    """The request clashes with what exists: a name that is taken, an index built by another model."""


class TooLarge(ShiTuError):
    """A body, file, image or archive over a configured limit."""


class Forbidden(ShiTuError):
    """Not allowed for anyone: e.g. an image URL that points into a private network."""


class Unauthorized(ShiTuError):
    """Allowed only after signing in (a token or password was missing or wrong)."""


class RateLimited(ShiTuError):
    """Too many attempts; try again later."""


class FetchTimeout(ShiTuError):
    """A remote image did not arrive in time."""


class Unavailable(ShiTuError):
    """The service cannot do it right now (models missing, busy, a worker restarting): try again."""

    retry_after = 2.0


class Busy(Unavailable):
    """Too many requests wait for the models already: this one is turned away at once, not queued."""


class ModelCrashed(Unavailable):
    """A model died natively (e.g. a segfault in its worker process) on this request.

    ``stage`` names the model that failed (``"detection"``, ``"recognition"``); the worker is
    restarted, so the next request is served normally.
    """

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


class DamagedIndex(ShiTuError):
    """An index on disk cannot be read; it has been set aside and the others keep working."""


class StarterModelUnavailable(RuntimeError):
    """The offline starter weights could not be fetched or converted (reason in the message)."""
