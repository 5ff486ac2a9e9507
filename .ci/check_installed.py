"""Fail unless every distribution installed in this Python is pinned by the lock file given,
at the same version (pip, setuptools and wheel included when the lock names them)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
BOOTSTRAP = {"pip"}  # the venv's own installer, not the app's


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: str) -> int:
    pinned: dict[str, set[str]] = {}
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        found = LINE.match(line)
        if found:
            pinned.setdefault(canonical(found[1]), set()).add(found[2])
    problems = []
    for dist in distributions():
        name, version = canonical(dist.metadata["Name"]), dist.version
        if name in BOOTSTRAP:
            continue
        if name not in pinned:
            problems.append(f"{name}=={version} is installed but not in {lock}")
        elif version not in pinned[name]:
            problems.append(f"{name}=={version} is installed but {lock} pins {', '.join(sorted(pinned[name]))}")
    for problem in sorted(problems):
        print(problem, file=sys.stderr)
    print(f"{len(list(distributions()))} installed distributions checked against {lock}: "
          f"{'OK' if not problems else f'{len(problems)} not locked'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
