"""The layering the code promises (docs/architecture.md), checked on the source itself.

Which module may import which is import-linter's job (``[tool.importlinter]`` in pyproject.toml: the
layers, front ends reaching the models and stores only through the engine, no cycles); the test
here runs it, so README's test command checks it too. What an import graph cannot show is checked
on the syntax trees: front ends never reach into the engine's private state, no module imports
another's private names, and shared helpers live in one place.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_ENDS = ["app.py", "shitu/api.py", "shitu/schemas.py", "shitu/startup.py", "shitu/__main__.py",
              "shitu/paddlex_api.py",
              *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "shitu" / "ui").glob("*.py"))]  # fmt: skip
MODULES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "shitu").glob("**/*.py"))
ENGINE_PRIVATE = ("store", "pipeline", "runtime")  # public-looking names that would still hand out the engine's parts
# engine methods that hand out an index object: for the engine's own callers, the tests and the Python API (whose
# IndexData holds an index, as PaddleX's does); the UI, the HTTP API and the CLI read shitu.views instead
INDEX_OBJECTS = ("index", "locate", "rec_threshold_for", "compatible")
READ_MODEL_FRONT_ENDS = [p for p in FRONT_ENDS if p != "shitu/paddlex_api.py"]


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


def _engine_reaches(tree: ast.AST, names: tuple[str, ...] = ENGINE_PRIVATE) -> list[str]:
    """Reads of the engine's private state: ``<...>.engine.<attr>`` where the engine is a name or the
    end of an attribute chain (``engine``, ``self.engine``, ``w.engine``, ``app.state.engine``) and
    ``attr`` is private or one of ``names``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        holder = node.value
        is_engine = (isinstance(holder, ast.Name) and holder.id == "engine") or (
            isinstance(holder, ast.Attribute) and holder.attr == "engine"
        )
        if is_engine and (node.attr.startswith("_") or node.attr in names):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _private_imports(tree: ast.AST) -> list[str]:
    """Private names (``_foo``) imported from another module of ours (a library's own private
    module, such as Paddle's ``_C_ops`` that the starter detector's export needs, is its business)."""
    return [
        f"line {node.lineno}: from {node.module} import {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("shitu", "")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_the_import_contracts_hold():
    """import-linter over the whole package (``lint-imports``, as CI runs it)."""
    linter = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if linter is None:
        pytest.skip("import-linter is not installed (requirements-dev.txt)")
    done = subprocess.run([linter, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("path", FRONT_ENDS)
def test_front_ends_never_reach_into_the_engine(path):
    reaches = _engine_reaches(_tree(path))
    assert not reaches, f"{path} reaches into the engine: {reaches}"


@pytest.mark.parametrize("path", READ_MODEL_FRONT_ENDS)
def test_front_ends_read_indices_through_read_models(path):
    """No index object, store or threshold rule in the UI, the HTTP API or the CLI: they ask the
    engine (info, entries, lookup, calibration, versions, ...) and get frozen read models back."""
    tree = _tree(path)
    objects = _engine_reaches(tree, INDEX_OBJECTS)
    galleries = [f"line {n.lineno}: {ast.unparse(n)}" for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and n.attr == "gallery"]  # a ChangeReport's index  # fmt: skip
    assert not objects + galleries, f"{path} handles index objects: {objects + galleries}"


@pytest.mark.parametrize("path", MODULES)
def test_no_module_imports_another_modules_private_names(path):
    private = _private_imports(_tree(path))
    assert not private, f"{path} imports private names: {private}"


@pytest.mark.parametrize(
    "source, caught",
    [("engine._store", True), ("self.engine._runtime.close()", True), ("w.engine.store.put(key)", True),
     ("request.app.state.engine._rt_lock", True), ("engine.index(name)", False), ("self.engine.models()", False),
     ("self.engines._x", False), ("engine_name._x", False)],
)  # fmt: skip
def test_the_engine_check_catches_attribute_chains(source, caught):
    assert bool(_engine_reaches(ast.parse(source))) is caught
    if source == "engine.index(name)":
        assert _engine_reaches(ast.parse(source), INDEX_OBJECTS)  # what the read-model check refuses


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
