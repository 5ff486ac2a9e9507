"""The project's exception types: one for user mistakes, one for unavailable models."""

from __future__ import annotations


class ShiTuError(Exception):
    """A problem with what the user asked for (bad file, unknown id, ...).

    The UI shows it as a toast, the HTTP API as a 4xx envelope (``status``), the CLI as a
    message and a non-zero exit. Nothing was changed when it is raised.
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(ShiTuError):
    """An index, entry or file that does not exist."""

    def __init__(self, message: str):
        super().__init__(message, status=404)


class StarterModelUnavailable(RuntimeError):
    """The offline starter weights could not be fetched or converted (reason in the message)."""
