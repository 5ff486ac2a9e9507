"""Smoke test of the benchmark scripts on tiny inputs: they run and write the report.

No timing is asserted (timings depend on the machine); only that every section runs end to
end on the generated sample photos and 2k synthetic vectors and that the report and plots
are written. Does not need ../shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import MODEL_CACHE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_run_tiny_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    env = {**os.environ, "SHITU_MODEL_DIR": str(MODEL_CACHE), "SHITU_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--out", str(out), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    for heading in ("## 1. Query latency", "## 2. Gallery build", "## 3. Index scale", "## 4. HTTP",
                    "## 5. Recognition quality", "## 6. Start-up", "## Goals"):  # fmt: skip
        assert heading in text
    assert "max abs diff" in text and "models on cpu (" in text
    for png in ("query_stages.png", "build_throughput.png", "index_recall_latency.png", "http_concurrency.png"):
        assert (tmp_path / "benchmarks" / png).stat().st_size > 1000


@pytest.mark.slow
def test_bench_helpers_on_synthetic_vectors() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import run

    x, q = run.clustered(2_000, 64, 20)
    assert x.shape == (2_000, 64) and q.shape == (20, 64)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    labels = np.array([str(i // 10) for i in range(len(x))])
    quality = run.recall_through_index(x, labels)
    assert 0 <= quality["fold5"] <= 1 and 0 <= quality["loo"] <= 1 and quality["n"] == 2_000
    plan = run.make_plan("tiny")
    plan.index_queries = 10
    rows = run.bench_index(plan, 2_000, dim=64)
    assert {r["index"] for r in rows} == {"Flat", "IVF", "HNSW32"}
    assert next(r for r in rows if r["index"] == "Flat")["recall"] == 1.0


@pytest.mark.slow
def test_bench_scale_tiny_measures_every_goal(tmp_path: Path) -> None:
    """bench/scale.py end to end on 3,000 vectors: every measure of issue #12 is there, and the
    table compares two runs."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "3000", "--types", "Flat", "IVF",
         "--changes", "3", "--queries", "20", "--work", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    assert [r["index_type"] for r in rows] == ["Flat", "IVF"]
    for r in rows:
        assert {"add_p50_ms", "remove_p50_ms", "load_s", "rss_ratio", "query_p50_ms", "recall_at_1"} <= r.keys()
        assert r["recall_at_1"] >= 0.9 and r["load_s"] > 0
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--table", str(out), str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    assert table.count("| 3,000 |") >= 12 and "recall@1 against exact search" in table


@pytest.mark.slow
def test_bench_scale_runs_both_stores_side_by_side(tmp_path: Path) -> None:
    """--backend faiss milvus: the same protocol on the file store and on Milvus Lite, one
    after the other, and --compare prints them side by side."""
    pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")
    out = tmp_path / "both.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--backend", "faiss", "milvus", "--sizes", "2000",
         "--types", "Flat", "--changes", "2", "--queries", "10", "--work", str(tmp_path), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["faiss", "milvus"]
    assert all(r["recall_at_1"] == 1.0 and r["add_p50_ms"] > 0 for r in rows)
    table = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--compare", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "| faiss (files) | Milvus Lite |" in table and table.count("| 2,000 | Flat |") >= 8


@pytest.mark.slow
def test_bench_map_methods_tiny_measures_the_report_map() -> None:
    """bench/map_methods.py on a small synthetic gallery: the report's own map is timed, found
    deterministic, and its quality numbers are in range."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "map_methods.py"), "--synthetic", "300", "--grow", "0",
         "--methods", "tsne_2d"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if "shitu.report.tsne_2d" in line)
    *_, again, label_knn, space, trust, kept, _load = row.split()
    assert again == "same"
    assert all(0 <= float(v) <= 1 for v in (label_knn, space, trust, kept)) and float(trust) > 0.9
