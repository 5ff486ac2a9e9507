"""Who may change indices: one policy for the HTTP API and the web UI.

* With ``SHITU_API_TOKEN`` set, changes (build, add, remove, relabel, rename, delete, import,
  export, model switch) need the token: a bearer header on the API, a sign-in in the UI.
  Recognising images never does.
* Without a token, changes are open on a private server (bound to loopback) and **refused** on
  a public one (bound to another address, or running as a Hugging Face Space): a stranger must
  never be one click away from deleting a gallery. ``SHITU_READ_ONLY`` overrides the guess.
* Failed sign-ins are rate-limited per client address.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from shitu.errors import Forbidden, RateLimited, Unauthorized

MAX_FAILURES = 5  # failed sign-ins per client address ...
FAILURE_WINDOW = 300.0  # ... within this many seconds, then a lock-out of the same length


def is_public_host(host: str | None) -> bool:
    """Whether a server bound to ``host`` is reachable from other machines."""
    if os.environ.get("SPACE_ID"):  # Hugging Face Spaces: public by construction
        return True
    return (host or "127.0.0.1") not in ("127.0.0.1", "localhost", "::1")


@dataclass
class AccessPolicy:
    """``token``: the shared secret (None: no sign-in possible); ``restricted``: changes need
    the token — or, without a token, are refused to everyone."""

    token: str | None
    restricted: bool
    _failures: dict[str, deque[float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def for_server(cls, token: str | None, read_only: bool | None, host: str | None) -> "AccessPolicy":
        if read_only is None:
            read_only = bool(token) or is_public_host(host)
        return cls(token=token or None, restricted=bool(read_only) or bool(token))

    @property
    def open(self) -> bool:
        """Anyone may change indices (a private server without a token)."""
        return not self.restricted

    def describe(self) -> str:
        if self.open:
            return "open: anyone who reaches this server may change indices"
        if self.token:
            return "changes need the access token (SHITU_API_TOKEN)"
        return "read-only: set SHITU_API_TOKEN to allow changes"

    def check(self, given: str | None, client: str = "?") -> None:
        """Allow a change, or raise: :class:`Forbidden` when no token exists, :class:`Unauthorized`
        for a missing or wrong one, :class:`RateLimited` after too many wrong ones."""
        if self.open:
            return
        if not self.token:
            raise Forbidden("this server is read-only; its operator can allow changes by setting SHITU_API_TOKEN")
        self._throttle(client)
        if given and hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8")):
            return
        if given:
            self._fail(client)
        raise Unauthorized("changing indices needs the access token (sign in, or send 'Authorization: Bearer ...')")

    def sign_in(self, given: str, client: str = "?") -> None:
        """Check a password typed into the UI (same rules and limits as :meth:`check`)."""
        if self.open:
            return
        if not self.token:
            raise Forbidden("this server is read-only: there is nothing to sign in to")
        self._throttle(client)
        if not given or not hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8")):
            self._fail(client)
            raise Unauthorized("wrong access token")

    def _throttle(self, client: str) -> None:
        with self._lock:
            recent = self._failures.get(client)
            now = time.monotonic()
            while recent and now - recent[0] > FAILURE_WINDOW:
                recent.popleft()
            if recent is not None and len(recent) >= MAX_FAILURES:
                wait = int(FAILURE_WINDOW - (now - recent[0])) + 1
                raise RateLimited(f"too many failed sign-ins from this address; try again in {wait} s")

    def _fail(self, client: str) -> None:
        with self._lock:
            self._failures.setdefault(client, deque()).append(time.monotonic())
