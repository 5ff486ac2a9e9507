"""The layering the code promises (docs/architecture.md), checked on the source itself.

Front ends — the web app and its start-up gate, the HTTP API, the UI (every module of
``shitu/ui/``), the CLI and the PaddleX-compatible Python API — talk to :class:`shitu.engine.Engine`
only: they never import the index, the stores, their backends or the model runtime, never reach
into the engine's private state, and import no private names. Shared helpers live in one place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = ["app.py", "shitu/api.py", "shitu/startup.py", "shitu/__main__.py", "shitu/paddlex_api.py",
              *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "shitu" / "ui").glob("*.py"))]  # fmt: skip
INTERNALS = {"shitu.index", "shitu.stores", "shitu.vectors", "shitu.labels", "shitu.changes", "shitu.transfer",
             "shitu.runtime", "shitu.models", "shitu.matching", "shitu.starter"}  # fmt: skip
ENGINE_PRIVATE = ("store", "pipeline", "runtime")  # public-looking names that would still hand out the engine's parts
# Known leaks, each to be closed by the change that gives the engine the missing operation. An entry that
# is no longer needed fails test_known_leaks_are_still_there: delete it then.
KNOWN_LEAKS: dict[str, set[str]] = {}


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


def _engine_reaches(tree: ast.AST) -> list[str]:
    """Reads of the engine's private state: ``<...>.engine.<attr>`` where the engine is a name or the
    end of an attribute chain (``engine``, ``self.engine``, ``w.engine``, ``app.state.engine``) and
    ``attr`` is private or hands out its parts."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        holder = node.value
        is_engine = (isinstance(holder, ast.Name) and holder.id == "engine") or (
            isinstance(holder, ast.Attribute) and holder.attr == "engine"
        )
        if is_engine and (node.attr.startswith("_") or node.attr in ENGINE_PRIVATE):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _private_imports(tree: ast.AST) -> list[str]:
    """Private names (``_foo``) imported from another module."""
    return [
        f"line {node.lineno}: from {node.module} import {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


@pytest.mark.parametrize("path", FRONT_ENDS)
def test_front_ends_use_only_the_engine(path):
    tree = _tree(path)
    allowed = KNOWN_LEAKS.get(path, set())
    leaked = {m for m in _imports(tree) if any(m == i or m.startswith(i + ".") for i in INTERNALS - allowed)}
    assert not leaked, f"{path} imports engine internals: {sorted(leaked)}"
    reaches = _engine_reaches(tree)
    assert not reaches, f"{path} reaches into the engine: {reaches}"
    private = _private_imports(tree)
    assert not private, f"{path} imports private names: {private}"


@pytest.mark.parametrize("path", sorted(KNOWN_LEAKS))
def test_known_leaks_are_still_there(path):
    imported = _imports(_tree(path))
    for module in KNOWN_LEAKS[path]:
        assert module in imported, f"{path} no longer imports {module}: remove it from KNOWN_LEAKS"


@pytest.mark.parametrize(
    "source, caught",
    [("engine._store", True), ("self.engine._runtime.close()", True), ("w.engine.store.put(key)", True),
     ("request.app.state.engine._rt_lock", True), ("engine.index(name)", False), ("self.engine.models()", False),
     ("self.engines._x", False), ("engine_name._x", False)],
)  # fmt: skip
def test_the_engine_check_catches_attribute_chains(source, caught):
    assert bool(_engine_reaches(ast.parse(source))) is caught


def test_the_private_import_check_catches_private_names():
    assert _private_imports(ast.parse("from shitu.index import GalleryIndex, _Labels")) == [
        "line 1: from shitu.index import _Labels"
    ]
    assert not _private_imports(ast.parse("from shitu.ui.events import Wiring\nfrom x import __version__"))


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
