"""The layering the code promises (docs/architecture.md), checked on the source itself.

Front ends — the web app, the HTTP API, the UI, the CLI and the PaddleX-compatible Python API —
talk to :class:`shitu.engine.Engine` only: they never import the index, the store or the model
runtime, and never reach into the engine's private state. Shared helpers live in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = ["app.py", "shitu/api.py", "shitu/__main__.py", "shitu/paddlex_api.py",
              *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "shitu" / "ui").glob("*.py"))]  # fmt: skip
INTERNALS = {"shitu.index", "shitu.store", "shitu.milvus_store", "shitu.runtime", "shitu.models", "shitu.matching",
             "shitu.starter"}  # fmt: skip


def _tree(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"))


def _imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("path", FRONT_ENDS)
def test_front_ends_use_only_the_engine(path):
    tree = _tree(path)
    leaked = {m for m in _imports(tree) if any(m == i or m.startswith(i + ".") for i in INTERNALS)}
    assert not leaked, f"{path} imports engine internals: {sorted(leaked)}"
    private = [
        f"line {node.lineno}: engine.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("engine", "self.engine")
        and (node.attr.startswith("_") or node.attr in ("store", "pipeline", "runtime"))
    ]
    assert not private, f"{path} reaches into the engine: {private}"


def test_each_shared_helper_is_defined_once():
    """sha256, atomic replace, IoU and id parsing each have one home (they existed 2-3 times)."""
    homes = {"sha256": "shitu/fsutil.py", "replace_dir": "shitu/fsutil.py", "iou": "shitu/geometry.py",
             "parse_id": "shitu/ids.py", "write_atomic": "shitu/fsutil.py"}  # fmt: skip
    offenders = []
    for path in sorted(ROOT.glob("shitu/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for word, home in homes.items():
                    if word in node.name.lower() and rel != home:
                        offenders.append(f"{rel}:{node.lineno} {node.name} (belongs in {home})")
    assert not offenders, offenders
